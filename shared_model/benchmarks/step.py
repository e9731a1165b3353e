"""Training-step benchmark: this project's SAM path and full pipeline against the plain SAMed recipe.

The plain recipe (REFERENCE.md): LoRA rank 4 on every ``qkv`` of SAM's image encoder, prompt encoder
and whole mask decoder trainable, segment-anything's attention, the mask decoder run once per image
(its ``MaskDecoder.forward``), Dice + BCE, ``torch.optim.AdamW``. Both are built in the same process
and timed on the same batch; FLOPs are counted with ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from shared_model.modeling import losses as L
from shared_model.benchmarks.record import ratio_range, spread
from shared_model.config import ModelConfig, SamConfig, get_preset, merge
from shared_model.modeling.prompt_sam import build_model
from shared_model.modeling.sam import SamParts, build_sam_parts


def plain_recipe(cfg: SamConfig, adapters: bool = True) -> SamParts:
    """SAM as the plain SAMed recipe trains it (original attention, whole decoder trainable).

    With ``adapters=False`` the weights are loaded (``cfg.checkpoint``) but no LoRA is added yet;
    call :func:`adapt_plain` after copying them elsewhere.
    """
    parts = build_sam_parts(replace(cfg, attention="sam", decoder_mode="train", lora_rank=4, lora_alpha=4.0,
                                    lora_targets=["qkv"], lora_blocks=[]), adapters=False)
    return adapt_plain(parts) if adapters else parts


def adapt_plain(parts: SamParts) -> SamParts:
    """Add the plain recipe's adapters: LoRA on every ``qkv``, prompt encoder and decoder trainable."""
    parts.add_adapters()
    parts.prompt_encoder.requires_grad_(True)
    parts.mask_decoder.requires_grad_(True)
    return parts


def copy_adapters(src: SamParts, dst: SamParts) -> None:
    """Copy every LoRA tensor of ``src`` into ``dst``, strictly.

    Adapters only ``dst`` has (e.g. its decoder LoRA) keep their initialisation: LoRA's B starts
    at zero, so they do not change what ``dst`` computes.

    Raises:
        ValueError: If a LoRA tensor of ``src`` is missing from ``dst`` or has another shape (names them).
    """
    mine = dst.state_dict()
    theirs = {k: v for k, v in src.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    missing = sorted(k for k in theirs if k not in mine)
    mismatched = sorted(f"{k} {tuple(v.shape)} vs {tuple(mine[k].shape)}" for k, v in theirs.items()
                        if k in mine and v.shape != mine[k].shape)
    if missing or mismatched:
        raise ValueError(f"copy_adapters: LoRA tensors missing from the target {missing[:5]} ({len(missing)}), "
                         f"shape-mismatched {mismatched[:5]} ({len(mismatched)})")
    dst.load_state_dict({**mine, **theirs}, strict=True)


def paired_sam_paths(cfg: SamConfig, plain_cfg: SamConfig | None = None) -> tuple[SamParts, SamParts]:
    """The plain recipe and this project's SAM path (``build_sam_parts(cfg)``) with the same weights.

    Every base weight is copied with a strict ``load_state_dict`` before either model gets its
    adapters (peft renames the adapted layers' weights to ``...base_layer...``), then the plain
    recipe's LoRA tensors are copied with :func:`copy_adapters`: both compute the same function.

    Args:
        cfg: This project's SAM configuration.
        plain_cfg: The plain recipe's base configuration (default ``cfg``); its attention,
            adapters and decoder mode are the recipe's own.

    Returns:
        ``(plain, ours)``.
    """
    plain = plain_recipe(plain_cfg or cfg, adapters=False)
    ours = SamParts(cfg)
    ours.load_state_dict(plain.state_dict(), strict=True)
    ours.add_adapters()
    adapt_plain(plain)
    copy_adapters(plain, ours)
    return plain, ours


def plain_forward(parts: SamParts, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Encoder on the batch, then prompt encoder + mask decoder per image (segment-anything's own).

    Args:
        images: B x 3 x S x S in [0, 1]. boxes: B x 1 x 4.

    Returns:
        B x 1 x S x S mask logits.
    """
    emb = parts.encode(images)
    pe = parts.prompt_encoder
    masks = []
    for i in range(images.shape[0]):
        sparse, dense = pe(points=None, boxes=boxes[i], masks=None)
        low, _ = parts.mask_decoder(
            image_embeddings=emb[i : i + 1],
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        masks.append(low)
    return parts.upscale(torch.cat(masks), images.shape[-2:])


def sam_path_forward(parts: SamParts, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """This project's SAM path: batched prompt encoding and mask decoding."""
    emb = parts.encode(images)
    sparse = parts.embed_prompts(boxes)
    low, _ = parts.decode(emb, sparse, parts.no_mask_dense(images.shape[0]))
    return parts.upscale(low, images.shape[-2:])


def _timed_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device
                 ) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of each of ``steps`` timed steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return wall, cpu


def _measure(name: str, module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], fused: bool,
             steps: int, warmup: int, device: torch.device, batch: int) -> dict:
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused and device.type == "cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = _timed_steps(step, steps, warmup, device)
    seconds = spread(times)["median"]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "name": name,
        "images_per_s": batch / seconds,
        "step_ms": seconds * 1000,
        "step_seconds": spread(times),
        "step_cpu_seconds": spread(cpu_times),
        "peak_gpu_gib": peak,
        "gflop_per_step": flops / 1e9,
        "achieved_tflops": flops / seconds / 1e12,
        "trainable_params": sum(p.numel() for p in params),
    }


