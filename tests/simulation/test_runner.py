"""The console view of a simulation: what ``flwr run``'s output shows and leaves out (runs: test_e2e.py)."""

import io
import subprocess
import sys
from types import SimpleNamespace

from simulation.runner import _env, _tee, console_line

FLOWER_OUTPUT = [
    "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n",
    "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n",
    "\x1b[92mINFO \x1b[0m:      Federation `@none/default` (3 simulated SuperNodes)\n",
    "\x1b[92mINFO \x1b[0m:      To change federation size, use the following command:\n",
    "\x1b[92mINFO \x1b[0m:      \tflwr federation simulation-config @none/default <superlink> --num-supernodes <N>\n",
    "\x1b[92mINFO \x1b[0m:      round 1/1: global Dice 0.0252, federated Dice 0.0252\n",
    "\x1b[36m(ClientAppActor pid=18750)\x1b[0m \x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor\n",
    "\x1b[92mINFO \x1b[0m:      \n",
]


def test_console_leaves_out_the_federation_size_banner_actor_shutdowns_and_empty_records():
    shown = [console_line(line, colour=False) for line in FLOWER_OUTPUT]
    assert [line for line in shown if line is not None] == [
        "INFO :      Starting Flower Simulation\n",
        "INFO :      Federation `@none/default` (3 simulated SuperNodes)\n",
        "INFO :      round 1/1: global Dice 0.0252, federated Dice 0.0252\n",
    ]
    assert console_line(FLOWER_OUTPUT[0], colour=True) == FLOWER_OUTPUT[0]


def test_tee_keeps_everything_in_the_log_and_echoes_the_console_view(tmp_path, capsys):
    log_file = tmp_path / "flower.log"
    _tee(SimpleNamespace(stdout=io.StringIO("".join(FLOWER_OUTPUT))), log_file, echo=True)
    assert log_file.read_text() == "".join(FLOWER_OUTPUT)
    out = capsys.readouterr().out
    assert out.count("\n") == 3 and "SuperNodes changed" not in out and "\x1b[" not in out


def test_the_simulation_environment_silences_rays_accelerator_tip(tmp_path):
    # The warning as Ray raises it: a FutureWarning from module ray._private.worker.
    code = ("import warnings\nexec(\"warnings.warn('Tip: In future versions of Ray', FutureWarning)\", "
            "{'__name__': 'ray._private.worker', 'warnings': warnings})\n"
            "warnings.warn('another FutureWarning', FutureWarning)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path),
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Tip: In future versions of Ray" not in done.stderr
    assert "another FutureWarning" in done.stderr
