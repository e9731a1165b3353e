"""Tests for shared_model.modeling.losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shared_model.config import LossConfig
from shared_model.modeling.losses import (
    bce_loss,
    dhn_nce,
    dice_loss,
    saliency_loss,
    total_loss,
)

BIG = 50.0  # sigmoid(+-50) is 1 / 0 to float32 precision


def dhn_nce_loop(v: torch.Tensor, t: torch.Tensor, tau: float, beta1: float, beta2: float) -> float:
    """The paper formula, written as a direct double loop over i, j in float64 Python."""
    b = v.shape[0]
    vn = F.normalize(v.double(), dim=-1)
    tn = F.normalize(t.double(), dim=-1)
    s = [[float(vn[i] @ tn[j]) for j in range(b)] for i in range(b)]

    def direction(sim: list[list[float]], beta: float) -> float:
        total = 0.0
        for i in range(b):
            norm = sum(math.exp(beta * sim[i][k] / tau) for k in range(b) if k != i)
            den = 0.0
            for j in range(b):
                if j == i:
                    continue
                w = (b - 1) * math.exp(beta * sim[i][j] / tau) / norm
                den += w * math.exp(sim[i][j] / tau)
            total += -math.log(math.exp(sim[i][i] / tau) / den)
        return total / b

    st = [[s[j][i] for j in range(b)] for i in range(b)]  # t -> v: columns of s
    return direction(s, beta1) + direction(st, beta2)


@pytest.mark.parametrize("seed, tau, beta1, beta2", [(0, 0.6, 0.15, 0.15), (1, 0.1, 0.5, 2.0)])
def test_dhn_nce_matches_double_loop(seed: int, tau: float, beta1: float, beta2: float) -> None:
    g = torch.Generator().manual_seed(seed)
    v, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    got = dhn_nce(v, t, tau=tau, beta1=beta1, beta2=beta2).item()
    assert got == pytest.approx(dhn_nce_loop(v, t, tau, beta1, beta2), abs=1e-5)


def test_dhn_nce_asymmetric_betas_use_columns() -> None:
    g = torch.Generator().manual_seed(3)
    v, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    # Swapping the roles of v and t transposes s, which swaps the two directions.
    a = dhn_nce(v, t, beta1=0.1, beta2=0.9)
    b = dhn_nce(t, v, beta1=0.9, beta2=0.1)
    torch.testing.assert_close(a, b)


def test_dhn_nce_beta_zero_is_decoupled_nce() -> None:
    # beta = 0: all w_ij = 1, L_v->t = -(1/B) sum_i [s_ii/tau - log sum_{j!=i} exp(s_ij/tau)].
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    s = F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T
    tau = 0.5
    expected = 0.0
    for sim in (s, s.T):
        for i in range(3):
            neg = sum(math.exp(sim[i, j].item() / tau) for j in range(3) if j != i)
            expected += (math.log(neg) - sim[i, i].item() / tau) / 3
    assert dhn_nce(v, t, tau=tau, beta1=0.0, beta2=0.0).item() == pytest.approx(expected, abs=1e-5)


def test_dhn_nce_stable_and_differentiable() -> None:
    v = torch.randn(6, 8, requires_grad=True)
    t = torch.randn(6, 8, requires_grad=True)
    loss = dhn_nce(v, t, tau=0.01, beta1=5.0, beta2=5.0)  # exp(s/tau) overflows without logsumexp
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(t.grad).all()
    assert v.grad.abs().sum() > 0


def test_dhn_nce_batch_of_one_is_zero() -> None:
    v = torch.randn(1, 4, requires_grad=True)
    loss = dhn_nce(v, torch.randn(1, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(v.grad, torch.zeros_like(v))


def test_dhn_nce_bad_shapes() -> None:
    with pytest.raises(ValueError, match="dhn_nce"):
        dhn_nce(torch.randn(3, 4), torch.randn(3, 5))


def test_dice_perfect_and_disjoint() -> None:
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1.0  # 8 pixels
    target[1, 0, 1:2, 1:3] = 1.0  # 2 pixels
    perfect = torch.where(target > 0, BIG, -BIG)
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    # Disjoint: predicted area a, target area b -> dice = 1 / (a + b + 1), loss = 1 - that.
    disjoint = torch.where(target > 0, -BIG, BIG)  # a = 16 - b
    expected = ((1 - 1 / (8 + 8 + 1)) + (1 - 1 / (14 + 2 + 1))) / 2
    assert dice_loss(disjoint, target).item() == pytest.approx(expected, abs=1e-6)


def test_dice_half_probability_hand_value() -> None:
    target = torch.zeros(1, 1, 2, 2)
    target[0, 0, 0, 0] = 1.0
    # p = 0.5 everywhere: (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5
    assert dice_loss(torch.zeros(1, 1, 2, 2), target).item() == pytest.approx(0.5)


def test_bce_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 5, 5, generator=g)
    target = (torch.rand(2, 1, 5, 5, generator=g) > 0.5).float()
    ref = F.binary_cross_entropy(torch.sigmoid(logits), target)
    assert bce_loss(logits, target).item() == pytest.approx(ref.item(), abs=1e-6)


def test_mask_losses_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="dice_loss"):
        dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="bce_loss"):
        bce_loss(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))


def test_saliency_loss_area_resize_and_value() -> None:
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, :2, :2] = 1.0
    target[0, 0, 2:, 2:3] = 1.0  # half of the bottom-right 2x2 block -> 0.5 after area resize
    sal = torch.tensor([[[[0.9, 0.2], [0.2, 0.5]]]])
    y = torch.tensor([[[[1.0, 0.0], [0.0, 0.5]]]])
    ref = F.binary_cross_entropy(sal, y)
    assert saliency_loss(sal, target).item() == pytest.approx(ref.item(), abs=1e-6)
    # Saturated probabilities are clamped: finite loss and gradient.
    sal01 = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]], requires_grad=True)
    loss = saliency_loss(sal01, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sal01.grad).all()


def test_losses_under_bf16_autocast() -> None:
    sal = torch.rand(1, 1, 4, 4)
    target = (torch.rand(1, 1, 8, 8) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = saliency_loss(sal.bfloat16(), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_total_loss_weights_and_skips() -> None:
    cfg = LossConfig(dice=1.0, bce=2.0, nce=0.5, ib=0.0, saliency=0.25)
    parts = {
        "dice": torch.tensor(0.4, requires_grad=True),
        "bce": torch.tensor(0.3),
        "ib": torch.tensor(7.0),  # weight 0: logged, not added
        "saliency": torch.tensor(2.0),
    }  # "nce" missing: skipped
    total, log = total_loss(parts, cfg)
    assert total.item() == pytest.approx(0.4 + 2 * 0.3 + 0.25 * 2.0)
    assert log == pytest.approx({"dice": 0.4, "bce": 0.3, "ib": 7.0, "saliency": 2.0,
                                 "total": 1.5})
    total.backward()
    assert parts["dice"].grad.item() == pytest.approx(1.0)


def test_total_loss_errors() -> None:
    with pytest.raises(ValueError, match="unknown loss part"):
        total_loss({"dice": torch.tensor(1.0), "focal": torch.tensor(1.0)}, LossConfig())
    with pytest.raises(ValueError, match="no loss parts"):
        total_loss({}, LossConfig())
    with pytest.raises(ValueError, match="'bce' must be a scalar"):
        total_loss({"bce": torch.ones(3)}, LossConfig())


def test_all_losses_give_finite_gradients() -> None:
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    v = torch.randn(2, 4, requires_grad=True)
    t = torch.randn(2, 4, requires_grad=True)
    parts = {
        "dice": dice_loss(logits, target),
        "bce": bce_loss(logits, target),
        "nce": dhn_nce(v, t),
        "saliency": saliency_loss(torch.sigmoid(logits), target),
    }
    total, _ = total_loss(parts, LossConfig())
    total.backward()
    for g in (logits.grad, v.grad, t.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
