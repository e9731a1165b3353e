"""PromptSAM: the whole text-prompted SAM pipeline, wired from its parts.

Data flow for a batch of B images (S x S, in [0, 1]) and B texts::

    texts --tokenizer--> ClipText (+ context vectors) ----------------------------> t   (B x E)
    images --ClipVision.forward_to(layer L)--> tokens --M2IB(tokens, t)--> z, KL
        [tokens; z] --ClipVision.forward_from(L)--> v (clean), v_z (bottlenecked)     (B x E)
    KL --saliency--> B x 1 x S x S --DenseCRF(image)--> refined saliency
    refined --boxes (no grad)--> B x K x 4        (or user boxes / points)
    SAM: encode(images) ; sparse = [box/point tokens ; TextToSparse(t)] ;
         dense = no_mask + SaliencyToDense(refined) ; batched mask decoder -> mask logits
    (box_source "mask": the decoder runs first without a box; the box enclosing that coarse mask
     prompts a second decoder pass on the same image embedding)

Losses: Dice + BCE on the mask (and on the coarse mask), DHN-NCE on (v, t), IB = beta * KL - cos(v_z, t),
saliency BCE.

Each prompt path is a switch of :class:`~shared_model.config.PromptConfig` (the ablation's rows):
``text_tokens = 0`` drops the text tokens, ``dense_saliency`` the dense saliency prompt,
``use_boxes`` the box prompts; with none of them the CLIP branch is not run at all and its
parameters are frozen (SAMed's recipe: SAM with LoRA and a learned no-prompt embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shared_model.modeling import losses as L
from shared_model.modeling.bottleneck import M2IB, ib_loss, saliency_from_kl
from shared_model.modeling.boxes import mask_boxes, saliency_to_boxes, validate_boxes
from shared_model.modeling.clip_text import ClipText
from shared_model.modeling.biomedclip import build_clip
from shared_model.modeling.clip_vision import ClipVision
from shared_model.config import ConfigError, ModelConfig, get_preset
from shared_model.modeling.crf import DenseCRF
from shared_model.modeling.foundation import load_text_to_sparse, with_foundation_weights
from shared_model.modeling.prompts import PromptProjections
from shared_model.modeling.sam import SamParts, build_sam_parts


@dataclass
class PromptSAMOutput:
    """Everything one forward pass produces.

    Attributes:
        mask_logits: B x 1 x S x S mask logits at SAM's input size.
        iou_pred: B x 1 predicted mask quality (mean over the box prompts of an image).
        saliency: B x 1 x S x S raw M2IB saliency in [0, 1].
        refined_saliency: B x 1 x S x S CRF-refined saliency in [0, 1].
        boxes: B x K x 4 box prompts (x0, y0, x1, y1) in input pixels; K = 0 when none were used.
        box_valid: B x K bool.
        image_embedding: B x E clean CLIP image embedding (None without the saliency branch).
        text_embedding: B x E CLIP text embedding (None without any text path).
        kl: B x T x D bottleneck KL per element (None without the saliency branch).
        ib_cos: B cosine between bottlenecked image embedding and text embedding (or None).
        coarse_logits: B x 1 x S x S first-pass mask logits of the two-pass cascade
            (``prompts.box_source = "mask"``), whose enclosing box prompted the final mask; else None.

    Without the saliency branch ``saliency`` and ``refined_saliency`` are zeros.
    """

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
    saliency: torch.Tensor
    refined_saliency: torch.Tensor
    boxes: torch.Tensor
    box_valid: torch.Tensor
    image_embedding: torch.Tensor | None
    text_embedding: torch.Tensor | None
    kl: torch.Tensor | None
    ib_cos: torch.Tensor | None
    coarse_logits: torch.Tensor | None = None


BOX_SOURCES = ("saliency", "mask", "ground-truth")


@dataclass(frozen=True)
class TextTokens:
    """Prompts already tokenised (:meth:`PromptSAM.tokenize`), accepted wherever texts are.

    ``torch.func.vmap`` maps over tensors, not strings: per-example gradients map over these
    (the text tower then runs in its vmappable form, :meth:`ClipText.forward`).

    Attributes:
        ids: B x L int64 token ids, checked against the text tower's vocabulary.
        mask: B x L attention mask.
    """

    ids: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]


class PromptSAM(nn.Module):
    """Text-prompted SAM; parts are passed in (see :func:`build_model`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        sam: SamParts,
        clip_vision: ClipVision,
        clip_text: ClipText,
        tokenizer,
        bottleneck: M2IB,
        crf: DenseCRF,
        prompts: PromptProjections,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.sam = sam
        self.clip_vision = clip_vision
        self.clip_text = clip_text
        self.tokenizer = tokenizer
        self.bottleneck = bottleneck
        self.crf = crf
        self.prompts = prompts
        self.foundation_digest: str | None = None  # set by build_model when cfg.foundation is

    @property
    def image_size(self) -> int:
        return self.cfg.sam.image_size

    @property
    def uses_saliency(self) -> bool:
        """Whether the M2IB saliency feeds a prompt (dense, or boxes taken from it)."""
        return self.cfg.prompts.dense_saliency or self.uses_saliency_boxes

    @property
    def uses_text(self) -> bool:
        """Whether the text tower runs (text tokens, or the text-conditioned saliency)."""
        return self.cfg.prompts.text_tokens > 0 or self.uses_saliency

    @property
    def uses_mask_boxes(self) -> bool:
        """Whether SAM is prompted by the box of its own first-pass mask (when no user prompt is given)."""
        return self.cfg.prompts.use_boxes and self.cfg.prompts.box_source == "mask"

    @property
    def uses_saliency_boxes(self) -> bool:
        """Whether SAM's box prompts are taken from the saliency map (when no user box is given)."""
        return self.cfg.prompts.use_boxes and self.cfg.prompts.box_source == "saliency"

    def oracle_prompts(self, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments of :meth:`forward` that ``prompts.box_source = "ground-truth"`` asks for.

        Args:
            masks: B x 1 x S x S ground truth.

        Returns:
            ``{"boxes", "box_valid"}`` (each mask's enclosing box) for the oracle, else ``{}``.
        """
        if not (self.cfg.prompts.use_boxes and self.cfg.prompts.box_source == "ground-truth"):
            return {}
        boxes, valid = mask_boxes(masks)
        return {"boxes": boxes, "box_valid": valid}

    def tokenize(self, texts: Sequence[str]) -> TextTokens:
        """Texts -> :class:`TextTokens` (ids checked against the vocabulary once, here)."""
        ids, mask = self.tokenizer(list(texts))
        self.clip_text.check_token_ids(ids)
        return TextTokens(ids, mask)

    def encode_text(self, texts: Sequence[str] | TextTokens) -> torch.Tensor:
        """Texts (or their tokens) -> B x E text embeddings (with the learnable context)."""
        if not isinstance(texts, TextTokens):
            ids, mask = self.tokenizer(list(texts))
            device = next(self.clip_text.parameters()).device
            return self.clip_text(ids.to(device), mask.to(device))
        device = next(self.clip_text.parameters()).device
        return self.clip_text(texts.ids.to(device), texts.mask.to(device), vmappable=True)

    @torch.no_grad()
    def derive_boxes(self, images: torch.Tensor, texts: Sequence[str] | TextTokens
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The box prompts :meth:`forward` derives from the saliency (text, CLIP to the bottleneck,
        CRF) or from the first-pass mask (``box_source: mask``), without gradient. Passed back as
        ``prompt_boxes``, they let the rest of the forward run under ``torch.func.vmap``, which
        cannot run the data-dependent box search, and fix the boxes so that per-example gradients
        do not hinge on a mask pixel that rounding flips.

        Returns:
            (B x K x 4 boxes, B x K bool validity).
        """
        if self.uses_mask_boxes:
            out = self(images, texts)
            return out.boxes, out.box_valid
        h, w = images.shape[-2:]
        text_emb = self.encode_text(texts)
        tokens = self.clip_vision.forward_to(self.clip_vision.preprocess(images), self.cfg.bottleneck.layer)
        saliency = saliency_from_kl(self.bottleneck(tokens, text_emb).kl, self.clip_vision.grid, (h, w))
        boxes, valid = saliency_to_boxes(self.crf(saliency, images), self.cfg.boxes, self.image_size)
        return boxes.to(images.device), valid.to(images.device)

    def forward(
        self,
        images: torch.Tensor,
        texts: Sequence[str],
        boxes: torch.Tensor | None = None,
        box_valid: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        prompt_boxes: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> PromptSAMOutput:
        """Run the pipeline.

        Args:
            images: B x 3 x S x S in [0, 1], S = ``cfg.sam.image_size``.
            texts: B prompts (or their :class:`TextTokens`).
            boxes: Optional user boxes B x K x 4 (x0, y0, x1, y1, input pixels) replacing the
                saliency-derived boxes.
            box_valid: B x K bool for user boxes (default all valid).
            points: Optional user clicks (coords B x P x 2 in input pixels, labels B x P with
                1 = foreground, 0 = background). With points and no boxes, no box prompt is used.
            prompt_boxes: The model's own box prompts for these images, not validated: the
                saliency or first-mask boxes from :meth:`derive_boxes` (instead of deriving them
                again; with ``box_source: mask`` the first pass still runs, for its loss) or the
                ground-truth oracle's (:meth:`oracle_prompts`).

        Returns:
            :class:`PromptSAMOutput`.
        """
        b, _, h, w = images.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {h}x{w}")
        if len(texts) != b:
            raise ValueError(f"got {len(texts)} texts for {b} images")
        cfg = self.cfg
        text_emb = self.encode_text(texts) if self.uses_text else None
        image_emb = kl = ib_cos = out_tokens = None
        if self.uses_saliency:
            # CLIP vision with the bottleneck after block L; clean and bottlenecked branches batched.
            layer = cfg.bottleneck.layer
            tokens = self.clip_vision.forward_to(self.clip_vision.preprocess(images), layer)
            bottle = self.bottleneck(tokens, text_emb)
            embeds, out_tokens = self.clip_vision.forward_from(torch.cat([tokens, bottle.z]), layer)
            image_emb, bottled_emb = embeds[:b], embeds[b:]
            ib_cos = F.cosine_similarity(bottled_emb.float(), text_emb.float(), dim=-1)
            kl = bottle.kl
            saliency = saliency_from_kl(kl, self.clip_vision.grid, (h, w))
            refined = self.crf(saliency, images)
        else:
            saliency = refined = images.new_zeros(b, 1, h, w)

        # Prompts: boxes (user, saliency or the first-pass mask's), points, text tokens, dense saliency.
        cascade = boxes is None and points is None and self.uses_mask_boxes
        if boxes is not None:
            validate_boxes(boxes, self.image_size)
            boxes = boxes.to(images.device, torch.float32)
            box_valid = (
                torch.ones(boxes.shape[:2], dtype=torch.bool, device=images.device)
                if box_valid is None
                else box_valid.to(images.device)
            )
        elif not cascade and points is None and (prompt_boxes is not None or self.uses_saliency_boxes):
            if prompt_boxes is None:
                prompt_boxes = saliency_to_boxes(refined.detach(), cfg.boxes, self.image_size)
            boxes, box_valid = prompt_boxes[0].to(images.device), prompt_boxes[1].to(images.device)
        else:
            boxes = images.new_zeros(b, 0, 4)
            box_valid = torch.zeros(b, 0, dtype=torch.bool, device=images.device)

        image_embedding = self.sam.encode(images)
        grid = tuple(image_embedding.shape[-2:])
        dense = self.sam.no_mask_dense(b)
        if cfg.prompts.dense_saliency:
            patch_tokens = out_tokens[:b, 1:] if cfg.prompts.use_patch_features else None
            dense = dense + self.prompts.dense(refined, grid, patch_tokens)
        text_tokens = self.prompts.text_tokens(text_emb) if text_emb is not None else None
        coarse_logits = None
        if cascade:  # first pass without a box; its mask's enclosing box prompts the second
            low_res, _ = self._decode(image_embedding, boxes, box_valid, points, text_tokens, dense)
            coarse_logits = self.sam.upscale(low_res, (h, w))
            if prompt_boxes is None:
                prompt_boxes = mask_boxes((coarse_logits.detach() > 0).float())
            boxes, box_valid = prompt_boxes[0].to(images.device), prompt_boxes[1].to(images.device)
        low_res, iou = self._decode(image_embedding, boxes, box_valid, points, text_tokens, dense)
        mask_logits = self.sam.upscale(low_res, (h, w))
        return PromptSAMOutput(
            mask_logits=mask_logits,
            iou_pred=iou,
            saliency=saliency,
            refined_saliency=refined,
            boxes=boxes,
            box_valid=box_valid,
            image_embedding=image_emb,
            text_embedding=text_emb,
            kl=kl,
            ib_cos=ib_cos,
            coarse_logits=coarse_logits,
        )

    def _decode(
        self,
        image_embedding: torch.Tensor,
        boxes: torch.Tensor,
        box_valid: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        text_tokens: torch.Tensor | None,
        dense: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's mask decoder for B images, one prompt row per box (one row without a box), merged per image.

        Args:
            image_embedding: B x C x h x w from SAM's encoder.
            boxes: B x K x 4 (K = 0: no box); box_valid: B x K.
            text_tokens: B x T x C sparse text tokens, or None.
            dense: B x C x h x w dense prompt.

        Returns:
            (B x 1 x h' x w' low-resolution mask logits, B x 1 predicted IoU).
        """
        b, rows = image_embedding.shape[0], max(boxes.shape[1], 1)
        sparse = self._sparse_prompts(boxes, points, text_tokens, rows)
        low_res, iou = self.sam.decode(
            image_embedding, sparse, dense.repeat_interleave(rows, dim=0), multimask=self.cfg.sam.multimask,
            rows_per_image=rows,
        )
        if self.cfg.sam.multimask:  # keep the mask SAM rates best, per prompt row
            best = iou.argmax(dim=1)
            low_res = low_res[torch.arange(len(best)), best][:, None]
            iou = iou.gather(1, best[:, None])
        return self._merge_rows(low_res, iou, box_valid, b, rows)

    def _sparse_prompts(
        self,
        boxes: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        text_tokens: torch.Tensor | None,
        rows: int,
    ) -> torch.Tensor:
        """Sparse tokens for B*rows prompt rows: one box per row (+ points, + text tokens)."""
        b = boxes.shape[0]
        k = boxes.shape[1]
        row_boxes = boxes.reshape(b * k, 1, 4) if k else None
        row_points = None
        if points is not None:
            coords, labels = points
            row_points = (
                coords.to(boxes.device, torch.float32).repeat_interleave(rows, dim=0),
                labels.to(boxes.device).repeat_interleave(rows, dim=0),
            )
        sparse = self.sam.embed_prompts(row_boxes, row_points, batch_size=b * rows)
        if text_tokens is not None:
            sparse = torch.cat([sparse, text_tokens.repeat_interleave(rows, dim=0).to(sparse.dtype)], 1)
        return sparse

    @staticmethod
    def _merge_rows(
        low_res: torch.Tensor, iou: torch.Tensor, valid: torch.Tensor, b: int, rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge the masks of several box prompts per image by a max over valid rows.

        Args:
            low_res: (B*rows) x 1 x h x w logits.
            iou: (B*rows) x 1.
            valid: B x K (K = rows, or 0 when no boxes were used).
        """
        if rows == 1:
            return low_res, iou
        low_res = low_res.reshape(b, rows, *low_res.shape[1:])
        iou = iou.reshape(b, rows, -1)
        mask = valid.to(low_res.device)
        neg = torch.finfo(low_res.dtype).min
        merged = low_res.masked_fill(~mask[:, :, None, None, None], neg).amax(dim=1)
        weights = mask.float()[:, :, None]
        iou = (iou * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return merged, iou

    def compute_losses(
        self, out: PromptSAMOutput, masks: torch.Tensor, paired: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted training loss.

        Args:
            out: Forward output.
            masks: B x 1 x S x S ground truth in {0, 1}.
            paired: Optional B bool: False where the text does not describe the image (a negative
                prompt, :mod:`shared_model.data.negatives`); those rows are left out of the
                image/text contrastive loss. None: every row is a pair.

        Returns:
            (scalar loss, dict of each unweighted part and the total as floats).
        """
        loss, terms = self.compute_loss_terms(out, masks, paired)
        return loss, {name: float(value) for name, value in terms.items()}

    def compute_loss_terms(
        self, out: PromptSAMOutput, masks: torch.Tensor, paired: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`compute_losses` with the parts as detached scalar tensors (no host sync, and so
        vmap-safe, when ``paired`` is None)."""
        cfg = self.cfg.loss
        logits = out.mask_logits.float()
        parts = {
            "dice": L.dice_loss(logits, masks),
            "bce": L.bce_loss(logits, masks),
            "iou": L.iou_head_loss(out.iou_pred, logits, masks),
        }
        if out.coarse_logits is not None:
            coarse = out.coarse_logits.float()
            parts["coarse"] = L.dice_loss(coarse, masks) + cfg.bce * L.bce_loss(coarse, masks)
        if out.kl is not None:
            parts["ib"] = ib_loss(out.kl.float(), out.ib_cos, self.cfg.bottleneck.beta)
            parts["saliency"] = L.saliency_loss(out.refined_saliency.float(), masks)
        image_emb, text_emb = out.image_embedding, out.text_embedding
        if image_emb is not None and paired is not None:
            keep = paired.to(image_emb.device, torch.bool)
            image_emb, text_emb = image_emb[keep], text_emb[keep]
        if image_emb is not None and image_emb.shape[0] > 1:
            parts["nce"] = L.dhn_nce(
                image_emb.float(),
                text_emb.float(),
                cfg.nce_tau,
                cfg.nce_beta1,
                cfg.nce_beta2,
            )
        return L.total_loss_terms(parts, cfg)


def build_model(cfg: ModelConfig | str) -> PromptSAM:
    """Build PromptSAM from a config or a preset name.

    Pretrained weights are loaded when ``cfg.sam.checkpoint`` (SAM ``.pth``) or
    ``cfg.clip.checkpoint`` (local BiomedCLIP open_clip folder) are set, before adapters are
    injected; everything not meant to train is frozen, so the trainable parameters are exactly the
    exchanged state.
    """
    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        return _build(cfg)


def _build(cfg: ModelConfig) -> PromptSAM:
    weights, foundation = with_foundation_weights(cfg)
    sam = build_sam_parts(weights.sam)
    vision, text, tokenizer = build_clip(weights.clip)
    bottleneck = M2IB(cfg.bottleneck, width=cfg.clip.vision.width, text_dim=cfg.clip.embed_dim)
    crf = DenseCRF(cfg.crf)
    prompts = PromptProjections(
        cfg.prompts, text_dim=cfg.clip.embed_dim, prompt_dim=cfg.sam.prompt_dim, clip_width=cfg.clip.vision.width
    )
    model = PromptSAM(cfg, sam, vision, text, tokenizer, bottleneck, crf, prompts)
    if foundation is not None:
        load_text_to_sparse(prompts.sparse, foundation)
        model.foundation_digest = foundation.digest()
    _freeze_unused(model)
    return model


def _freeze_unused(model: PromptSAM) -> None:
    """Freeze the parts no prompt path uses, so that the trainable parameters (= the exchanged
    state) are exactly those that get gradients."""
    p = model.cfg.prompts
    if p.box_source not in BOX_SOURCES:
        raise ConfigError(f"model.prompts.box_source: expected one of {list(BOX_SOURCES)}, got {p.box_source!r}")
    if not model.uses_text:
        model.clip_text.requires_grad_(False)
    if not model.uses_saliency:
        for part in (model.clip_vision, model.bottleneck, model.crf):
            part.requires_grad_(False)
    if not p.dense_saliency:
        model.prompts.dense.requires_grad_(False)
    if not p.use_boxes:  # SAM's box-corner embeddings (point_embeddings[2:4]) are never used
        for corner in model.sam.prompt_encoder.point_embeddings[2:4]:
            corner.requires_grad_(False)


def component_parameter_counts(model: PromptSAM) -> dict[str, dict[str, int]]:
    """Total and trainable parameter counts per top-level component."""
    counts: dict[str, dict[str, int]] = {}
    for name, module in model.named_children():
        params = list(module.parameters())
        counts[name] = {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
        }
    return counts
