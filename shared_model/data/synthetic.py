"""Synthetic colonoscopy-like images with polyps, for tests, demos and CPU smoke training.

Each image is a pinkish-orange mucosa (smooth multi-scale noise, curved folds, vessel-like ridge
lines, a dark lumen and vignetting) with 1-3 non-overlapping polyps: ellipses with a wobbly
boundary (a few random low-order Fourier terms on the radius), a colour slightly redder or paler
than the mucosa, dome shading with a shadowed rim so they look raised, and their own finer texture.
Small white specular highlights are put on the polyp domes and elsewhere on the mucosa. The mask is
exactly the union of the polyp shapes.

Learnable but not trivial: polyps differ from the background in colour, shading and texture, but
the folds, lumen and highlights also create edges and bright/dark regions.

Centres are non-IID: each has its own :class:`SyntheticStyle` (mucosa colour, polyp tint,
lighting, folds, noise, polyp sizes). Everything is drawn from the given NumPy generator, so one
seed gives identical arrays and identical PNG bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SyntheticStyle:
    """Look of one synthetic centre.

    Attributes:
        mucosa: Base RGB (0-255) of the background.
        tint: Per-channel factor of the polyp colour relative to the mucosa under it.
        vignette: Darkening towards the corners (0 = none, 1 = black corners).
        folds: Depth of the fold shading (0-1).
        noise: Standard deviation of the additive sensor noise (0-255 units).
        polyp_radius: ``(min, max)`` polyp radius as a fraction of the image size.
    """

    mucosa: tuple[float, float, float] = (205.0, 120.0, 95.0)
    tint: tuple[float, float, float] = (1.08, 0.80, 0.84)
    vignette: float = 0.55
    folds: float = 0.25
    noise: float = 3.0
    polyp_radius: tuple[float, float] = (0.07, 0.2)


STYLES: tuple[SyntheticStyle, ...] = (
    SyntheticStyle(),
    SyntheticStyle(mucosa=(215.0, 150.0, 138.0), tint=(1.04, 0.86, 0.90), vignette=0.35, folds=0.35,
                   noise=4.0, polyp_radius=(0.08, 0.22)),
    SyntheticStyle(mucosa=(175.0, 88.0, 72.0), tint=(1.12, 0.82, 0.80), vignette=0.7, folds=0.2,
                   noise=5.0, polyp_radius=(0.06, 0.15)),
)


def centre_style(index: int) -> SyntheticStyle:
    """The style of centre ``index``: :data:`STYLES` cycled, later cycles shifted in colour."""
    base = STYLES[index % len(STYLES)]
    cycle = index // len(STYLES)
    if cycle == 0:
        return base
    rng = np.random.default_rng([7919, index])
    shift = rng.uniform(-20, 20, 3) * min(cycle, 2)
    mucosa = tuple(float(np.clip(c + s, 60, 235)) for c, s in zip(base.mucosa, shift))
    return replace(base, mucosa=mucosa)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """size x size float32 noise, ~unit std, smooth over size / cells pixels (bicubic upsampling)."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC))


