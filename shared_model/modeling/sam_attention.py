"""SAM image-encoder attention: an eager and an SDPA implementation, chosen per device.

segment-anything's ``Attention.forward`` computes ``softmax(q k^T * scale + rel_h + rel_w) v`` with
the decomposed relative-position terms ``rel_h`` (B x heads x H x W x H) and ``rel_w`` (... x W)
broadcast onto the scores, keeping two full-size temporaries. :class:`RelPosAttention` computes the
same function two ways:

* ``eager``: the same steps, with the bias ``rel_h + rel_w`` built once and the scores computed as
  ``baddbmm(bias, q, k^T, alpha=scale)`` (one fused kernel, one temporary fewer). On CPU at
  128-512 px its median is at or above segment-anything's own forward and the SDPA path's
  (``promptsam bench attention``, docs/bench/attention_cpu.json): PyTorch's CPU SDPA kernels gain
  nothing from an additive mask.
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

from shared_model.config import ATTENTION_IMPLS


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
        # 3 x (B heads) x HW x d, contiguous (as segment-anything lays them out)
        qkv = self.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b * heads, h * w, -1)
        q, k, v = qkv.unbind(0)
        bias = None
        if self.use_rel_pos:
            r_q = q.view(b * heads, h, w, -1)
            # Made contiguous (small), the sum below comes out contiguous: no copy of the big bias.
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, self.rel_pos_h)).contiguous()
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, self.rel_pos_w)).contiguous()
            # bias[(b n), (qh, qw), (kh, kw)] = rel_h[(b n), qh, qw, kh] + rel_w[(b n), qh, qw, kw]
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).view(b * heads, h * w, h * w)
        if resolve_attention(self.impl, x.device) == "sdpa":
            mask = None if bias is None else bias.view(b, heads, h * w, h * w).to(q.dtype)
            four_d = [t.view(b, heads, h * w, -1) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*four_d, attn_mask=mask, scale=self.scale)
        else:
            if bias is None:
                scores = (q * self.scale) @ k.transpose(1, 2)
            else:  # one fused bias + scale * q k^T
                scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=self.scale)
            out = scores.softmax(dim=-1) @ v  # (B heads) x HW x d
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
