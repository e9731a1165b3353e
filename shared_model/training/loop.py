"""Single-site training (no Flower imports): the function every hospital's client calls."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from shared_model.config import TrainConfig
from shared_model.modeling.prompt_sam import PromptSAM


@dataclass
class TrainResult:
    """Summary of one local training run.

    Attributes:
        loss: Mean total loss over the last ``min(steps, 20)`` steps.
        steps: Optimiser steps taken.
        num_examples: Images seen (steps x batch size).
        seconds: Wall-clock time.
        optimizer_state: AdamW state dict (to carry across federated rounds), or None.
        history: Per-step dicts of the loss parts and the step's learning rate (``lr``).
    """

    loss: float
    steps: int
    num_examples: int
    seconds: float
    optimizer_state: dict | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/None -> CUDA when available else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, cosine decay to ``floor``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class LRSchedule:
    """Where one call's steps sit in the run's single warm-up + cosine learning-rate schedule.

    A single-site run is one call (``LRSchedule()``). A federated run is one schedule over all
    rounds: round ``r`` of ``R`` with ``n`` local steps takes global steps ``(r - 1) n .. r n - 1``
    of ``R n``, so the warm-up happens once, at the start of the run, and the learning rate decays
    across rounds instead of restarting every round (:meth:`federated`).

    Attributes:
        offset: Optimiser steps of the run taken before this call.
        total: Optimiser steps of the whole run (0: the call's own steps).
    """

    offset: int = 0
    total: int = 0

    @classmethod
    def federated(cls, server_round: int, local_steps: int, num_rounds: int) -> "LRSchedule":
        """The schedule of round ``server_round`` (1-based) of ``num_rounds`` x ``local_steps``;
        rounds past ``num_rounds`` (a run extended on resume) stay at the final learning rate."""
        return cls(offset=(max(server_round, 1) - 1) * local_steps, total=max(num_rounds, 1) * local_steps)

    def multiplier(self, step: int, warmup: int, steps: int) -> float:
        """LR multiplier of the call's ``step`` (0-based) when the call takes ``steps`` steps."""
        return warmup_cosine(self.offset + step, warmup, self.total or steps)

    def scheduler(self, optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """A ``LambdaLR`` following this schedule from the call's first step."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: self.multiplier(s, warmup, steps))


def infinite_batches(loader: DataLoader, first_epoch: int = 0) -> Iterator[dict]:
    """Cycle through a DataLoader forever, reshuffling and (if the dataset has ``set_epoch``)
    drawing new augmentations each pass."""
    epoch = first_epoch
    while True:
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        epoch += 1
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the training set is empty")


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0) -> DataLoader:
    """A seeded DataLoader over a PolypDataset (dict items)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(dataset) >= batch_size,
        num_workers=num_workers,
        generator=generator,
    )


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def add_proximal_gradient(model: PromptSAM, reference: Mapping[str, torch.Tensor], mu: float) -> float:
    """Add FedProx's gradient ``mu (w - w_ref)`` to every trainable parameter's ``.grad``.

    The term needs no data, so it is added after the data gradient has been clipped (and, under
    DP, noised). Returns the term's value ``mu / 2 ||w - w_ref||^2`` for the log.
    """
    squared = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            diff = p - reference[name].to(p.device, p.dtype)
            squared += float(diff.pow(2).sum())
            p.grad = mu * diff if p.grad is None else p.grad.add_(diff, alpha=mu)
    return 0.5 * mu * squared


class GradientStep:
    """How one training step turns data into gradients; the plain step: mean loss, backward, clip.

    :func:`train_model` owns everything else (AdamW, schedule, FedProx, logging, time limit).
    Subclasses (``shared_model.training.privacy.DPGradientStep``) change how batches are drawn and how the
    gradient is formed.
    """

    def prepare(self, model: PromptSAM, dataset: Dataset, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                steps: int, device: torch.device) -> Iterator[dict]:
        """Called once before the first step; returns the batch iterator (a seeded, shuffled loader)."""
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device, self.cfg = device, cfg
        return infinite_batches(make_loader(dataset, cfg.batch_size, True, cfg.seed, cfg.num_workers),
                                first_epoch=cfg.seed)

    def compute(self, model: PromptSAM, batch: dict, step: int) -> tuple[dict[str, float], int, bool]:
        """Fill ``.grad`` of the trainable parameters from ``batch``.

        Returns:
            (log of the step's loss parts, examples to count, whether the optimiser steps).

        Raises:
            FloatingPointError: On a non-finite loss.
        """
        images = batch["image"].to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True)
        with autocast_for(self.device, self.cfg.amp):
            out = model(images, batch["text"], **model.oracle_prompts(masks))
        loss, parts = model.compute_losses(out, masks, batch.get("paired"))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {step}: {parts}")
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        return parts, images.shape[0], True

    def finish(self) -> None:
        """Called after each step's optimiser update (DP: the accountant's bookkeeping)."""


