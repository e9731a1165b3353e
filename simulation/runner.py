"""Run the Flower app on the simulation engine: a private SuperLink, ``flwr run``, clean shutdown.

``flwr run`` with the ``:local:`` address starts a background ``flower-superlink`` on fixed ports
(and runtime dependency installation on); instead this module starts its own SuperLink
(``--simulation --disable-runtime-dependency-installation``) on a free port with ``FLWR_HOME``
inside the run folder, points a connection at it, runs ``flwr run <app> <connection> --stream``,
and always stops the SuperLink (and so its SuperExec children) afterwards.

``<run_dir>/flower.log`` keeps ``flwr run``'s whole output; the console gets one line per log
record, without Flower's federation-size banner, its actors' shutdown warnings, empty records or
Ray's accelerator FutureWarning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

CONNECTION = "promptsam-sim"
# Ray's "Tip: In future versions of Ray, ..." FutureWarning at ray.init (Ray's current behaviour is kept).
RAY_TIP_FILTER = "ignore::FutureWarning:ray._private.worker"
# Left out of the console (flower.log keeps them): Flower's federation-size banner (a warning about
# Flower's default size, which promptsam always sets, and a hint to resize with a Flower command,
# where promptsam takes the size from the experiment's ``simulation`` section) and the warning each
# Ray actor logs when Flower stops it at the end of every run.
QUIET_LINES = (
    "default simulated SuperNodes changed from 10 to 2",
    "To change federation size, use the following command:",
    "flwr federation simulation-config",
    "Manually terminating ClientAppActor",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EMPTY_RECORD = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*")


class SimulationError(RuntimeError):
    """The simulation could not be started or failed; the message points at the logs."""


@dataclass
class SimulationResources:
    """Virtual hospitals and Ray's per-client scheduling shares."""

    num_supernodes: int
    client_cpus: int = 1
    client_gpus: float = 0.0


def federation_config(res: SimulationResources) -> str:
    """The ``--federation-config`` of ``flwr run`` (Flower's SimulationConfig fields)."""
    return (f"num-supernodes={int(res.num_supernodes)} client-resources-num-cpus={int(res.client_cpus)} "
            f"client-resources-num-gpus={float(res.client_gpus)}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON escapes are valid TOML escapes
    raise TypeError(f"run-config values must be bool, int, float or str, got {type(value).__name__}")


def write_run_config(path: str | Path, run_config: Mapping[str, Any]) -> Path:
    """Write a flat run config as a TOML file for ``flwr run --run-config FILE``."""
    path = Path(path)
    path.write_text("".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in run_config.items()))
    return path


def write_connection(flwr_home: Path, port: int) -> Path:
    """``$FLWR_HOME/config.toml`` with one connection to the private SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    text = (
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    path = flwr_home / "config.toml"
    path.write_text(text)
    return path


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS", ""), RAY_TIP_FILTER]))
    return env


def _wait_healthy(port: int, proc: subprocess.Popen, log_file: Path, timeout: float = 60.0) -> None:
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no "HTTP Request: GET .../health" per poll

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {proc.returncode}; see {log_file}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SimulationError(f"flower-superlink did not become ready within {timeout:.0f} s; see {log_file}")


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group started for ``proc``; SIGKILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass


def console_line(line: str, colour: bool) -> str | None:
    """A line of ``flwr run``'s output as the console shows it, or None to leave it out.

    Leaves out the lines of :data:`QUIET_LINES` and log records with an empty message; strips the
    colour codes unless ``colour``.
    """
    plain = _ANSI.sub("", line)
    if any(text in plain for text in QUIET_LINES) or _EMPTY_RECORD.fullmatch(plain.strip()):
        return None
    return line if colour else plain


def _tee(proc: subprocess.Popen, log_file: Path, echo: bool) -> None:
    """Copy the process's output to ``log_file`` as is and, if ``echo``, to stdout via :func:`console_line`."""
    assert proc.stdout is not None
    colour = sys.stdout.isatty()
    with open(log_file, "w") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            shown = console_line(line, colour) if echo else None
            if shown is not None:
                sys.stdout.write(shown)
                sys.stdout.flush()


def run_flower_simulation(
    app_dir: str | Path,
    run_dir: str | Path,
    run_config: Mapping[str, Any],
    resources: SimulationResources,
    timeout: float | None = None,
    echo: bool = True,
    on_start: Callable[[int], None] | None = None,
) -> Path:
    """Run the app in ``app_dir`` on ``resources.num_supernodes`` virtual nodes.

    Logs go to ``<run_dir>/flower.log`` (and to stdout if ``echo``). ``on_start`` is called with
    the SuperLink's process id once it is ready (the simulation engine and Ray's processes are
    its descendants; benchmarks measure their memory).

    Returns:
        The log file's path.

    Raises:
        SimulationError: If the SuperLink does not start, ``flwr run`` fails or times out.
    """
    run_dir = Path(run_dir)
    flwr_home = run_dir / "flwr_home"
    port = free_port()
    write_connection(flwr_home, port)
    config_file = write_run_config(run_dir / "run_config.toml", run_config)
    env = _env(flwr_home)
    superlink_log = flwr_home / "superlink.log"
    log_file = run_dir / "flower.log"
    superlink = subprocess.Popen(
        [_tool("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation",
         "--log-file", str(superlink_log)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_healthy(port, superlink, superlink_log)
        if on_start is not None:
            on_start(superlink.pid)
        cmd = [_tool("flwr"), "run", str(app_dir), CONNECTION, "--run-config", str(config_file), "--stream",
               "--federation-config", federation_config(resources)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        reader = threading.Thread(target=_tee, args=(proc, log_file, echo), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout or None)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            raise SimulationError(f"flwr run exceeded {timeout:.0f} s; see {log_file}") from None
        finally:
            reader.join(timeout=10)
        if proc.returncode != 0:
            raise SimulationError(f"flwr run exited with code {proc.returncode}; see {log_file}")
    finally:
        stop_process(superlink)
    return log_file


def simulate(config_path: str | Path, overrides: Mapping[str, Any] | None = None,
             run_dir: str | Path | None = None, resume: bool = False, echo: bool = True) -> Path:
    """Run an experiment on the simulation engine; return the path of its report.

    Args:
        config_path: Experiment YAML.
        overrides: Dotted keys -> values applied to the YAML (``{"federation.num_server_rounds": 2}``).
        run_dir: Run folder (default ``runs/<name>-<time>``); holds data, logs, checkpoints, report.
        resume: Continue the run in ``run_dir`` from its last checkpoint.
        echo: Stream Flower's log to stdout.
    """
    from simulation.experiment import PROJECT_ROOT, prepare_run

    exp, run_dir = prepare_run(config_path, overrides, run_dir, resume)
    sim = exp.simulation
    run_flower_simulation(
        PROJECT_ROOT, run_dir, exp.run_config(),
        SimulationResources(sim.num_supernodes, sim.client_cpus, sim.client_gpus),
        timeout=sim.timeout or None, echo=echo,
    )
    report = run_dir / "report.md"
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the run ended without a summary; see {run_dir / 'flower.log'}")
    summary = json.loads(summary_path.read_text())
    print(f"report: {report}")
    if (run_dir / "report.html").is_file():
        print(f"report (HTML, open in a browser): {run_dir / 'report.html'}")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    rounds = sorted({*summary["global"]["dice"], *summary["federated_dice"]}, key=int)
    for rnd in rounds:
        print(f"round {rnd}: global Dice {fmt(summary['global']['dice'].get(rnd))}, "
              f"federated Dice {fmt(summary['federated_dice'].get(rnd))}")
    return report
