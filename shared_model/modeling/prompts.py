"""Projections from BiomedCLIP into SAM's prompt spaces.

* Text embedding (B x E) -> ``text_tokens`` sparse prompt tokens (B x n x C), appended to SAM's
  box/point tokens.
* Refined saliency (B x 1 x H x W), and optionally CLIP patch features (B x N x D), -> a dense
  prompt (B x C x h x w) added to SAM's "no mask" dense embedding. The last layer of the dense
  projection starts at zero, so an untrained projection leaves SAM's behaviour unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shared_model.config import PromptConfig


class TextToSparse(nn.Module):
    """Text embedding -> n sparse prompt tokens.

    One shared linear map followed by a learned per-token scale and offset, which keeps the
    parameter count at about E x C while letting the tokens differ.
    """

    def __init__(self, text_dim: int, prompt_dim: int, n_tokens: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, prompt_dim)
        self.scale = nn.Parameter(torch.ones(n_tokens, prompt_dim))
        self.offset = nn.Parameter(torch.randn(n_tokens, prompt_dim) * 0.02)

    def forward(self, text_emb: torch.Tensor) -> torch.Tensor:
        """Args: text_emb: B x E. Returns: B x n x C."""
        base = self.proj(F.normalize(text_emb, dim=-1) * math.sqrt(text_emb.shape[-1]))
        return base[:, None, :] * self.scale + self.offset


class SaliencyToDense(nn.Module):
    """Refined saliency (and optionally CLIP patch tokens) -> dense prompt embedding."""

    def __init__(self, prompt_dim: int, hidden: int, clip_width: int, use_patch_features: bool) -> None:
        super().__init__()
        self.saliency_net = nn.Sequential(
            nn.Conv2d(1, hidden, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, prompt_dim, kernel_size=1),
        )
        nn.init.zeros_(self.saliency_net[-1].weight)
        nn.init.zeros_(self.saliency_net[-1].bias)
        self.patch_proj = None
        if use_patch_features:
            self.patch_proj = nn.Conv2d(clip_width, prompt_dim, kernel_size=1)
            nn.init.zeros_(self.patch_proj.weight)
            nn.init.zeros_(self.patch_proj.bias)

    def forward(
        self,
        saliency: torch.Tensor,
        grid: tuple[int, int],
        patch_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Project the saliency onto SAM's embedding grid.

        Args:
            saliency: B x 1 x H x W in [0, 1].
            grid: (h, w) of SAM's image embedding.
            patch_tokens: B x N x D CLIP patch tokens (CLS removed), N a square; used only when the
                projection was built with ``use_patch_features``.

        Returns:
            B x C x h x w.
        """
        sal = F.interpolate(saliency, size=grid, mode="bilinear", align_corners=False)
        dense = self.saliency_net(sal * 2.0 - 1.0)
        if self.patch_proj is not None and patch_tokens is not None:
            b, n, d = patch_tokens.shape
            side = int(math.isqrt(n))
            feats = patch_tokens.transpose(1, 2).reshape(b, d, side, side)
            feats = F.interpolate(feats, size=grid, mode="bilinear", align_corners=False)
            dense = dense + self.patch_proj(feats)
        return dense


class PromptProjections(nn.Module):
    """Both projections, built from :class:`PromptConfig`."""

    def __init__(self, cfg: PromptConfig, text_dim: int, prompt_dim: int, clip_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.sparse = TextToSparse(text_dim, prompt_dim, cfg.text_tokens) if cfg.text_tokens > 0 else None
        self.dense = SaliencyToDense(prompt_dim, cfg.dense_hidden, clip_width, cfg.use_patch_features)

    def text_tokens(self, text_emb: torch.Tensor) -> torch.Tensor | None:
        """B x E -> B x n x C (None when ``text_tokens`` is 0)."""
        return None if self.sparse is None else self.sparse(text_emb)
