"""``promptsam deploy ...``: certificates, keys, connections, per-party commands, compose files, load test.

Registered into the main ``promptsam`` parser by ``cli.main`` through :func:`register`; also
runnable alone as ``python -m cli.deploy``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Callable

from cli.argtypes import add_command, port, positive_float, positive_int

from deploy.certs import DEFAULT_SANS, bundle_paths, generate_certs, write_node_keypair
from deploy.commands import (
    SUPERLINK_PORT,
    SUPERNODE_PORT,
    shell_join,
    superlink_command,
    supernode_command,
    write_connection,
)


def _clean_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print a one-line ``error: ...`` (exit code 2) for the errors a user can fix."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (FileExistsError, FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return wrapper


def _parse_pairs(items: list[str]) -> dict[str, object]:
    """``["k=v", ...]`` with TOML values (``data-path="/d"``, ``partition-id=0``)."""
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([" ".join(items)])) if items else {}


@_clean_errors
def cmd_certs(args: argparse.Namespace) -> int:
    sans = args.san or list(DEFAULT_SANS)
    bundle = generate_certs(args.out, sans, args.hospitals or [], force=args.force,
                            ca_days=args.ca_days, server_days=args.server_days)
    print(f"CA certificate      {bundle.ca_cert}   (give to every party)")
    print(f"CA key              {bundle.ca_key}   (keep offline)")
    print(f"SuperLink cert/key  {bundle.server_cert}, {bundle.server_key}   SANs: {', '.join(sans)}")
    for name, (key, pub) in bundle.hospitals.items():
        print(f"hospital {name:<10} private {key} (to {name} only), public {pub} (register it)")
    return 0


@_clean_errors
def cmd_keygen(args: argparse.Namespace) -> int:
    key, pub = write_node_keypair(args.out, args.name, force=args.force)
    print(f"private key {key} (stays here; --auth-supernode-private-key)")
    print(f"public key  {pub} (send to the coordinating site for `flwr supernode register`)")
    return 0


@_clean_errors
def cmd_connect(args: argparse.Namespace) -> int:
    home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    path = write_connection(home, args.name, args.address, None if args.insecure else args.ca,
                            insecure=args.insecure)
    print(f"connection {args.name!r} -> {args.address} written to {path} (now the default)")
    return 0


def _emit(cmd: list[str], execute: bool) -> int:
    if execute:
        os.execv(cmd[0], cmd)
    print(shell_join([Path(cmd[0]).name, *cmd[1:]]))
    return 0


@_clean_errors
def cmd_superlink(args: argparse.Namespace) -> int:
    bundle = bundle_paths(args.certs, [])
    for path in (bundle.ca_cert, bundle.server_cert, bundle.server_key):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing (create it with `promptsam deploy certs --out {args.certs}`)")
    cmd = superlink_command(bundle.ca_cert, bundle.server_cert, bundle.server_key, host=args.host,
                            port=args.port, database=args.database, isolation=args.isolation)
    return _emit(cmd, args.exec)


@_clean_errors
def cmd_supernode(args: argparse.Namespace) -> int:
    for path in (args.ca, args.key):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: missing")
    if not Path(args.data_path).is_dir():
        raise FileNotFoundError(f"{args.data_path}: data folder missing (it needs images/ and masks/)")
    node_config = {"data-path": str(Path(args.data_path).resolve()), **_parse_pairs(args.node_config)}
    cmd = supernode_command(args.superlink, args.ca, args.key, node_config, port=args.port)
    return _emit(cmd, args.exec)


@_clean_errors
def cmd_run(args: argparse.Namespace) -> int:
    from deploy.commands import check_run_config, run_command

    overrides = _parse_pairs(args.run_config)
    if not args.no_check:
        check_run_config(args.app, overrides)
    cmd = run_command(args.app, args.connection, overrides, stream=not args.no_stream)
    return _emit(cmd, args.exec)


@_clean_errors
def cmd_compose(args: argparse.Namespace) -> int:
    from deploy.compose import write_compose_files

    for path in write_compose_files(args.out, args.hospitals):
        print(f"wrote {path}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from deploy.load import run_load

    return run_load(args.nodes, args.rounds, args.local_steps, args.per_site, args.timeout, args.workdir, args.json)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``deploy`` and its subcommands to ``promptsam``'s subparsers."""
    deploy = add_command(subparsers, "deploy", "Flower deployment: certificates, keys, commands, compose")
    add_subcommands(deploy.add_subparsers(dest="deploy_command", required=True, title="steps", metavar="STEP"))


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """The ``deploy`` subcommands (each sets ``func``)."""

    p = add_command(sub, "certs", "CA, SuperLink TLS certificate and one SuperNode key pair per hospital")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--san", action="append", metavar="IP:ADDR|DNS:NAME",
                   help=f"subject alternative name of the SuperLink (repeat; default {' '.join(DEFAULT_SANS)})")
    p.add_argument("--hospitals", nargs="*", default=[], help="hospital names (file names of their keys)")
    p.add_argument("--ca-days", type=positive_int, default=3650, help="validity of the CA certificate in days "
                   "(default: 3650)")
    p.add_argument("--server-days", type=positive_int, default=825, help="validity of the SuperLink's TLS "
                   "certificate in days (default: 825)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_certs)

    p = add_command(sub, "keygen", "one hospital's SuperNode key pair (run at the hospital)")
    p.add_argument("--name", required=True, help="the hospital's name (file name of its keys)")
    p.add_argument("--out", default=".", help="output folder (default: the current one)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_keygen)

    p = add_command(sub, "connect", "add a SuperLink connection to $FLWR_HOME/config.toml (flwr CLI)")
    p.add_argument("--name", default="promptsam", help="name of the connection (default: promptsam)")
    p.add_argument("--address", required=True, help="host:port of the SuperLink")
    p.add_argument("--ca", help="CA certificate (ca.crt)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (never with real data)")
    p.set_defaults(func=cmd_connect)

    p = add_command(sub, "superlink", "print (or --exec) the coordinating site's flower-superlink command")
    p.add_argument("--certs", required=True, help="folder made by `deploy certs`")
    p.add_argument("--host", default="0.0.0.0", help="address the SuperLink listens on (default: 0.0.0.0)")
    p.add_argument("--port", type=port, default=SUPERLINK_PORT,
                   help=f"the SuperLink's Fleet API port (default: {SUPERLINK_PORT})")
    p.add_argument("--database", default="superlink-state/state.db", help="SQLite state file")
    p.add_argument("--isolation", choices=["subprocess", "process"], default="subprocess",
                   help="how the ServerApp runs: subprocess of the SuperLink, or a separate process "
                        "(default: subprocess)")
    p.add_argument("--exec", action="store_true", help="run it instead of printing it")
    p.set_defaults(func=cmd_superlink)

    p = add_command(sub, "supernode", "print (or --exec) a hospital's flower-supernode command")
    p.add_argument("--superlink", required=True, help="host:port of the SuperLink")
    p.add_argument("--ca", required=True, help="the federation's CA certificate")
    p.add_argument("--key", required=True, help="this hospital's private key")
    p.add_argument("--data-path", required=True, help="the hospital's folder (images/ + masks/) or a root of "
                   "centre folders")
    p.add_argument("--port", type=port, default=SUPERNODE_PORT, help="this SuperNode's Runtime API port")
    p.add_argument("--node-config", nargs="*", default=[], metavar="KEY=VALUE",
                   help='extra node config, e.g. val-fraction=0.2 partition-id=3')
    p.add_argument("--exec", action="store_true", help="run it instead of printing it")
    p.set_defaults(func=cmd_supernode)

    p = add_command(sub, "run", "check a run config, then print (or --exec) the flwr run command")
    p.add_argument("--app", default=".", help="the project folder (pyproject.toml)")
    p.add_argument("--connection", default="promptsam", help="flwr connection (see `deploy connect`)")
    p.add_argument("--run-config", nargs="*", default=[], metavar="KEY=VALUE",
                   help='overrides, e.g. num-server-rounds=20 run-dir="/srv/runs/exp1"')
    p.add_argument("--no-check", action="store_true", help="skip the key/type check")
    p.add_argument("--no-stream", action="store_true", help="return once the run is submitted")
    p.add_argument("--exec", action="store_true", help="run it instead of printing it")
    p.set_defaults(func=cmd_run)

    p = add_command(sub, "compose", "write compose.yaml + compose.hospital.yaml for these hospitals")
    p.add_argument("--hospitals", nargs="+", required=True, help="hospital names (one SuperNode service each)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "deploy"), help="output folder (default: deploy/)")
    p.set_defaults(func=cmd_compose)

    p = add_command(sub, "load", "load figure: round time vs number of SuperNodes on loopback")
    p.add_argument("--nodes", type=positive_int, nargs="+", default=[2, 8, 16],
                   help="numbers of SuperNodes to measure (default: 2 8 16)")
    p.add_argument("--rounds", type=positive_int, default=2, help="federated rounds per run (default: 2)")
    p.add_argument("--local-steps", type=positive_int, default=2,
                   help="local training steps per hospital per round (default: 2)")
    p.add_argument("--per-site", type=positive_int, default=8, help="synthetic image/mask pairs per hospital")
    p.add_argument("--timeout", type=positive_float, default=1800.0, help="seconds allowed per run")
    p.add_argument("--workdir", help="keep logs here (default: a temporary folder)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_load)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.deploy")
    add_subcommands(parser.add_subparsers(dest="deploy_command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