def _background(rng: np.random.Generator, size: int, style: SyntheticStyle,
                xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    low = _smooth_noise(rng, size, 3)
    mid = _smooth_noise(rng, size, 8)
    fine = _smooth_noise(rng, size, max(4, size // 6))
    colour = np.asarray(style.mucosa, np.float32) * (1 + 0.07 * low + 0.04 * mid + 0.03 * fine)[..., None]
    # Folds: bands of a warped sinusoid; the dark side of each band is the crease.
    theta, freq = rng.uniform(0, np.pi), rng.uniform(1.5, 3.5)
    phase = 2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + 2.5 * low + rng.uniform(0, 6.3)
    shade = 1 - style.folds * np.clip(-np.sin(phase), 0, 1) ** 2 + 0.08 * np.cos(phase)
    # Vessels: thin curves along the zero set of a mid-scale noise field.
    vessels = np.exp(-(_smooth_noise(rng, size, 6) / 0.08) ** 2) * rng.uniform(0.15, 0.35)
    colour = colour * (1 - vessels[..., None] * np.array([0.1, 0.45, 0.45], np.float32))
    # Lumen: a dark, wide blob; vignetting: darker towards the corners.
    ly, lx = rng.uniform(0.1, 0.9, 2)
    lumen = np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * rng.uniform(0.08, 0.15) ** 2))
    radius2 = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 2
    light = (1 - style.vignette * radius2) * (1 - 0.75 * lumen)
    return colour * (shade * light)[..., None]


def _polyp_shape(
    rng: np.random.Generator, size: int, style: SyntheticStyle, taken: list[tuple[float, float, float]]
) -> tuple[float, float, float, float, float, np.ndarray] | None:
    """Pick a non-overlapping polyp: (cx, cy, a, b, angle, fourier terms) in pixels, or None."""
    for _ in range(20):
        a = rng.uniform(*style.polyp_radius) * size
        b = a * rng.uniform(0.65, 1.0)
        cx, cy = rng.uniform(a + 2, size - a - 2, 2)
        if all(np.hypot(cx - x, cy - y) > a + r + 3 for x, y, r in taken):
            terms = np.stack([np.arange(2, 6), rng.uniform(0, 0.16, 4) / np.arange(1, 5) ** 0.5,
                              rng.uniform(0, 2 * np.pi, 4)], 1)
            return cx, cy, a, b, rng.uniform(0, np.pi), terms
    return None


def _paint_polyp(
    image: np.ndarray, px: np.ndarray, py: np.ndarray, shape: tuple, light_dir: np.ndarray,
    tint: np.ndarray, texture: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Paint one polyp (a :func:`_polyp_shape` result) onto ``image`` (H x W x 3 float).

    Returns:
        ``(new image, H x W bool polyp mask, (x, y) of its specular highlight)``.
    """
    cx, cy, a, b, angle, terms = shape
    u = (px - cx) * np.cos(angle) + (py - cy) * np.sin(angle)
    v = -(px - cx) * np.sin(angle) + (py - cy) * np.cos(angle)
    phi = np.arctan2(v / b, u / a)
    wobble = 1 + (terms[:, 1] * np.cos(terms[:, 0] * phi[..., None] + terms[:, 2])).sum(-1)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble
    # Raised dome lit from light_dir, shadowed rim just outside, antialiased edge.
    dome = np.sqrt(np.clip(1 - ((u / a - light_dir[0]) ** 2 + (v / b - light_dir[1]) ** 2) / 1.6, 0, 1))
    rim = 1 - 0.22 * np.exp(-((rho - 1.05) / 0.1) ** 2) * (rho > 1)
    polyp = image * tint * ((0.8 + 0.35 * dome) * texture)[..., None]
    alpha = np.clip((1 - rho) * min(a, b) + 0.5, 0, 1)[..., None]
    image = (polyp * alpha + image * (1 - alpha)) * rim[..., None]
    hx, hy = light_dir * np.array([a, b]) * 0.6
    highlight = (cx + hx * np.cos(angle) - hy * np.sin(angle), cy + hx * np.sin(angle) + hy * np.cos(angle))
    return image, rho <= 1, highlight


def _add_highlights(rng: np.random.Generator, image: np.ndarray, px: np.ndarray, py: np.ndarray,
                    spots: list[tuple[float, float]]) -> np.ndarray:
    """Small white specular blobs at ``spots`` (x, y in pixels) on ``image`` (H x W x 3 float)."""
    size = image.shape[0]
    for hx, hy in spots:
        sigma = rng.uniform(0.006, 0.016) * size
        blob = np.exp(-((px - hx) ** 2 + (py - hy) ** 2 * rng.uniform(0.5, 2)) / (2 * sigma**2))
        alpha = np.clip(1.6 * blob, 0, 1)[..., None]
        image = image * (1 - alpha) + 250 * alpha
    return image


def synthetic_sample(
    rng: np.random.Generator, size: int, style: SyntheticStyle | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic image and its mask.

    Args:
        rng: Source of all randomness.
        size: Side length in pixels (>= 16).
        style: Centre look; default :data:`STYLES` [0].

    Returns:
        ``(image, mask)``: uint8 size x size x 3 RGB and bool size x size (True = polyp).
    """
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    style = style or STYLES[0]
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    image = _background(rng, size, style, xx, yy)
    px, py = xx * size, yy * size
    mask = np.zeros((size, size), bool)
    taken: list[tuple[float, float, float]] = []
    highlights: list[tuple[float, float]] = []
    light_dir = rng.uniform(-1, 1, 2) * 0.35
    for _ in range(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15])):
        shape = _polyp_shape(rng, size, style, taken)
        if shape is None:
            continue
        taken.append((shape[0], shape[1], shape[2]))
        tint = np.asarray(style.tint, np.float32) * rng.uniform(0.93, 1.07, 3).astype(np.float32)
        if rng.random() < 0.3:  # a paler polyp
            tint = 0.5 * tint + 0.5 * np.array([1.12, 1.12, 1.12], np.float32)
        texture = 1 + 0.05 * _smooth_noise(rng, size, max(4, size // 4))
        image, inside, highlight = _paint_polyp(image, px, py, shape, light_dir, tint, texture)
        mask |= inside
        highlights.append(highlight)
    if not taken:  # cannot happen with the radius ranges used (first draw never overlaps)
        raise RuntimeError("no polyp could be placed")
    highlights += [tuple(rng.uniform(0, size, 2)) for _ in range(rng.integers(1, 5))]
    image = _add_highlights(rng, image, px, py, highlights)
    image = image + rng.normal(0, style.noise, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8), mask


def generate_dataset(
    root: str | Path,
    centres: int | list[str] = 3,
    per_centre: int = 40,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a synthetic folder dataset ``<root>/<centre>/{images,masks}/<stem>.png``.

    Args:
        root: Output folder (created; existing files of the same names are overwritten).
        centres: Number of centres (named ``centre_0``, ...) or their names; centre ``i`` uses
            :func:`centre_style` ``(i)``.
        per_centre: Images per centre.
        image_size: Side length in pixels.
        seed: Base seed; centre ``i`` draws from ``np.random.default_rng([seed, i])``.

    Returns:
        ``root`` as a Path. Masks are 8-bit PNGs with values 0/255.
    """
    names = [f"centre_{i}" for i in range(centres)] if isinstance(centres, int) else list(centres)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"centres must be a positive count or distinct names, got {centres!r}")
    if per_centre < 1:
        raise ValueError(f"per_centre must be >= 1, got {per_centre}")
    root = Path(root)
    for index, name in enumerate(names):
        rng = np.random.default_rng([seed, index])
        style = centre_style(index)
        (root / name / "images").mkdir(parents=True, exist_ok=True)
        (root / name / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(per_centre):
            image, mask = synthetic_sample(rng, image_size, style)
            stem = f"{name}_{i:04d}"
            Image.fromarray(image).save(root / name / "images" / f"{stem}.png", compress_level=1)
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / name / "masks" / f"{stem}.png",
                                                              compress_level=1)
    return root
