"""Text prompts: per-image attribute captions built from the mask and pixels, or the class name.

An attribute caption describes each connected component (8-connectivity) of the mask by

* **size**: area as a fraction of the image: ``small`` < :data:`SMALL_AREA` (4 %) <= ``medium`` <
  :data:`LARGE_AREA` (13 %) <= ``large``;
* **shape**: ``irregular`` if solidity (area / convex-hull area, see :func:`solidity`; taken as 1
  below :data:`MIN_SHAPE_PIXELS` = 50 px) < :data:`IRREGULAR_SOLIDITY` (0.88), else ``round`` if the axis ratio (sqrt of the eigenvalue ratio of the pixel covariance)
  < :data:`OVAL_AXIS_RATIO` (1.4), else ``oval``;
* **colour** of the mean RGB inside the component: ``white`` (pale) if bright and unsaturated
  (mean channel >= :data:`WHITE_BRIGHTNESS` (150) and (max - min) / max < :data:`WHITE_SATURATION`
  (0.45)), ``red`` if green / red < :data:`RED_GREEN_RATIO` (0.55), else ``pink``;
* **location** of the centroid on a 3 x 3 grid: ``top``/``centre``/``bottom`` by row and
  ``left``/``centre``/``right`` by column, combined ("top left", "left", "centre", ...).

Components smaller than :data:`MIN_COMPONENT` (0.1 % of the image) are treated as mask noise and
ignored, unless every component is that small (then the largest one is kept). The three largest
components are described, largest first; the count covers all kept components.

The thresholds were set on 400 random real images (all three centres, resized to 256 px) so each
word is used: per component, size small/medium/large 29/39/32 %, shape irregular 12 %,
round 40 %, oval 48 %, colour white 8 %, red 29 %, pink 63 %.

Other tasks (see :mod:`shared_model.data.tasks`) use the same size, shape and location words with
the brightness against the surroundings instead of the colour (:func:`object_caption`, e.g. breast
ultrasound: ratio inside / around < :data:`DARK_CONTRAST` is ``dark``; 0.6 makes about 70 % of
the BUSI tumours dark, the median ratio being 0.39), or describe thin branching structures by
density and thickness (:func:`network_caption`, retinal vessels), never as round objects.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

SMALL_AREA = 0.04
LARGE_AREA = 0.13
IRREGULAR_SOLIDITY = 0.88
OVAL_AXIS_RATIO = 1.4
WHITE_BRIGHTNESS = 150.0
WHITE_SATURATION = 0.45
RED_GREEN_RATIO = 0.55
MIN_COMPONENT = 0.001
MIN_SHAPE_PIXELS = 50
MAX_DESCRIBED = 3
DARK_CONTRAST = 0.6
BRIGHT_CONTRAST = 1.2
SPARSE_NETWORK = 0.075
DENSE_NETWORK = 0.09
THIN_NETWORK = 0.04

_NUMBERS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def class_prompt(class_name: str = "polyp") -> str:
    """The class-only prompt: the class name itself (learned context vectors are prepended later)."""
    name = class_name.strip()
    if not name:
        raise ValueError("class_name must be a non-empty string")
    return name


def _number(n: int) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) else str(n)


def _plural(name: str) -> str:
    return name if name.endswith("s") else name + "s"


def solidity(component: np.ndarray) -> float:
    """Area / convex-hull area of an H x W bool component, pixels counted as unit squares.

    The hull is taken over pixel centres, and its area is corrected to the area of the unit squares
    it covers by Pick's theorem, ``A + P / 2 + 1`` (exact for axis-aligned rectangles, which thus
    have solidity 1). Components under :data:`MIN_SHAPE_PIXELS` pixels are too coarse to judge
    and get 1.
    """
    ys, xs = np.nonzero(component)
    if len(ys) < MIN_SHAPE_PIXELS:
        return 1.0
    # Only the pixels on the component's boundary can be hull vertices.
    ey, ex = np.nonzero(component & ~ndimage.binary_erosion(component))
    try:
        hull = ConvexHull(np.stack([ex, ey], 1).astype(float))
    except QhullError:  # all boundary pixels on one line: a straight bar, convex
        return 1.0
    return float(min(1.0, len(ys) / (hull.volume + hull.area / 2 + 1)))


def axis_ratio(component: np.ndarray) -> float:
    """sqrt(major / minor eigenvalue) of the pixel-coordinate covariance (1 for a disc)."""
    ys, xs = np.nonzero(component)
    coords = np.stack([xs, ys]).astype(float)
    cov = np.cov(coords, bias=True) + np.eye(2) / 12.0  # + the variance of a unit pixel
    eig = np.linalg.eigvalsh(cov)
    return float(np.sqrt(eig[1] / eig[0]))


def size_word(area_fraction: float) -> str:
    """``small`` / ``medium`` / ``large`` for a component's fraction of the image area."""
    if area_fraction < SMALL_AREA:
        return "small"
    return "medium" if area_fraction < LARGE_AREA else "large"


