"""In-context segmentation of a new task, no gradient at all: the support set is the prompt.

For a query image (PerSAM / PANet style, on SAM's frozen image encoder):

1. support features: ``F_k = sam.encode(support_k)`` (K x C x h x w), L2-normalised per location;
   support masks area-averaged onto the h x w grid (``m_k``);
2. prototypes: ``p_fg = sum_k sum_xy m_k F_k / sum m_k``, ``p_bg`` the same with ``1 - m_k``;
3. query map: ``P = sigmoid((cos(F_q, p_fg) - cos(F_q, p_bg)) / temperature)`` (B x 1 x h x w),
   bilinearly resized to the input (S x S);
4. SAM prompts from the map: the box of its largest component above ``threshold``
   (:func:`~shared_model.modeling.boxes.saliency_to_boxes`; the whole image when nothing passes)
   and a positive click at its maximum; the base model's own prompts (text tokens of the task name,
   its saliency path) are kept as they are.

:class:`InContextSAM` wraps a base :class:`PromptSAM` and is called like it (same arguments, same
:class:`PromptSAMOutput`, with the prototype map as the ``saliency`` shown in overlays), so
evaluation (:func:`~shared_model.training.evaluate.evaluate_model`) and prediction
(:func:`~shared_model.inference.predict_images`) use it unchanged. The query's image embedding is
computed once and reused by the base's forward.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from shared_model.config import BoxConfig
from shared_model.modeling.boxes import saliency_to_boxes
from shared_model.modeling.prompt_sam import PromptSAM, PromptSAMOutput


@contextmanager
def reuse_embedding(sam: nn.Module, images: torch.Tensor, embedding: torch.Tensor) -> Iterator[None]:
    """Within the block, ``sam.encode(images)`` (the same tensor object) returns ``embedding``."""
    original = type(sam).encode
    sam.encode = lambda x: embedding if x is images else original(sam, x)
    try:
        yield
    finally:
        del sam.encode


def normalised_features(sam: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """B x 3 x S x S -> B x C x h x w frozen SAM image features, unit L2 norm per location."""
    return F.normalize(sam.encode(images).float(), dim=1)


@torch.no_grad()
def support_prototypes(sam: nn.Module, images: torch.Tensor, masks: torch.Tensor, batch_size: int = 8
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background prototypes of a support set.

    Args:
        sam: SAM parts (``encode``).
        images: K x 3 x S x S in [0, 1].
        masks: K x 1 x S x S in {0, 1}.
        batch_size: Support images encoded together.

    Returns:
        (C foreground prototype, C background prototype), each unit-norm.

    Raises:
        ValueError: The support masks have no foreground at all.
    """
    fg = bg = None
    for start in range(0, images.shape[0], batch_size):
        feats = normalised_features(sam, images[start:start + batch_size])  # b x C x h x w
        weight = F.adaptive_avg_pool2d(masks[start:start + batch_size].float().to(feats.device), feats.shape[-2:])
        part_fg = (feats * weight).sum((0, 2, 3)), weight.sum()
        part_bg = (feats * (1 - weight)).sum((0, 2, 3)), (1 - weight).sum()
        fg = part_fg if fg is None else (fg[0] + part_fg[0], fg[1] + part_fg[1])
        bg = part_bg if bg is None else (bg[0] + part_bg[0], bg[1] + part_bg[1])
    if fg is None or float(fg[1]) <= 0:
        raise ValueError("the support masks have no foreground pixel")
    return F.normalize(fg[0] / fg[1], dim=0), F.normalize(bg[0] / bg[1].clamp_min(1e-6), dim=0)


def similarity_map(features: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, temperature: float,
                   size: int) -> torch.Tensor:
    """Foreground probability of every query location.

    Args:
        features: B x C x h x w unit-norm query features.
        fg, bg: C unit-norm prototypes.
        temperature: Softness of the fg-vs-bg cosine contrast (> 0).
        size: Output side S.

    Returns:
        B x 1 x S x S in [0, 1].
    """
    contrast = torch.einsum("bchw,c->bhw", features, fg) - torch.einsum("bchw,c->bhw", features, bg)
    prob = torch.sigmoid(contrast / temperature)[:, None]
    return F.interpolate(prob, size=(size, size), mode="bilinear", align_corners=False)


