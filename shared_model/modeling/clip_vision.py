"""BiomedCLIP vision tower: open_clip's ``TimmModel`` (a timm ViT + linear head) with a split forward.

:class:`ClipVision` holds the ``trunk`` and ``head`` of the open_clip model's ``visual`` tower (so the
parameter names are open_clip's ``visual.*`` without the prefix) and adds what open_clip lacks: the forward
pass split at a block index (``forward_to`` / ``forward_from``), so that the information bottleneck can act
on the intermediate tokens, tensor preprocessing, and LoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from torch import nn

from shared_model.config import ClipConfig
from shared_model.modeling.lora import add_lora, freeze, linear_names, unfreeze_lora


class ClipVision(nn.Module):
    """ViT image encoder with its projection into the shared CLIP space.

    Args:
        visual: The ``visual`` tower of an open_clip model built for ``cfg`` (see
            :func:`shared_model.modeling.biomedclip.create_open_clip`); its modules are shared, not copied.
        cfg: The CLIP config (``cfg.vision`` image size, mean/std and adapters).
    """

    def __init__(self, visual: TimmModel, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk, self.head = visual.trunk, visual.head
        v = cfg.vision
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
        """Blocks ``layer ..``, final norm, timm's pooling and open_clip's projection head.

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
