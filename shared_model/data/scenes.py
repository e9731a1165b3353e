"""Synthetic scenes where the text must choose: several targets per frame, prompts that name one.

A scene is a colonoscopy-like frame (the mucosa, folds, vessels and lumen of
:mod:`shared_model.data.synthetic`) holding several **targets**, each with its own mask:

* 1-3 **polyps** of different size (small radius 5-9 %, or large 13-20 % of the side), colour
  (``red`` or ``pale``: :data:`POLYP_RGB`, under the mucosa's light) and place;
* at most one **instrument**: an elongated grey metallic tube with a specular stripe, a darker tip
  and a shadow, entering from a border (always present when there is a single polyp, so every
  frame has at least two targets);

and **distractors** that belong to no mask: folds, the lumen, specular highlights, bubbles. The
target masks are disjoint (polyps are placed away from each other and from the instrument).

Each frame comes with prompts, each naming exactly one target:

* by kind: ``"the instrument"``; ``"the polyp"`` when there is one polyp;
* by attribute, when there are several polyps: ``"the large polyp"`` / ``"the small polyp"``
  (area at least :data:`SIZE_RATIO` times that of every other polyp / at most 1 / SIZE_RATIO),
  ``"the red polyp"`` / ``"the pale polyp"``, ``"the polyp in the top left"`` (location words of
  :func:`~shared_model.data.captions.location_word` on the mask centroid, emitted only when the
  centroid is at least :data:`LOCATION_MARGIN` from the 3 x 3 grid lines).

A prompt is emitted only if its rule holds for exactly one target of the frame (checked over all
targets, so the named target is unique by construction). An image with a prompt is then an
(image, text, target mask) triple whose answer depends on the text; :meth:`Scene.distractor`
gives another target of the same image, so a model can be scored on the named target against it.

Everything is drawn from the given generator: one seed gives identical scenes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from shared_model.data.captions import location_word
from shared_model.data.synthetic import (
    STYLES,
    SyntheticStyle,
    _add_highlights,
    _background,
    _paint_polyp,
    _smooth_noise,
)

SIZE_RATIO = 2.0
LOCATION_MARGIN = 0.05
SMALL_RADIUS = (0.05, 0.09)  # polyp semi-axis as a fraction of the side
LARGE_RADIUS = (0.13, 0.2)
COLOURS = ("red", "pale")
POLYP_RGB = {"red": (190.0, 62.0, 55.0), "pale": (215.0, 172.0, 158.0)}  # green / red 0.33 and 0.8
MAX_DRAWS = 100  # draws of a frame (under 1 % of draws fail and are redrawn)
_GAP = 3  # pixels kept free between targets


@dataclass(frozen=True)
class SceneTarget:
    """One target of a scene.

    Attributes:
        kind: ``"polyp"`` or ``"instrument"``.
        mask: S x S bool.
        colour: ``"red"`` / ``"pale"`` for polyps, None for the instrument.
    """

    kind: str
    mask: np.ndarray = field(repr=False)
    colour: str | None = None

    @property
    def area(self) -> float:
        """Fraction of the image covered."""
        return float(self.mask.mean())

    @property
    def centroid(self) -> tuple[float, float]:
        """``(cy, cx)`` of the mask as fractions of the height and width (pixel centres)."""
        ys, xs = np.nonzero(self.mask)
        h, w = self.mask.shape
        return float((ys.mean() + 0.5) / h), float((xs.mean() + 0.5) / w)

    @property
    def location(self) -> str:
        """3 x 3 grid word of the centroid (``"top left"``, ``"centre"``, ...)."""
        return location_word(*self.centroid)


@dataclass(frozen=True)
class ScenePrompt:
    """A text naming one target: ``rule`` is ``kind``, ``size``, ``colour`` or ``location``."""

    text: str
    target: int
    rule: str


_COUNTS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass
class Scene:
    """A frame (S x S x 3 uint8), its targets and the prompts that each name one of them."""

    image: np.ndarray = field(repr=False)
    targets: list[SceneTarget]
    prompts: list[ScenePrompt]

    def distractor(self, prompt: int) -> int | None:
        """Another target of the frame for prompt ``prompt``: the largest other polyp (the hard
        negative), else the instrument; None if the frame has one target."""
        named = self.prompts[prompt].target
        others = [i for i in range(len(self.targets)) if i != named]
        if not others:
            return None
        polyps = [i for i in others if self.targets[i].kind == "polyp"]
        return max(polyps, key=lambda i: self.targets[i].area) if polyps else others[0]

    def caption(self) -> str:
        """The whole frame in words, naming every target's kind and none in particular, e.g.
        ``"two polyps and an instrument in a colonoscopy image"`` (CLIP's caption of the frame)."""
        n = sum(t.kind == "polyp" for t in self.targets)
        parts = [f"{_COUNTS[n]} polyps" if n > 1 else "a polyp"] if n else []
        if any(t.kind == "instrument" for t in self.targets):
            parts.append("an instrument")
        return " and ".join(parts) + " in a colonoscopy image"

    def label_map(self) -> np.ndarray:
        """S x S uint8: 0 = background, ``i + 1`` = target ``i`` (masks are disjoint)."""
        labels = np.zeros(self.image.shape[:2], np.uint8)
        for i, target in enumerate(self.targets):
            labels[target.mask] = i + 1
        return labels


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _instrument(rng: np.random.Generator, size: int, px: np.ndarray, py: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """An instrument's geometry: (distance to its axis, across-axis coordinate / half-width,
    along-axis coordinate, half-width, length), all in pixels, for a tube entering from a border."""
    side = rng.integers(4)
    along = rng.uniform(0.15, 0.85) * size
    inward = (np.pi / 2, np.pi, -np.pi / 2, 0.0)[side]  # from the top, right, bottom, left border
    start = [(along, -4.0), (size + 4.0, along), (along, size + 4.0), (-4.0, along)][side]
    angle = inward + rng.uniform(-0.6, 0.6)
    half_width = rng.uniform(0.035, 0.06) * size
    length = rng.uniform(0.4, 0.65) * size
    dx, dy = np.cos(angle), np.sin(angle)
    rel_x, rel_y = px - start[0], py - start[1]
    s = rel_x * dx + rel_y * dy  # along the axis
    t = -rel_x * dy + rel_y * dx  # across it
    s_clamped = np.clip(s, 0, length)
    dist = np.hypot(rel_x - s_clamped * dx, rel_y - s_clamped * dy)
    return dist, t / half_width, s, half_width, length


def _paint_instrument(rng: np.random.Generator, image: np.ndarray, geometry: tuple) -> np.ndarray:
    """Grey metal tube: cylinder shading, a specular stripe, a darker tip, a soft shadow beside it."""
    dist, across, along, half_width, length = geometry
    shadow = 1 - 0.35 * np.exp(-((dist - half_width) / (0.8 * half_width)) ** 2) * (dist > half_width)
    image = image * shadow[..., None]
    grey = rng.uniform(140, 185)
    stripe_at = rng.uniform(-0.5, 0.3)
    across = np.clip(across, -1, 1)
    shade = 0.45 + 0.45 * np.sqrt(1 - across**2) + 0.6 * np.exp(-((across - stripe_at) / 0.15) ** 2)
    tip = np.where(along > length - 1.6 * half_width, 0.55, 1.0)
    metal = grey * np.array([0.97, 1.0, 1.05], np.float32) * (shade * tip)[..., None]
    alpha = np.clip(half_width - dist + 0.5, 0, 1)[..., None]
    return metal * alpha + image * (1 - alpha)


def _add_bubbles(rng: np.random.Generator, image: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """0-4 transparent bubbles: a bright thin ring and a glint, in no mask."""
    size = image.shape[0]
    for _ in range(rng.integers(0, 5)):
        bx, by = rng.uniform(0, size, 2)
        radius = rng.uniform(0.012, 0.035) * size
        r = np.hypot(px - bx, py - by)
        ring = np.exp(-((r - radius) / max(0.8, 0.12 * radius)) ** 2)
        glint = np.exp(-(np.hypot(px - bx + 0.4 * radius, py - by + 0.4 * radius) / (0.2 * radius)) ** 2)
        alpha = np.clip(0.45 * ring + 0.9 * glint, 0, 1)[..., None]
        image = image * (1 - alpha) + 245 * alpha
    return image


def _polyp_geometry(rng: np.random.Generator, size: int, radius: tuple[float, float]) -> tuple:
    """A polyp shape as :func:`shared_model.data.synthetic._paint_polyp` takes it, placed at random."""
    a = rng.uniform(*radius) * size
    b = a * rng.uniform(0.7, 1.0)
    cx, cy = rng.uniform(a + 2, size - a - 2, 2)
    terms = np.stack([np.arange(2, 6), rng.uniform(0, 0.12, 4) / np.arange(1, 5) ** 0.5,
                      rng.uniform(0, 2 * np.pi, 4)], 1)
    return cx, cy, a, b, rng.uniform(0, np.pi), terms


def _polyp_tint(rng: np.random.Generator, image: np.ndarray, colour: str) -> np.ndarray:
    """Per-pixel H x W x 3 factor that turns ``image`` into the polyp's colour under the local light.

    The colour is absolute (:data:`POLYP_RGB`, +-6 % per channel), not relative to the mucosa, so a
    ``red`` polyp is redder than a ``pale`` one in every style; only the brightness follows the
    mucosa's (folds, lumen, vignetting; 1 at the brightest tenth of the frame).
    """
    rgb = np.asarray(POLYP_RGB[colour], np.float32) * rng.uniform(0.94, 1.06, 3).astype(np.float32)
    lum = image.mean(-1, keepdims=True)
    light = np.clip(lum / max(float(np.percentile(lum, 90)), 1.0), 0, 1)
    return rgb * light / np.maximum(image, 1.0)


def synthetic_scene(rng: np.random.Generator, size: int = 128, style: SyntheticStyle | None = None) -> Scene:
    """Draw one scene: a frame, its targets (disjoint masks) and the prompts naming each uniquely.

    Args:
        rng: Source of all randomness.
        size: Side length in pixels (>= 48: smaller frames cannot hold the targets apart).
        style: Mucosa look; default one of :data:`~shared_model.data.synthetic.STYLES` at random.

    Returns:
        The :class:`Scene`, with at least two targets and one prompt (a frame where fewer targets
        fit, or where no prompt names a target uniquely, is drawn again); targets are polyps
        first, then the instrument if any.
    """
    if size < 48:
        raise ValueError(f"size must be >= 48, got {size}")
    for _ in range(MAX_DRAWS):
        scene = _draw_scene(rng, size, style or STYLES[int(rng.integers(len(STYLES)))])
        if len(scene.targets) >= 2 and scene.prompts:
            return scene
    raise RuntimeError(f"no scene with two targets and a prompt in {MAX_DRAWS} draws at size {size}")


def _draw_scene(rng: np.random.Generator, size: int, style: SyntheticStyle) -> Scene:
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    px, py = xx * size, yy * size
    image = _background(rng, size, style, xx, yy)
    n_polyps = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    has_instrument = n_polyps == 1 or rng.random() < 0.6
    occupied = np.zeros((size, size), bool)
    geometry = None
    if has_instrument:
        geometry = _instrument(rng, size, px, py)
        occupied = geometry[0] <= geometry[3] + _GAP
    light_dir = rng.uniform(-1, 1, 2) * 0.35
    targets: list[SceneTarget] = []
    highlights: list[tuple[float, float]] = []
    for _ in range(n_polyps):
        radius = LARGE_RADIUS if rng.random() < 0.5 else SMALL_RADIUS
        colour = COLOURS[int(rng.integers(2))]
        for _ in range(40):
            shape = _polyp_geometry(rng, size, radius)
            trial, inside, spot = _paint_polyp(image, px, py, shape, light_dir, _polyp_tint(rng, image, colour),
                                               1 + 0.05 * _smooth_noise(rng, size, max(4, size // 4)))
            if inside.sum() >= 20 and not (inside & occupied).any():
                break
            radius = SMALL_RADIUS  # crowded: try a smaller one
        else:
            continue
        image = trial
        occupied |= _dilate(inside, _GAP)
        targets.append(SceneTarget("polyp", inside, colour))
        highlights.append(spot)
    if not targets:
        raise RuntimeError("no polyp could be placed")  # the first polyp always fits at size >= 48
    if geometry is not None:
        image = _paint_instrument(rng, image, geometry)
        targets.append(SceneTarget("instrument", geometry[0] <= geometry[3]))
    highlights += [tuple(rng.uniform(0, size, 2)) for _ in range(rng.integers(1, 5))]
    image = _add_highlights(rng, image, px, py, highlights)
    image = _add_bubbles(rng, image, px, py)
    image = image + rng.normal(0, style.noise, image.shape).astype(np.float32)
    image = np.clip(image, 0, 255).round().astype(np.uint8)
    return Scene(image, targets, scene_prompts(targets))


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=pixels)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def _robust_location(target: SceneTarget) -> bool:
    """The centroid is at least :data:`LOCATION_MARGIN` from the grid lines at 1/3 and 2/3."""
    return all(abs(c - line) >= LOCATION_MARGIN for c in target.centroid for line in (1 / 3, 2 / 3))


def _rules(targets: list[SceneTarget]) -> list[tuple[str, str, Callable[[int], bool]]]:
    """Candidate prompts ``(text, rule, predicate over target indices)``."""
    polyps = [i for i, t in enumerate(targets) if t.kind == "polyp"]
    areas = {i: targets[i].area for i in polyps}

    def others(i: int) -> list[float]:
        return [areas[j] for j in polyps if j != i]

    rules: list[tuple[str, str, Callable[[int], bool]]] = [
        ("the instrument", "kind", lambda i: targets[i].kind == "instrument"),
    ]
    if len(polyps) == 1:
        rules.append(("the polyp", "kind", lambda i: i in areas))
        return rules
    rules += [
        ("the large polyp", "size", lambda i: i in areas and areas[i] >= SIZE_RATIO * max(others(i))),
        ("the small polyp", "size", lambda i: i in areas and SIZE_RATIO * areas[i] <= min(others(i))),
    ]
    for colour in COLOURS:
        rules.append((f"the {colour} polyp", "colour", lambda i, c=colour: i in areas and targets[i].colour == c))
    for word in sorted({targets[i].location for i in polyps}):
        rules.append((f"the polyp in the {word}", "location",
                      lambda i, w=word: i in areas and targets[i].location == w and _robust_location(targets[i])))
    return rules


def scene_prompts(targets: list[SceneTarget]) -> list[ScenePrompt]:
    """The prompts whose rule holds for exactly one of ``targets`` (see the module docstring)."""
    prompts = []
    for text, rule, holds in _rules(targets):
        matching = [i for i in range(len(targets)) if holds(i)]
        if len(matching) == 1:
            prompts.append(ScenePrompt(text, matching[0], rule))
    # A location prompt is unambiguous only if no other polyp shares the word at all.
    words = [t.location for t in targets if t.kind == "polyp"]
    return [p for p in prompts if p.rule != "location" or words.count(targets[p.target].location) == 1]
