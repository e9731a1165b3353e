"""Saliency map -> box prompts for SAM, and validation of user-given boxes.

The saliency is resampled to a ``grid x grid`` map, thresholded, split into 8-connected components
(``scipy.ndimage.label`` on the CPU, no gradient), and components smaller than ``min_area`` (a
fraction of the grid) are dropped. Box coordinates are in SAM input pixels ``0..image_size`` and map
grid cell edges exactly: cell ``i`` spans ``[i * S / g, (i + 1) * S / g)``, so a component covering
cells ``i0..i1`` gives ``[i0 * S / g, (i1 + 1) * S / g]``.

Modes:
    * ``"enclosing"``: K = 1, one box enclosing every kept component.
    * ``"components"``: K = ``top_k``, one box per kept component, largest area first (ties in
      scan order); missing rows are ``[0, 0, 0, 0]`` with ``valid`` False.

Empty map (nothing above the threshold, or only components below ``min_area``): the first row is
the whole-image box ``[0, 0, S, S]`` with ``valid`` True, so SAM always gets a prompt and an empty
map never crashes (the reference pipeline crashes here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from shared_model.config import BoxConfig, ConfigError

MODES = ("enclosing", "components")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _check_config(cfg: BoxConfig) -> None:
    if cfg.mode not in MODES:
        raise ConfigError(f"boxes.mode: must be one of {list(MODES)}, got {cfg.mode!r}")
    if cfg.top_k < 1:
        raise ConfigError(f"boxes.top_k: must be >= 1, got {cfg.top_k}")
    if cfg.grid < 1:
        raise ConfigError(f"boxes.grid: must be >= 1, got {cfg.grid}")
    if not 0.0 <= cfg.min_area < 1.0:
        raise ConfigError(f"boxes.min_area: must be in [0, 1), got {cfg.min_area}")


def _to_grid(sal: Tensor, grid: int) -> Tensor:
    """B x 1 x H x W -> B x 1 x grid x grid: area averaging when shrinking, bilinear otherwise."""
    if tuple(sal.shape[-2:]) == (grid, grid):
        return sal
    if sal.shape[-2] >= grid and sal.shape[-1] >= grid:
        return F.interpolate(sal, size=(grid, grid), mode="area")
    return F.interpolate(sal, size=(grid, grid), mode="bilinear", align_corners=False)


def _component_boxes(mask: np.ndarray, min_cells: float) -> list[tuple[int, int, int, int, int]]:
    """Kept components of a boolean grid, largest first.

    Args:
        mask: g x g bool.
        min_cells: Components with fewer cells are dropped.

    Returns:
        List of (area, row0, col0, row1_exclusive, col1_exclusive).
    """
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    found = []
    for idx, slc in enumerate(ndimage.find_objects(labels)):
        if slc is None or areas[idx] < min_cells:
            continue
        rows, cols = slc
        found.append((int(areas[idx]), rows.start, cols.start, rows.stop, cols.stop))
    found.sort(key=lambda item: -item[0])  # stable: ties keep scan order
    return found


def saliency_to_boxes(sal: Tensor, cfg: BoxConfig, image_size: int) -> tuple[Tensor, Tensor]:
    """Boxes around the salient regions of each map.

    Args:
        sal: B x 1 x H x W saliency (any real values; typically in [0, 1]); not differentiated.
        cfg: Box configuration (``threshold``, ``mode``, ``top_k``, ``min_area``, ``grid``).
        image_size: S, the SAM input size in pixels.

    Returns:
        ``boxes``: B x K x 4 float32 ``(x0, y0, x1, y1)`` in ``[0, S]`` on ``sal.device``;
        ``valid``: B x K bool. K = 1 for ``"enclosing"``, ``cfg.top_k`` for ``"components"``.

    Raises:
        ConfigError: On an invalid ``cfg`` field.
        ValueError: On a wrongly shaped or non-finite saliency or a non-positive ``image_size``.
    """
    _check_config(cfg)
    if sal.dim() != 4 or sal.shape[1] != 1:
        raise ValueError(f"saliency_to_boxes: sal must be B x 1 x H x W, got {tuple(sal.shape)}")
    if image_size < 1:
        raise ValueError(f"saliency_to_boxes: image_size must be >= 1, got {image_size}")
    g = cfg.grid
    with torch.no_grad():
        grid_map = _to_grid(sal.detach().float(), g)
        if not torch.isfinite(grid_map).all():
            raise ValueError("saliency_to_boxes: saliency contains NaN or inf")
        masks = (grid_map[:, 0] >= cfg.threshold).cpu().numpy()

    k = 1 if cfg.mode == "enclosing" else cfg.top_k
    b = sal.shape[0]
    boxes = np.zeros((b, k, 4), dtype=np.float64)
    valid = np.zeros((b, k), dtype=bool)
    cell = image_size / g
    min_cells = cfg.min_area * g * g
    for i in range(b):
        comps = _component_boxes(masks[i], min_cells)
        if not comps:
            boxes[i, 0] = (0.0, 0.0, image_size, image_size)
            valid[i, 0] = True
            continue
        if cfg.mode == "enclosing":
            r0 = min(c[1] for c in comps)
            c0 = min(c[2] for c in comps)
            r1 = max(c[3] for c in comps)
            c1 = max(c[4] for c in comps)
            boxes[i, 0] = (c0 * cell, r0 * cell, c1 * cell, r1 * cell)
            valid[i, 0] = True
            continue
        for j, (_, r0, c0, r1, c1) in enumerate(comps[:k]):
            boxes[i, j] = (c0 * cell, r0 * cell, c1 * cell, r1 * cell)
            valid[i, j] = True
    return (
        torch.as_tensor(boxes, dtype=torch.float32, device=sal.device),
        torch.as_tensor(valid, device=sal.device),
    )


def validate_boxes(boxes: Tensor | Sequence[Sequence[float]], image_size: int) -> Tensor:
    """Check user-given boxes and return them as a float32 tensor.

    Args:
        boxes: ... x 4 boxes ``(x0, y0, x1, y1)`` in pixels of the ``image_size`` SAM input
            (a tensor or nested sequence; e.g. N x 4 or B x K x 4).
        image_size: S; every box must satisfy ``0 <= x0 < x1 <= S`` and ``0 <= y0 < y1 <= S``.

    Returns:
        The boxes as a float32 tensor of the same shape.

    Raises:
        ValueError: Naming the first bad box (its index and values) and what is wrong.
    """
    t = torch.as_tensor(boxes, dtype=torch.float32)
    if t.dim() < 1 or t.shape[-1] != 4:
        raise ValueError(f"validate_boxes: boxes must have shape ... x 4, got {tuple(t.shape)}")
    flat = t.reshape(-1, 4)
    s = float(image_size)
    for n, box in enumerate(flat.tolist()):
        idx = tuple(int(v) for v in np.unravel_index(n, t.shape[:-1])) if t.dim() > 1 else ()
        x0, y0, x1, y1 = box
        problem = None
        if not all(np.isfinite(box)):
            problem = "non-finite coordinate"
        elif not x0 < x1:
            problem = "x0 must be < x1"
        elif not y0 < y1:
            problem = "y0 must be < y1"
        elif min(x0, y0) < 0 or max(x1, y1) > s:
            problem = f"outside the image [0, {image_size}]"
        if problem:
            raise ValueError(f"validate_boxes: box {list(idx)} = {box} is invalid: {problem}")
    return t


def mask_boxes(masks: Tensor) -> tuple[Tensor, Tensor]:
    """The box enclosing each mask's foreground, as SAM box prompts (pixel edges, ``x1``/``y1`` exclusive).

    Args:
        masks: B x 1 x S x S in {0, 1}.

    Returns:
        ``(boxes B x 1 x 4, valid B x 1)``; an empty mask gives the whole-image box, valid, as
        :func:`saliency_to_boxes` does for an empty map.
    """
    fg = masks[:, 0] > 0.5  # B x S x S
    b, s = fg.shape[0], fg.shape[-1]
    rows, cols = fg.any(2), fg.any(1)  # B x S each
    idx = torch.arange(s, device=masks.device)
    big = torch.full_like(idx, s)
    y0 = torch.where(rows, idx, big).amin(1)
    x0 = torch.where(cols, idx, big).amin(1)
    y1 = torch.where(rows, idx, -1).amax(1) + 1
    x1 = torch.where(cols, idx, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    whole = torch.tensor([0.0, 0.0, s, s], device=masks.device)
    boxes = torch.where(rows.any(1)[:, None], boxes, whole)  # not in place: usable under torch.func.vmap
    return boxes[:, None], torch.ones(b, 1, dtype=torch.bool, device=masks.device)


def box_agreement(boxes: Tensor, valid: Tensor, masks: Tensor) -> list[dict[str, float]]:
    """How well box prompts find the target, per image.

    Args:
        boxes: B x K x 4 box prompts (input pixels); valid: B x K.
        masks: B x 1 x S x S ground truth in {0, 1}.

    Returns:
        B dicts: ``box_iou`` (IoU of the box enclosing the valid boxes with the mask's enclosing
        box), ``box_hit`` (1.0 when that IoU >= 0.5) and ``box_coverage`` (fraction of the
        foreground pixels inside the union of the valid boxes; 1.0 for an empty mask).
    """
    truth, _ = mask_boxes(masks)
    s = masks.shape[-1]
    ys = torch.arange(s, device=masks.device).view(1, s, 1) + 0.5
    xs = torch.arange(s, device=masks.device).view(1, 1, s) + 0.5
    out = []
    for i in range(boxes.shape[0]):
        fg = masks[i, 0] > 0.5
        kept = boxes[i][valid[i]].float()
        if len(kept) == 0:
            out.append({"box_iou": 0.0, "box_hit": 0.0, "box_coverage": 0.0 if fg.any() else 1.0})
            continue
        x0, y0 = kept[:, 0].min(), kept[:, 1].min()
        x1, y1 = kept[:, 2].max(), kept[:, 3].max()
        tx0, ty0, tx1, ty1 = truth[i, 0]
        iw = (torch.minimum(x1, tx1) - torch.maximum(x0, tx0)).clamp_min(0)
        ih = (torch.minimum(y1, ty1) - torch.maximum(y0, ty0)).clamp_min(0)
        inter = iw * ih
        union = (x1 - x0) * (y1 - y0) + (tx1 - tx0) * (ty1 - ty0) - inter
        iou = float(inter / union) if union > 0 else 0.0
        inside = ((xs >= kept[:, 0, None, None]) & (xs < kept[:, 2, None, None])
                  & (ys >= kept[:, 1, None, None]) & (ys < kept[:, 3, None, None])).any(0)  # S x S
        coverage = float((inside & fg).sum() / fg.sum()) if fg.any() else 1.0
        out.append({"box_iou": iou, "box_hit": float(iou >= 0.5), "box_coverage": coverage})
    return out
