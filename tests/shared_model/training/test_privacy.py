"""Local DP-SGD: per-example gradients, cumulative accounting, budget refusal, training wiring."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from shared_model.config import ConfigError, PrivacyConfig, TrainConfig, get_preset, merge
from shared_model.exchange import get_exchanged_state
from shared_model.modeling.prompt_sam import build_model
from shared_model.training.privacy import (
    PrivacyBudgetExceeded,
    _generator,
    PrivacyError,
    accountant_from_state,
    accountant_to_state,
    calibrate_noise,
    epsilon_after,
    new_accountant_state,
    per_example_gradients,
    spent_epsilon,
    train_model_dp,
)

S = 128  # tiny preset image size


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and far faster when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(nce: float = 0.0):
    cfg = get_preset("tiny")
    cfg.loss.nce = nce
    return cfg


# Every optional trainable module on: box prompts per component (several decoder rows per image),
# CLIP patch features in the dense prompt, SAM's multimask heads, LoRA in the mask decoder, a fully
# unfrozen CLIP block (LayerNorms, MLP, attention), learnable CRF kernel weights.
ALL_OPTIONS = {
    "boxes": {"mode": "components", "top_k": 2},
    "prompts": {"use_patch_features": True},
    "sam": {"multimask": True, "decoder_mode": "lora"},
    "clip": {"vision": {"unfreeze_last_blocks": 1}},
    "crf": {"learnable_weights": True},
}


def off_zero(m):
    """LoRA B and the dense projection's last layer start at zero, which would zero the gradients
    of the layers before them: move every trainable tensor off zero."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad and not p.abs().sum() > 0:
                p.normal_(0, 0.02)
    return m


@pytest.fixture(scope="module")
def model():
    return off_zero(build_model(tiny_config()))


@pytest.fixture(scope="module")
def models(model):
    return {"tiny": model, "tiny, every option": off_zero(build_model(merge(tiny_config(), ALL_OPTIONS))),
            "tiny, mask boxes": off_zero(build_model(merge(tiny_config(), {"prompts": {"box_source": "mask"}})))}


def examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        mask = torch.zeros(1, S, S)
        mask[:, 10 + 7 * i : 70 + 5 * i, 20 + 3 * i : 90] = 1.0
        words = ["one small pink round polyp", "two large red polyps, left", "a white oval polyp at the top"]
        items.append({"image": torch.rand(3, S, S, generator=g), "mask": mask, "text": words[i % 3],
                      "stem": f"img_{i}", "centre": "a"})
    return items


