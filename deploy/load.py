"""Load figure: how round time grows with the number of SuperNodes one SuperLink serves on loopback.

For each N in ``--nodes``: a fresh SuperLink (TLS + SuperNode authentication), N registered SuperNodes
(one process each, own key, own synthetic hospital folder), then ``flwr run`` of this project's app with
the ``tiny`` preset for ``--rounds`` rounds with ``min-nodes = N``. Reported per N: time to bring the
nodes online, the server's mean round time (its ``metrics.jsonl``), accepted replies, the end-to-end run
time and the peak memory (PSS) of all processes together. Everything runs on 127.0.0.1 and is stopped
afterwards. Not part of CI (minutes on 2 cores); run ``promptsam deploy load --nodes 2 8 16``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from deploy.certs import generate_certs
from deploy.local import LocalFederation
from client.phases import PROFILE_ENV
from shared_model.benchmarks.procmem import ProcessTreeProbe as MemoryProbe

REPO = Path(__file__).resolve().parents[1]


def project_run_config(run_dir: Path, nodes: int, rounds: int, local_steps: int) -> dict[str, Any]:
    """Run config of a small deployment run of this project (tiny preset, no server-side data)."""
    return {
        "num-server-rounds": rounds,
        "min-nodes": nodes,
        "fraction-train": 1.0,
        "fraction-evaluate": 0.0,
        "local-steps": local_steps,
        "run-dir": str(run_dir),
        "global-eval": "none",
        "model-config": json.dumps({"preset": "tiny"}),
        "train-config": json.dumps({"batch_size": 4, "progress": False}),
        "data-config": json.dumps({"val_fraction": 0.25, "test_fraction": 0.0}),
    }


def measure(n: int, workdir: Path, rounds: int, local_steps: int, per_site: int,
            timeout: float) -> dict[str, Any]:
    """One load point: N SuperNodes, ``rounds`` rounds; returns the table row."""
    from shared_model.data.synthetic import generate_dataset

    names = [f"site-{i:02d}" for i in range(n)]
    certs = generate_certs(workdir / "certs", ["IP:127.0.0.1", "DNS:localhost"], names)
    data = generate_dataset(workdir / "data", names, per_centre=per_site, image_size=64, seed=n)
    row: dict[str, Any] = {"nodes": n}
    profile = workdir / "client_profile.jsonl"  # every ClientApp call's phases (client.phases)
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", PROFILE_ENV: str(profile)}
    # One torch thread per process: every ClientApp, the ServerApp and the SuperLink share the cores.
    with LocalFederation(workdir / "fed", certs, env_extra=env) as fed:
        fed.start_superlink()
        for name in names:
            fed.register(certs.hospitals[name][1])
        t0 = time.perf_counter()
        procs = [fed.start_supernode(name, {"data-path": str(data / name), "partition-id": i,
                                            "data-cache": str(workdir / "data-cache")})
                 for i, name in enumerate(names)]
        for proc in procs:
            fed.wait_online(proc, timeout=120 + 10 * n)
        row["online_s"] = time.perf_counter() - t0
        run_dir = workdir / "run"
        roots = [fed.superlink.popen.pid, *(p.popen.pid for p in procs)]
        t0 = time.perf_counter()
        with MemoryProbe(roots) as probe:
            res = fed.run(REPO, project_run_config(run_dir, n, rounds, local_steps), timeout=timeout)
        row["run_s"] = time.perf_counter() - t0
        row["peak_mem_gib"] = probe.peak_mib / 1024
        row["ok"] = res.ok
        rounds_rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()
                       if l.strip()] if (run_dir / "metrics.jsonl").exists() else []
        rounds_rows = [r for r in rounds_rows if r.get("kind") == "round"]
        row["rounds_done"] = len(rounds_rows)
        row["round_s"] = statistics.mean(r["seconds"] for r in rounds_rows) if rounds_rows else float("nan")
        row["round_s_max"] = max((r["seconds"] for r in rounds_rows), default=float("nan"))
        row["accepted"] = min((r["accepted"] for r in rounds_rows), default=0)
        row["breakdown"] = round_breakdown(profile, row["round_s"], n)
        if not row["ok"]:
            row["error"] = f"{res.status}: {res.details}\n{res.output[-2000:]}"
    return row


PHASES = ("imports", "data", "model", "training", "validation", "serialisation")


def round_breakdown(profile: Path, round_s: float, nodes: int) -> dict[str, float]:
    """Mean seconds of each part of a hospital's train call (from the ClientApp profile lines) and
    what the mean round spends outside the ClientApp processes.

    ``start-up``: the process's age when the handler was entered (process start, Python, Flower,
    the app's module imports, pulling the message); ``imports``: the model's imports inside the
    handler. The calls are grouped into rounds of ``nodes`` (every node trains every round), in
    the order they ended; ``span``: the mean over rounds of first process start to last handler
    end; ``outside``: mean round time minus ``span``: the SuperNodes' and the SuperLink's polling,
    the transfers, the server's own work.
    """
    if not profile.is_file():
        return {}
    calls = [json.loads(line) for line in profile.read_text().splitlines() if line.strip()]
    calls = sorted((c for c in calls if c.get("kind") == "train"), key=lambda c: c["ended-at"])
    if not calls:
        return {}
    mean = lambda key: statistics.mean(float(c.get(key) or 0.0) for c in calls)  # noqa: E731
    out = {"calls": len(calls), "start-up": mean("age-at-entry"), "app-imports": mean("app-imports"),
           **{name: mean(f"phase-{name}") for name in PHASES}, "handler": mean("handler")}
    spans = []
    for i in range(0, len(calls) - nodes + 1, nodes):
        group = calls[i:i + nodes]
        first_start = min(c["ended-at"] - c["handler"] - float(c.get("age-at-entry") or 0.0) for c in group)
        spans.append(max(c["ended-at"] for c in group) - first_start)
    out["span"] = statistics.mean(spans) if spans else float("nan")
    out["outside"] = round_s - out["span"]
    return out


def format_breakdown(rows: list[dict[str, Any]]) -> str:
    """Markdown table: where a round's time goes, per number of SuperNodes (mean seconds per hospital)."""
    head = ("| SuperNodes | mean round (s) | ClientApp start-up (s) | of it app imports | model imports | data | "
            "model build | training | local validation | serialisation | ClientApps, first start to last reply (s) "
            "| outside the ClientApps (s) |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        b = r.get("breakdown") or {}
        if not b:
            continue
        cells = [b["start-up"], b["app-imports"], *(b[p] for p in PHASES), b["span"], b["outside"]]
        lines.append(f"| {r['nodes']} | {r['round_s']:.1f} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`measure` rows."""
    head = ("| SuperNodes | online after (s) | mean round (s) | slowest round (s) | replies accepted / round "
            "| run total (s) | peak memory, all processes (PSS, GiB) | finished |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['nodes']} | {r['online_s']:.1f} | {r['round_s']:.1f} | {r['round_s_max']:.1f} "
                     f"| {r['accepted']}/{r['nodes']} | {r['run_s']:.1f} | {r['peak_mem_gib']:.2f} "
                     f"| {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def run_load(nodes: list[int], rounds: int = 2, local_steps: int = 2, per_site: int = 8, timeout: float = 1800.0,
             workdir: str | None = None, json_path: str | None = None) -> int:
    """Measure every count of SuperNodes in ``nodes``; print the table; 0 when every run finished.

    Args:
        nodes: Numbers of SuperNodes to measure.
        rounds: Federated rounds per run.
        local_steps: Local training steps per hospital per round.
        per_site: Synthetic image/mask pairs per hospital.
        timeout: Seconds allowed per run.
        workdir: Keep the logs here (default: a temporary folder).
        json_path: Also write the rows to this JSON file.
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="promptsam-load-") as tmp:
        base = Path(workdir or tmp)
        for n in nodes:
            print(f"measuring {n} SuperNodes ...", file=sys.stderr, flush=True)
            row = measure(n, base / f"n{n}", rounds, local_steps, per_site, timeout)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "error"}), file=sys.stderr, flush=True)
            if "error" in row:
                print(row["error"], file=sys.stderr)
    print(format_table(rows))
    print()
    print(format_breakdown(rows))
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1
