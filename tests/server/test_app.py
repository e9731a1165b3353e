"""The ServerApp entry point: the run folder of a run config that leaves ``run-dir`` empty."""

import tomllib

from flwr.app import Context, RecordDict

import server.app as server_app
from simulation.experiment import PROJECT_ROOT


def test_an_empty_run_dir_becomes_runs_flwr_run_id_under_the_working_directory(monkeypatch, tmp_path):
    seen = {}

    class RecordingServer:
        def __init__(self, settings, run_config):
            seen["settings"], seen["run_config"] = settings.federation.run_dir, run_config["run-dir"]

        def run(self, grid):
            seen["ran"] = True

    defaults = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert defaults["run-dir"] == ""
    monkeypatch.setattr(server_app, "FederatedServer", RecordingServer)
    monkeypatch.chdir(tmp_path)
    server_app.main(None, Context(run_id=42, node_id=0, node_config={}, state=RecordDict(), run_config=defaults))
    expected = str(tmp_path / "runs" / "flwr-42")
    assert seen == {"settings": expected, "run_config": expected, "ran": True}
