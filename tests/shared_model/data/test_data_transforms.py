"""Joint augmentation: seeded, mask stays binary and aligned, colour only on the image."""

from __future__ import annotations

import pytest
import torch

from shared_model.data.transforms import JointTransform, item_seed, single_thread


def _square_pair(size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(1, size, size, dtype=torch.uint8)
    mask[0, 6:20, 10:30] = 1
    image = (mask * 255).expand(3, -1, -1).contiguous()  # the image shows the mask
    return image, mask


def test_same_seed_same_result_different_seed_differs():
    t = JointTransform()
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    mask = (torch.rand(1, 32, 32) > 0.5).to(torch.uint8)
    a, b = t(image, mask, 123), t(image, mask, 123)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert any(not torch.equal(t(image, mask, s)[0], a[0]) for s in range(5))


def test_caller_rng_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    image, mask = _square_pair()
    JointTransform()(image, mask, 7)
    assert torch.equal(torch.rand(3), expected)


def test_flips_move_image_and_mask_together():
    t = JointTransform(hflip=1.0, vflip=1.0, affine_p=0.0, brightness=0, contrast=0, saturation=0, hue=0)
    image, mask = _square_pair()
    out_image, out_mask = t(image, mask, 0)
    assert torch.equal(out_mask, mask.flip(-1).flip(-2))
    assert torch.equal(out_image, image.flip(-1).flip(-2))


def test_affine_keeps_mask_binary_and_aligned():
    t = JointTransform(hflip=0.5, vflip=0.5, affine_p=1.0, degrees=20, brightness=0, contrast=0,
                       saturation=0, hue=0)
    image, mask = _square_pair()
    moved = 0
    for seed in range(10):
        out_image, out_mask = t(image, mask, seed)
        assert out_mask.dtype == torch.uint8 and set(out_mask.unique().tolist()) <= {0, 1}
        agree = ((out_image[0] > 127) == out_mask[0].bool()).float().mean()
        assert agree > 0.97  # bilinear image vs nearest mask differ only on edge pixels
        moved += not torch.equal(out_mask, mask)
    assert moved >= 8


def test_colour_jitter_changes_image_only():
    t = JointTransform(hflip=0, vflip=0, affine_p=0, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1)
    mask = torch.zeros(1, 32, 32, dtype=torch.uint8)
    mask[0, 8:16, 8:16] = 1
    image = torch.randint(30, 220, (3, 32, 32), dtype=torch.uint8)
    out_image, out_mask = t(image, mask, 1)
    assert torch.equal(out_mask, mask)
    assert not torch.equal(out_image, image)
    assert out_image.dtype == torch.uint8


def test_item_seed_is_stable_and_distinct():
    assert item_seed(0, 0, 1) == item_seed(0, 0, 1)
    seeds = {item_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450
    assert all(0 <= s < 2**63 for s in seeds)


def test_single_thread_restores_count():
    before = torch.get_num_threads()
    with single_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_shape_checks():
    t = JointTransform()
    with pytest.raises(ValueError, match="image must be 3 x H x W"):
        t(torch.zeros(1, 8, 8, dtype=torch.uint8), torch.zeros(1, 8, 8), 0)
    with pytest.raises(ValueError, match="mask must be 1 x H x W"):
        t(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(1, 8, 9), 0)
