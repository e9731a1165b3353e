"""SAM's image encoder, prompt encoder and mask decoder, sized from :class:`SamConfig`.

:class:`SamParts` assembles segment-anything's modules directly (its ``_build_sam`` hard-codes
1024 px and 256-d prompts), keeps their attribute names so official checkpoints load, and exposes
the steps of SAM separately, because ``Sam.forward`` runs under ``torch.no_grad``. The mask
decoder is re-implemented batched over images (segment-anything's assumes one image per call).
:func:`load_sam_checkpoint` loads an official ``.pth``, interpolating the positional embeddings
when the input size is not 1024 px (as SAMed does).
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from shared_model.config import ATTENTION_IMPLS, ConfigError, SamConfig
from shared_model.modeling.lora import add_lora, freeze, linear_names, unfreeze_lora
from shared_model.modeling.sam_attention import use_activation_checkpointing, use_attention

ATTENTION_MODES = (*ATTENTION_IMPLS, "sam")
DECODER_MODES = ("lora", "train", "frozen")


class SamParts(nn.Module):
    """SAM split into encode / embed_prompts / decode / upscale steps.

    Attributes:
        image_encoder: segment-anything ``ImageEncoderViT`` (S x S -> C x S/p x S/p, C = prompt_dim).
        prompt_encoder: segment-anything ``PromptEncoder``.
        mask_decoder: segment-anything ``MaskDecoder`` with a ``TwoWayTransformer``.
        pixel_mean, pixel_std: 3 x 1 x 1 normalisation buffers (0..255 scale, not saved).
    """

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        s, p = cfg.image_size, cfg.patch_size
        self.embed_size = s // p
        self.image_encoder = ImageEncoderViT(
            img_size=s,
            patch_size=p,
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            out_chans=cfg.prompt_dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=cfg.window_size,
            global_attn_indexes=tuple(cfg.global_attn_indexes),
        )
        self.prompt_encoder = PromptEncoder(
            embed_dim=cfg.prompt_dim,
            image_embedding_size=(self.embed_size, self.embed_size),
            input_image_size=(s, s),
            mask_in_chans=cfg.mask_in_chans,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=cfg.prompt_dim,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_heads,
            ),
            num_multimask_outputs=cfg.num_multimask_outputs,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        )
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(3, 1, 1), False)
        if cfg.attention != "sam":
            use_attention(self.image_encoder, cfg.attention)
        if cfg.activation_checkpointing:
            use_activation_checkpointing(self.image_encoder)
        self.adapted = False

    # ----------------------------------------------------------------------------------------
    # Forward steps
    # ----------------------------------------------------------------------------------------

    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """Image embeddings.

        Args:
            images01: B x 3 x S x S RGB in [0, 1].

        Returns:
            B x C x S/p x S/p (C = prompt_dim).
        """
        s = self.cfg.image_size
        if images01.ndim != 4 or tuple(images01.shape[1:]) != (3, s, s):
            raise ValueError(f"SamParts.encode: expected B x 3 x {s} x {s} images, got {tuple(images01.shape)}")
        x = (images01 * 255.0 - self.pixel_mean) / self.pixel_std
        return self.image_encoder(x)

    def embed_prompts(
        self,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Sparse prompt embeddings of points and boxes (input-pixel coordinates, 0..S).

        Same as segment-anything's ``PromptEncoder.forward`` (points first, padded with a
        not-a-point token when there are no boxes), but several boxes per row are allowed.

        Args:
            boxes: B x K x 4 boxes (x0, y0, x1, y1), or None.
            points: (B x P x 2 coordinates (x, y), B x P labels: 1 foreground, 0 background,
                -1 ignored), or None.
            batch_size: B; required when there are neither boxes nor points (the result is
                then B x 0 x C), checked against the prompts otherwise.

        Returns:
            B x N x C with N = P (+1 padding when boxes is None) + 2K.
        """
        pe = self.prompt_encoder
        parts: list[torch.Tensor] = []
        if points is not None:
            coords, labels = points
            if coords.ndim != 3 or coords.shape[-1] != 2 or tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ValueError(
                    "SamParts.embed_prompts: points must be (B x P x 2 coords, B x P labels), got "
                    f"{tuple(coords.shape)} and {tuple(labels.shape)}"
                )
            parts.append(pe._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            if boxes.ndim != 3 or boxes.shape[-1] != 4:
                raise ValueError(f"SamParts.embed_prompts: boxes must be B x K x 4, got {tuple(boxes.shape)}")
            b, k = boxes.shape[:2]
            corners = (boxes + 0.5).reshape(b, 2 * k, 2)  # shift to pixel centres, as SAM does
            emb = pe.pe_layer.forward_with_coords(corners, pe.input_image_size)
            corner_kind = torch.cat([pe.point_embeddings[2].weight, pe.point_embeddings[3].weight])
            parts.append(emb + corner_kind.repeat(k, 1))
        if not parts:
            if batch_size is None:
                raise ValueError("SamParts.embed_prompts: give boxes, points or batch_size")
            weight = pe.not_a_point_embed.weight
            return weight.new_zeros(batch_size, 0, weight.shape[1])
        sizes = {t.shape[0] for t in parts} | ({batch_size} if batch_size is not None else set())
        if len(sizes) > 1:
            raise ValueError(f"SamParts.embed_prompts: batch sizes of points / boxes / batch_size differ: {sizes}")
        return torch.cat(parts, dim=1)

    def no_mask_dense(self, batch: int) -> torch.Tensor:
        """Dense embedding meaning "no mask prompt": B x C x h x w (a broadcast view)."""
        weight = self.prompt_encoder.no_mask_embed.weight
        return weight.reshape(1, -1, 1, 1).expand(batch, -1, self.embed_size, self.embed_size)

    def dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid: 1 x C x h x w."""
        return self.prompt_encoder.get_dense_pe()

    def decode(
        self,
        image_emb: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask: bool = False,
        rows_per_image: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's mask decoder, batched over images.

        Computes what ``MaskDecoder.forward`` computes for one image, with one image embedding per
        group of ``rows_per_image`` prompt rows (rows i*R .. i*R+R-1 belong to image i).

        Args:
            image_emb: B x C x h x w image embeddings.
            sparse: B*R x N x C sparse prompt embeddings.
            dense: B*R x C x h x w (or B x C x h x w, shared by an image's rows) dense embeddings.
            multimask: Return the num_multimask_outputs masks (M = 3) instead of the single one.
            rows_per_image: R, prompt rows per image.

        Returns:
            Low-resolution mask logits B*R x M x 4h x 4w and predicted IoU B*R x M.
        """
        md = self.mask_decoder
        b, c, h, w = image_emb.shape
        r = rows_per_image
        rows = b * r
        if r < 1 or sparse.ndim != 3 or sparse.shape[0] != rows or sparse.shape[2] != c:
            raise ValueError(
                f"SamParts.decode: sparse must be (B*R={rows}) x N x {c} for image_emb {tuple(image_emb.shape)} "
                f"and rows_per_image={r}, got {tuple(sparse.shape)}"
            )
        if dense.ndim != 4 or tuple(dense.shape[1:]) != (c, h, w) or dense.shape[0] not in (b, rows):
            raise ValueError(
                f"SamParts.decode: dense must be {b} or {rows} x {c} x {h} x {w}, got {tuple(dense.shape)}"
            )
        if r > 1:
            image_emb = image_emb.repeat_interleave(r, dim=0)
            if dense.shape[0] == b:
                dense = dense.repeat_interleave(r, dim=0)
        src = image_emb + dense
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(rows, -1, -1).to(sparse.dtype), sparse], dim=1)

        # The transformer adds the positional encoding with broadcasting: 1 x C x h x w suffices.
        hs, src = md.transformer(src, self.dense_pe(), tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + md.num_mask_tokens, :]

        upscaled = md.output_upscaling(src.transpose(1, 2).reshape(rows, c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], dim=1
        )
        _, cu, hu, wu = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(rows, cu, hu * wu)).reshape(rows, -1, hu, wu)
        iou = md.iou_prediction_head(iou_token_out)
        keep = slice(1, None) if multimask else slice(0, 1)
        return masks[:, keep], iou[:, keep]

    def upscale(self, low_res_logits: torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Bilinear upsampling of mask logits.

        Args:
            low_res_logits: B x M x 4h x 4w.
            size: Output H x W: an int (square), an (H, W) pair, or None for S x S.

        Returns:
            B x M x H x W.
        """
        size = size or self.cfg.image_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return F.interpolate(low_res_logits, size=hw, mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------------------------------
    # Adapters
    # ----------------------------------------------------------------------------------------

    def add_adapters(self) -> None:
        """Freeze the image encoder with LoRA on it, and set the decoder / prompt-encoder modes.

        Call after loading weights. Image encoder: frozen, LoRA (cfg.lora_rank / lora_alpha /
        lora_dropout) on the Linear layers named in cfg.lora_targets of the blocks in
        cfg.lora_blocks (empty = all). Mask decoder by cfg.decoder_mode: "lora" frozen with LoRA
        on cfg.decoder_lora_targets of its transformer's attention, "train" fully trainable,
        "frozen" fixed. Prompt encoder trainable iff cfg.prompt_encoder_trainable.
        """
        if self.adapted:
            raise RuntimeError("SamParts.add_adapters: adapters were already added")
        cfg = self.cfg
        blocks = cfg.lora_blocks or list(range(cfg.depth))
        names = linear_names(self.image_encoder, cfg.lora_targets, [f"blocks.{i}." for i in blocks])
        if cfg.lora_rank > 0 and not names:
            raise ConfigError(f"sam.lora_targets: no Linear layer named {cfg.lora_targets} in the image encoder")
        freeze(self.image_encoder)
        add_lora(self.image_encoder, names, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        unfreeze_lora(self.image_encoder)

        if cfg.decoder_mode == "lora":
            names = linear_names(self.mask_decoder, cfg.decoder_lora_targets, ["transformer."])
            if cfg.lora_rank > 0 and not names:
                raise ConfigError(
                    f"sam.decoder_lora_targets: no Linear layer named {cfg.decoder_lora_targets} "
                    "in the mask decoder's transformer"
                )
            freeze(self.mask_decoder)
            add_lora(self.mask_decoder, names, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
            unfreeze_lora(self.mask_decoder)
        else:
            self.mask_decoder.requires_grad_(cfg.decoder_mode == "train")
        self.prompt_encoder.requires_grad_(cfg.prompt_encoder_trainable)
        self._freeze_unused()
        self.adapted = True

    def _freeze_unused(self) -> None:
        """Freeze what training never reaches, so it is not exchanged: SAM's mask-input branch
        (dense prompts come from the saliency projection), the point-label embeddings (points are
        an inference-time correction), and the multimask output heads when only one mask is used."""
        pe = self.prompt_encoder
        for module in (pe.mask_downscaling, pe.point_embeddings[0], pe.point_embeddings[1], pe.not_a_point_embed):
            freeze(module)
        if not self.cfg.multimask:
            for mlp in self.mask_decoder.output_hypernetworks_mlps[1:]:
                freeze(mlp)


def _check_config(cfg: SamConfig) -> None:
    """Raise ConfigError naming the field for SamConfig values SamParts cannot build."""
    if cfg.attention not in ATTENTION_MODES:
        raise ConfigError(f"sam.attention: expected one of {ATTENTION_MODES}, got {cfg.attention!r}")
    if cfg.decoder_mode not in DECODER_MODES:
        raise ConfigError(f"sam.decoder_mode: expected one of {DECODER_MODES}, got {cfg.decoder_mode!r}")
    if cfg.patch_size <= 0 or cfg.image_size % cfg.patch_size:
        raise ConfigError(
            f"sam.image_size: {cfg.image_size} is not a multiple of sam.patch_size {cfg.patch_size}"
        )
    if cfg.width % cfg.heads:
        raise ConfigError(f"sam.heads: {cfg.heads} does not divide sam.width {cfg.width}")
    if cfg.prompt_dim % 8 or cfg.prompt_dim % cfg.decoder_heads:
        raise ConfigError(
            f"sam.prompt_dim: {cfg.prompt_dim} must be a multiple of 8 and of sam.decoder_heads {cfg.decoder_heads}"
        )
    if cfg.mask_in_chans % 4:
        raise ConfigError(f"sam.mask_in_chans: {cfg.mask_in_chans} must be a multiple of 4")
    for field_name, values in (("global_attn_indexes", cfg.global_attn_indexes), ("lora_blocks", cfg.lora_blocks)):
        bad = [i for i in values if not 0 <= i < cfg.depth]
        if bad:
            raise ConfigError(f"sam.{field_name}: block index(es) {bad} outside 0..{cfg.depth - 1}")
    if len(cfg.pixel_mean) != 3 or len(cfg.pixel_std) != 3:
        raise ConfigError("sam.pixel_mean / sam.pixel_std: expected 3 values each")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

_REL_POS = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.rel_pos_[hw]$")
_LIST_LIMIT = 20


def load_sam_checkpoint(parts: SamParts, path: str | Path) -> None:
    """Load an official SAM checkpoint (or ``{"model": state_dict}``) into ``parts`` in place.

    When the checkpoint was made for another input size, ``image_encoder.pos_embed``
    (1 x G x G x C) is resized bilinearly to 1 x S/p x S/p x C, and the rel_pos_h / rel_pos_w
    (2G-1 x d) of the global-attention blocks linearly along their length to 2 S/p - 1 x d (as
    SAMed does); windowed blocks keep theirs. Must be called before :meth:`SamParts.add_adapters`.

    Raises:
        FileNotFoundError: The file does not exist (the message names it).
        ValueError: The file is not a state dict, or keys / shapes still disagree; the message
            names the file and lists missing, unexpected and mismatched keys with shapes.
    """
    path = Path(path)
    if parts.adapted:
        raise RuntimeError(f"load_sam_checkpoint({path}): load weights before SamParts.add_adapters")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SAM checkpoint not found")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a SAM state dict (or {{'model': state_dict}}), got {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if k not in ("pixel_mean", "pixel_std")}
    own = parts.state_dict()
    global_blocks = set(parts.cfg.global_attn_indexes)
    for key, value in state.items():
        target = own.get(key)
        if target is None or target.shape == value.shape:
            continue
        if key == "image_encoder.pos_embed" and value.ndim == 4 and value.shape[-1] == target.shape[-1]:
            state[key] = _resize_pos_embed(value, target.shape[1:3])
        match = _REL_POS.match(key)
        if match and int(match.group(1)) in global_blocks and value.ndim == 2 and value.shape[1] == target.shape[1]:
            state[key] = _resize_rel_pos(value, target.shape[0])

    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path}: checkpoint does not match the SAM configuration"
            + _listing("missing keys", missing)
            + _listing("unexpected keys", unexpected)
            + _listing("mismatched shapes", mismatched)
        )
    parts.load_state_dict(state, strict=True)


def _resize_pos_embed(pos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """1 x G x G x C -> 1 x h x w x C, bilinear."""
    resized = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=tuple(size), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos.dtype).contiguous()


def _resize_rel_pos(rel: torch.Tensor, length: int) -> torch.Tensor:
    """L x d -> length x d, linear along L (segment-anything's own get_rel_pos rule)."""
    resized = F.interpolate(rel.t()[None].float(), size=length, mode="linear", align_corners=False)
    return resized[0].t().to(rel.dtype).contiguous()


def _listing(title: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = items[:_LIST_LIMIT]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(shown) + more


def build_sam_parts(cfg: SamConfig, adapters: bool = True) -> SamParts:
    """SamParts from ``cfg``: load ``cfg.checkpoint`` if set, then add adapters if asked."""
    parts = SamParts(cfg)
    if cfg.checkpoint:
        load_sam_checkpoint(parts, cfg.checkpoint)
    if adapters:
        parts.add_adapters()
    return parts
