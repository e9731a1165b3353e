"""SAM image-encoder attention through ``F.scaled_dot_product_attention``.

segment-anything's ``Attention.forward`` materialises the softmax matrix itself and adds the
decomposed relative-position terms to it. :class:`SdpaAttention` computes the same function with
the rel-pos terms materialised as the additive ``attn_mask`` of SDPA, which lets PyTorch pick a
fused kernel (no stored softmax for backward). It is a subclass with the same parameters, so
:func:`use_sdpa_attention` swaps the class of existing modules in place: parameter names, loaded
weights and injected LoRA layers (``attn.qkv``) are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos
from torch import nn
from torch.utils.checkpoint import checkpoint


class SdpaAttention(Attention):
    """segment-anything ``Attention`` whose forward uses ``F.scaled_dot_product_attention``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention with decomposed relative positions.

        Args:
            x: B x H x W x C tokens (a window or the whole grid).

        Returns:
            B x H x W x C.
        """
        b, h, w, _ = x.shape
        heads = self.num_heads
        # 3 x B x heads x HW x d
        qkv = self.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        mask = None
        if self.use_rel_pos:
            rh = get_rel_pos(h, h, self.rel_pos_h)  # H x H x d
            rw = get_rel_pos(w, w, self.rel_pos_w)  # W x W x d
            r_q = q.reshape(b, heads, h, w, -1)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)
            # bias[b, n, (qh, qw), (kh, kw)] = rel_h[b, n, qh, qw, kh] + rel_w[b, n, qh, qw, kw]
            mask = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, h * w, h * w)
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def use_sdpa_attention(image_encoder: nn.Module) -> int:
    """Switch every segment-anything encoder ``Attention`` in ``image_encoder`` to SDPA in place.

    Args:
        image_encoder: A segment-anything ``ImageEncoderViT`` (LoRA-adapted or not).

    Returns:
        The number of attention modules switched.
    """
    return _swap_class(image_encoder, Attention, SdpaAttention)


class CheckpointedBlock(Block):
    """segment-anything encoder ``Block`` that recomputes its activations in backward.

    With gradients on, the block's forward runs under ``torch.utils.checkpoint`` (non-reentrant):
    only its input is kept for backward and everything inside (attention, MLP, LoRA) is
    recomputed, trading about one more encoder forward for most of the encoder's activation
    memory. Without gradients (evaluation) it is the plain block.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x H x W x C tokens -> B x H x W x C."""
        if torch.is_grad_enabled():
            return checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)


def use_activation_checkpointing(image_encoder: nn.Module) -> int:
    """Make every encoder ``Block`` of ``image_encoder`` a :class:`CheckpointedBlock` in place.

    Parameter names and injected LoRA layers are untouched (only the class changes).

    Returns:
        The number of blocks switched.
    """
    return _swap_class(image_encoder, Block, CheckpointedBlock)


def _swap_class(root: nn.Module, old: type, new: type) -> int:
    """Give every module of exactly class ``old`` under ``root`` the subclass ``new``; count them."""
    count = 0
    for module in root.modules():
        if type(module) is old:
            module.__class__ = new
            count += 1
    return count
