"""Central DP on the server: Opacus-backed accountant in Flower's protocol, fixed/adaptive wrappers."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig as FlowerPrivacyConfig,
    SamplingMethod,
)

from client.wire import record_to_state, state_to_record
from server.privacy import (
    CentralDPAdaptive,
    CentralDPFixed,
    OpacusRdpAccountant,
    central_epsilon,
    check_privacy_strategy,
    wrap_central_dp,
)
from server.strategy import GuardedStrategy, build_inner_strategy
from shared_model.config import ConfigError, FederationConfig, PartitionConfig, PrivacyConfig, from_run_config
from server_helpers import FakeGrid

ORDERS = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
SHAPES = OrderedDict([("w", (3,)), ("b", (1,))])
GLOBAL = OrderedDict([("w", torch.zeros(3)), ("b", torch.zeros(1))])


pytestmark = pytest.mark.usefixtures("fixed_task_identity")


def gaussian_epsilon(z: float, releases: int, delta: float) -> float:
    """Full-participation Gaussian mechanism: RDP(a) = releases * a / (2 z^2), Balle et al. conversion."""
    rdp = releases * ORDERS / (2 * z**2)
    return float(np.min(rdp - (np.log(delta) + np.log(ORDERS)) / (ORDERS - 1) + np.log((ORDERS - 1) / ORDERS)))


def flower_config(max_epsilon=None, delta=1e-5, n=3):
    return FlowerPrivacyConfig(target_delta=delta, population_size=n,
                               neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                               sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=max_epsilon)


def test_accountant_follows_flowers_protocol_and_the_hand_formula():
    acc = OpacusRdpAccountant(flower_config(max_epsilon=20.0))
    event = GaussianPrivacyEvent(noise_multiplier=1.5, sample_size=3, population_size=3)
    acc.compose(event)
    acc.compose(event, count=2)
    assert acc.num_releases == 3
    spent = acc.get_privacy_spent()
    assert spent.delta == 1e-5 and spent.num_releases == 3
    assert spent.epsilon == pytest.approx(gaussian_epsilon(1.5, 3, 1e-5), rel=1e-9)
    assert acc.get_epsilon(acc.get_delta(spent.epsilon)) == pytest.approx(spent.epsilon, rel=1e-3)
    assert not acc.would_exceed(event)
    assert acc.would_exceed(event, max_epsilon=spent.epsilon)  # one more release costs more
    again = OpacusRdpAccountant(flower_config())
    again.load_state_dict(acc.state_dict())
    assert again.get_epsilon(1e-5) == spent.epsilon and again.num_releases == 3


def _reply(msg, delta, n):
    metrics = MetricRecord({"num-examples": n, "partition-id": msg.metadata.dst_node_id, "train-loss": 0.5,
                            "train-steps": 1, "train-seconds": 0.1, "val-dice": 0.3})
    return Message(RecordDict({"arrays": state_to_record(delta), "metrics": metrics}), reply_to=msg)


def _guard(privacy: PrivacyConfig, nodes=(1, 2, 3)):
    fed = FederationConfig(min_nodes=3)
    part = PartitionConfig(hospitals=3)
    wrapped = wrap_central_dp(build_inner_strategy(fed), privacy, fed, part)
    guard = GuardedStrategy(wrapped, SHAPES)
    msgs = list(guard.configure_train(1, state_to_record(GLOBAL), ConfigRecord(), FakeGrid(nodes)))
    return guard, wrapped, {m.metadata.dst_node_id: m for m in msgs}


DELTAS = {1: [3.0, 4.0, 0.0, 0.0], 2: [0.0, 0.0, 0.3, 0.4], 3: [0.0, 0.0, 0.0, -0.5]}  # norms 5, 0.5, 0.5


def _delta(values):
    return OrderedDict([("w", torch.tensor(values[:3])), ("b", torch.tensor(values[3:]))])


def test_fixed_clipping_clips_each_delta_weights_equally_adds_calibrated_noise_and_accounts():
    privacy = PrivacyConfig(central_dp="fixed", central_noise_multiplier=1e-6, central_clipping_norm=1.0)
    guard, wrapped, msgs = _guard(privacy)
    assert isinstance(wrapped, CentralDPFixed)
    replies = [_reply(msgs[i], _delta(DELTAS[i]), n) for i, n in ((1, 10), (2, 500), (3, 90))]
    new = record_to_state(guard.aggregate_train(1, replies)[0])
    # Hospital 1 is clipped from norm 5 to 1 ([0.6, 0.8, 0, 0]); equal weights despite num-examples.
    expected = (np.array([0.6, 0.8, 0.0, 0.0]) + np.array(DELTAS[2]) + np.array(DELTAS[3])) / 3
    got = np.concatenate([new["w"].numpy(), new["b"].numpy()])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert central_epsilon(wrapped) == pytest.approx(gaussian_epsilon(1e-6, 1, 1e-5), rel=1e-6)


def test_fixed_clipping_noise_has_std_z_c_over_n():
    privacy = PrivacyConfig(central_dp="fixed", central_noise_multiplier=2.0, central_clipping_norm=0.3)
    fed, part = FederationConfig(min_nodes=3), PartitionConfig(hospitals=3)
    shapes = OrderedDict([("w", (20000,))])
    zero = OrderedDict([("w", torch.zeros(20000))])
    guard = GuardedStrategy(wrap_central_dp(build_inner_strategy(fed), privacy, fed, part), shapes)
    msgs = list(guard.configure_train(1, state_to_record(zero), ConfigRecord(), FakeGrid((1, 2, 3))))
    small = [OrderedDict([("w", torch.full((20000,), 1e-6 * (i + 1)))]) for i in range(3)]
    new = record_to_state(guard.aggregate_train(1, [_reply(m, d, 5) for m, d in zip(msgs, small)])[0])
    assert float(new["w"].std()) == pytest.approx(2.0 * 0.3 / 3, rel=0.03)  # the signal is 2e-6
    assert abs(float(new["w"].mean())) < 0.01


def test_central_budget_stops_the_run_before_it_is_exceeded():
    z = 5.0
    one = gaussian_epsilon(z, 1, 1e-5)
    privacy = PrivacyConfig(central_dp="fixed", central_noise_multiplier=z, central_epsilon=(one + gaussian_epsilon(z, 2, 1e-5)) / 2)
    guard, wrapped, msgs = _guard(privacy)
    guard.aggregate_train(1, [_reply(msgs[i], _delta(DELTAS[i]), 1) for i in (1, 2, 3)])
    assert central_epsilon(wrapped) == pytest.approx(one)
    with pytest.raises(PrivacyBudgetExhausted):
        list(guard.configure_train(2, state_to_record(GLOBAL), ConfigRecord(), FakeGrid((1, 2, 3))))


def test_adaptive_clipping_moves_the_bound_and_accounts_both_releases():
    privacy = PrivacyConfig(central_dp="adaptive", central_noise_multiplier=0.5, central_clipping_norm=1.0,
                            adaptive_target_quantile=0.5, adaptive_clip_lr=0.2, adaptive_count_stddev=1.0)
    guard, wrapped, msgs = _guard(privacy)
    assert isinstance(wrapped, CentralDPAdaptive)
    guard.aggregate_train(1, [_reply(msgs[i], _delta(DELTAS[i]), 1) for i in (1, 2, 3)])
    c_new = wrapped.clipping_norm
    assert c_new != 1.0
    z_update = wrapped.noise_multiplier  # Flower's update noise after removing the count's share
    history = wrapped.accountant.state_dict()["history"]
    assert history["noise_multiplier"] == pytest.approx([z_update * c_new / 1.0, 1.0])
    assert history["steps"] == [1, 1]


def test_central_dp_config_errors_name_the_setting():
    fed, part = FederationConfig(strategy="fedmedian"), PartitionConfig(hospitals=3)
    with pytest.raises(ConfigError, match="privacy-central-dp"):
        wrap_central_dp(build_inner_strategy(fed), PrivacyConfig(central_dp="fixed"), fed, part)
    fed = FederationConfig()
    with pytest.raises(ConfigError, match="privacy-adaptive-count-stddev"):
        wrap_central_dp(build_inner_strategy(fed), PrivacyConfig(central_dp="adaptive", central_noise_multiplier=1.0),
                        fed, part)


def test_accountant_history_survives_a_checkpoint(tmp_path):
    privacy = PrivacyConfig(central_dp="fixed", central_noise_multiplier=2.0)
    guard, wrapped, msgs = _guard(privacy)
    guard.aggregate_train(1, [_reply(msgs[i], _delta(DELTAS[i]), 1) for i in (1, 2, 3)])
    torch.save(guard.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert set(state) == {"privacy"}
    fresh, rewrapped, _ = _guard(privacy)
    fresh.load_state_dict(state)
    assert central_epsilon(rewrapped) == central_epsilon(wrapped) == pytest.approx(gaussian_epsilon(2.0, 1, 1e-5))
    plain = GuardedStrategy(build_inner_strategy(FederationConfig()), SHAPES)
    with pytest.raises(ValueError, match="central DP"):
        plain.load_state_dict(state)


def test_privacy_cross_checks_name_the_setting():
    settings = from_run_config({"strategy": "fedmedian", "privacy-secagg": True})
    with pytest.raises(ConfigError, match="privacy-secagg"):
        check_privacy_strategy(settings)
    settings = from_run_config({"privacy-local-dp": True})  # the tiny preset trains DHN-NCE
    with pytest.raises(ConfigError, match="loss.nce"):
        check_privacy_strategy(settings)
    check_privacy_strategy(from_run_config({"privacy-local-dp": True, "model-config": '{"loss": {"nce": 0.0}}'}))
    with pytest.raises(ConfigError, match="privacy-secagg"):  # SecAgg+ hides what central DP clips
        from_run_config({"privacy-secagg": True, "privacy-central-dp": "fixed"})


def test_adaptive_budget_discards_the_round_that_would_exceed_it():
    privacy = PrivacyConfig(central_dp="adaptive", central_noise_multiplier=0.5, adaptive_count_stddev=1.0,
                            central_epsilon=1.0)  # one round costs far more
    guard, wrapped, msgs = _guard(privacy)
    with pytest.raises(PrivacyBudgetExhausted):
        guard.aggregate_train(1, [_reply(msgs[i], _delta(DELTAS[i]), 1) for i in (1, 2, 3)])
    assert wrapped.clipping_norm == 0.1 and wrapped.accountant.num_releases == 0
