"""The command lines each party of a Flower 1.42 deployment runs, built in one place.

Flower 1.42 serves the SuperLink's Fleet, Control and Runtime APIs on one HTTPS port (``--host`` /
``--port``, default 8000). The coordinating site runs the SuperLink (which, in the default
``subprocess`` isolation, starts a SuperExec that runs the ServerApp); each hospital runs one SuperNode
whose ``--node-config`` points the ClientApp at its own data folder; the data scientist submits runs
with ``flwr run . <connection>`` after registering each hospital's public key with
``flwr supernode register``. The tests, the launch scripts' ``DRY_RUN`` output and ``promptsam deploy``
all use these builders, so what is documented is what was run.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

SUPERLINK_PORT = 8000  # flower-superlink's default (Fleet + Control + Runtime API)
SUPERNODE_PORT = 9094  # flower-supernode's default Runtime API port (one per SuperNode on a host)


def executable(name: str) -> str:
    """Path of a Flower console script: next to the running Python first, then ``PATH``."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: not found next to {sys.executable} nor on PATH (pip install flwr)")
    return found


def toml_value(value: Any) -> str:
    """One TOML scalar, as Flower's ``--node-config`` / ``--run-config`` parser reads it.

    Raises:
        TypeError: for values other than bool, int, float, str.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if "\n" not in value and '"' not in value and "\\" not in value:
            return f'"{value}"'
        if "\n" not in value and "'" not in value:
            return f"'{value}'"  # TOML literal string: no escapes
        raise ValueError(f"value {value!r} cannot be quoted for Flower's key=value parser")
    raise TypeError(f"config value {value!r}: only bool, int, float and str are allowed")


def format_config(values: Mapping[str, Any]) -> str:
    """``{"data-path": "/d", "partition-id": 0}`` -> ``data-path="/d" partition-id=0``."""
    for key in values:
        if not key or any(c.isspace() or c == "=" for c in key):
            raise ValueError(f"config key {key!r}: no spaces or '=' allowed")
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def superlink_command(ca_cert: str | Path | None, server_cert: str | Path | None, server_key: str | Path | None,
                      *, host: str = "127.0.0.1", port: int = SUPERLINK_PORT, database: str | Path | None = None,
                      supernode_auth: bool = True, isolation: str = "subprocess",
                      insecure: bool = False) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication and no run-time ``uv sync``.

    Args:
        database: SQLite file for the SuperLink's state (registered nodes, runs); None keeps it in memory.
        isolation: ``subprocess`` (the SuperLink starts a SuperExec for the ServerApp itself) or
            ``process`` (a separate ``flower-superexec`` connects to the Runtime API, as in compose).
        insecure: plain HTTP, for tests of the refusal paths only (incompatible with ``supernode_auth``).
    """
    cmd = [executable("flower-superlink")]
    if insecure:
        cmd.append("--insecure")
    else:
        if not (ca_cert and server_cert and server_key):
            raise ValueError("TLS needs the CA certificate, the server certificate and its key")
        cmd += ["--ssl-ca-certfile", str(ca_cert), "--ssl-certfile", str(server_cert),
                "--ssl-keyfile", str(server_key)]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    cmd += ["--disable-runtime-dependency-installation", "--isolation", isolation,
            "--host", host, "--port", str(port)]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_command(superlink: str, ca_cert: str | Path | None, private_key: str | Path | None,
                      node_config: Mapping[str, Any], *, port: int = SUPERNODE_PORT, host: str = "127.0.0.1",
                      insecure: bool = False, max_retries: int | None = None,
                      max_wait_time: float | None = None, isolation: str = "subprocess") -> list[str]:
    """``flower-supernode`` for one hospital.

    Args:
        superlink: ``host:port`` of the SuperLink.
        ca_cert: the federation's CA certificate (None: the system store, which will not trust it).
        private_key: the hospital's OpenSSH private key (None: no authentication).
        node_config: e.g. ``{"data-path": "/data/hospital-a"}``; read by the ClientApp.
        port: this SuperNode's own Runtime API port (each SuperNode on a host needs its own).
        max_retries / max_wait_time: give up connecting after this many tries / seconds (None: never).
    """
    cmd = [executable("flower-supernode"), "--superlink", superlink]
    if insecure:
        cmd.append("--insecure")
    elif ca_cert is not None:
        cmd += ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if node_config:
        cmd += ["--node-config", format_config(node_config)]
    cmd += ["--isolation", isolation, "--host", host, "--port", str(port)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    return cmd


def register_command(public_key: str | Path, connection: str) -> list[str]:
    """``flwr supernode register <key.pub> <connection> --format json``."""
    return [executable("flwr"), "supernode", "register", str(public_key), connection, "--format", "json"]


def run_command(app_dir: str | Path, connection: str, run_config: Mapping[str, Any] | None = None,
                stream: bool = True) -> list[str]:
    """``flwr run <app_dir> <connection> [--run-config ...] [--stream]``."""
    cmd = [executable("flwr"), "run", str(app_dir), connection]
    if run_config:
        cmd += ["--run-config", format_config(run_config)]
    if stream:
        cmd.append("--stream")
    return cmd


def check_run_config(app_dir: str | Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``--run-config`` overrides before submitting: declared keys, typed values.

    Flower itself answers an undeclared key with "Invalid run configuration" (no key named) and a
    value of the wrong type only fails inside the ServerApp; this check names both up front.

    Returns:
        The full run config (``[tool.flwr.app.config]`` of ``app_dir/pyproject.toml`` + overrides).

    Raises:
        ConfigError: naming the unknown key or the mistyped field.
        FileNotFoundError: when ``app_dir`` has no pyproject.toml.
    """
    import tomli
    from flwr.common.config import flatten_dict

    from shared_model.config import ConfigError, blame_overrides, from_run_config

    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(f"{pyproject}: not found (--app must be the project folder)")
    app = tomli.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app", {})
    declared = flatten_dict(app.get("config", {}))
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise ConfigError(f"run config: unknown key(s) {unknown}; the keys are those of "
                          f"[tool.flwr.app.config] in {pyproject}")
    merged = {**declared, **overrides}
    try:
        from_run_config(merged)
    except ConfigError as err:
        blamed = blame_overrides(err, "", overrides, lambda: from_run_config(declared), flag="--run-config")
        if blamed is err:  # the bad value is in the project's own run config
            raise ConfigError(f"{pyproject}: [tool.flwr.app.config] {err}") from None
        raise blamed from None
    return merged


def write_connection(flwr_home: str | Path, name: str, address: str, root_certificates: str | Path | None,
                     insecure: bool = False) -> Path:
    """Add (or replace) the connection ``name`` in ``<flwr_home>/config.toml`` and make it the default.

    Other connections in the file are kept. Returns the path of the file.
    """
    import tomli  # a Flower dependency (tomllib needs Python 3.11)
    import tomli_w

    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = tomli.loads(path.read_text()) if path.exists() else {}
    links = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if insecure:
        entry["insecure"] = True
    elif root_certificates is not None:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    links[name] = entry
    links["default"] = name
    path.write_text(tomli_w.dumps(data))
    return path


def shell_join(cmd: list[str]) -> str:
    """A copy-pasteable shell line."""
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)