def stack(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return (torch.stack([x["image"] for x in items]), torch.stack([x["mask"] for x in items]),
            [x["text"] for x in items])


# --------------------------------------------------------------------------------------------
# Per-example gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["microbatch", "batched", "vmap"])
@pytest.mark.parametrize("variant", ["tiny", "tiny, every option"])
def test_per_example_gradients_match_each_example_alone(models, variant, mode):
    model = models[variant].eval()  # no dropout or bottleneck noise: both sides see one function
    images, masks, texts = stack(examples(3))
    grads, logs = per_example_gradients(model, images, masks, texts, mode)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(grads) == list(trainable)
    assert len(logs) == 3 and all("nce" not in parts for parts in logs)
    for i in range(3):
        model.zero_grad(set_to_none=True)
        loss, parts = model.compute_losses(model(images[i : i + 1], texts[i : i + 1]), masks[i : i + 1])
        loss.backward()
        assert parts["total"] == pytest.approx(logs[i]["total"], rel=1e-5)
        for name, p in trainable.items():
            expected = torch.zeros_like(p) if p.grad is None else p.grad
            assert grads[name].shape == (3, *p.shape)
            # Batched and single-image kernels round differently: compare at the tensor's scale.
            error = float((grads[name][i] - expected).abs().max())
            assert error <= 1e-6 + 1e-3 * float(expected.abs().max()), f"{mode} {name} #{i}: {error}"
    model.zero_grad(set_to_none=True)
    # Every trainable tensor (LoRA of both towers and SAM, ctx, gates, prompt projections, SAM's
    # prompt/decoder tokens, ...) is reached, and the examples' gradients differ.
    silent = [n for n, g in grads.items() if not g.abs().sum() > 0]
    assert silent == []
    assert not torch.allclose(grads["clip_text.ctx"][0], grads["clip_text.ctx"][1])
    assert not torch.allclose(grads["prompts.sparse.scale"][0], grads["prompts.sparse.scale"][2])


@pytest.mark.parametrize("variant", ["tiny", "tiny, every option", "tiny, mask boxes"])
def test_vmap_gradients_equal_the_microbatch_ones(models, variant):
    model = models[variant].eval()
    images, masks, texts = stack(examples(4))
    texts[3] = "a much longer description of one flat polyp with more padding tokens"  # other lengths
    reference, reference_logs = per_example_gradients(model, images, masks, texts, "microbatch")
    grads, logs = per_example_gradients(model, images, masks, texts, "vmap")
    assert list(grads) == list(reference)
    for name, expected in reference.items():
        assert grads[name].shape == expected.shape and grads[name].dtype == torch.float32
        for i in range(4):  # each image at its own scale
            error = float((grads[name][i] - expected[i]).abs().max())
            assert error <= 1e-7 + 1e-5 * float(expected[i].abs().max()), f"{name} #{i}: {error}"
    for got, want in zip(logs, reference_logs):
        assert got == pytest.approx(want, rel=1e-5)


def test_auto_mode_falls_back_to_microbatch_once_saying_why(model, monkeypatch, caplog):
    import shared_model.training.privacy as privacy

    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("vmap: It looks like you're calling .item() on a Tensor")

    monkeypatch.setattr(privacy, "vmap_gradients", refuse)
    monkeypatch.setattr(privacy, "_VMAP_REFUSED", privacy.weakref.WeakKeyDictionary())
    model = model.eval()
    images, masks, texts = stack(examples(2))
    reference, _ = per_example_gradients(model, images, masks, texts, "microbatch")
    with caplog.at_level("WARNING", logger="shared_model.training.privacy"):
        for _ in range(2):
            grads, _ = per_example_gradients(model, images, masks, texts, "auto")
            for name in reference:
                assert torch.equal(grads[name], reference[name])
    assert len(calls) == 1  # not retried on the same model
    assert "vmap failed on this model (RuntimeError: vmap: It looks like you're calling .item()" in caplog.text
    assert "using the microbatch mode instead" in caplog.text


def test_dhn_nce_is_refused_under_dp():
    coupled = build_model(tiny_config(nce=0.1))
    with pytest.raises(PrivacyError, match="model.loss.nce"):
        train_model_dp(coupled, examples(4), TrainConfig(steps=1, batch_size=2, progress=False),
                       PrivacyConfig(local_dp=True, delta=1e-3), None)


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------

OPACUS_ORDERS = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)


def test_epsilon_of_full_batch_gaussian_matches_hand_formula():
    # q = 1: each step is the Gaussian mechanism, RDP(a) = a / (2 sigma^2) per step; Balle et al.
    # (2020) conversion eps = min_a RDP(a) - (log(delta) + log(a)) / (a - 1) + log((a - 1) / a).
    sigma, delta, steps = 2.0, 1e-5, 6
    rdp = steps * OPACUS_ORDERS / (2 * sigma**2)
    expected = np.min(rdp - (np.log(delta) + np.log(OPACUS_ORDERS)) / (OPACUS_ORDERS - 1)
                      + np.log((OPACUS_ORDERS - 1) / OPACUS_ORDERS))
    state = new_accountant_state("rdp")
    state = {**state, "noise_multiplier": [sigma], "sample_rate": [1.0], "steps": [3]}
    # Two rounds of 3 steps compose to one history of 6 steps.
    assert epsilon_after(state, delta, sigma, 1.0, 3) == pytest.approx(float(expected), rel=1e-9)
    assert spent_epsilon(state, delta) < epsilon_after(state, delta, sigma, 1.0, 3)


def test_accountant_state_is_plain_data_and_round_trips():
    accountant = accountant_from_state(None, "rdp")
    for _ in range(4):
        accountant.step(noise_multiplier=1.1, sample_rate=0.05)
    accountant.step(noise_multiplier=0.9, sample_rate=0.05)
    state = json.loads(json.dumps(accountant_to_state(accountant)))
    assert state == {"mechanism": "rdp", "noise_multiplier": [1.1, 0.9], "sample_rate": [0.05, 0.05], "steps": [4, 1]}
    again = accountant_from_state(state, "rdp")
    assert again.get_epsilon(delta=1e-5) == pytest.approx(accountant.get_epsilon(delta=1e-5))
    prv = accountant_from_state({**state, "mechanism": "prv"}, "prv")
    assert 0 < prv.get_epsilon(delta=1e-5) < math.inf


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"mechanism": "rdp", "noise_multiplier": [1.0], "sample_rate": [0.1]}, "missing key"),
        ({"mechanism": "rdp", "noise_multiplier": [1.0], "sample_rate": [0.1], "steps": []}, "differ in length"),
        ({"mechanism": "rdp", "noise_multiplier": [1.0], "sample_rate": [1.5], "steps": [2]}, "invalid entry 0"),
        ({"mechanism": "prv", "noise_multiplier": [], "sample_rate": [], "steps": []}, "mechanism 'prv'"),
    ],
)
def test_invalid_accountant_state_is_named(bad, match):
    with pytest.raises(PrivacyError, match=match):
        accountant_from_state(bad, "rdp")


