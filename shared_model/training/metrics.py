"""Segmentation metrics on binary masks: Dice, IoU, precision, recall and HD95, per image.

Inputs may be torch tensors or NumPy arrays, bool or numbers in [0, 1] (thresholded at 0.5);
values outside [0, 1] (e.g. logits) raise ValueError.

Conventions for empty masks (P = predicted foreground, T = target foreground):

* a ratio whose denominator is 0 (Dice and IoU when P and T are both empty, precision when P is
  empty, recall when T is empty) is 1.0 if both masks are empty and 0.0 otherwise;
* HD95 is 0.0 when both are empty and the image diagonal sqrt(H^2 + W^2) when exactly one is.

HD95 (pixels): boundary pixels are the foreground pixels with a 4-neighbour in the background
(the image border counts as background); for every boundary pixel of each mask the Euclidean
distance to the nearest boundary pixel of the other is taken (exact distance transforms), and
HD95 is the 95th percentile (linear interpolation) of the two sets pooled, as in MedPy's
``hd95``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

METRICS = ("dice", "iou", "precision", "recall", "hd95")
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def as_binary(mask: Any, name: str = "mask") -> np.ndarray:
    """A bool NumPy copy of a torch/NumPy mask (bool, or numbers in [0, 1] thresholded at 0.5)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu()
        mask = mask.numpy() if mask.dtype != torch.bfloat16 else mask.float().numpy()
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr.copy()
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name}: expected a numeric or bool mask, got dtype {arr.dtype}")
    if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1 or np.isnan(arr).any()):
        raise ValueError(f"{name}: values must be in [0, 1] (a binary mask or probabilities), got "
                         f"range [{np.nanmin(arr)}, {np.nanmax(arr)}]")
    return arr > 0.5


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


def boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels of an H x W bool mask with a 4-neighbour outside it (border = outside)."""
    return mask & ~ndimage.binary_erosion(mask, structure=_FOUR_CONNECTED, border_value=0)


def hd95(pred: Any, target: Any) -> float:
    """95th-percentile symmetric Hausdorff distance in pixels between two H x W masks."""
    p, t = as_binary(pred, "pred"), as_binary(target, "target")
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"hd95 needs two H x W masks of one shape, got {p.shape} and {t.shape}")
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return math.hypot(*p.shape)
    # Distances between boundary points never leave the union's bounding box: crop to it.
    rows = np.flatnonzero((p | t).any(1))
    cols = np.flatnonzero((p | t).any(0))
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    bp, bt = boundary(p)[crop], boundary(t)[crop]
    to_target = ndimage.distance_transform_edt(~bt)
    to_pred = ndimage.distance_transform_edt(~bp)
    distances = np.concatenate([to_target[bp], to_pred[bt]])
    return float(np.percentile(distances, 95))


def binary_metrics(pred: Any, target: Any) -> dict[str, float]:
    """Dice, IoU, precision, recall and HD95 of one H x W prediction against its target."""
    p, t = as_binary(pred, "pred"), as_binary(target, "target")
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"expected two H x W masks of one shape, got {p.shape} and {t.shape}")
    tp = int((p & t).sum())
    n_p, n_t = int(p.sum()), int(t.sum())
    both_empty = n_p == 0 and n_t == 0
    return {
        "dice": _ratio(2 * tp, n_p + n_t, both_empty),
        "iou": _ratio(tp, n_p + n_t - tp, both_empty),
        "precision": _ratio(tp, n_p, both_empty),
        "recall": _ratio(tp, n_t, both_empty),
        "hd95": hd95(p, t),
    }


def segmentation_metrics(pred: Any, target: Any) -> list[dict[str, float]]:
    """Per-image metrics of a batch.

    Args:
        pred: B x 1 x H x W (or B x H x W) bool or {0, 1} / probabilities in [0, 1].
        target: Same shape as ``pred``.

    Returns:
        B dicts with keys :data:`METRICS`.
    """
    p, t = as_binary(pred, "pred"), as_binary(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {p.shape} vs {t.shape}")
    if p.ndim == 4:
        if p.shape[1] != 1:
            raise ValueError(f"expected B x 1 x H x W masks, got {p.shape}")
        p, t = p[:, 0], t[:, 0]
    elif p.ndim != 3:
        raise ValueError(f"expected B x 1 x H x W or B x H x W masks, got {p.shape}")
    return [binary_metrics(pi, ti) for pi, ti in zip(p, t)]


def aggregate(per_image: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean and population standard deviation (ddof=0) of each metric over images.

    Args:
        per_image: Dicts with identical keys, e.g. from :func:`segmentation_metrics`.

    Returns:
        Flat dict: ``{<metric>: mean, <metric>_std: std, ..., "n": number of images}``.
    """
    if not per_image:
        raise ValueError("aggregate: no per-image metrics to aggregate")
    keys = list(per_image[0])
    for i, row in enumerate(per_image):
        if set(row) != set(keys):
            raise ValueError(f"aggregate: image {i} has metrics {sorted(row)}, expected {sorted(keys)}")
    out: dict[str, float] = {}
    for key in keys:
        values = np.asarray([row[key] for row in per_image], dtype=np.float64)
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std())
    out["n"] = len(per_image)
    return out
