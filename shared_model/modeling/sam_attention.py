"""SAM image-encoder attention: an eager and an SDPA implementation, chosen per device.

segment-anything's ``Attention.forward`` computes ``softmax(q k^T * scale + rel_h + rel_w) v`` with
the decomposed relative-position terms ``rel_h`` (B x heads x H x W x H) and ``rel_w`` (... x W)
broadcast onto the scores, keeping two full-size temporaries. :class:`RelPosAttention` computes the
same function two ways:

* ``eager``: the same steps with the rel-pos terms added in place onto the scores (autograd keeps
  only the softmax output for backward). Fastest on CPU at 128-512 px (``promptsam bench attention``):
  PyTorch's CPU SDPA kernels gain nothing with an additive mask and pay for materialising it.
* ``sdpa``: ``F.scaled_dot_product_attention`` with the rel-pos terms materialised as the
  additive ``attn_mask``, which lets PyTorch pick a fused CUDA kernel (no stored softmax).
* ``auto``: ``sdpa`` on CUDA, ``eager`` elsewhere, decided from the input's device at each call.

It is a subclass with the same parameters, so :func:`use_attention` swaps the class of existing
modules in place: parameter names, loaded weights and injected LoRA layers (``attn.qkv``) are
untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos
from torch import nn
from torch.utils.checkpoint import checkpoint

ATTENTION_IMPLS = ("auto", "eager", "sdpa")


def resolve_attention(impl: str, device: torch.device) -> str:
    """``eager`` or ``sdpa``: ``impl`` itself, or for ``auto`` the one measured fastest on ``device``."""
    if impl == "auto":
        return "sdpa" if device.type == "cuda" else "eager"
    return impl


class RelPosAttention(Attention):
    """segment-anything ``Attention`` with a selectable implementation (``impl``, see the module)."""

    impl: str = "auto"

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
        rel_h = rel_w = None
        if self.use_rel_pos:
            r_q = q.reshape(b, heads, h, w, -1)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, self.rel_pos_h))  # B x n x H x W x H
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, self.rel_pos_w))  # B x n x H x W x W
        if resolve_attention(self.impl, x.device) == "sdpa":
            mask = None
            if rel_h is not None:
                # bias[b, n, (qh, qw), (kh, kw)] = rel_h[b, n, qh, qw, kh] + rel_w[b, n, qh, qw, kw]
                mask = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, h * w, h * w).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            # The matmul's backward needs q and k, not its output: adding in place is safe.
            scores = (q * self.scale) @ k.transpose(-2, -1)  # B x n x HW x HW
            if rel_h is not None:
                grid = scores.view(b, heads, h, w, h, w)
                grid.add_(rel_h[..., :, None]).add_(rel_w[..., None, :])
            out = scores.softmax(dim=-1) @ v
        out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def use_attention(image_encoder: nn.Module, impl: str = "auto") -> int:
    """Switch every segment-anything encoder ``Attention`` in ``image_encoder`` to ``impl`` in place.

    Args:
        image_encoder: A segment-anything ``ImageEncoderViT`` (LoRA-adapted or not).
        impl: One of :data:`ATTENTION_IMPLS`.

    Returns:
        The number of attention modules switched.

    Raises:
        ValueError: If ``impl`` is unknown (names the config field).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"sam.attention: expected one of {ATTENTION_IMPLS}, got {impl!r}")
    count = _swap_class(image_encoder, Attention, RelPosAttention)
    for module in image_encoder.modules():
        if isinstance(module, RelPosAttention):
            module.impl = impl
    return count


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
