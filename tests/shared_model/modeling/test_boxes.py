"""Tests for shared_model.modeling.boxes (saliency -> SAM box prompts, box validation)."""

from __future__ import annotations

import pytest
import torch

from shared_model.modeling.boxes import saliency_to_boxes, validate_boxes
from shared_model.config import BoxConfig, ConfigError

G = 16  # grid
S = 128  # SAM input size: one grid cell = 8 px


def cfg(**kw) -> BoxConfig:
    return BoxConfig(**{"grid": G, "min_area": 0.01, **kw})  # min_area 0.01 * 256 = 2.56 cells


def empty_map(b: int = 1, size: int = G) -> torch.Tensor:
    return torch.zeros(b, 1, size, size)


def test_single_square_gives_exact_box() -> None:
    sal = empty_map()
    sal[0, 0, 2:6, 3:10] = 0.9  # rows 2..5, cols 3..9
    boxes, valid = saliency_to_boxes(sal, cfg(), S)
    assert boxes.shape == (1, 1, 4) and valid.shape == (1, 1)
    assert boxes[0, 0].tolist() == [3 * 8, 2 * 8, 10 * 8, 6 * 8]
    assert valid.tolist() == [[True]]


def test_larger_map_is_area_resampled_to_cell_edges() -> None:
    sal = empty_map(size=4 * G)  # 64 x 64 map, 4 px per grid cell
    sal[0, 0, 8:24, 4:40] = 1.0  # grid rows 2..5, cols 1..9
    boxes, _ = saliency_to_boxes(sal, cfg(), S)
    assert boxes[0, 0].tolist() == [8.0, 16.0, 80.0, 48.0]


def test_two_components_enclosing_and_components_modes() -> None:
    sal = empty_map()
    sal[0, 0, 1:3, 1:3] = 1.0  # 4 cells
    sal[0, 0, 8:14, 9:15] = 1.0  # 36 cells, larger
    boxes, valid = saliency_to_boxes(sal, cfg(mode="enclosing"), S)
    assert boxes[0, 0].tolist() == [8.0, 8.0, 120.0, 112.0]
    boxes, valid = saliency_to_boxes(sal, cfg(mode="components", top_k=3), S)
    assert boxes.shape == (1, 3, 4)
    assert boxes[0, 0].tolist() == [72.0, 64.0, 120.0, 112.0]  # largest first
    assert boxes[0, 1].tolist() == [8.0, 8.0, 24.0, 24.0]
    assert boxes[0, 2].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert valid.tolist() == [[True, True, False]]
    boxes, valid = saliency_to_boxes(sal, cfg(mode="components", top_k=1), S)
    assert boxes[0, 0].tolist() == [72.0, 64.0, 120.0, 112.0] and valid.tolist() == [[True]]


def test_diagonal_cells_are_one_component() -> None:
    sal = empty_map()
    for i in range(4):
        sal[0, 0, 4 + i, 4 + i] = 1.0  # 8-connected only through corners
    boxes, valid = saliency_to_boxes(sal, cfg(mode="components", top_k=2), S)
    assert boxes[0, 0].tolist() == [32.0, 32.0, 64.0, 64.0]
    assert valid.tolist() == [[True, False]]


def test_empty_map_falls_back_to_whole_image() -> None:
    for mode in ("enclosing", "components"):
        boxes, valid = saliency_to_boxes(empty_map(), cfg(mode=mode, top_k=2), S)
        assert boxes[0, 0].tolist() == [0.0, 0.0, float(S), float(S)]
        assert valid[0, 0].item() is True
        assert valid[0, 1:].sum() == 0


def test_tiny_noise_component_is_ignored() -> None:
    sal = empty_map()
    sal[0, 0, 4:8, 4:8] = 1.0
    sal[0, 0, 14, 1] = 1.0  # one cell, below min_area (2.56 cells)
    sal[0, 0, 0, 14:16] = 0.6  # two cells, also below
    boxes, _ = saliency_to_boxes(sal, cfg(), S)
    assert boxes[0, 0].tolist() == [32.0, 32.0, 64.0, 64.0]
    # Only noise -> fallback.
    noise = empty_map()
    noise[0, 0, 14, 1] = 1.0
    boxes, valid = saliency_to_boxes(noise, cfg(), S)
    assert boxes[0, 0].tolist() == [0.0, 0.0, 128.0, 128.0] and valid.all()


def test_threshold_is_inclusive_and_respected() -> None:
    sal = empty_map()
    sal[0, 0, 0:4, 0:4] = 0.5
    sal[0, 0, 10:14, 10:14] = 0.49
    boxes, _ = saliency_to_boxes(sal, cfg(threshold=0.5), S)
    assert boxes[0, 0].tolist() == [0.0, 0.0, 32.0, 32.0]


def test_batch_is_independent() -> None:
    sal = empty_map(3)
    sal[0, 0, 0:3, 0:3] = 1.0
    sal[2, 0, 5:16, 7:9] = 1.0
    boxes, valid = saliency_to_boxes(sal, cfg(), S)
    assert boxes.shape == (3, 1, 4) and valid.all()
    assert boxes[:, 0].tolist() == [[0, 0, 24, 24], [0, 0, 128, 128], [56, 40, 72, 128]]
    assert boxes.dtype == torch.float32 and valid.dtype == torch.bool


def test_boxes_carry_no_grad() -> None:
    sal = torch.rand(1, 1, G, G, requires_grad=True)
    boxes, _ = saliency_to_boxes(sal, cfg(), S)
    assert not boxes.requires_grad


def test_bad_input_raises() -> None:
    with pytest.raises(ConfigError, match="boxes.mode"):
        saliency_to_boxes(empty_map(), cfg(mode="kmeans"), S)
    with pytest.raises(ConfigError, match="boxes.top_k"):
        saliency_to_boxes(empty_map(), cfg(mode="components", top_k=0), S)
    with pytest.raises(ValueError, match="B x 1 x H x W"):
        saliency_to_boxes(torch.zeros(1, G, G), cfg(), S)
    with pytest.raises(ValueError, match="NaN"):
        saliency_to_boxes(torch.full((1, 1, G, G), float("nan")), cfg(), S)


def test_validate_boxes() -> None:
    ok = validate_boxes([[0, 0, 128, 128], [10.5, 3, 20, 4]], 128)
    assert ok.dtype == torch.float32 and ok.shape == (2, 4)
    with pytest.raises(ValueError, match=r"box \[1\] .*x0 must be < x1"):
        validate_boxes([[0, 0, 10, 10], [20, 0, 10, 10]], 128)
    with pytest.raises(ValueError, match=r"y0 must be < y1"):
        validate_boxes(torch.tensor([5.0, 9.0, 10.0, 9.0]), 128)
    with pytest.raises(ValueError, match=r"box \[0, 1\] .*outside the image"):
        validate_boxes(torch.tensor([[[0, 0, 5, 5], [0, 0, 129, 5]]]), 128)
    with pytest.raises(ValueError, match="outside"):
        validate_boxes([[-1, 0, 5, 5]], 128)
    with pytest.raises(ValueError, match="non-finite"):
        validate_boxes([[0, 0, float("nan"), 5]], 128)
    with pytest.raises(ValueError, match=r"\.\.\. x 4"):
        validate_boxes([[0, 0, 5]], 128)
