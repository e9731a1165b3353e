"""The ``simulate`` subcommand's parsing (the runs themselves are in test_e2e.py)."""

import argparse

import pytest

from shared_model.config import ConfigError
from cli.simulation import _parse_set, cmd_simulate, register
from simulation.experiment import DEFAULT_CONFIG, prepare_run
from shared_model.data.partition import PartitionError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptsam")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_register_adds_simulate_with_defaults():
    args = _parser().parse_args(["simulate", "--set", "federation.num_server_rounds=2", "--set", "train.lr=0.01"])
    assert args.func is cmd_simulate and args.config == str(DEFAULT_CONFIG) and not args.resume
    assert _parse_set(args.set) == {"federation.num_server_rounds": "2", "train.lr": "0.01"}


def test_set_needs_key_value():
    with pytest.raises(ConfigError, match="--set 'rounds': expected KEY=VALUE"):
        _parse_set(["rounds"])


def test_prepare_run_generates_data_and_checks_the_partitioning(tmp_path):
    exp, run_dir = prepare_run(DEFAULT_CONFIG, {"synthetic.per_centre": 4, "synthetic.image_size": 32}, tmp_path / "r")
    assert run_dir == (tmp_path / "r").resolve() and exp.federation.run_dir == str(run_dir)
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == ["centre_0", "centre_1", "centre_2"]
    assert (run_dir / "experiment.json").is_file()
    with pytest.raises(PartitionError, match="2 hospitals but 3 centres"):
        prepare_run(DEFAULT_CONFIG, {"simulation.num_supernodes": 2, "synthetic.per_centre": 4}, run_dir)


def test_a_bad_set_value_names_the_flag_and_the_dotted_key(tmp_path, capsys, monkeypatch):
    from cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--set", "federation.num_server_rounds=-3"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --set federation.num_server_rounds=-3: federation.num_server_rounds: must be >= 1\n")
    assert not (tmp_path / "runs").exists()  # refused before any run folder is made
