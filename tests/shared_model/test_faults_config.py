"""The simulation-only fault-injection settings: parsing, errors naming the field, the seeded draw."""

import pytest

from shared_model.config import ConfigError, DataConfig, FederationConfig, PartitionConfig, TrainConfig
from shared_model.config import from_run_config, to_run_config
from shared_model.config.experiment import parse_experiment
from shared_model.config.faults import FAULT_KINDS, FaultConfig, choose_fault


def _exp(faults: dict, **federation) -> dict:
    return {"name": "t", "data": {"root": "/tmp/x"}, "faults": faults, "federation": federation}


def test_yaml_section_reaches_the_run_config_and_back():
    exp = parse_experiment(_exp({"sleep_fraction": 0.1, "error_fraction": 0.05, "sleep_seconds": 90},
                                reply_timeout=60.0))
    rc = exp.run_config()
    assert rc["fault-sleep-fraction"] == 0.1 and rc["fault-error-fraction"] == 0.05
    assert from_run_config(rc).faults == exp.faults


def test_faults_are_off_by_default():
    rc = parse_experiment(_exp({})).run_config()
    assert {k: v for k, v in rc.items() if k.endswith("-fraction") and k.startswith("fault-")} == {
        "fault-sleep-fraction": 0.0, "fault-error-fraction": 0.0, "fault-corrupt-fraction": 0.0}
    assert not from_run_config(rc).faults.enabled
    assert not from_run_config({}).faults.enabled


@pytest.mark.parametrize("faults, federation, message", [
    ({"sleep_fraction": 1.5}, {}, r"t: faults.sleep_fraction: must be a fraction in \[0, 1\]"),
    ({"error_fraction": -0.1}, {}, r"faults.error_fraction: must be a fraction"),
    ({"sleep_fraction": 0.6, "corrupt_fraction": 0.6}, {}, r"must sum to at most 1, got 1.2"),
    ({"sleep_seconds": 0}, {}, r"faults.sleep_seconds: must be > 0"),
    ({"sleep_fraction": 0.1, "sleep_seconds": 30}, {"reply_timeout": 60.0},
     r"faults.sleep_seconds: 30 s does not pass the deadline federation.reply_timeout=60 s"),
    ({"crash_fraction": 0.1}, {}, r"crash_fraction"),
])
def test_bad_yaml_values_name_the_field(faults, federation, message):
    with pytest.raises(ConfigError, match=message):
        parse_experiment(_exp(faults, **federation))


def test_bad_run_config_values_name_the_key():
    rc = to_run_config(FederationConfig(), PartitionConfig(), {"preset": "tiny"}, TrainConfig(), DataConfig(),
                       faults=FaultConfig(error_fraction=0.5))
    with pytest.raises(ConfigError, match=r"fault-error-fraction: must be a fraction"):
        from_run_config({**rc, "fault-error-fraction": 2.0})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['fault-typo'\]"):
        from_run_config({**rc, "fault-typo": 1})


def test_the_draw_is_a_function_of_seed_round_and_partition_with_the_configured_rates():
    cfg = FaultConfig(sleep_fraction=0.1, error_fraction=0.2, corrupt_fraction=0.05, seed=3)
    draws = [choose_fault(cfg, r, p) for r in range(1, 21) for p in range(500)]
    assert draws == [choose_fault(cfg, r, p) for r in range(1, 21) for p in range(500)]
    n = len(draws)  # 10,000 independent draws: each rate within 5 standard deviations
    for kind, rate in (("sleep", 0.1), ("error", 0.2), ("corrupt", 0.05), (None, 0.65)):
        assert abs(draws.count(kind) / n - rate) < 5 * (rate * (1 - rate) / n) ** 0.5, kind
    assert choose_fault(FaultConfig(), 1, 0) is None
    assert set(draws) == {*FAULT_KINDS, None}
    other = FaultConfig(sleep_fraction=0.1, error_fraction=0.2, corrupt_fraction=0.05, seed=4)
    assert draws != [choose_fault(other, r, p) for r in range(1, 21) for p in range(500)]
