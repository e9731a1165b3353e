"""The foundation model being pretrained: every weight of SAM and of both CLIP towers, trainable.

:class:`Foundation` holds segment-anything's three parts (:class:`~shared_model.modeling.sam.SamParts`,
no adapters) and open_clip's whole model (both towers and ``logit_scale``), built by the same code
that builds PromptSAM, so that their state dicts are those of the official files. A text prompt
reaches SAM as in PromptSAM (text embedding -> :class:`~shared_model.modeling.prompts.TextToSparse`
-> sparse tokens); that projection is the pretraining's own and is not exported (hospitals train
theirs, as they train the context vectors, which pretraining does not use: ``n_ctx = 0``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from shared_model.config import ModelConfig
from shared_model.modeling import losses as L
from shared_model.modeling.biomedclip import create_open_clip
from shared_model.modeling.prompts import TextToSparse
from shared_model.modeling.sam import build_sam_parts
from shared_model.modeling.tokenizer import Tokenizer
from shared_model.config.pretrain import PretrainTrainConfig
from shared_model.pretrain.data import PretrainBatch

LOGIT_SCALE_MAX = 4.6052  # ln(100), open_clip's clamp


def foundation_clip_config(cfg: ModelConfig):
    """``cfg.clip`` without context vectors (open_clip's text tower has none)."""
    return dataclasses.replace(cfg.clip, text=dataclasses.replace(cfg.clip.text, n_ctx=0))


class Foundation(nn.Module):
    """SAM + CLIP with every parameter trainable, and the text -> sparse-token projection.

    Args:
        cfg: The model config (sizes; ``sam.checkpoint`` / ``clip.checkpoint`` start from those weights).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.clip_cfg = foundation_clip_config(cfg)
        self.sam = build_sam_parts(cfg.sam, adapters=False)
        self.clip, tokenizer, folder = create_open_clip(self.clip_cfg)
        self.tokenizer = Tokenizer(tokenizer, self.clip_cfg.text.vocab_size, folder)
        n_tokens = max(cfg.prompts.text_tokens, 1)
        self.text_to_sparse = TextToSparse(cfg.clip.embed_dim, cfg.sam.prompt_dim, n_tokens)
        self.requires_grad_(True)
        self.clip_loss = ClipLoss()

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> B x E text embeddings (not normalised), through open_clip's text tower."""
        ids, _ = self.tokenizer(list(texts))
        return self.clip.encode_text(ids.to(self.clip.logit_scale.device))

    def encode_image(self, images01: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S images in [0, 1] -> B x E image embeddings (resized and normalised for the tower)."""
        v = self.clip_cfg.vision
        x = F.interpolate(images01, size=(v.image_size, v.image_size), mode="bilinear", align_corners=False,
                          antialias=True)
        mean = torch.tensor(v.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(v.std, device=x.device).view(1, 3, 1, 1)
        return self.clip.encode_image((x - mean) / std)

    def segment(self, batch: PretrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM prompted by the batch's boxes, points or texts.

        Returns:
            (B x 1 x S x S mask logits, B x 1 predicted IoU).
        """
        images = batch.images
        b, s = images.shape[0], images.shape[-1]
        device = images.device
        if batch.kind == "box":
            sparse = self.sam.embed_prompts(boxes=batch.boxes.to(device))
        elif batch.kind == "point":
            coords, labels = batch.points
            sparse = self.sam.embed_prompts(points=(coords.to(device), labels.to(device)))
        else:
            tokens = self.text_to_sparse(self.encode_text(batch.texts))
            sparse = torch.cat([self.sam.embed_prompts(batch_size=b), tokens.to(images.dtype)], 1)
        embedding = self.sam.encode(images)
        low_res, iou = self.sam.decode(embedding, sparse.to(embedding.dtype), self.sam.no_mask_dense(b))
        return self.sam.upscale(low_res, s), iou

    def losses(self, batch: PretrainBatch, weights: PretrainTrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted loss of one batch: Dice + BCE + IoU head on SAM's mask, CLIP's contrastive loss.

        Returns:
            (scalar loss, dict of the unweighted parts, ``total`` and ``clip_scale`` as floats).
        """
        logits, iou = self.segment(batch)
        logits, masks = logits.float(), batch.masks.to(logits.device)
        parts = {"dice": L.dice_loss(logits, masks), "bce": L.bce_loss(logits, masks),
                 "iou": L.iou_head_loss(iou.float(), logits, masks)}
        if len(batch.clip_rows) >= 2:
            image = F.normalize(self.encode_image(batch.images[batch.clip_rows]).float(), dim=-1)
            text = F.normalize(self.encode_text(batch.captions).float(), dim=-1)
            parts["clip"] = self.clip_loss(image, text, self.clip.logit_scale.exp())
        total = sum(getattr(weights, name) * value for name, value in parts.items())
        log = {name: float(value.detach()) for name, value in parts.items()}
        log.update(total=float(total.detach()), clip_scale=float(self.clip.logit_scale.detach().exp()))
        return total, log

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep CLIP's temperature at most 100, as open_clip's training does."""
        self.clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
