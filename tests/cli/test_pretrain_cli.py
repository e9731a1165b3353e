"""``promptsam pretrain``: bad input is refused before anything is built or written."""

from __future__ import annotations

from pathlib import Path

from cli.main import main

TINY_YAML = Path(__file__).resolve().parents[2] / "simulation" / "configs" / "pretrain_tiny.yaml"


def test_cli_refuses_the_polyp_root_with_status_2(tmp_path, capsys):
    status = main(["pretrain", "--config", str(TINY_YAML), "--out", str(tmp_path / "out"), "--steps", "2",
                   "--set", "data.sources=[{root: ../shared/data/polyp, task: polyp}]"])
    assert status == 2 and "forbidden root" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_names_a_bad_override(tmp_path, capsys):
    status = main(["pretrain", "--config", str(TINY_YAML), "--out", str(tmp_path / "out"),
                   "--set", "pretrain.prompt_weights=[1, 1]"])
    assert status == 2 and "--set pretrain.prompt_weights=[1, 1]: pretrain.prompt_weights" in capsys.readouterr().err
