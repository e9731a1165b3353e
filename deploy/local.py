"""A real Flower federation on loopback: SuperLink, SuperNodes and ``flwr`` CLI calls as processes.

Used by the deployment tests and the load script. Every process starts in its own session (process
group), writes its log to a file in the work folder, and is stopped with its whole group (the
SuperExec, ServerApp and ClientApp children included) by :meth:`LocalFederation.close`. Every wait is
bounded. ``FLWR_HOME`` points into the work folder, so nothing touches the user's ``~/.flwr``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from deploy.certs import CertBundle
from deploy.commands import register_command, run_command, superlink_command, supernode_command, write_connection
from shared_model.benchmarks.procmem import descendants  # noqa: F401 - re-exported for deploy's callers

CONNECTION = "local-tls"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass
class Proc:
    """One started process (group leader) and its log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        """The log so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the group and every descendant, SIGKILL what is left after ``grace`` s; returns the exit code.

        Descendants are collected first because Flower starts its SuperExec in a session of its own.
        """
        family = [self.popen.pid, *descendants(self.popen.pid)]
        _signal_all(self.popen.pid, family, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_exists(p) for p in family[1:]):
            time.sleep(0.1)
        _signal_all(self.popen.pid, family, signal.SIGKILL)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return self.popen.poll()

    def kill(self) -> None:
        """SIGKILL the process and all its descendants at once (a crash, not a shutdown)."""
        _signal_all(self.popen.pid, [self.popen.pid, *descendants(self.popen.pid)], signal.SIGKILL)
        self.popen.wait(timeout=10)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal_all(leader: int, pids: list[int], sig: signal.Signals) -> None:
    for target in pids:
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass
    try:
        os.killpg(leader, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2, proc: Proc | None = None) -> None:
    """Poll ``predicate`` until true; raise ``TimeoutError`` naming ``what`` (and the log tail of ``proc``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what}: {proc.name} exited with {proc.popen.returncode}\n{proc.text()[-3000:]}")
        time.sleep(interval)
    tail = f"\n{proc.name} log:\n{proc.text()[-3000:]}" if proc is not None else ""
    raise TimeoutError(f"{what}: not within {timeout:.0f} s{tail}")


def _json_payload(text: str) -> dict[str, Any]:
    """The JSON object a ``flwr ... --format json`` command printed (after any log lines); {} if none."""
    start = text.find("{")
    if start < 0:
        return {}
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0]
    except json.JSONDecodeError:
        return {}


@dataclass
class RunResult:
    """Outcome of one ``flwr run``: CLI exit code and output, run id, final status and its details."""

    returncode: int | None
    output: str
    run_id: int | None
    status: str
    details: str

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


@dataclass
class LocalFederation:
    """A loopback federation rooted at ``workdir`` using the certificates of ``certs``.

    Use as a context manager; :meth:`close` stops every process it started.
    """

    workdir: Path
    certs: CertBundle
    port: int = 0
    database: Path | None = None
    env_extra: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    superlink: Proc | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr_home"
        self.port = self.port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        write_connection(self.flwr_home, CONNECTION, self.address, self.certs.ca_cert)

    # -- processes ------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Flower starts flower-superexec / flwr-serverapp / flwr-clientapp by name: the venv must be on PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update({"FLWR_HOME": str(self.flwr_home), "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1"})
        env.update(self.env_extra)
        return env

    def spawn(self, name: str, cmd: list[str], cwd: Path | None = None) -> Proc:
        """Start ``cmd`` in a new session, logging to ``<workdir>/logs/<name>.log``."""
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, cwd=cwd or self.workdir, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def cli(self, cmd: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command to completion (bounded), capturing its output."""
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=cwd or self.workdir,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def start_superlink(self, timeout: float = 60.0, **kwargs: Any) -> Proc:
        """Start ``flower-superlink`` (TLS + SuperNode auth unless overridden) and wait for its port."""
        cmd = superlink_command(self.certs.ca_cert, self.certs.server_cert, self.certs.server_key,
                                port=self.port, database=self.database, **kwargs)
        n = sum(p.name.startswith("superlink") for p in self.procs)
        self.superlink = self.spawn(f"superlink{'-' + str(n) if n else ''}", cmd)
        wait_for(lambda: port_open(self.port) and "startup complete" in self.superlink.text(), timeout,
                 "SuperLink start", proc=self.superlink)
        return self.superlink

    def register(self, public_key: Path, timeout: float = 60.0) -> int:
        """``flwr supernode register``; returns the node id.

        Raises:
            RuntimeError: with the CLI's output when registration fails.
        """
        res = self.cli(register_command(public_key, CONNECTION), timeout)
        payload = _json_payload(res.stdout)
        if res.returncode != 0 or not payload.get("success"):
            raise RuntimeError(f"registering {public_key} failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
        return int(payload["node-id"])

    def start_supernode(self, name: str, node_config: Mapping[str, Any], private_key: Path | None | str = "bundle",
                        ca_cert: Path | None | str = "bundle", port: int | None = None, **kwargs: Any) -> Proc:
        """Start ``flower-supernode`` for hospital ``name``.

        ``private_key`` / ``ca_cert`` default to the bundle's files for ``name``; None leaves the flag out.
        """
        key = self.certs.hospitals[name][0] if private_key == "bundle" else private_key
        ca = self.certs.ca_cert if ca_cert == "bundle" else ca_cert
        cmd = supernode_command(self.address, ca, key, node_config, port=port or free_port(), **kwargs)
        n = sum(p.name.startswith(f"supernode-{name}") for p in self.procs)
        return self.spawn(f"supernode-{name}{'-' + str(n) if n else ''}", cmd)

    def wait_online(self, proc: Proc, timeout: float = 60.0) -> int:
        """Wait until a SuperNode has activated with the SuperLink; returns its node id."""
        wait_for(lambda: "SuperNode ID:" in proc.text(), timeout, f"{proc.name} online", proc=proc)
        line = next(l for l in proc.text().splitlines() if "SuperNode ID:" in l)
        return int(line.rsplit(":", 1)[1].strip())

    def run(self, app_dir: Path, run_config: Mapping[str, Any] | None = None,
            timeout: float = 300.0) -> "RunResult":
        """``flwr run <app_dir> --stream`` to completion, then the run's final status from ``flwr list``.

        ``flwr run --stream`` exits 0 even when the ServerApp fails, so the status is what counts.
        """
        res = self.cli(run_command(app_dir, CONNECTION, run_config, stream=True), timeout, cwd=app_dir)
        return self.result(res.stdout + res.stderr, res.returncode)

    def result(self, output: str, returncode: int | None) -> "RunResult":
        """A :class:`RunResult` for a ``flwr run`` output (its run id, looked up with ``flwr list``)."""
        match = re.search(r"Successfully started run (\d+)", output)
        run = {}
        if match:
            run = next((r for r in self.runs() if str(r.get("run-id")) == match.group(1)), {})
        return RunResult(returncode, output, int(match.group(1)) if match else None,
                         str(run.get("status", "not started")), str(run.get("status-details", "")))

    def start_run(self, app_dir: Path, run_config: Mapping[str, Any] | None = None) -> Proc:
        """``flwr run <app_dir> --stream`` in the background (for fault injection)."""
        n = sum(p.name.startswith("run") for p in self.procs)
        return self.spawn(f"run-{n}", run_command(app_dir, CONNECTION, run_config, stream=True), cwd=app_dir)

    def _json(self, args: list[str], key: str, timeout: float) -> list[dict[str, Any]]:
        from deploy.commands import executable

        res = self.cli([executable("flwr"), *args, CONNECTION, "--format", "json"], timeout)
        payload = _json_payload(res.stdout)
        if res.returncode != 0 or not payload.get("success"):
            raise RuntimeError(f"flwr {' '.join(args)} failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
        return list(payload.get(key, []))

    def runs(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """``flwr list --format json``: every run with its ``status``."""
        return self._json(["list"], "runs", timeout)

    def supernodes(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """``flwr supernode list --format json``: every registered node with its ``status``."""
        return self._json(["supernode", "list"], "nodes", timeout)

    def close(self) -> None:
        """Stop every process started here (SuperNodes first, the SuperLink last)."""
        for proc in sorted(self.procs, key=lambda p: p.name.startswith("superlink")):
            proc.stop()

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
