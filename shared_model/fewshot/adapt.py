"""Training a task adapter on a support set: ``promptsam adapt`` as a plain function.

The base model comes from a promptsam checkpoint; every base weight stays frozen and only the
adapter of :func:`~shared_model.fewshot.adapter.attach_adapter` trains, with the project's one
training loop (:func:`~shared_model.training.loop.train_model`) on the K support images, augmented,
prompted with the task name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shared_model.config import AdapterConfig, TrainConfig, check_train, to_dict
from shared_model.fewshot.adapter import attach_adapter, base_record, save_adapter
from shared_model.fewshot.support import SupportSet
from shared_model.training.loop import TrainResult, train_model

# Defaults of `promptsam adapt` (tiny preset on CPU: about 0.15 s per step at batch 4).
ADAPT_TRAIN = TrainConfig(steps=300, batch_size=4, lr=3e-3, weight_decay=0.0, warmup_steps=10)


@dataclass
class AdaptResult:
    """What one adapter training produced.

    Attributes:
        path: The adapter file (None when not saved).
        train: The training loop's summary.
        parameters: Values in the adapter.
        nbytes: Bytes of the adapter's tensors (float32).
        file_bytes: Size of the adapter file on disk (0 when not saved).
        seconds: Wall-clock time of the whole call (data, attach, training, saving).
    """

    path: Path | None
    train: TrainResult
    parameters: int
    nbytes: int
    file_bytes: int
    seconds: float


def train_adapter(model, support: SupportSet, train: TrainConfig = ADAPT_TRAIN,
                  adapter: AdapterConfig | None = None, device: str = "cpu", augment: bool = True) -> TrainResult:
    """Attach an adapter to ``model`` (the base, loaded) and train it on ``support``, in place."""
    attach_adapter(model, adapter or AdapterConfig())
    model.task_name = support.name
    dataset = support.dataset(model.image_size, augment=augment, seed=train.seed,
                              resize=model.cfg.sam.input_resize)
    return train_model(model, dataset, train, device=device)


def adapt(model, support: SupportSet, out: str | Path | None, checkpoint: str | Path | None = None,
          train: TrainConfig = ADAPT_TRAIN, adapter: AdapterConfig | None = None, device: str = "cpu",
          augment: bool = True) -> AdaptResult:
    """Fingerprint the base ``model``, train an adapter on ``support`` and write it to ``out``.

    Args:
        model: The base model (from ``checkpoint``), state loaded; changed in place.
        support: The drawn support set.
        out: Adapter file to write (None: do not save).
        checkpoint: The base checkpoint's path, recorded in the adapter.
        train: Training settings (steps, batch size, lr, seed, ...).
        adapter: What the adapter trains (default :class:`AdapterConfig`).
        device: Training device.
        augment: Augment the support images (flips, rotations, colour).

    Returns:
        :class:`AdaptResult`.
    """
    start = time.perf_counter()
    check_train(train, "train.")
    base = base_record(model, checkpoint)
    result = train_adapter(model, support, train, adapter, device, augment)
    extra: dict[str, Any] = {"support": support.record(), "train": {**to_dict(replace(train, progress=False)),
                             "seconds": result.seconds, "loss": result.loss, "steps_done": result.steps}}
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    path = None
    if out is not None:
        path = save_adapter(out, model.cpu(), support.name, base, extra)
    nbytes = 4 * params
    return AdaptResult(path, result, params, nbytes, path.stat().st_size if path else 0,
                       time.perf_counter() - start)