def train_model(
    model: PromptSAM,
    dataset: Dataset,
    cfg: TrainConfig,
    device: str | torch.device | None = "cpu",
    steps: int | None = None,
    proximal_reference: Mapping[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    schedule: LRSchedule | None = None,
    gradient_step: GradientStep | None = None,
) -> TrainResult:
    """Train the model's trainable parameters with AdamW: the one training loop, plain or DP-SGD.

    Args:
        model: The model; only parameters with ``requires_grad`` are optimised.
        dataset: Items ``{"image": 3 x S x S, "mask": 1 x S x S, "text": str}``.
        cfg: Training hyper-parameters (lr, warm-up, clipping, batch size, bf16 on CUDA, ...).
        device: Device (``"auto"`` picks CUDA when present).
        steps: Optimiser steps (default ``cfg.steps``).
        proximal_reference: Global exchanged state for FedProx's term (used if
            ``cfg.proximal_mu > 0``).
        optimizer_state: AdamW state from a previous call to continue from.
        on_step: Optional callback ``(step, parts)`` after each step.
        schedule: Position of this call in the run's learning-rate schedule (default: the
            call is the whole run: warm-up, then cosine decay over ``steps``).
        gradient_step: How batches become gradients (default :class:`GradientStep`: mean loss,
            backward, clipping; ``shared_model.training.privacy.DPGradientStep`` for DP-SGD).

    Returns:
        :class:`TrainResult`.
    """
    device = resolve_device(device)
    steps = cfg.steps if steps is None else steps
    gradient_step = gradient_step or GradientStep()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    scheduler = (schedule or LRSchedule()).scheduler(optimizer, cfg.warmup_steps, steps)
    batches = gradient_step.prepare(model, dataset, cfg, optimizer, steps, device)
    use_prox = proximal_reference is not None and cfg.proximal_mu > 0

    history: list[dict[str, float]] = []
    seen = 0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", disable=not cfg.progress, leave=False)
    for step in bar:
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        parts, examples, update = gradient_step.compute(model, next(batches), step)
        if update:
            if use_prox:
                parts["proximal"] = add_proximal_gradient(model, proximal_reference, cfg.proximal_mu)
            optimizer.step()
        gradient_step.finish()
        scheduler.step()
        parts["lr"] = lr
        seen += examples
        history.append(parts)
        if "total" in parts:
            bar.set_postfix(loss=f"{parts['total']:.3f}")
        if on_step is not None:
            on_step(step, parts)
        if cfg.time_limit_s > 0 and time.perf_counter() - start > cfg.time_limit_s:
            break
    tail = [h["total"] for h in history[-20:] if "total" in h]
    return TrainResult(
        loss=sum(tail) / len(tail) if tail else math.nan,
        steps=len(history),
        num_examples=seen,
        seconds=time.perf_counter() - start,
        optimizer_state=optimizer.state_dict(),
        history=history,
    )
