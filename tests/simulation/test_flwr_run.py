"""``flwr run .`` on the project itself, the way the README gives it.

The venv's tools first on PATH (what activating it does), runtime dependency installation off,
Flower's own local SuperLink (the ``:local:`` connection of a fresh Flower config), 3 simulated
hospitals on synthetic data, 1 round of 2 local steps of the tiny preset (pyproject's defaults for
the rest). ``flwr run`` exits 0 even when the run fails, so the test checks the run's summary.
"""

import importlib.metadata
import json
import subprocess
import threading
import tomllib

from packaging.specifiers import SpecifierSet
from sim_helpers import processes_mentioning, stop_processes_mentioning

from simulation.experiment import PROJECT_ROOT
from simulation.runner import _env, _tee, free_port, write_run_config

TIMEOUT_S = 600


def test_requires_python_is_what_flwr_requires():
    ours = SpecifierSet(tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    flwr = SpecifierSet(importlib.metadata.metadata("flwr")["Requires-Python"])
    for minor in range(8, 16):
        version = f"3.{minor}"
        assert version not in ours or version in flwr, f"requires-python {ours} allows {version}; flwr needs {flwr}"


def test_flwr_run_on_the_project(synthetic_root, tmp_path):
    flwr_home, run_dir = tmp_path / "flwr_home", tmp_path / "run"
    env = _env(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())  # not the fixed default other runs may hold
    overrides = write_run_config(tmp_path / "run.toml", {
        "num-server-rounds": 1,
        "local-steps": 2,
        "run-dir": str(run_dir),
        "data-config": json.dumps({"root": str(synthetic_root), "val_fraction": 0.25, "test_fraction": 0.25,
                                   "augment": False}),
        "train-config": json.dumps({"batch_size": 2, "warmup_steps": 0, "progress": False}),
    })
    log_file = tmp_path / "flwr_run.log"
    proc = subprocess.Popen(
        ["flwr", "run", ".", "--stream", "--federation-config", "num-supernodes=3", "--run-config", str(overrides)],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    reader = threading.Thread(target=_tee, args=(proc, log_file, False), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=TIMEOUT_S)
    finally:
        stop_processes_mentioning(str(flwr_home))  # Flower's local SuperLink outlives `flwr run`
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    output = log_file.read_text()
    assert proc.returncode == 0, output
    assert (run_dir / "summary.json").is_file(), f"the run wrote no summary; flwr run printed:\n{output}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["global"]["dice"]) == ["0", "1"]
    assert "Installing application dependencies" not in output and "uv sync" not in output
    assert output.count("configure_train: Sampled 3 nodes (out of 3)") == 1, output  # each record once
    assert not processes_mentioning(str(flwr_home))
