"""BiomedCLIP vision tower: a timm ViT laid out like open_clip's ``TimmModel``.

BiomedCLIP's ``open_clip_config.json`` uses ``timm_model_name=vit_base_patch16_224``, ``timm_pool=""``
and ``timm_proj="linear"``: open_clip then keeps timm's default token pooling (CLS after the final
norm), drops timm's classifier and adds ``head = Sequential(drop, proj)`` with a bias-free
``Linear(width, embed_dim)``. The parameter names here are the same (``trunk.*``, ``head.proj.weight``),
so a checkpoint's ``visual.*`` entries load directly (see :mod:`shared_model.biomedclip`).

The forward pass is split at a block index (``forward_to`` / ``forward_from``) so that an information
bottleneck can act on the intermediate tokens.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from shared_model.config import ClipConfig, ConfigError
from shared_model.lora import add_lora, freeze, linear_names, unfreeze_lora


class ClipVision(nn.Module):
    """ViT image encoder with a linear projection into the shared CLIP space.

    ``ClipVision(cfg)`` builds the plain tower (all parameters trainable, as after construction of any
    module); load weights, then call :meth:`add_adapters` to inject LoRA and freeze the rest.

    Args:
        cfg: The CLIP config (``cfg.vision`` sizes and adapters, ``cfg.embed_dim``).
    """

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        v = cfg.vision
        if v.image_size % v.patch_size:
            raise ConfigError(
                f"model.clip.vision.image_size: {v.image_size} is not a multiple of patch_size {v.patch_size}"
            )
        if v.width % v.heads:
            raise ConfigError(f"model.clip.vision.width: {v.width} is not divisible by heads {v.heads}")
        for name in ("lora_last_blocks", "unfreeze_last_blocks"):
            if not 0 <= getattr(v, name) <= v.depth:
                raise ConfigError(
                    f"model.clip.vision.{name}: {getattr(v, name)} is outside [0, depth={v.depth}]"
                )
        if len(v.mean) != 3 or len(v.std) != 3 or min(v.std) <= 0:
            raise ConfigError("model.clip.vision.mean/std: expected 3 values each, std > 0")
        self.cfg = cfg
        self.trunk = VisionTransformer(
            img_size=v.image_size,
            patch_size=v.patch_size,
            embed_dim=v.width,
            depth=v.depth,
            num_heads=v.heads,
            mlp_ratio=v.mlp_ratio,
            qkv_bias=True,
            class_token=True,
            global_pool="token",
            num_classes=0,
        )
        self.head = nn.Sequential(
            OrderedDict(drop=nn.Dropout(0.0), proj=nn.Linear(v.width, cfg.embed_dim, bias=False))
        )
        self.register_buffer("mean", torch.tensor(v.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(v.std).view(1, 3, 1, 1), persistent=False)
        self.adapted = False

    @property
    def grid(self) -> int:
        """Patches per image side (image_size / patch_size)."""
        return self.cfg.vision.image_size // self.cfg.vision.patch_size

    @property
    def depth(self) -> int:
        return len(self.trunk.blocks)

    @property
    def width(self) -> int:
        return self.cfg.vision.width

    def add_adapters(self) -> None:
        """Freeze the tower, then add LoRA on the last blocks' ``attn.qkv`` and unfreeze configured blocks.

        Trainable afterwards: LoRA A/B of blocks ``depth - lora_last_blocks ..``, and every parameter of
        blocks ``depth - unfreeze_last_blocks ..``. Call once, after loading pretrained weights.
        """
        if self.adapted:
            raise RuntimeError("ClipVision.add_adapters: adapters were already added")
        v = self.cfg.vision
        freeze(self)
        if v.lora_last_blocks > 0:
            prefixes = [f"trunk.blocks.{i}." for i in range(v.depth - v.lora_last_blocks, v.depth)]
            add_lora(self, linear_names(self, ["qkv"], prefixes), v.lora_rank, v.lora_alpha)
            unfreeze_lora(self)
        if v.unfreeze_last_blocks > 0:
            for block in list(self.trunk.blocks)[-v.unfreeze_last_blocks:]:
                for p in block.parameters():
                    p.requires_grad_(True)
        self.adapted = True

    def preprocess(self, images01: torch.Tensor) -> torch.Tensor:
        """Resize and normalise images for the tower.

        Args:
            images01: B x 3 x H x W, values in [0, 1].

        Returns:
            B x 3 x S x S normalised with the config mean/std, S = ``cfg.vision.image_size``.
        """
        if images01.dim() != 4 or images01.shape[1] != 3 or not images01.is_floating_point():
            raise ValueError(
                "ClipVision.preprocess: expected float B x 3 x H x W images in [0, 1], got "
                f"{images01.dtype} {tuple(images01.shape)}"
            )
        size = self.cfg.vision.image_size
        x = images01
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer <= self.depth:
            raise ValueError(f"ClipVision: layer {layer} is outside [0, depth={self.depth}]")

    def forward_to(self, x_norm: torch.Tensor, layer: int) -> torch.Tensor:
        """Patch embedding, [CLS] and position embedding, then blocks ``0 .. layer-1``.

        Args:
            x_norm: B x 3 x S x S preprocessed images.
            layer: Number of blocks to run (0 = embeddings only).

        Returns:
            B x (1 + N) x D tokens, [CLS] first, N = grid * grid.
        """
        self._check_layer(layer)
        size = self.cfg.vision.image_size
        if x_norm.dim() != 4 or tuple(x_norm.shape[1:]) != (3, size, size):
            raise ValueError(
                f"ClipVision.forward_to: expected B x 3 x {size} x {size} (run preprocess), got {tuple(x_norm.shape)}"
            )
        t = self.trunk
        x = t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(x_norm))))
        for block in list(t.blocks)[:layer]:
            x = block(x)
        return x

    def forward_from(self, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``layer ..``, final norm, [CLS] pooling and projection.

        Args:
            tokens: B x (1 + N) x D tokens as returned by ``forward_to(x, layer)``.
            layer: The same split index.

        Returns:
            embedding: B x E image embedding (not normalised).
            tokens_out: B x (1 + N) x D tokens after the final norm.
        """
        self._check_layer(layer)
        x = tokens
        for block in list(self.trunk.blocks)[layer:]:
            x = block(x)
        x = self.trunk.norm(x)
        return self.head(self.trunk.forward_head(x)), x

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """Images B x 3 x H x W in [0, 1] -> B x E embeddings."""
        return self.forward_from(self.forward_to(self.preprocess(images01), 0), 0)[0]
