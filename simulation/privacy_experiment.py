"""Privacy-utility experiment: one federated run per privacy setting, same data, seeds and schedule.

``python -m simulation.privacy_experiment --out runs/privacy`` runs every setting of
:data:`SETTINGS` on top of ``simulation/configs/privacy_tiny.yaml`` in this process
(:class:`simulation.inprocess.InProcessGrid`: Flower's messages serialised as on the wire, no
transport), then writes ``results.json`` and prints a Markdown table: final and best global Dice
(pooled validation split), Dice of the best round on the pooled test split, the epsilons spent,
round time and bytes per round. ``--secagg-cost`` measures what SecAgg+ adds per round instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

CONFIG = Path(__file__).resolve().parent / "configs" / "privacy_tiny.yaml"

SETTINGS: dict[str, dict[str, Any]] = {
    "no DP": {},
    "local DP, epsilon 8": {"privacy.local_dp": True, "privacy.epsilon": 8.0},
    "local DP, epsilon 3": {"privacy.local_dp": True, "privacy.epsilon": 3.0},
    "central DP (fixed, z 1, C 0.1)": {"privacy.central_dp": "fixed", "privacy.central_noise_multiplier": 1.0,
                                        "privacy.central_clipping_norm": 0.1},
    "SecAgg+ (no DP)": {"privacy.secagg": True},
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """Dice, epsilons, time and bytes of one finished run folder."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    dice = [r["dice"] for r in sorted((r for r in rows if r["kind"] == "global"), key=lambda r: r["round"])]
    rounds = [r for r in rows if r["kind"] == "round"]
    privacy = summary.get("privacy", {})
    test = summary.get("best_round_test") or {}
    return {
        "global_dice_by_round": dice,
        "final_dice": dice[-1] if dice else None,
        "best_dice": max(dice) if dice else None,
        "best_round_test_dice": test.get("dice"),
        "epsilon_central": privacy.get("central_epsilon"),
        "epsilon_local_by_hospital": privacy.get("local_epsilon_by_hospital") or {},
        "epsilon_central_by_round": [r.get("epsilon-central") for r in rounds],
        "epsilon_local_max_by_round": [r.get("epsilon-local-max") for r in rounds],
        "round_seconds": statistics.fmean(r["seconds"] for r in rounds) if rounds else None,
        "bytes_up_per_round": statistics.fmean(r["bytes-up"] for r in rounds) if rounds else None,
        "bytes_down_per_round": statistics.fmean(r["bytes-down"] for r in rounds) if rounds else None,
        "declined": sum(r.get("declined", 0) for r in rounds),
    }


def run_settings(out: Path, names: list[str] | None = None, config: Path = CONFIG,
                 overrides: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Run the named settings (default: all) into ``out/<slug>``; return their summaries."""
    from simulation.inprocess import run_inprocess

    results: dict[str, dict[str, Any]] = {}
    for name in names or list(SETTINGS):
        if name not in SETTINGS:
            raise SystemExit(f"unknown setting {name!r}; choose from {list(SETTINGS)}")
        start = time.perf_counter()
        run_dir = out / _slug(name)
        run_inprocess(config, {**dict(overrides or {}), **SETTINGS[name]}, run_dir)
        results[name] = {**summarize_run(run_dir), "wall_seconds": time.perf_counter() - start}
        (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def secagg_cost(config: Path = CONFIG, rounds: int = 2, local_steps: int = 2, repeats: int = 2,
                overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Time and bytes per round with and without SecAgg+, runs interleaved in this process.

    Every message is counted serialised (Flower's protobuf) by a proxy around the grid, in both
    settings, so the bytes compare like for like; round 1 is dropped (data loading, warm-up).

    Returns:
        ``{"plain": {...}, "secagg": {...}}`` with the median ``seconds`` per round, ``bytes_up``
        and ``bytes_down`` per round (all hospitals), and ``hospitals``.
    """
    from client.app import app as client_app
    from server.loop import FederatedServer
    from shared_model.config import from_run_config
    from simulation.experiment import prepare_run
    from simulation.inprocess import InProcessGrid

    samples: dict[str, list[dict[str, float]]] = {"plain": [], "secagg": []}
    for repeat in range(repeats):
        for mode in ("plain", "secagg"):
            with tempfile.TemporaryDirectory() as tmp:
                exp, run_dir = prepare_run(config, {**dict(overrides or {}), "federation.num_server_rounds": rounds,
                                                    "federation.local_steps": local_steps,
                                                    "privacy.secagg": mode == "secagg"}, tmp)
                run_config = exp.run_config()
                grid = _RoundCounter(InProcessGrid(client_app, run_config, exp.simulation.num_supernodes))
                server = FederatedServer(from_run_config(run_config), run_config)
                run_round = server.run_round

                def counted(grid_: Any, rnd: int, state: Any, run_round=run_round, grid=grid) -> Any:
                    grid.round = rnd
                    return run_round(grid_, rnd, state)

                server.run_round = counted
                server.run(grid)
                rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                for row in (r for r in rows if r["kind"] == "round" and r["round"] > 1):
                    samples[mode].append({"seconds": row["seconds"], **grid.per_round[row["round"]]})
    out: dict[str, Any] = {}
    for mode, values in samples.items():
        out[mode] = {key: statistics.median(v[key] for v in values) for key in ("seconds", "bytes_up", "bytes_down")}
    out["overhead_seconds"] = out["secagg"]["seconds"] - out["plain"]["seconds"]
    out["bytes_up_ratio"] = out["secagg"]["bytes_up"] / out["plain"]["bytes_up"]
    return out


class _RoundCounter:
    """Grid proxy: serialised bytes per round (``round`` is set by the caller before each round)."""

    def __init__(self, grid: Any) -> None:
        from server.secagg import message_bytes

        self._grid, self._size = grid, message_bytes
        self.per_round: dict[int, dict[str, int]] = {}
        self.round = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list:
        messages = list(messages)
        counts = self.per_round.setdefault(self.round, {"bytes_up": 0, "bytes_down": 0})
        counts["bytes_down"] += sum(self._size(m) for m in messages)
        replies = self._grid.send_and_receive(messages, timeout=timeout)
        counts["bytes_up"] += sum(self._size(r) for r in replies)
        return replies


def table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of :func:`run_settings` results."""
    def f(v: Any, d: int = 3) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    lines = ["| setting | final global Dice | best global Dice | test Dice (best round) | epsilon | "
             "s / round | MB up / round |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        local = r["epsilon_local_by_hospital"]
        eps = (f"central {f(r['epsilon_central'], 2)}" if r["epsilon_central"] is not None
               else "local " + ", ".join(f"{h} {f(e, 2)}" for h, e in sorted(local.items())) if local else "-")
        lines.append(f"| {name} | {f(r['final_dice'])} | {f(r['best_dice'])} | {f(r['best_round_test_dice'])} | "
                     f"{eps} | {f(r['round_seconds'], 1)} | {f((r['bytes_up_per_round'] or 0) / 1e6, 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/privacy", help="folder for the runs and results.json")
    parser.add_argument("--config", default=str(CONFIG), help="base experiment YAML")
    parser.add_argument("--only", action="append", default=None, help="run only this setting (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every setting, e.g. federation.num_server_rounds=2")
    parser.add_argument("--secagg-cost", action="store_true",
                        help="instead: time and bytes per round with and without SecAgg+ (interleaved runs)")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    if args.secagg_cost:
        print(json.dumps(secagg_cost(Path(args.config), overrides=overrides), indent=2))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_settings(out, args.only, Path(args.config), overrides)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
