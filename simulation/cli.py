"""``promptsam simulate --config FILE``: an experiment YAML run on Flower's simulation engine.

Steps: parse the YAML (strict) -> make the run folder -> generate synthetic data into it if the
experiment asks -> check that the data partitions as configured -> write the run config ->
``flwr run`` on a private SuperLink -> print the report's path and the global Dice per round.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from shared_model.argtypes import add_command
from shared_model.config import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def prepare_run(config_path: str | Path, overrides: Mapping[str, Any] | None = None,
                run_dir: str | Path | None = None, resume: bool = False):
    """Parse the experiment and prepare its run folder (data, split check).

    Returns:
        ``(experiment, run_dir)`` with ``experiment.federation.run_dir`` / ``resume`` set.
    """
    from simulation.experiment import load_experiment
    from simulation.partition import hospital_splits

    exp = load_experiment(config_path, overrides)
    if run_dir is None and exp.federation.run_dir:
        run_dir = exp.federation.run_dir
    if run_dir is None:
        run_dir = Path.cwd() / "runs" / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(run_dir).resolve()
    if resume and not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"--resume: {run_dir} holds no checkpoint.pt")
    run_dir.mkdir(parents=True, exist_ok=True)
    if exp.synthetic is not None:
        from shared_model.data.synthetic import generate_dataset

        syn = exp.synthetic
        data_root = run_dir / "data"
        if not data_root.is_dir():
            generate_dataset(data_root, centres=syn.centres, per_centre=syn.per_centre,
                             image_size=syn.image_size, seed=syn.seed)
        exp.data.root = str(data_root)
    if exp.data.split_file and not Path(exp.data.split_file).exists():
        from shared_model.data.splits import build_splits

        build_splits(exp.data)  # writes the split file once, before any client reads it
    hospital_splits(exp.data, exp.partition, exp.simulation.num_supernodes)  # fail early, naming the setting
    exp.federation.run_dir = str(run_dir)
    exp.federation.resume = resume
    (run_dir / "experiment.json").write_text(json.dumps(exp.raw, indent=2, sort_keys=True, default=str))
    return exp, run_dir


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
    from simulation.experiment import PROJECT_ROOT
    from simulation.runner import SimulationResources, run_flower_simulation

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


def _parse_set(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. federation.num_server_rounds=2)")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def cmd_simulate(args: argparse.Namespace) -> int:
    """Entry point of the ``simulate`` subcommand."""
    simulate(args.config, _parse_set(args.set), args.run_dir, args.resume)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """Entry point of the ``experiment`` subcommand."""
    from simulation.comparison import load_comparison, run_comparison

    out = args.out
    if out is None:
        exp, _, _ = load_comparison(args.config, _parse_set(args.set))
        out = Path.cwd() / "runs" / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_comparison(args.config, out, _parse_set(args.set))
    print((Path(out) / "table.md").read_text())
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``simulate`` and ``experiment`` subcommands (and ``bench round``) to ``promptsam``."""
    p = add_command(subparsers, "simulate", "run a federated experiment on Flower's simulation engine",
                    "Run a federated experiment YAML on Flower's simulation engine: make the run folder, "
                    "generate synthetic data if asked, check the data split, run `flwr run`, then print "
                    "the report's path and the global Dice per round.")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: the demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML field, e.g. --set federation.num_server_rounds=5 (repeatable)")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/<name>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    p.set_defaults(func=cmd_simulate)
    e = add_command(subparsers, "experiment",
                    "centralized vs local-only vs FedAvg vs FedProx (+ leave-one-centre-out), same compute")
    e.add_argument("--config", required=True, help="experiment YAML with a compare: section "
                   "(e.g. simulation/configs/compare_polyp_tiny.yaml)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML field, e.g. --set compare.total_steps=300 (repeatable)")
    e.add_argument("--out", default=None, help="output folder (default runs/<name>-<time>); an existing "
                   "one is resumed: finished training jobs are not run again")
    e.set_defaults(func=cmd_experiment)
    from shared_model.cli import BENCH_SUBPARSERS
    from simulation.bench import register_bench

    # `promptsam bench` of the parser being built is the latest entry; an older parser's already has `round`.
    if BENCH_SUBPARSERS and "round" not in BENCH_SUBPARSERS[-1].choices:
        register_bench(BENCH_SUBPARSERS[-1])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulation.cli simulate ...`` without the lead's CLI."""
    parser = argparse.ArgumentParser(prog="promptsam")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