def shape_word(component: np.ndarray) -> str:
    """``irregular`` / ``round`` / ``oval`` for an H x W bool component."""
    if solidity(component) < IRREGULAR_SOLIDITY:
        return "irregular"
    return "round" if axis_ratio(component) < OVAL_AXIS_RATIO else "oval"


def colour_word(mean_rgb: np.ndarray) -> str:
    """``white`` / ``red`` / ``pink`` for a mean RGB colour (0-255)."""
    r, g, b = (float(v) for v in mean_rgb)
    brightest = max(r, g, b, 1e-6)
    if (r + g + b) / 3 >= WHITE_BRIGHTNESS and (brightest - min(r, g, b)) / brightest < WHITE_SATURATION:
        return "white"
    return "red" if g / max(r, 1e-6) < RED_GREEN_RATIO else "pink"


def location_word(cy: float, cx: float) -> str:
    """Grid location of a centroid given as fractions of the height (``cy``) and width (``cx``)."""
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "centre"
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    if row == col == "centre":
        return "centre"
    if row == "centre":
        return col
    if col == "centre":
        return row
    return f"{row} {col}"


def brightness_word(inside_mean: float, around_mean: float) -> str:
    """``dark`` / ``bright`` / ``""`` for a component's mean grey level against its surroundings'.

    The ratio inside / around is ``dark`` below :data:`DARK_CONTRAST`, ``bright`` above
    :data:`BRIGHT_CONTRAST`, else no word (neither clearly darker nor brighter).
    """
    ratio = inside_mean / max(around_mean, 1.0)
    return "dark" if ratio < DARK_CONTRAST else "bright" if ratio > BRIGHT_CONTRAST else ""


def _brightness(labels: np.ndarray, index: int, grey: np.ndarray) -> str:
    """:func:`brightness_word` of component ``index`` (label ``index + 1``) against a ring around it."""
    component = labels == index + 1
    width = max(2, round(max(labels.shape) / 32))
    ring = ndimage.binary_dilation(component, iterations=width) & (labels == 0)
    if not ring.any():
        return ""
    return brightness_word(float(grey[component].mean()), float(grey[ring].mean()))


def describe_components(mask: np.ndarray, image: np.ndarray,
                        brightness: bool = False) -> list[dict[str, str | float]]:
    """Attributes of the kept components of a mask, largest first.

    Args:
        mask: H x W bool (non-zero = foreground).
        image: H x W x 3 uint8 RGB.
        brightness: Also give each component's ``brightness`` word (:func:`brightness_word`:
            its mean grey level against a ring of background around it, for grey-scale modalities).

    Returns:
        One dict per kept component: ``area`` (fraction), ``size``, ``shape``, ``colour``,
        ``location`` words (and ``brightness`` if asked).
    """
    mask = np.asarray(mask) != 0
    image = np.asarray(image)
    if mask.ndim != 2 or image.shape != (*mask.shape, 3):
        raise ValueError(f"expected mask H x W and image H x W x 3, got {mask.shape} and {image.shape}")
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n == 0:
        return []
    h, w = mask.shape
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = sorted(range(n), key=lambda i: (-areas[i], i))
    kept = [i for i in order if areas[i] >= MIN_COMPONENT * h * w] or order[:1]
    slices = ndimage.find_objects(labels)
    out = []
    for i in kept:
        sl = slices[i]
        component = labels[sl] == i + 1
        ys, xs = np.nonzero(component)
        cy = (ys.mean() + sl[0].start + 0.5) / h
        cx = (xs.mean() + sl[1].start + 0.5) / w
        out.append({
            "area": float(areas[i]) / (h * w),
            "size": size_word(areas[i] / (h * w)),
            "shape": shape_word(component),
            "colour": colour_word(image[sl][component].reshape(-1, 3).mean(0)),
            "location": location_word(cy, cx),
        })
        if brightness:
            out[-1]["brightness"] = _brightness(labels, i, image.astype(np.float32).mean(-1))
    return out


