"""Tests for shared_model.modeling.bottleneck (M2IB with a text-conditioned gate network)."""

from __future__ import annotations

import math

import pytest
import torch

from shared_model.modeling.bottleneck import M2IB, BottleneckOutput, ib_loss, saliency_from_kl
from shared_model.config import BottleneckConfig, ConfigError

B, GRID, D, E = 2, 3, 8, 6
T = 1 + GRID * GRID


def make(noise: bool = True, seed: int = 0) -> M2IB:
    torch.manual_seed(seed)
    return M2IB(BottleneckConfig(gate_hidden=5, noise=noise), width=D, text_dim=E)


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g) * 3 + 2, torch.randn(B, E, generator=g)


def test_shapes_and_initial_lambda() -> None:
    out = make().eval()(*inputs())
    assert isinstance(out, BottleneckOutput)
    for t in out:
        assert t.shape == (B, T, D)
    assert (out.kl >= 0).all()
    # Documented init: lambda starts around sigmoid(1.5) = 0.82, within 0.5..0.9.
    assert 0.5 < out.lam.min() and out.lam.max() < 0.9
    assert abs(out.lam.mean().item() - 1 / (1 + math.exp(-1.5))) < 0.03


def test_kl_and_z_match_formula_in_eval() -> None:
    m = make().eval()
    x, text = inputs()
    out = m(x, text)
    lam = torch.sigmoid(m.gate_logits(x, text))
    mu = x.mean(1, keepdim=True)
    sigma = (x.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    xs = (x - mu) / sigma
    kl = -0.5 * (1 + torch.log((1 - lam) ** 2) - (lam * xs) ** 2 - (1 - lam) ** 2)
    torch.testing.assert_close(out.lam, lam)
    torch.testing.assert_close(out.kl, kl, rtol=1e-5, atol=1e-5)
    # eps = 0 in eval: z = lambda * x + (1 - lambda) * mu
    torch.testing.assert_close(out.z, lam * x + (1 - lam) * mu, rtol=1e-5, atol=1e-5)


def test_noise_only_in_training_with_noise_flag() -> None:
    x, text = inputs()
    m = make(noise=True)
    m.train()
    torch.manual_seed(0)
    z1 = m(x, text).z
    torch.manual_seed(1)
    z2 = m(x, text).z
    assert not torch.allclose(z1, z2)
    m.eval()
    torch.testing.assert_close(m(x, text).z, m(x, text).z)
    quiet = make(noise=False).train()
    torch.testing.assert_close(quiet(x, text).z, quiet(x, text).z)


def test_kl_is_zero_when_gate_closed_on_standard_noise() -> None:
    # lambda -> 0: z is pure noise, KL -> -1/2 (1 + 0 - 0 - 1) = 0.
    m = make().eval()
    with torch.no_grad():
        m.out.weight.zero_()
        m.out.bias.fill_(-30.0)
    out = m(*inputs())
    assert out.kl.abs().max() < 1e-6
    # lambda -> 1 stays finite (log term computed via logsigmoid).
    with torch.no_grad():
        m.out.bias.fill_(40.0)
    assert torch.isfinite(m(*inputs()).kl).all()


def test_text_conditions_the_gates() -> None:
    m = make().eval()
    x, text = inputs()
    assert not torch.allclose(m(x, text).lam, m(x, text + 1.0).lam)


def test_gradients_reach_gate_network() -> None:
    m = make().train()
    x, text = inputs()
    x.requires_grad_(True)
    out = m(x, text)
    cos = torch.cosine_similarity(out.z.mean(1), torch.ones(B, D), dim=-1)
    loss = ib_loss(out.kl, cos, beta=0.1) + saliency_from_kl(out.kl, GRID, (6, 6)).mean()
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_saliency_from_kl_hand_example() -> None:
    kl = torch.zeros(1, 1 + 4, 2)
    kl[0, 0] = 100.0  # CLS is dropped
    kl[0, 1:, 0] = torch.tensor([0.0, 1.0, 2.0, 4.0])
    kl[0, 1:, 1] = 1.0  # channel sum: [1, 2, 3, 5]
    sal = saliency_from_kl(kl, grid=2, size=(2, 2))
    expected = torch.tensor([[[[0.0, 0.25], [0.5, 1.0]]]])
    torch.testing.assert_close(sal, expected)
    big = saliency_from_kl(kl, grid=2, size=(7, 5))
    assert big.shape == (1, 1, 7, 5) and big.min() == 0 and big.max() == 1


def test_saliency_constant_map_gives_zeros() -> None:
    sal = saliency_from_kl(torch.ones(2, 5, 3), grid=2, size=(4, 4))
    assert torch.equal(sal, torch.zeros(2, 1, 4, 4))


def test_ib_loss_value() -> None:
    kl = torch.full((2, 3, 4), 2.0)
    cos = torch.tensor([0.5, 0.3])
    assert ib_loss(kl, cos, beta=0.5).item() == pytest.approx(0.5 * 2.0 - 0.4)


def test_bad_inputs_raise() -> None:
    m = make()
    x, text = inputs()
    with pytest.raises(ValueError, match="tokens"):
        m(x[..., :-1], text)
    with pytest.raises(ValueError, match="text_emb"):
        m(x, text[:1])
    with pytest.raises(ValueError, match="saliency_from_kl"):
        saliency_from_kl(torch.ones(1, 4, 2), grid=2, size=(4, 4))
    with pytest.raises(ConfigError, match="bottleneck.gate_hidden"):
        M2IB(BottleneckConfig(gate_hidden=0), width=D, text_dim=E)


def test_bf16_autocast_cpu() -> None:
    m = make().eval()
    x, text = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x.bfloat16(), text)
    assert out.kl.dtype == torch.float32 and torch.isfinite(out.kl).all()
    assert out.z.dtype == torch.bfloat16
