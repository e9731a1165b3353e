"""Tests for shared_model.modeling.crf (differentiable mean-field dense CRF)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shared_model.config import ConfigError, CRFConfig, tiny_config
from shared_model.modeling.crf import DenseCRF, unfold_window

N = 32


def two_region_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat pink square on a flat blue background; noisy saliency with salt in both regions.

    Returns:
        prob 1 x 1 x N x N, image 1 x 3 x N x N, region mask 1 x 1 x N x N.
    """
    mask = torch.zeros(1, 1, N, N)
    mask[..., 10:22, 8:24] = 1.0
    image = torch.empty(1, 3, N, N)
    image[:, 0], image[:, 1], image[:, 2] = 0.2, 0.2, 0.6
    inside = mask[0, 0].bool()
    image[0, 0][inside], image[0, 1][inside], image[0, 2][inside] = 0.9, 0.4, 0.4
    prob = 0.3 + 0.4 * mask  # weakly right everywhere
    g = torch.Generator().manual_seed(0)
    salt = torch.rand(N, N, generator=g) < 0.1
    prob[0, 0][salt & inside] = 0.05  # dark salt inside the square
    prob[0, 0][salt & ~inside] = 0.95  # bright salt outside it
    return prob, image, mask


def test_reduces_error_on_two_region_example() -> None:
    prob, image, mask = two_region_example()
    crf = DenseCRF(tiny_config().crf)
    out = crf(prob, image)
    err_in = (prob - mask).abs().mean().item()
    err_out = (out - mask).abs().mean().item()
    assert err_out < 0.5 * err_in, (err_in, err_out)
    # About 10% of the input pixels are on the wrong side of 0.5; after the CRF under 1% are,
    # and all of those lie at the square's border (the colour-blind Gaussian kernel rounds corners).
    wrong_in = ((prob > 0.5) != mask.bool())[0, 0]
    wrong_out = ((out > 0.5) != mask.bool())[0, 0]
    assert wrong_in.float().mean() > 0.08
    assert wrong_out.float().mean() < 0.01
    interior = torch.zeros(N, N, dtype=torch.bool)
    interior[12:20, 10:22] = True  # the square eroded by 2
    exterior = torch.ones(N, N, dtype=torch.bool)
    exterior[8:24, 6:26] = False  # outside the square dilated by 2
    assert not wrong_out[interior | exterior].any()
    assert out.min() >= 0 and out.max() <= 1


def test_one_iteration_matches_hand_computation() -> None:
    # 3 x 3 grid, uniform p = 0.8, Gaussian kernel only (sigma 1, weight 1), Potts.
    cfg = CRFConfig(iterations=1, kernel_size=3, resolution=3, gaussian_sigma=1.0,
                    gaussian_weight=1.0, bilateral_weight=0.0)
    out = DenseCRF(cfg)(torch.full((1, 1, 3, 3), 0.8), torch.rand(1, 3, 3, 3))

    def fg(mass: float) -> float:
        # logit_fg - logit_bg = log(0.8/0.2) - (0.2 - 0.8) * mass
        return 1 / (1 + math.exp(-(math.log(4.0) + 0.6 * mass)))

    centre = 4 * math.exp(-0.5) + 4 * math.exp(-1.0)
    corner = 2 * math.exp(-0.5) + math.exp(-1.0)
    edge = 3 * math.exp(-0.5) + 2 * math.exp(-1.0)
    assert out[0, 0, 1, 1].item() == pytest.approx(fg(centre), abs=1e-5)
    assert out[0, 0, 0, 0].item() == pytest.approx(fg(corner), abs=1e-5)
    assert out[0, 0, 0, 1].item() == pytest.approx(fg(edge), abs=1e-5)


def test_unfold_window_matches_torch_unfold() -> None:
    x = torch.randn(2, 3, 6, 5)
    for k in (3, 5):
        ref = F.unfold(x, k, padding=k // 2).view(2, 3, k * k, 30)
        torch.testing.assert_close(unfold_window(x, k), ref, rtol=0, atol=0)


def test_zero_iterations_is_identity_at_resolution() -> None:
    prob = torch.rand(2, 1, 16, 16) * 0.9 + 0.05
    out = DenseCRF(CRFConfig(iterations=0, resolution=16))(prob, torch.rand(2, 3, 16, 16))
    torch.testing.assert_close(out, prob)


def test_shapes_and_resampling() -> None:
    crf = DenseCRF(tiny_config().crf)
    out = crf(torch.rand(2, 1, 40, 24), torch.rand(2, 3, 100, 90))
    assert out.shape == (2, 1, 40, 24)
    assert out.min() >= 0 and out.max() <= 1


def test_disabled_returns_input() -> None:
    prob = torch.rand(1, 1, 8, 8)
    assert DenseCRF(CRFConfig(enabled=False))(prob, torch.rand(1, 3, 8, 8)) is prob


def test_batch_of_two_equals_two_batches_of_one() -> None:
    crf = DenseCRF(tiny_config().crf)
    prob, image = torch.rand(2, 1, 20, 20), torch.rand(2, 3, 50, 50)
    both = crf(prob, image)
    single = torch.cat([crf(prob[i : i + 1], image[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(both, single)


def test_gradients_flow_to_prob_and_learnable_weights() -> None:
    cfg = CRFConfig(iterations=3, kernel_size=5, resolution=16, learnable_weights=True)
    crf = DenseCRF(cfg)
    names = {n for n, _ in crf.named_parameters()}
    assert names == {"gaussian_weight", "bilateral_weight"}
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)  # stands in for the gates upstream
    out = crf(torch.sigmoid(logits), torch.rand(2, 3, 16, 16))
    (out * torch.randn_like(out)).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    for p in crf.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs() > 0


def test_fixed_weights_are_buffers() -> None:
    crf = DenseCRF(CRFConfig(learnable_weights=False))
    assert list(crf.parameters()) == []
    assert {"gaussian_weight", "bilateral_weight"} <= set(crf.state_dict())


def test_bf16_autocast_computes_in_float32() -> None:
    crf = DenseCRF(tiny_config().crf)
    prob, image, _ = two_region_example()
    prob, image = prob.bfloat16(), image.bfloat16()
    ref = crf(prob.float(), image.float())  # same (quantised) inputs, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crf(prob, image)
    assert out.dtype == torch.bfloat16
    # Only the final rounding to bf16 differs (8 mantissa bits).
    torch.testing.assert_close(out.float(), ref, atol=1e-6, rtol=4e-3)


def test_bad_inputs_raise() -> None:
    crf = DenseCRF(CRFConfig())
    with pytest.raises(ValueError, match="prob"):
        crf(torch.rand(1, 2, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="image"):
        crf(torch.rand(2, 1, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="crf.kernel_size"):
        DenseCRF(CRFConfig(kernel_size=4))
    with pytest.raises(ConfigError, match="crf.bilateral_sigma_rgb"):
        DenseCRF(CRFConfig(bilateral_sigma_rgb=0.0))
