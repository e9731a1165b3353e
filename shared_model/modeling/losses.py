"""Training losses: DHN-NCE (paper form), Dice, BCE, saliency BCE and their weighted total.

Every loss is computed in float32 (safe under bf16 autocast) and returns a scalar tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from shared_model.config import LossConfig

PROB_EPS = 1e-6
LOSS_NAMES = ("dice", "bce", "nce", "ib", "saliency", "iou", "coarse")


def _one_direction(s: Tensor, tau: float, beta: float) -> Tensor:
    """Hard-negative-weighted decoupled NCE for rows of ``s`` (positives on the diagonal).

    ``-(1/B) sum_i [s_ii/tau - log sum_{j!=i} w_ij exp(s_ij/tau)]`` with
    ``log w_ij = log(B-1) + beta s_ij/tau - logsumexp_{k!=i}(beta s_ik/tau)``.

    Args:
        s: B x B cosine similarities (float32), B >= 2.
        tau: Temperature.
        beta: Hardness of the negative weighting.

    Returns:
        Scalar loss.
    """
    b = s.shape[0]
    logits = s / tau
    off_diag = ~torch.eye(b, dtype=torch.bool, device=s.device)
    neg_inf = torch.full_like(logits, float("-inf"))
    weight_logits = torch.where(off_diag, beta * logits, neg_inf)
    log_w = math.log(b - 1) + weight_logits - torch.logsumexp(weight_logits, dim=1, keepdim=True)
    log_den = torch.logsumexp(torch.where(off_diag, log_w + logits, neg_inf), dim=1)
    return (log_den - logits.diagonal()).mean()


def dhn_nce(
    v: Tensor, t: Tensor, tau: float = 0.6, beta1: float = 0.15, beta2: float = 0.15
) -> Tensor:
    """DHN-NCE of MedCLIP-SAMv2, paper form: ``L = L_v->t + L_t->v``.

    With ``s_ij = cos(v_i, t_j)``::

        L_v->t = -(1/B) sum_i log( exp(s_ii/tau) / sum_{j!=i} w_ij exp(s_ij/tau) )
        w_ij   = (B-1) exp(beta1 s_ij/tau) / sum_{k!=i} exp(beta1 s_ik/tau)

    and ``L_t->v`` the same over the columns of ``s`` with ``beta2``. Computed with logsumexp.
    With B = 1 there are no negatives and the loss is defined as 0 (kept in the graph, so
    ``backward`` works and gives zero gradients).

    Args:
        v: B x E image embeddings (not necessarily normalised).
        t: B x E text embeddings, ``t[i]`` paired with ``v[i]``.
        tau: Temperature (> 0).
        beta1: Hardness for image -> text negatives.
        beta2: Hardness for text -> image negatives.

    Returns:
        Scalar loss (float32).
    """
    if v.dim() != 2 or v.shape != t.shape:
        raise ValueError(
            f"dhn_nce: v and t must both be B x E, got {tuple(v.shape)} and {tuple(t.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"dhn_nce: tau must be > 0, got {tau}")
    s = F.normalize(v.float(), dim=-1) @ F.normalize(t.float(), dim=-1).T
    if s.shape[0] < 2:
        return s.sum() * 0.0
    return _one_direction(s, tau, beta1) + _one_direction(s.T, tau, beta2)


def _check_pair(name: str, pred: Tensor, target: Tensor) -> None:
    if pred.dim() != 4 or pred.shape[1] != 1 or pred.shape != target.shape:
        raise ValueError(
            f"{name}: prediction and target must both be B x 1 x H x W, "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice loss on ``sigmoid(logits)``, averaged over the batch.

    Per image: ``1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)``.

    Args:
        logits: B x 1 x H x W mask logits.
        target: B x 1 x H x W target in [0, 1].
        smooth: Additive smoothing (1 by default).

    Returns:
        Scalar loss in [0, 1].
    """
    _check_pair("dice_loss", logits, target)
    p = torch.sigmoid(logits.float()).flatten(1)
    y = target.float().flatten(1)
    dice = (2.0 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)
    return (1.0 - dice).mean()


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy with logits, mean over all pixels.

    Args:
        logits: B x 1 x H x W mask logits.
        target: B x 1 x H x W target in [0, 1].

    Returns:
        Scalar loss.
    """
    _check_pair("bce_loss", logits, target)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def saliency_loss(sal: Tensor, target: Tensor) -> Tensor:
    """BCE between a saliency probability map and the mask, at the saliency's resolution.

    Args:
        sal: B x 1 x h x w saliency in [0, 1] (clamped to ``[1e-6, 1 - 1e-6]``).
        target: B x 1 x H x W mask in [0, 1], resized to h x w by area interpolation.

    Returns:
        Scalar loss (mean over pixels).
    """
    if sal.dim() != 4 or sal.shape[1] != 1:
        raise ValueError(f"saliency_loss: sal must be B x 1 x h x w, got {tuple(sal.shape)}")
    if target.dim() != 4 or target.shape[:2] != sal.shape[:2]:
        raise ValueError(
            f"saliency_loss: target must be {sal.shape[0]} x 1 x H x W, got {tuple(target.shape)}"
        )
    y = target.float()
    if y.shape[-2:] != sal.shape[-2:]:
        y = F.interpolate(y, size=tuple(sal.shape[-2:]), mode="area")
    p = sal.float().clamp(PROB_EPS, 1.0 - PROB_EPS)
    # Written out rather than F.binary_cross_entropy, which refuses to run under autocast.
    return -(y * torch.log(p) + (1.0 - y) * torch.log1p(-p)).mean()


def total_loss(parts: dict[str, Tensor], cfg: LossConfig) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the loss parts present, and every part as a float (:func:`total_loss_terms`)."""
    total, terms = total_loss_terms(parts, cfg)
    return total, {name: float(value.detach()) for name, value in terms.items()}


