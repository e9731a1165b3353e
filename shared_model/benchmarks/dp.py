"""DP-SGD step benchmark: the DP step of every per-example-gradient mode against the non-DP step.

``promptsam bench dp`` builds one model and one batch (random images, box masks), and times, with
:func:`shared_model.benchmarks.timing.interleaved`, an ordinary step (forward + backward + AdamW)
and a DP-SGD step per mode of :data:`shared_model.config.GRAD_SAMPLE_MODES` (per-example gradients
by :func:`shared_model.training.privacy.per_example_gradients`, then Opacus' clipping, noise and
AdamW), one after another within every repeat.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from shared_model.benchmarks.timing import NO_DIFFERENCE, interleaved, paired_ratio, ratio_text, verdict
from shared_model.config import GRAD_SAMPLE_MODES, get_preset
from shared_model.config.privacy import DP_BENCH_MODES
from shared_model.modeling.prompt_sam import build_model
from shared_model.training.loop import resolve_device
from shared_model.training.opacus_compat import DPOptimizer
from shared_model.training.privacy import per_example_gradients


def bench_dp_step(
    preset: str = "tiny",
    batch_size: int = 8,
    steps: int = 5,
    device: str = "cpu",
    warmup: int = 1,
    modes: Sequence[str] = DP_BENCH_MODES,
) -> dict[str, Any]:
    """Time a DP-SGD step per mode against the non-DP step on the same batch, interleaved.

    Returns:
        ``{"preset", "batch_size", "steps", "warmup", "device", "threads", "modes", "non_dp_s",
        "dp_<mode>_s"}`` (median wall seconds per step); ``"seconds"`` and ``"cpu_seconds"``:
        way -> spread (``non_dp``, ``dp_<mode>``); ``"ratio_<mode>"`` (DP / non-DP wall time,
        paired by repeat: median, min, max, quartiles and ``verdict`` "slower", "faster" or "no
        measurable difference") and the same from process CPU time as ``"ratio_<mode>_cpu"``.

    Raises:
        ValueError: On ``steps < 1``, ``warmup < 0`` or an unknown mode (names the flag).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench dp: --steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    unknown = [m for m in modes if m not in GRAD_SAMPLE_MODES]
    if unknown or not modes:
        raise ValueError(f"bench dp: --modes {list(modes)}: expected some of {list(GRAD_SAMPLE_MODES)}")
    cfg = get_preset(preset)
    cfg.loss.nce = 0.0  # DP refuses DHN-NCE; the ordinary step uses the same loss
    dev = resolve_device(device)
    model = build_model(cfg).to(dev).train()
    s = cfg.sam.image_size
    images = torch.rand(batch_size, 3, s, s, generator=torch.Generator().manual_seed(0)).to(dev)
    masks = torch.zeros(batch_size, 1, s, s, device=dev)
    masks[:, :, s // 4 : 3 * s // 4, s // 3 : 2 * s // 3] = 1.0
    texts = ["one small pink round polyp"] * batch_size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size)

    def plain() -> None:
        loss, _ = model.compute_losses(model(images, texts), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def private(mode: str):
        def step() -> None:
            grads, _ = per_example_gradients(model, images, masks, texts, mode)
            for p, g in zip(params, grads.values()):
                p.grad_sample = g
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)

        return step

    ways = {"non_dp": plain, **{f"dp_{mode}": private(mode) for mode in modes}}
    times = interleaved(ways, warmup, steps, sync=torch.cuda.synchronize if dev.type == "cuda" else None)
    result: dict[str, Any] = {
        "preset": preset, "batch_size": batch_size, "steps": steps, "warmup": warmup, "device": str(dev),
        "threads": torch.get_num_threads(), "modes": list(modes), "interleaved": True,
        **{f"{way}_s": t["wall"]["median"] for way, t in times.items()},
        "seconds": {way: t["wall"] for way, t in times.items()},
        "cpu_seconds": {way: t["cpu"] for way, t in times.items()},
    }
    for mode in modes:
        for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
            r = paired_ratio(times[f"dp_{mode}"][clock]["all"], times["non_dp"][clock]["all"])
            result[f"ratio_{mode}{suffix}"] = {**r, "verdict": verdict(r, above="slower", below="faster")}
    return result


def format_bench(result: Mapping[str, Any]) -> str:
    """One readable line per timing of :func:`bench_dp_step`."""
    lines = [f"DP-SGD step vs non-DP step ({result['preset']}, batch {result['batch_size']}, {result['device']}, "
             f"{result['threads']} thread(s), median of {result['steps']} interleaved repeats after "
             f"{result['warmup']} warm-up):",
             f"  non-DP {' ' * 12}{result['non_dp_s']:.3f} s"]
    for mode in result["modes"]:
        r = result[f"ratio_{mode}"]
        says = "" if r["verdict"] == NO_DIFFERENCE else f", {r['verdict']}"
        lines.append(f"  DP {mode:<15} {result[f'dp_{mode}_s']:.3f} s  DP / non-DP {ratio_text(r)}{says}")
    return "\n".join(lines)
