"""Attribute captions on constructed masks with hand-known answers."""

from __future__ import annotations

import numpy as np
import pytest

from shared_model.data.captions import (
    attribute_caption,
    axis_ratio,
    class_prompt,
    colour_word,
    describe_components,
    location_word,
    size_word,
    solidity,
)

PINK, RED, WHITE = (200, 120, 110), (180, 60, 50), (235, 225, 220)


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _image(mask, inside, outside=(90, 40, 30)):
    image = np.empty((*mask.shape, 3), np.uint8)
    image[:] = outside
    image[mask] = inside
    return image


def test_single_small_pink_round_left():
    mask = _disc((100, 100), 50, 15, 8)  # area 2 % of the image, centroid (0.505, 0.155)
    assert attribute_caption(mask, _image(mask, PINK)) == (
        "one small pink round polyp, located in the left of the image")


def test_empty_mask_and_class_name():
    mask = np.zeros((20, 20), bool)
    assert attribute_caption(mask, _image(mask, PINK)) == "no polyp visible"
    assert attribute_caption(mask, _image(mask, PINK), "lesion") == "no lesion visible"
    assert class_prompt() == "polyp" and class_prompt(" adenoma ") == "adenoma"
    with pytest.raises(ValueError, match="class_name"):
        class_prompt("  ")


def test_large_red_oval_bottom_right():
    yy, xx = np.mgrid[:100, :100]
    mask = ((yy - 78) / 14.0) ** 2 + ((xx - 70) / 28.0) ** 2 <= 1  # axis ratio 2, area ~12.3 %
    mask |= ((yy - 80) / 15.0) ** 2 + ((xx - 72) / 27.0) ** 2 <= 1
    assert mask.mean() >= 0.13
    assert attribute_caption(mask, _image(mask, RED)) == (
        "one large red oval polyp, located in the bottom right of the image")


def test_irregular_white_top():
    mask = np.zeros((100, 100), bool)
    mask[5:25, 40:50] = True  # an L: 20 x 10 + 10 x 10 = 300 px
    mask[15:25, 50:60] = True
    # Hull of the pixel centres: (0,0) (9,0) (19,10) (19,19) (0,19): area 19^2 - 10^2/2 = 311,
    # perimeter 9 + 10 sqrt2 + 9 + 19 + 19; covered area 311 + P/2 + 1 = 340 + 5 sqrt2.
    assert solidity(mask) == pytest.approx(300 / (340 + 5 * np.sqrt(2)))
    assert attribute_caption(mask, _image(mask, WHITE)) == (
        "one small white irregular polyp, located in the top of the image")


def test_two_components_largest_first():
    mask = _disc((90, 90), 20, 20, 5) | _disc((90, 90), 60, 60, 20)
    image = _image(mask, PINK)
    image[:40, :40][mask[:40, :40]] = RED
    assert attribute_caption(mask, image) == (
        "two polyps: a large pink round one in the bottom right and a small red round one in the "
        "top left of the image")


def test_more_than_three_components_and_noise():
    mask = np.zeros((100, 100), bool)
    for i, side in enumerate([12, 10, 8, 6, 5]):
        mask[5 + 18 * i: 5 + 18 * i + side, 40: 40 + side] = True
    mask[95, 2] = True  # 1 px < 0.1 % of the image: ignored as noise
    caption = attribute_caption(mask, _image(mask, PINK), "polyp")
    # Centroid rows 10.5, 27.5, 44.5 (of 100): top, top, centre; columns ~46: centre.
    assert caption == (
        "five polyps, the three largest: a small pink round one in the top, a small pink round one "
        "in the top and a small pink round one in the centre of the image")
    parts = describe_components(mask, _image(mask, PINK))
    assert [p["area"] for p in parts] == [144 / 1e4, 100 / 1e4, 64 / 1e4, 36 / 1e4, 25 / 1e4]


def test_only_tiny_component_is_kept():
    mask = np.zeros((100, 100), bool)
    mask[10, 80] = True
    assert attribute_caption(mask, _image(mask, PINK)) == (
        "one small pink round polyp, located in the top right of the image")


def test_diagonal_pixels_are_one_component():
    mask = np.zeros((60, 60), bool)
    mask[20:30, 20:30] = True
    mask[30:40, 30:40] = True  # touches the first square at one corner
    assert len(describe_components(mask, _image(mask, PINK))) == 1


def test_word_rules():
    assert [size_word(a) for a in (0.0, 0.0399, 0.04, 0.1299, 0.13, 0.9)] == [
        "small", "small", "medium", "medium", "large", "large"]
    assert colour_word(np.array(PINK)) == "pink"
    assert colour_word(np.array(RED)) == "red"
    assert colour_word(np.array(WHITE)) == "white"
    assert colour_word(np.array([0, 0, 0])) == "red"  # dark: no green at all
    grid = {(0.1, 0.1): "top left", (0.1, 0.5): "top", (0.1, 0.9): "top right",
            (0.5, 0.1): "left", (0.5, 0.5): "centre", (0.5, 0.9): "right",
            (0.9, 0.1): "bottom left", (0.9, 0.5): "bottom", (0.9, 0.9): "bottom right"}
    for (cy, cx), word in grid.items():
        assert location_word(cy, cx) == word


def test_shape_measures():
    rect = np.zeros((50, 60), bool)
    rect[10:20, 5:45] = True  # 40 x 10: pixel-corrected covariance gives exactly 40 / 10
    assert axis_ratio(rect) == pytest.approx(4.0)
    assert solidity(rect) == pytest.approx(1.0)
    disc = _disc((80, 80), 40, 40, 20)
    assert axis_ratio(disc) == pytest.approx(1.0, abs=1e-6)
    assert solidity(disc) > 0.95


def test_input_checks():
    with pytest.raises(ValueError, match="H x W x 3"):
        attribute_caption(np.zeros((10, 10), bool), np.zeros((10, 11, 3), np.uint8))