def test_calibrated_noise_spends_the_budget_over_the_planned_steps():
    dp = PrivacyConfig(local_dp=True, epsilon=3.0, delta=1e-5)
    q, planned = 0.05, 200
    sigma = calibrate_noise(dp, q, planned)
    eps = epsilon_after(None, dp.delta, sigma, q, planned)
    assert dp.epsilon - 0.01 <= eps <= dp.epsilon
    # 10 rounds of 20 steps fit; an 11th does not.
    state = {"mechanism": "rdp", "noise_multiplier": [sigma], "sample_rate": [q], "steps": [180]}
    assert epsilon_after(state, dp.delta, sigma, q, 20) <= dp.epsilon
    state["steps"] = [200]
    assert epsilon_after(state, dp.delta, sigma, q, 20) > dp.epsilon
    assert calibrate_noise(PrivacyConfig(noise_multiplier=1.3), q, planned) == 1.3
    assert calibrate_noise(PrivacyConfig(epsilon=8.0, delta=1e-5), q, planned) < sigma


def test_bad_privacy_settings_name_the_field():
    with pytest.raises(ConfigError, match="privacy.delta"):
        train_model_dp(build_model(tiny_config()), examples(4), TrainConfig(steps=1, batch_size=2),
                       PrivacyConfig(delta=0.0), None)
    with pytest.raises(PrivacyError, match="privacy.delta"):  # delta must be below 1 / N
        train_model_dp(build_model(tiny_config()), examples(4), TrainConfig(steps=1, batch_size=2),
                       PrivacyConfig(delta=0.3), None)
    with pytest.raises(PrivacyError, match="train.batch_size"):
        train_model_dp(build_model(tiny_config()), examples(4), TrainConfig(steps=1, batch_size=8),
                       PrivacyConfig(delta=1e-3), None)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def test_dp_training_accumulates_epsilon_across_calls_and_stops_at_the_budget(model):
    m = copy.deepcopy(model)
    data = examples(6)
    cfg = TrainConfig(steps=2, batch_size=2, progress=False, lr=1e-3)
    dp = PrivacyConfig(local_dp=True, epsilon=5.0, delta=1e-3, planned_steps=4, noise_seed=0)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    start = get_exchanged_state(m)

    result, state, eps1 = train_model_dp(m, data, cfg, dp, None)
    assert result.steps == 2 and result.num_examples == 4 and len(result.history) == 2
    assert state["steps"] == [2] and state["sample_rate"] == [pytest.approx(2 / 6)]
    assert 0 < eps1 < dp.epsilon
    assert all(0.0 <= h["clipped"] <= 1.0 for h in result.history)

    result, state, eps2 = train_model_dp(m, data, cfg, dp, state)
    assert state["steps"] == [4]
    assert eps1 < eps2 <= dp.epsilon  # the noise was calibrated for exactly 4 steps
    assert eps2 == pytest.approx(epsilon_after(None, dp.delta, state["noise_multiplier"][0], 2 / 6, 4))

    after = get_exchanged_state(m)
    with pytest.raises(PrivacyBudgetExceeded, match="past the budget 5.0"):
        train_model_dp(m, data, cfg, dp, state)
    assert all(torch.equal(after[k], v) for k, v in get_exchanged_state(m).items())  # nothing trained
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(start[k], after[k]) for k in start)


def test_noise_is_reproducible_only_when_seeded(model):
    data = examples(4)
    cfg = TrainConfig(steps=1, batch_size=2, progress=False, lr=1e-2, warmup_steps=0)

    def run(seed: int) -> dict[str, torch.Tensor]:
        m = copy.deepcopy(model)
        torch.manual_seed(0)  # the same dropout / bottleneck noise in both runs
        train_model_dp(m, data, cfg, PrivacyConfig(local_dp=True, noise_multiplier=1.0, delta=1e-3,
                                                   noise_seed=seed), None)
        return get_exchanged_state(m)

    first, second = run(7), run(7)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # Without a seed, noise and sampling draw from OS entropy: a server knowing the run's seeds
    # cannot regenerate (and subtract) the noise.
    assert _generator(-1).initial_seed() != _generator(-1).initial_seed()
    assert _generator(7).initial_seed() == 7
