"""``promptsam bench scale``: round time of a 100-hospital simulation against the hospitals sampled.

For each K in ``--sampled`` (default 10, 20, 50) one run of the experiment (default
``simulation/configs/hospitals100_tiny.yaml``, or its synthetic twin when the real data is
missing) on Flower's simulation engine (:func:`simulation.runner.run_flower_simulation`: a
private SuperLink, Ray, one client actor per core) with exactly K hospitals sampled per round
(``fraction-train = K / hospitals``, ``min-nodes = K``), federated evaluation, server-side
evaluation and fault injection off, ``--rounds`` rounds of ``--local-steps`` steps. Per K:

* the server's wall time of every round (``metrics.jsonl``); round 1 includes the actors' first
  imports, so the timed rounds are rounds 2.. (median, min, max, quartiles), and rounds per
  minute = 60 / their median;
* the run's whole wall time (SuperLink start to the end of ``flwr run``) and its start-up share;
* peak memory: the summed PSS of every process of the run (SuperLink, simulation engine, Ray's
  daemons and actors) and each client actor's peak RSS (:class:`ProcessTreeProbe`).

The JSON record (``--out``) holds the command, machine, load average at start and end and all of
the above; ``--figure`` draws round time against K.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from shared_model.benchmarks.procmem import ProcessTreeProbe
from shared_model.benchmarks.timing import spread
from simulation.experiment import PROJECT_ROOT

CONFIGS = PROJECT_ROOT / "simulation" / "configs"
REAL = CONFIGS / "hospitals100_tiny.yaml"
SYNTHETIC = CONFIGS / "hospitals100_synthetic.yaml"
ACTOR = "ClientAppActor"  # in the command line (process title) of Ray's client actors


def default_config() -> Path:
    """The real-data experiment when its data folder exists, else the synthetic one."""
    from shared_model.config.experiment import load_experiment

    return REAL if Path(load_experiment(REAL).data.root).is_dir() else SYNTHETIC


def scale_overrides(hospitals: int, sampled: int, rounds: int, local_steps: int) -> dict[str, Any]:
    """The experiment overrides of one point: exactly ``sampled`` hospitals per round, nothing else."""
    if not 1 <= sampled <= hospitals:
        raise ValueError(f"--sampled: {sampled} is not between 1 and the {hospitals} hospitals of the experiment")
    return {
        "federation.num_server_rounds": rounds,
        "federation.local_steps": local_steps,
        "federation.fraction_train": sampled / hospitals,
        "federation.min_nodes": sampled,  # Flower samples max(int(N x fraction), min-nodes) = K nodes
        "federation.fraction_evaluate": 0.0,
        "federation.global_eval": "none",
        "faults.sleep_fraction": 0.0, "faults.error_fraction": 0.0, "faults.corrupt_fraction": 0.0,
    }


def round_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The ``kind == "round"`` rows of a run's ``metrics.jsonl`` (empty when there is none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "round"]


def summarise_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Round times (all; timed = from round 2 on when there are two or more), rounds per minute."""
    seconds = [float(r["seconds"]) for r in rows]
    timed = seconds[1:] if len(seconds) > 1 else seconds
    out: dict[str, Any] = {"rounds_done": len(rows), "round_seconds": seconds,
                           "accepted": [r["accepted"] for r in rows], "dropped": [r["dropped"] for r in rows]}
    if timed:
        out["timed_rounds"] = spread(timed)
        out["rounds_per_minute"] = 60.0 / statistics.median(timed)
    return out


def measure_point(config: Path, sampled: int, rounds: int, local_steps: int, run_dir: Path,
                  timeout: float, interval: float = 1.0) -> dict[str, Any]:
    """One simulation with ``sampled`` hospitals per round; its round times and memory."""
    from simulation.experiment import prepare_run
    from simulation.runner import SimulationError, SimulationResources, run_flower_simulation

    from shared_model.config.experiment import load_experiment

    hospitals = load_experiment(config).simulation.num_supernodes
    exp, run_dir = prepare_run(config, scale_overrides(hospitals, sampled, rounds, local_steps), run_dir)
    sim = exp.simulation
    probe = ProcessTreeProbe([], interval=interval, track=ACTOR)
    row: dict[str, Any] = {"sampled": sampled, "hospitals": hospitals, "client_cpus": sim.client_cpus}
    start = time.perf_counter()
    with probe:
        try:
            run_flower_simulation(PROJECT_ROOT, run_dir, exp.run_config(),
                                  SimulationResources(sim.num_supernodes, sim.client_cpus, sim.client_gpus),
                                  timeout=timeout, echo=False, on_start=probe.add_root)
            row["ok"] = True
        except SimulationError as err:
            row.update(ok=False, error=str(err))
    row["run_seconds"] = time.perf_counter() - start
    row.update(summarise_rounds(round_rows(run_dir)))
    row["outside_rounds_seconds"] = row["run_seconds"] - sum(row["round_seconds"])
    row["memory"] = probe.summary()
    row["ok"] = row["ok"] and row["rounds_done"] == rounds
    return row


