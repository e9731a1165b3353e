"""Attention benchmark: SAM's image encoder with each attention implementation, interleaved.

``promptsam bench attention`` times forward + backward of the preset's image encoder (frozen
weights, gradient to the input, as LoRA training needs it through every block) with
segment-anything's own ``Attention`` (``sam``) and this project's ``eager`` and ``sdpa``
implementations (:mod:`shared_model.modeling.sam_attention`), same weights, same batch. The
measurement behind ``sam.attention: auto``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch

from shared_model.benchmarks.timing import interleaved, paired_ratio, verdict
from shared_model.config import get_preset, merge
from shared_model.modeling.sam import SamParts

IMPLS = ("sam", "eager", "sdpa")


def bench_attention(
    preset: str = "tiny",
    sizes: Sequence[int] = (128, 256, 512),
    batches: Sequence[int] = (8, 4, 2),
    warmup: int = 1,
    repeats: int = 5,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Encoder forward + backward per attention implementation, at each (size, batch) pair.

    Returns:
        One dict per size: ``{"image_size", "batch_size", "device", "seconds": {impl: {"wall",
        "cpu"}}, "vs_sam": {impl: paired wall-time ratio sam / impl (> 1: faster), with
        "verdict"}, "max_abs_diff": {impl: largest output difference from sam's}}``.

    Raises:
        ValueError: If ``sizes`` and ``batches`` differ in length (names the flags).
    """
    if len(sizes) != len(batches):
        raise ValueError(f"--image-size and --batch: give as many batches as sizes (got {list(sizes)}, "
                         f"{list(batches)})")
    dev = torch.device(device)
    results = []
    for size, batch in zip(sizes, batches):
        cfg = merge(get_preset(preset), {"sam": {"image_size": size}}).sam
        torch.manual_seed(0)
        encoders = {}
        for impl in IMPLS:
            parts = SamParts(replace(cfg, attention=impl))
            if encoders:
                parts.load_state_dict(encoders["sam"].state_dict(), strict=True)
            else:  # SAM initialises the rel-pos tables to zero: give them values, so they count
                with torch.no_grad():
                    for name, p in parts.named_parameters():
                        if "rel_pos" in name:
                            p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
            encoders[impl] = parts.to(dev).requires_grad_(False)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dev)
        with torch.no_grad():
            outs = {impl: p.image_encoder(x) for impl, p in encoders.items()}
        x.requires_grad_(True)

        def step(parts: SamParts):
            return lambda: parts.image_encoder(x).square().mean().backward()

        sync = torch.cuda.synchronize if dev.type == "cuda" else None
        times = interleaved({impl: step(p) for impl, p in encoders.items()}, warmup, repeats, sync=sync)
        vs = {}
        for impl in IMPLS[1:]:
            r = paired_ratio(times["sam"]["wall"]["all"], times[impl]["wall"]["all"])
            vs[impl] = {**r, "verdict": verdict(r)}
        results.append({
            "image_size": size, "batch_size": batch, "device": str(dev), "threads": torch.get_num_threads(),
            "warmup": warmup, "repeats": repeats,
            "seconds": times, "vs_sam": vs,
            "max_abs_diff": {impl: float((o - outs["sam"]).abs().max()) for impl, o in outs.items()},
        })
    return results

