"""Differentiable dense CRF (ConvCRF-style mean field on a local window).

The reference (MedCLIP-SAMv2) refines the saliency with pydensecrf, which is neither
differentiable nor batched. This module runs the same model in PyTorch so gradients reach the
gates upstream:

* both the probability map and the image are resampled to ``resolution x resolution``;
* two labels (background, foreground); unary ``U_l = -log(p_l)`` with ``p`` clamped to
  ``[1e-4, 1 - 1e-4]``;
* pairwise kernels over a ``kernel_size x kernel_size`` window around each pixel (an unfold;
  centre excluded, neighbours outside the image contribute nothing)::

      k_g(i, j) = w_g * exp(-|p_i - p_j|^2 / (2 sxy^2))
      k_b(i, j) = w_b * exp(-|p_i - p_j|^2 / (2 sxy_b^2) - |I_i - I_j|^2 / (2 srgb^2))

  with pixel distances in grid cells at ``resolution`` and colours in [0, 1];
* Potts compatibility: the pairwise energy of label ``l`` at pixel ``i`` is the kernel-weighted
  mass of the *other* label, ``sum_j k(i, j) Q_{1-l}(j)``;
* ``Q = softmax(-U)`` then ``iterations`` times ``Q = softmax(-U - pairwise(Q))``;
* the foreground marginal is resized back to the input size.

Everything is computed in float32 with autocast disabled, so it is safe under bf16 autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_model.config import ConfigError, CRFConfig

PROB_EPS = 1e-4


def _check_config(cfg: CRFConfig) -> None:
    if cfg.kernel_size < 3 or cfg.kernel_size % 2 == 0:
        raise ConfigError(f"crf.kernel_size: must be an odd integer >= 3, got {cfg.kernel_size}")
    if cfg.iterations < 0:
        raise ConfigError(f"crf.iterations: must be >= 0, got {cfg.iterations}")
    if cfg.resolution < 2:
        raise ConfigError(f"crf.resolution: must be >= 2, got {cfg.resolution}")
    for name in ("gaussian_sigma", "bilateral_sigma_xy", "bilateral_sigma_rgb"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"crf.{name}: must be > 0, got {getattr(cfg, name)}")


def unfold_window(x: Tensor, k: int) -> Tensor:
    """Zero-padded ``k x k`` neighbourhoods, the layout of ``F.unfold(x, k, padding=k // 2)``.

    Built from shifted slices: same values, but far faster than ``F.unfold`` on the CPU.

    Args:
        x: B x C x H x W.
        k: Odd window size.

    Returns:
        B x C x k*k x H*W; index ``dy * k + dx`` holds the neighbour at offset
        ``(dy - k // 2, dx - k // 2)``.
    """
    b, c, h, w = x.shape
    p = k // 2
    xp = F.pad(x, (p, p, p, p))
    shifts = [xp[..., dy : dy + h, dx : dx + w] for dy in range(k) for dx in range(k)]
    return torch.stack(shifts, dim=2).reshape(b, c, k * k, h * w)


def _resample(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resampling (antialiased when shrinking); identity when the size already matches."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


class DenseCRF(nn.Module):
    """Mean-field dense CRF with Gaussian + bilateral local-window kernels.

    Args:
        cfg: CRF configuration. The kernel weights ``gaussian_weight`` and ``bilateral_weight``
            are ``nn.Parameter`` s (trained and exchanged) when ``cfg.learnable_weights``, else
            buffers.
    """

    def __init__(self, cfg: CRFConfig) -> None:
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        k = cfg.kernel_size
        weights = {
            "gaussian_weight": torch.tensor(float(cfg.gaussian_weight)),
            "bilateral_weight": torch.tensor(float(cfg.bilateral_weight)),
        }
        for name, value in weights.items():
            if cfg.learnable_weights:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        r = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
        dist2 = (r.view(k, 1) ** 2 + r.view(1, k) ** 2).flatten()  # k*k squared offsets
        self.register_buffer("offset_dist2", dist2, persistent=False)

    def _kernel(self, image: Tensor) -> Tensor:
        """Combined pairwise kernel over the window.

        Args:
            image: B x 3 x R x R float32 in [0, 1].

        Returns:
            B x K2 x R*R kernel (K2 = kernel_size^2), zero at the centre and outside the image.
        """
        cfg = self.cfg
        k = cfg.kernel_size
        b, c, h, w = image.shape
        dist2 = self.offset_dist2.view(1, k * k, 1)
        valid = unfold_window(image.new_ones(1, 1, h, w), k)[:, 0]  # 1 x K2 x HW
        valid = valid * (dist2 > 0)  # exclude the centre
        neigh = unfold_window(image, k)  # B x 3 x K2 x HW
        colour2 = ((neigh - image.view(b, c, 1, h * w)) ** 2).sum(dim=1)  # B x K2 x HW
        gauss = torch.exp(-dist2 / (2 * cfg.gaussian_sigma**2))
        bilat = torch.exp(
            -dist2 / (2 * cfg.bilateral_sigma_xy**2) - colour2 / (2 * cfg.bilateral_sigma_rgb**2)
        )
        wg = self.gaussian_weight.float()
        wb = self.bilateral_weight.float()
        return (wg * gauss + wb * bilat) * valid

    def forward(self, prob: Tensor, image: Tensor) -> Tensor:
        """Refine a foreground probability map.

        Args:
            prob: B x 1 x H x W foreground probability in [0, 1].
            image: B x 3 x H' x W' image in [0, 1] (any size; resampled to ``cfg.resolution``).

        Returns:
            B x 1 x H x W refined foreground probability in [0, 1], dtype of ``prob``; ``prob``
            itself when ``cfg.enabled`` is False.
        """
        if not self.cfg.enabled:
            return prob
        if prob.dim() != 4 or prob.shape[1] != 1:
            raise ValueError(
                f"DenseCRF.forward: prob must be B x 1 x H x W, got {tuple(prob.shape)}"
            )
        if image.dim() != 4 or image.shape[1] != 3 or image.shape[0] != prob.shape[0]:
            raise ValueError(
                f"DenseCRF.forward: image must be {prob.shape[0]} x 3 x H' x W', "
                f"got {tuple(image.shape)}"
            )
        out_size = tuple(prob.shape[-2:])
        res = self.cfg.resolution
        with torch.autocast(device_type=prob.device.type, enabled=False):
            p = _resample(prob.float(), res).clamp(PROB_EPS, 1.0 - PROB_EPS)
            img = _resample(image.float(), res)
            b = p.shape[0]
            unary = -torch.log(torch.cat([1.0 - p, p], dim=1)).view(b, 2, 1, res * res)
            kernel = self._kernel(img).unsqueeze(1)  # B x 1 x K2 x HW
            q = torch.softmax(-unary, dim=1)
            k = self.cfg.kernel_size
            for _ in range(self.cfg.iterations):
                q_neigh = unfold_window(q.view(b, 2, res, res), k)  # B x 2 x K2 x HW
                message = (kernel * q_neigh).sum(dim=2, keepdim=True)
                pairwise = message.flip(1)  # Potts: energy of label l = mass of the other label
                q = torch.softmax(-unary - pairwise, dim=1)
            fg = q[:, 1].view(b, 1, res, res)
            fg = _resample(fg, out_size).clamp(0.0, 1.0)
        return fg.to(prob.dtype)
