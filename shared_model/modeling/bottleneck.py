"""M2IB information bottleneck with a learned, text-conditioned gate network.

The reference M2IB (MedCLIP-SAMv2) optimises a per-image gate ``alpha`` for several Adam steps.
Here a small gate network, conditioned on the text embedding, predicts ``lambda = sigmoid(alpha)``
for every token and channel in one forward pass, so saliency costs one pass and the gates are
trained (and federated) like any other adapter.

Bottleneck (per image, per channel ``d``; ``mu``/``sigma`` are the mean/std of ``x`` over the
image's tokens, detached: they are the noise distribution's estimate, as in IBA)::

    x_s = (x - mu) / sigma                                  # standardised features
    z_s = lambda * x_s + (1 - lambda) * eps,  eps ~ N(0, 1) # eps = 0 in eval or without noise
    z   = z_s * sigma + mu = lambda*x + (1-lambda)*eps*sigma + (1-lambda)*mu
    KL  = -1/2 (1 + log((1-lambda)^2) - (lambda x_s)^2 - (1-lambda)^2)

``KL`` is exactly KL(N(lambda x_s, (1-lambda)^2) || N(0, 1)) per element; the log term is computed
as ``2 * logsigmoid(-alpha)`` so it stays finite when ``lambda -> 1``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_model.config import BottleneckConfig, ConfigError

# Initial bias of the gate's output layer: lambda starts at sigmoid(1.5) ~= 0.82 for every element
# (small output weights keep it within about 0.75-0.87 at init, measured for the tiny and base
# sizes): most of the signal passes and the gates learn what to suppress.
GATE_INIT_BIAS = 1.5
GATE_INIT_STD = 0.02
STD_EPS = 1e-5


class BottleneckOutput(NamedTuple):
    """Result of :meth:`M2IB.forward`.

    Attributes:
        z: B x T x D bottlenecked tokens (same dtype as the input tokens).
        kl: B x T x D per-element KL divergence (float32), >= 0.
        lam: B x T x D gate values lambda in (0, 1) (float32).
    """

    z: Tensor
    kl: Tensor
    lam: Tensor


class M2IB(nn.Module):
    """Text-conditioned information bottleneck on ViT tokens.

    Gate network: ``h = GELU(Linear(LN(x)) + Linear(text))``, ``alpha = Linear(h)``, hidden size
    ``cfg.gate_hidden``; ``lambda = sigmoid(alpha)`` starts near 0.82 (see ``GATE_INIT_BIAS``).

    Args:
        cfg: Bottleneck configuration (``gate_hidden``, ``noise``; ``beta`` is for
            :func:`ib_loss`).
        width: D, the token width of the vision layer the bottleneck sits after.
        text_dim: E, the size of the text embedding.
    """

    def __init__(self, cfg: BottleneckConfig, width: int, text_dim: int) -> None:
        super().__init__()
        if cfg.gate_hidden < 1:
            raise ConfigError(f"bottleneck.gate_hidden: must be >= 1, got {cfg.gate_hidden}")
        if width < 1 or text_dim < 1:
            raise ValueError(f"M2IB: width and text_dim must be >= 1, got {width}, {text_dim}")
        self.cfg = cfg
        self.width = width
        self.text_dim = text_dim
        self.norm = nn.LayerNorm(width)
        self.token_proj = nn.Linear(width, cfg.gate_hidden)
        self.text_proj = nn.Linear(text_dim, cfg.gate_hidden)
        self.out = nn.Linear(cfg.gate_hidden, width)
        nn.init.normal_(self.out.weight, std=GATE_INIT_STD)
        nn.init.constant_(self.out.bias, GATE_INIT_BIAS)

    def gate_logits(self, tokens: Tensor, text_emb: Tensor) -> Tensor:
        """Predict alpha for every token and channel.

        Args:
            tokens: B x T x D.
            text_emb: B x E.

        Returns:
            B x T x D float32 logits alpha (lambda = sigmoid(alpha)).
        """
        h = self.token_proj(self.norm(tokens)) + self.text_proj(text_emb).unsqueeze(1)
        return self.out(F.gelu(h)).float()

    def forward(self, tokens: Tensor, text_emb: Tensor) -> BottleneckOutput:
        """Apply the bottleneck.

        Args:
            tokens: B x T x D tokens, T = 1 + N with the CLS token first.
            text_emb: B x E text embedding conditioning the gates.

        Returns:
            :class:`BottleneckOutput` with ``z``, ``kl`` and ``lam``, each B x T x D.
        """
        if tokens.dim() != 3 or tokens.shape[-1] != self.width:
            raise ValueError(
                f"M2IB.forward: tokens must be B x T x {self.width}, got {tuple(tokens.shape)}"
            )
        if text_emb.dim() != 2 or text_emb.shape != (tokens.shape[0], self.text_dim):
            raise ValueError(
                f"M2IB.forward: text_emb must be {tokens.shape[0]} x {self.text_dim}, "
                f"got {tuple(text_emb.shape)}"
            )
        alpha = self.gate_logits(tokens, text_emb)
        lam = torch.sigmoid(alpha)

        x = tokens.float()
        mu = x.mean(dim=1, keepdim=True).detach()
        sigma = (x.var(dim=1, unbiased=False, keepdim=True) + STD_EPS).sqrt().detach()
        x_s = (x - mu) / sigma

        if self.training and self.cfg.noise:
            eps = torch.randn_like(x_s)
            z_s = lam * x_s + (1.0 - lam) * eps
        else:
            z_s = lam * x_s
        z = (z_s * sigma + mu).to(tokens.dtype)

        log_var = 2.0 * F.logsigmoid(-alpha)  # log((1 - lambda)^2), stable for lambda -> 1
        kl = -0.5 * (1.0 + log_var - (lam * x_s) ** 2 - (1.0 - lam) ** 2)
        return BottleneckOutput(z=z, kl=kl, lam=lam)


def saliency_from_kl(kl: Tensor, grid: int, size: tuple[int, int]) -> Tensor:
    """Saliency map from the per-element KL.

    KL summed over channels, CLS dropped, reshaped to grid x grid (row-major patches), bilinear
    to ``size``, min-max normalised per image; a constant map becomes all zeros (no NaN).

    Args:
        kl: B x T x D KL, T = 1 + grid * grid.
        grid: Patches per side.
        size: (H, W) of the output.

    Returns:
        B x 1 x H x W saliency in [0, 1] (float32).
    """
    if kl.dim() != 3 or kl.shape[1] != 1 + grid * grid:
        raise ValueError(
            f"saliency_from_kl: kl must be B x (1 + {grid}*{grid}) x D, got {tuple(kl.shape)}"
        )
    b = kl.shape[0]
    per_token = kl.float().sum(dim=-1)[:, 1:]
    sal = per_token.reshape(b, 1, grid, grid)
    sal = F.interpolate(sal, size=tuple(size), mode="bilinear", align_corners=False)
    flat = sal.flatten(1)
    lo = flat.min(dim=1).values.view(b, 1, 1, 1)
    hi = flat.max(dim=1).values.view(b, 1, 1, 1)
    return ((sal - lo) / (hi - lo).clamp_min(1e-8)).clamp(0.0, 1.0)


def ib_loss(kl: Tensor, cos_sim: Tensor, beta: float) -> Tensor:
    """Information-bottleneck objective ``beta * mean(KL) - mean(cos)``.

    Args:
        kl: B x T x D per-element KL.
        cos_sim: B cosine similarities between the text embedding and the image embedding
            computed from the bottlenecked tokens.
        beta: KL weight (``BottleneckConfig.beta``).

    Returns:
        Scalar loss (float32).
    """
    if cos_sim.dim() != 1 or cos_sim.shape[0] != kl.shape[0]:
        raise ValueError(
            f"ib_loss: cos_sim must have shape ({kl.shape[0]},), got {tuple(cos_sim.shape)}"
        )
    return beta * kl.float().mean() - cos_sim.float().mean()