def bench_step(
    preset: str = "tiny",
    image_size: int | None = None,
    batch_size: int = 4,
    steps: int = 5,
    warmup: int = 2,
    device: str = "auto",
    compile_encoder: bool = False,
    amp: bool = True,
    seed: int = 0,
    activation_checkpointing: bool = False,
) -> dict:
    """Time one local training step three ways on the same batch.

    Each way runs one untimed step that counts FLOPs, ``warmup`` untimed steps, then ``steps``
    timed repeats; ``images_per_s`` and ``step_ms`` are from their median wall time. Each repeat's
    process CPU time is recorded too: on a shared, loaded CPU it varies less than wall time (it
    does not count waiting for a core), so it compares the ways' work where wall time cannot.

    Returns:
        JSON-able dict: environment, ``plain`` (SAMed recipe), ``sam_path`` (ours, SAM only),
        ``full`` (BiomedCLIP + M2IB + CRF + SAM), each with ``step_seconds`` (median, min, max of
        the repeats); the ratios ``sam_path_vs_plain`` and ``full_vs_sam_path`` (images/s, from
        the medians) with ``*_range`` (the lowest and highest the repeats allow), the same from
        CPU time as ``*_cpu`` and ``*_cpu_range``; and
        ``max_abs_diff_sam_paths`` of the two SAM paths' logits (same weights, see
        :func:`paired_sam_paths`).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench step: --steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    cfg: ModelConfig = get_preset(preset)
    if image_size is not None:
        cfg = merge(cfg, {"sam": {"image_size": image_size}})
    # This project's paths only; the plain recipe stays as published.
    cfg = merge(cfg, {"sam": {"activation_checkpointing": activation_checkpointing}})
    s = cfg.sam.image_size
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, s, s, generator=g).to(dev)
    masks = torch.zeros(batch_size, 1, s, s, device=dev)
    masks[:, :, s // 4 : 3 * s // 4, s // 3 : 2 * s // 3] = 1
    boxes = torch.tensor([[[s / 3, s / 4, 2 * s / 3, 3 * s / 4]]], device=dev).repeat(batch_size, 1, 1)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda")

    torch.manual_seed(seed)
    plain, ours = paired_sam_paths(cfg.sam, replace(cfg.sam, activation_checkpointing=False))
    plain, ours = plain.to(dev), ours.to(dev)
    with torch.no_grad(), autocast:
        diff = (plain_forward(plain, images, boxes).float() - sam_path_forward(ours, images, boxes).float()).abs().max()
    if compile_encoder:
        ours.image_encoder = torch.compile(ours.image_encoder)

    def seg_loss(logits: torch.Tensor) -> torch.Tensor:
        return L.dice_loss(logits.float(), masks) + L.bce_loss(logits.float(), masks)

    def plain_loss() -> torch.Tensor:
        with autocast:
            return seg_loss(plain_forward(plain, images, boxes))

    def ours_loss() -> torch.Tensor:
        with autocast:
            return seg_loss(sam_path_forward(ours, images, boxes))

    results = {
        "preset": preset,
        "image_size": s,
        "batch_size": batch_size,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "bf16_autocast": bool(amp and dev.type == "cuda"),
        "compiled_encoder": compile_encoder,
        "activation_checkpointing": activation_checkpointing,
        "max_abs_diff_sam_paths": float(diff),
        "warmup": warmup,
        "repeats": steps,
    }
    results["plain"] = _measure("plain SAMed recipe", plain, plain_loss, False, steps, warmup, dev, batch_size)
    del plain
    results["sam_path"] = _measure("SAM path (ours)", ours, ours_loss, True, steps, warmup, dev, batch_size)
    del ours

    model = build_model(cfg).to(dev).train()
    texts = ["one medium pink round polyp, located in the centre of the image"] * batch_size

    def full_loss() -> torch.Tensor:
        with autocast:
            out = model(images, texts)
        return model.compute_losses(out, masks)[0]

    results["full"] = _measure("full pipeline", model, full_loss, True, steps, warmup, dev, batch_size)
    results["sam_path_vs_plain"] = results["sam_path"]["images_per_s"] / results["plain"]["images_per_s"]
    results["full_vs_sam_path"] = results["full"]["images_per_s"] / results["sam_path"]["images_per_s"]
    # An images/s ratio a / b is b's step time over a's.
    for ratio, (a, b) in {"sam_path_vs_plain": ("sam_path", "plain"), "full_vs_sam_path": ("full", "sam_path")}.items():
        results[f"{ratio}_range"] = ratio_range(results[b]["step_seconds"], results[a]["step_seconds"])
        cpu_a, cpu_b = results[a]["step_cpu_seconds"], results[b]["step_cpu_seconds"]
        results[f"{ratio}_cpu"] = cpu_b["median"] / cpu_a["median"]
        results[f"{ratio}_cpu_range"] = ratio_range(cpu_b, cpu_a)
    return results


def saved_activation_bytes(
    preset: str = "tiny",
    image_size: int | None = None,
    batch_size: int = 1,
    activation_checkpointing: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict:
    """Bytes autograd keeps for backward in one training forward (SAM path and full pipeline).

    A device-independent measure of activation memory: every tensor saved for backward is
    recorded through ``torch.autograd.graph.saved_tensors_hooks`` and each distinct storage is
    counted once, parameters and buffers excluded. Runs on CPU (no GPU needed); ``dtype``
    ``torch.bfloat16`` runs the forward under bf16 autocast, as training does on a GPU (CPU
    autocast's op lists are close to, not the same as, CUDA's). Peak GPU memory adds weights,
    gradients, optimiser state and workspace; attention kernels may keep a little more or less.

    Returns:
        ``{"preset", "image_size", "batch_size", "activation_checkpointing", "dtype",
        "sam_path_gib", "full_gib"}``.
    """
    cfg: ModelConfig = get_preset(preset)
    cfg = merge(cfg, {"sam": {"activation_checkpointing": activation_checkpointing,
                              **({"image_size": image_size} if image_size else {})}})
    s = cfg.sam.image_size
    dev = torch.device(device)
    images = torch.rand(batch_size, 3, s, s, generator=torch.Generator().manual_seed(0)).to(dev)
    boxes = torch.tensor([[[s / 3, s / 4, 2 * s / 3, 3 * s / 4]]], device=dev).repeat(batch_size, 1, 1)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def measure(module: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> float:
        own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in own and storage.device.type != "meta":
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            forward()
        return sum(seen.values()) / 2**30

    parts = build_sam_parts(cfg.sam).to(dev).train()
    sam_gib = measure(parts, lambda: sam_path_forward(parts, images, boxes))
    del parts
    model = build_model(cfg).to(dev).train()
    texts = ["one medium pink round polyp, located in the centre of the image"] * batch_size
    full_gib = measure(model, lambda: model(images, texts).mask_logits)
    return {"preset": preset, "image_size": s, "batch_size": batch_size,
            "activation_checkpointing": activation_checkpointing, "dtype": str(dtype).removeprefix("torch."),
            "sam_path_gib": sam_gib, "full_gib": full_gib}
