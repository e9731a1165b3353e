"""Evaluation (no Flower imports): Dice, IoU, precision, recall and HD95 per image and aggregate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .metrics import aggregate, segmentation_metrics
from .model import PromptSAM
from .train import autocast_for, make_loader, resolve_device


@dataclass
class EvalResult:
    """Aggregate metrics (means, ``*_std``, ``n``) and one dict per image (with stem and centre)."""

    aggregate: dict[str, float]
    per_image: list[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate_model(
    model: PromptSAM,
    dataset: Dataset,
    device: str | torch.device | None = "cpu",
    batch_size: int = 8,
    threshold: float = 0.5,
    prompt: str | Sequence[str] | None = None,
    progress: bool = False,
    amp: bool = True,
) -> EvalResult:
    """Segment every item of ``dataset`` and score it against its mask.

    Args:
        model: The model (put in eval mode here).
        dataset: Items ``{"image", "mask", "text", "stem", "centre"}``.
        device: Device (``"auto"`` picks CUDA when present).
        batch_size: Images per forward pass.
        threshold: Probability threshold of the predicted mask.
        prompt: Override every item's text with this prompt (e.g. the class name only).
        progress: Show a progress bar.
        amp: bf16 autocast on CUDA.

    Returns:
        :class:`EvalResult`.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = resolve_device(device)
    was_training = model.training
    model.to(device).eval()
    per_image: list[dict] = []
    scores: list[dict] = []
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0)
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        images = batch["image"].to(device)
        texts = list(batch["text"])
        if prompt is not None:
            texts = [prompt] * len(texts) if isinstance(prompt, str) else list(prompt)[: len(texts)]
        with autocast_for(device, amp):
            out = model(images, texts)
        pred = torch.sigmoid(out.mask_logits.float()) > threshold
        rows = segmentation_metrics(pred.cpu(), batch["mask"] > 0.5)
        scores += rows
        for i, row in enumerate(rows):
            per_image.append({"stem": batch["stem"][i], "centre": batch["centre"][i], **row})
    model.train(was_training)
    return EvalResult(aggregate=aggregate(scores), per_image=per_image)
