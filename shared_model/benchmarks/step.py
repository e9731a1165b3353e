"""Training-step benchmark: this project's SAM path and full pipeline against the plain SAMed recipe.

The plain recipe (REFERENCE.md): LoRA rank 4 on every ``qkv`` of SAM's image encoder, prompt encoder
and whole mask decoder trainable, segment-anything's attention, the mask decoder run once per image
(its ``MaskDecoder.forward``), Dice + BCE, ``torch.optim.AdamW``. All are built in the same process
and timed on the same batch, interleaved; FLOPs are counted with ``torch.utils.flop_counter``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from shared_model.modeling import losses as L
from shared_model.benchmarks.timing import interleaved, paired_ratio, verdict
from shared_model.config import ModelConfig, SamConfig, get_preset, merge
from shared_model.modeling.prompt_sam import build_model
from shared_model.modeling.sam import SamParts, build_sam_parts
from shared_model.modeling.sam_attention import resolve_attention


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


def _train_step(module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], fused: bool,
                device: torch.device) -> tuple[Callable[[], None], int]:
    """A zero_grad + backward + AdamW step over ``module``'s trainable parameters, and their count."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused and device.type == "cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step, sum(p.numel() for p in params)


def _profile(step: Callable[[], None], device: torch.device) -> tuple[float, float | None, float | None]:
    """FLOPs of one step (``torch.utils.flop_counter``); on CUDA the peak GPU memory of another step
    and what was allocated before it (GiB: the three ways' weights, gradients and optimiser states
    stay resident side by side, so the step's own peak is about the difference plus its own share)."""
    with FlopCounterMode(display=False) as counter:
        step()
    peak = resident = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device) / 2**30
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    return counter.get_total_flops(), peak, resident


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
    attention: str | None = None,
) -> dict:
    """Time one local training step three ways on the same batch, interleaved.

    The plain recipe, this project's SAM path and the full pipeline are built side by side; each
    runs one untimed step that counts FLOPs (and one that measures peak GPU memory), then
    :func:`shared_model.benchmarks.timing.interleaved` runs ``warmup`` untimed rounds and
    ``steps`` timed rounds, every round one step of each way in turn, so a change of machine
    load hits all three alike. Ratios are taken repeat by repeat (:func:`paired_ratio`): their
    median, min, max and quartiles, and a verdict ("faster", "slower" or "no measurable
    difference" when the min-max range includes 1). Process CPU time is recorded beside wall time
    (it does not count waiting for a core).

    Args:
        attention: This project's ``sam.attention`` (default: the preset's, ``auto``).

    Returns:
        JSON-able dict: environment; ``plain`` (SAMed recipe), ``sam_path`` (ours, SAM only),
        ``full`` (BiomedCLIP + M2IB + CRF + SAM), each with ``images_per_s`` and ``step_ms`` (median
        wall time), ``step_seconds`` and ``step_cpu_seconds`` (spreads); ``sam_path_vs_plain`` and
        ``full_vs_sam_path`` (images/s ratios: paired spreads with ``verdict``, wall time) and the
        same from CPU time as ``*_cpu``; ``max_abs_diff_sam_paths`` of the two SAM paths' logits
        (same weights, see :func:`paired_sam_paths`).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench step: --steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    cfg: ModelConfig = get_preset(preset)
    if image_size is not None:
        cfg = merge(cfg, {"sam": {"image_size": image_size}})
    # This project's paths only; the plain recipe stays as published.
    cfg = merge(cfg, {"sam": {"activation_checkpointing": activation_checkpointing,
                              **({"attention": attention} if attention else {})}})
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
    model = build_model(cfg).to(dev).train()
    texts = ["one medium pink round polyp, located in the centre of the image"] * batch_size

    def seg_loss(logits: torch.Tensor) -> torch.Tensor:
        return L.dice_loss(logits.float(), masks) + L.bce_loss(logits.float(), masks)

    def plain_loss() -> torch.Tensor:
        with autocast:
            return seg_loss(plain_forward(plain, images, boxes))

    def ours_loss() -> torch.Tensor:
        with autocast:
            return seg_loss(sam_path_forward(ours, images, boxes))

    def full_loss() -> torch.Tensor:
        with autocast:
            out = model(images, texts)
        return model.compute_losses(out, masks)[0]

    ways = {"plain": ("plain SAMed recipe", plain, plain_loss, False),
            "sam_path": ("SAM path (ours)", ours, ours_loss, True),
            "full": ("full pipeline", model, full_loss, True)}
    steps_by_way, results = {}, {
        "preset": preset, "image_size": s, "batch_size": batch_size,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "bf16_autocast": bool(amp and dev.type == "cuda"), "compiled_encoder": compile_encoder,
        "activation_checkpointing": activation_checkpointing, "attention": cfg.sam.attention,
        "attention_resolved": resolve_attention(cfg.sam.attention, dev),
        "max_abs_diff_sam_paths": float(diff), "warmup": warmup, "repeats": steps, "interleaved": True,
    }
    for key, (name, module, loss_fn, fused) in ways.items():
        step, trainable = _train_step(module, loss_fn, fused, dev)
        flops, peak, resident = _profile(step, dev)
        steps_by_way[key] = step
        results[key] = {"name": name, "gflop_per_step": flops / 1e9, "peak_gpu_gib": peak,
                        "gpu_allocated_before_gib": resident, "trainable_params": trainable}
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    times = interleaved(steps_by_way, warmup, steps, sync=sync)
    for key, t in times.items():
        seconds = t["wall"]["median"]
        results[key].update(images_per_s=batch_size / seconds, step_ms=seconds * 1000,
                            achieved_tflops=results[key]["gflop_per_step"] / seconds / 1e3,
                            step_seconds=t["wall"], step_cpu_seconds=t["cpu"])
    # An images/s ratio a / b is b's step time over a's, repeat by repeat.
    for ratio, (a, b) in {"sam_path_vs_plain": ("sam_path", "plain"), "full_vs_sam_path": ("full", "sam_path")}.items():
        for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
            r = paired_ratio(times[b][clock]["all"], times[a][clock]["all"])
            results[ratio + suffix] = {**r, "verdict": verdict(r)}
    return results


def saved_activation_bytes(
    preset: str = "tiny",
    image_size: int | None = None,
    batch_size: int = 1,
    activation_checkpointing: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attention: str = "sdpa",
) -> dict:
    """Bytes autograd keeps for backward in one training forward (SAM path and full pipeline).

    A device-independent measure of activation memory: every tensor saved for backward is
    recorded through ``torch.autograd.graph.saved_tensors_hooks`` and each distinct storage is
    counted once, parameters and buffers excluded. Runs on CPU (no GPU needed); ``dtype``
    ``torch.bfloat16`` runs the forward under bf16 autocast, as training does on a GPU (CPU
    autocast's op lists are close to, not the same as, CUDA's). Peak GPU memory adds weights,
    gradients, optimiser state and workspace; attention kernels may keep a little more or less.
    ``attention`` is ``sam.attention``; the default ``sdpa`` is what ``auto`` runs on CUDA.

    Returns:
        ``{"preset", "image_size", "batch_size", "activation_checkpointing", "dtype", "attention",
        "sam_path_gib", "full_gib"}``.
    """
    cfg: ModelConfig = get_preset(preset)
    cfg = merge(cfg, {"sam": {"activation_checkpointing": activation_checkpointing, "attention": attention,
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
            "attention": attention,
            "sam_path_gib": sam_gib, "full_gib": full_gib}