def total_loss_terms(parts: dict[str, Tensor], cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the loss parts present (no host synchronisation: usable under ``torch.func.vmap``).

    Weights come from ``cfg`` (``dice``, ``bce``, ``nce``, ``ib``, ``saliency``); missing parts are
    skipped, parts with weight 0 are logged but not added.

    Args:
        parts: Name -> scalar loss tensor; names must be among ``LOSS_NAMES``.
        cfg: Loss weights.

    Returns:
        ``(total, terms)``: the scalar total and a dict of scalar tensors with every unweighted
        part and ``"total"``.

    Raises:
        ValueError: On an unknown part name, a non-scalar part, or no parts at all.
    """
    unknown = sorted(set(parts) - set(LOSS_NAMES))
    if unknown:
        raise ValueError(f"total_loss: unknown loss part(s) {unknown}; known: {list(LOSS_NAMES)}")
    if not parts:
        raise ValueError("total_loss: no loss parts given")
    total: Tensor | None = None
    log: dict[str, Tensor] = {}
    for name in LOSS_NAMES:
        if name not in parts:
            continue
        value = parts[name]
        if value.numel() != 1:
            raise ValueError(
                f"total_loss: part {name!r} must be a scalar, got {tuple(value.shape)}"
            )
        value = value.reshape(()).float()
        log[name] = value.detach()
        weight = float(getattr(cfg, name))
        if weight == 0.0:
            continue
        total = weight * value if total is None else total + weight * value
    if total is None:  # every part present had weight 0
        total = sum(parts[name].reshape(()).float() for name in parts) * 0.0
    log["total"] = total.detach()
    return total, log


def iou_head_loss(iou_pred: Tensor, logits: Tensor, target: Tensor) -> Tensor:
    """MSE between SAM's IoU prediction and the IoU its own (thresholded) mask actually has.

    Args:
        iou_pred: B x 1 predicted IoU.
        logits: B x 1 x H x W mask logits (the target IoU is computed without gradient).
        target: B x 1 x H x W ground truth in {0, 1}.

    Returns:
        Scalar loss.
    """
    with torch.no_grad():
        pred = (logits > 0).float()
        inter = (pred * target).flatten(1).sum(1)
        union = ((pred + target) > 0).float().flatten(1).sum(1)
        actual = torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))
    return F.mse_loss(iou_pred.float().reshape(-1), actual)