def map_prompts(prob: torch.Tensor, threshold: float, grid: int, image_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Box and click prompts of a foreground map.

    Args:
        prob: B x 1 x S x S in [0, 1].
        threshold: Map threshold of the box's component.
        grid: Grid the components are found on.
        image_size: S.

    Returns:
        (B x 1 x 4 boxes, B x 1 validity, (B x 1 x 2 click coordinates, B x 1 labels = 1)).
    """
    cfg = BoxConfig(threshold=threshold, mode="components", top_k=1, min_area=0.002, grid=grid)
    boxes, valid = saliency_to_boxes(prob.detach(), cfg, image_size)
    b, _, s, _ = prob.shape
    flat = prob.reshape(b, -1).argmax(dim=1)
    coords = torch.stack([flat % s, flat // s], dim=1).float() + 0.5  # (x, y) at pixel centres
    labels = torch.ones(b, 1, dtype=torch.long, device=prob.device)
    return boxes.to(prob.device), valid.to(prob.device), (coords[:, None].to(prob.device), labels)


class InContextSAM(nn.Module):
    """A base PromptSAM prompted by a support set (see the module docstring); trains nothing.

    Args:
        base: The base model (frozen here: ``requires_grad`` off, used in eval mode).
        support: Items ``{"image": 3 x S x S, "mask": 1 x S x S}`` (e.g. a
            :meth:`~shared_model.fewshot.support.SupportSet.dataset`).
        name: The task name (recorded; the text prompt comes from the caller, as for PromptSAM).
        temperature: Softness of the prototype contrast.
        threshold: Threshold of the map's box component.
        click: Also give SAM a positive click at the map's maximum.
    """

    def __init__(self, base: PromptSAM, support: Dataset, name: str = "", temperature: float = 0.1,
                 threshold: float = 0.5, click: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.base = base.requires_grad_(False)
        self.cfg = base.cfg
        self.task_name = name
        self.temperature, self.threshold, self.click = temperature, threshold, click
        items = [support[i] for i in range(len(support))]
        if not items:
            raise ValueError("the support set is empty")
        self.register_buffer("support_images", torch.stack([it["image"] for it in items]), persistent=False)
        self.register_buffer("support_masks", torch.stack([it["mask"] for it in items]), persistent=False)
        self._prototypes: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def image_size(self) -> int:
        return self.base.image_size

    uses_saliency_boxes = False  # the boxes come from the prototype map, not the M2IB saliency
    uses_mask_boxes = False

    def oracle_prompts(self, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """No oracle: in-context prompts come from the support set only."""
        return {}

    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fg, bg) prototypes on the current device (computed once per device)."""
        device = self.support_images.device
        if self._prototypes is None or self._prototypes[0].device != device:
            was = self.base.training
            self.base.eval()
            self._prototypes = support_prototypes(self.base.sam, self.support_images, self.support_masks)
            self.base.train(was)
        return self._prototypes

    def forward(self, images: torch.Tensor, texts: Sequence[str], boxes: torch.Tensor | None = None,
                box_valid: torch.Tensor | None = None, points: tuple[torch.Tensor, torch.Tensor] | None = None,
                prompt_boxes: tuple[torch.Tensor, torch.Tensor] | None = None) -> PromptSAMOutput:
        """As :meth:`PromptSAM.forward`; without user boxes or points, prompts come from the support set."""
        if boxes is not None or points is not None or prompt_boxes is not None:
            return self.base(images, texts, boxes=boxes, box_valid=box_valid, points=points,
                             prompt_boxes=prompt_boxes)
        fg, bg = self.prototypes()
        embedding = self.base.sam.encode(images)
        prob = similarity_map(F.normalize(embedding.float(), dim=1), fg, bg, self.temperature, self.image_size)
        map_boxes, valid, click = map_prompts(prob, self.threshold, self.cfg.boxes.grid, self.image_size)
        with reuse_embedding(self.base.sam, images, embedding):
            out = self.base(images, texts, boxes=map_boxes, box_valid=valid, points=click if self.click else None)
        return dataclasses.replace(out, saliency=prob, refined_saliency=prob)