def bench_scale(config: str | Path | None = None, sampled: tuple[int, ...] = (10, 20, 50), rounds: int = 3,
                local_steps: int = 1, run_dir: str | Path | None = None, timeout: float = 900.0) -> dict[str, Any]:
    """Every point of ``sampled`` (see the module docstring) as one JSON-serialisable dict.

    Raises:
        ValueError: On counts below 1 or a K above the experiment's hospitals (names the flag).
    """
    if rounds < 2:
        raise ValueError("--rounds: at least 2 (round 1 includes the actors' start-up and is not timed)")
    if local_steps < 1:
        raise ValueError("--local-steps: must be >= 1")
    config = Path(config) if config else default_config()
    points = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        base = Path(run_dir or tmp)
        for k in sampled:
            points.append(measure_point(config, k, rounds, local_steps, base / f"k{k}", timeout))
    return {"config": str(config.relative_to(PROJECT_ROOT)) if config.is_relative_to(PROJECT_ROOT) else str(config),
            "rounds": rounds, "local_steps": local_steps, "points": points,
            "definitions": {
                "round_seconds": "server wall time of each round (metrics.jsonl): sample, send, K clients train "
                                 "on the actors, replies validated and aggregated; no evaluation",
                "timed_rounds": "spread of the round times from round 2 on (round 1 includes the actors' imports)",
                "rounds_per_minute": "60 / median of the timed rounds",
                "outside_rounds_seconds": "run wall time minus the rounds: SuperLink, Ray and actor start-up, "
                                          "server set-up, final report",
                "memory": "peak summed PSS of every process of the run, and each Ray client actor's peak RSS, "
                          "sampled every interval_s"}}


def format_scale(result: dict[str, Any]) -> str:
    """One line per point: round time, rounds per minute, memory."""
    lines = [f"{result['config']}: {result['rounds']} rounds of {result['local_steps']} local step(s)"]
    for p in result["points"]:
        t = p.get("timed_rounds")
        mem = p["memory"]
        timing = (f"round {t['median']:.1f} s (min {t['min']:.1f}, max {t['max']:.1f}), "
                  f"{p['rounds_per_minute']:.1f} rounds/min" if t else "no timed round")
        lines.append(f"K={p['sampled']:>3} of {p['hospitals']}: {timing}; run {p['run_seconds']:.0f} s; peak memory "
                     f"{mem['peak_pss_all_processes_mib'] / 1024:.2f} GiB (all processes, PSS), client actors "
                     f"{mem['tracked_peak_rss_max_mib'] or 0:.0f} MiB RSS at most ({mem['tracked_processes']} actors)"
                     + ("" if p["ok"] else f"; FAILED: {p.get('error', 'rounds missing')}"))
    return "\n".join(lines)


def plot_scale(result: dict[str, Any], path: str | Path) -> Path:
    """Round time (median, min-max bars) against the hospitals sampled per round, as PNG or SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in result["points"] if p.get("timed_rounds")]
    if not points:
        raise ValueError("no point has a timed round to plot")
    ks = [p["sampled"] for p in points]
    med = [p["timed_rounds"]["median"] for p in points]
    low = [m - p["timed_rounds"]["min"] for m, p in zip(med, points)]
    high = [p["timed_rounds"]["max"] - m for m, p in zip(med, points)]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.errorbar(ks, med, yerr=[low, high], marker="o", capsize=4)
    for k, m, p in zip(ks, med, points):
        ax.annotate(f"{p['rounds_per_minute']:.1f}/min", (k, m), textcoords="offset points", xytext=(10, -3),
                    va="center")
    ax.set_xlabel(f"hospitals sampled per round (of {points[0]['hospitals']})")
    ax.set_ylabel("wall time per round (s)")
    ax.set_xticks(ks)
    ax.set_xlim(0, max(ks) * 1.2)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{Path(result['config']).stem}: {result['local_steps']} local step(s), "
                 f"{points[0]['client_cpus']} CPU per client actor", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