def attribute_caption(mask: np.ndarray, image: np.ndarray, class_name: str = "polyp") -> str:
    """Describe the mask's components in words.

    Args:
        mask: H x W bool.
        image: H x W x 3 uint8 RGB.
        class_name: Noun for one object.

    Returns:
        E.g. ``"one small pink round polyp, located in the left of the image"``;
        ``"two polyps: a large red oval one in the top left and a small pink round one in the
        centre of the image"``; ``"no polyp visible"`` for an empty mask.
    """
    name = class_prompt(class_name)
    parts = describe_components(mask, image)
    if not parts:
        return f"no {name} visible"
    if len(parts) == 1:
        p = parts[0]
        words = f"{p['size']} {p['colour']} {p['shape']} {name}"
        return f"one {words}, located in the {p['location']} of the image"
    head = f"{_number(len(parts))} {_plural(name)}"
    if len(parts) > MAX_DESCRIBED:
        head += f", the {_number(MAX_DESCRIBED)} largest"
    phrases = [f"a {p['size']} {p['colour']} {p['shape']} one in the {p['location']}"
               for p in parts[:MAX_DESCRIBED]]
    return f"{head}: {', '.join(phrases[:-1])} and {phrases[-1]} of the image"


def _words(*words: str) -> str:
    return " ".join(w for w in words if w)


def object_caption(mask: np.ndarray, image: np.ndarray, class_name: str, image_noun: str) -> str:
    """Describe the mask's components as objects of a grey-scale-like modality (any task but polyps).

    The words are those of :func:`attribute_caption` with the colour replaced by the brightness
    against the surroundings (``dark`` / ``bright`` / none, :func:`brightness_word`), and the image
    named by ``image_noun``.

    Args:
        mask: H x W bool.
        image: H x W x 3 uint8 RGB.
        class_name: Noun for one object (e.g. ``"breast tumour"``).
        image_noun: The image with its article (e.g. ``"an ultrasound image"``).

    Returns:
        E.g. ``"one small dark oval breast tumour, located in the top left of an ultrasound image"``;
        ``"two breast tumours: a large dark irregular one in the centre and a small round one in the
        right of an ultrasound image"``; ``"no breast tumour visible in an ultrasound image"``.
    """
    name = class_prompt(class_name)
    parts = describe_components(mask, image, brightness=True)
    if not parts:
        return f"no {name} visible in {image_noun}"
    if len(parts) == 1:
        p = parts[0]
        words = _words(p["size"], p["brightness"], p["shape"], name)
        return f"one {words}, located in the {p['location']} of {image_noun}"
    head = f"{_number(len(parts))} {_plural(name)}"
    if len(parts) > MAX_DESCRIBED:
        head += f", the {_number(MAX_DESCRIBED)} largest"
    phrases = [f"a {_words(p['size'], p['brightness'], p['shape'])} one in the {p['location']}"
               for p in parts[:MAX_DESCRIBED]]
    return f"{head}: {', '.join(phrases[:-1])} and {phrases[-1]} of {image_noun}"


def network_caption(mask: np.ndarray, class_name: str, image_noun: str) -> str:
    """Describe a mask of thin branching structures (vessels) by density and thickness, not as objects.

    * **density** of the foreground fraction: ``sparse`` < :data:`SPARSE_NETWORK` (7.5 %) <=
      (no word) < :data:`DENSE_NETWORK` (9 %) <= ``dense``;
    * **thickness** of the mean width, estimated as 2 x area / boundary pixels, as a fraction of
      the image side: ``thin`` below :data:`THIN_NETWORK` (4 %), else ``thick``.

    The density thresholds are the quartiles of the 68 real fundus images (DRIVE, CHASE_DB1) at
    256 px; their vessels are all ``thin`` (mean width 2.3-2.8 px at 256 px). The estimate cannot
    go below 2 px (a line 1 px wide is all boundary), so ``thin`` needs an image side of at least
    50 px.

    Args:
        mask: H x W bool.
        class_name: The structures' name, plural (e.g. ``"retinal blood vessels"``).
        image_noun: The image with its article (e.g. ``"a fundus photograph"``).

    Returns:
        E.g. ``"a dense network of thin retinal blood vessels in a fundus photograph"``;
        ``"no retinal blood vessels visible in a fundus photograph"``.
    """
    name = class_prompt(class_name)
    mask = np.asarray(mask) != 0
    if mask.ndim != 2:
        raise ValueError(f"expected mask H x W, got {mask.shape}")
    area = int(mask.sum())
    if area == 0:
        return f"no {name} visible in {image_noun}"
    fraction = area / mask.size
    density = "sparse" if fraction < SPARSE_NETWORK else "dense" if fraction >= DENSE_NETWORK else ""
    boundary = int((mask & ~ndimage.binary_erosion(mask)).sum())
    width = 2.0 * area / max(boundary, 1) / max(mask.shape)
    thickness = "thin" if width < THIN_NETWORK else "thick"
    return f"a {_words(density, 'network')} of {thickness} {name} in {image_noun}"
