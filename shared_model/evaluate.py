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

    def by_centre(self) -> dict[str, dict[str, float]]:
        """Aggregate metrics per centre (hospital) of the evaluated images."""
        groups: dict[str, list[dict]] = {}
        for row in self.per_image:
            groups.setdefault(row["centre"], []).append(
                {k: v for k, v in row.items() if k not in ("stem", "centre")}
            )
        return {centre: aggregate(rows) for centre, rows in sorted(groups.items())}


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


def constant_mask_baseline(train: Dataset, test: Dataset, thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)) -> dict[str, float]:
    """The best constant predictor: the mean training mask, thresholded.

    The threshold is chosen on the training set (by mean Dice), then the same mask is scored on
    ``test``. This is the bar a model must clear to have learned anything image-dependent.

    Returns:
        ``{"threshold": t, "train_dice": ..., **aggregate test metrics}``.
    """
    masks = torch.stack([train[i]["mask"] for i in range(len(train))]) > 0.5
    mean = masks.float().mean(0, keepdim=True)
    best_t, best_dice = thresholds[0], -1.0
    for t in thresholds:
        pred = (mean > t).expand_as(masks)
        dice = aggregate(segmentation_metrics(pred, masks))["dice"]
        if dice > best_dice:
            best_t, best_dice = t, dice
    test_masks = torch.stack([test[i]["mask"] for i in range(len(test))]) > 0.5
    pred = (mean > best_t).expand_as(test_masks)
    return {"threshold": best_t, "train_dice": best_dice, **aggregate(segmentation_metrics(pred, test_masks))}
