"""``promptsam simulate --config FILE``: an experiment YAML run on Flower's simulation engine.

Steps: parse the YAML (strict) -> make the run folder -> generate synthetic data into it if the
experiment asks -> check that the data partitions as configured -> write the run config ->
``flwr run`` on a private SuperLink -> print the report's path and the global Dice per round.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from cli.argtypes import add_command, parse_set as _parse_set
from simulation.experiment import DEFAULT_CONFIG
from simulation.runner import simulate


def cmd_simulate(args: argparse.Namespace) -> int:
    """Entry point of the ``simulate`` subcommand."""
    overrides = _parse_set(args.set)
    if args.adapter_only:  # the same as --set adapter.enabled=true
        overrides["adapter.enabled"] = "true"
    simulate(args.config, overrides, args.run_dir, args.resume)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """Entry point of the ``experiment`` subcommand: a comparison, or an ablation when the file
    has an ``ablation:`` section."""
    from shared_model.config import load_yaml
    from simulation.comparison import load_comparison, run_comparison

    if "ablation" in load_yaml(args.config):
        from simulation.ablation import load_ablation as load, run_ablation as run

        table = "ablation.md"
    else:
        load, run, table = load_comparison, run_comparison, "table.md"
    overrides = _parse_set(args.set)
    out = args.out
    if out is None:
        exp, _, _ = load(args.config, overrides)
        out = Path.cwd() / "runs" / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run(args.config, out, overrides)
    print((Path(out) / table).read_text())
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``simulate`` and ``experiment`` subcommands to ``promptsam``."""
    p = add_command(subparsers, "simulate", "run a federated experiment on Flower's simulation engine",
                    "Run a federated experiment YAML on Flower's simulation engine: make the run folder, "
                    "generate synthetic data if asked, check the data split, run `flwr run`, then print "
                    "the report's path and the global Dice per round.")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: the demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML field, e.g. --set federation.num_server_rounds=5 (repeatable)")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/<name>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    p.add_argument("--adapter-only", action="store_true",
                   help="exchange only a task adapter (the base model frozen at every site): the same as "
                        "--set adapter.enabled=true; the run writes base_model.pt and best/final_adapter.pt")
    p.set_defaults(func=cmd_simulate)
    e = add_command(subparsers, "experiment",
                    "centralized vs local-only vs FedAvg vs FedProx (+ leave-one-centre-out), same compute; "
                    "or an ablation of the prompt paths")
    e.add_argument("--config", required=True, help="experiment YAML with a compare: section "
                   "(e.g. simulation/configs/compare_polyp_tiny.yaml) or an ablation: section "
                   "(simulation/configs/ablation_polyp_tiny.yaml)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML field, e.g. --set compare.total_steps=300 (repeatable)")
    e.add_argument("--out", default=None, help="output folder (default runs/<name>-<time>); an existing "
                   "one is resumed: finished training jobs are not run again")
    e.set_defaults(func=cmd_experiment)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cli.simulation simulate ...`` without the lead's CLI."""
    parser = argparse.ArgumentParser(prog="promptsam")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
