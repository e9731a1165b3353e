"""``promptsam bench round``: what one federated round costs, printed as JSON.

Three measurements:

1. **Payload**: bytes one client uploads (its delta) and downloads (the global state, once in the
   train message and once in the evaluate message) per round, for every wire dtype, measured on
   real ``client.wire.state_to_record`` records of the aggregation preset and of the simulated
   (tiny) preset.
2. **Server aggregation** (:mod:`simulation.bench_aggregation`): wall time of
   :meth:`server.strategy.GuardedStrategy.aggregate_train` (decode + validate + aggregate +
   re-encode) over K train replies built like ``client.app.train`` builds them, per wire dtype
   (FedAvg) and per strategy (float32), next to one plain sum over the same K deltas stacked (the
   limit); and the peak memory of aggregating K updates streamed or held.
3. **Flower overhead**: N hospitals run ``rounds`` rounds of the tiny preset on synthetic data in
   this process (:class:`simulation.inprocess.InProcessGrid`, no transport), every ClientApp call
   and the server's global evaluation timed; what remains of the round's wall time is Flower's
   and the strategy's own work (message building, wire encoding, validation, aggregation).
"""

from __future__ import annotations

import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from client.wire import record_nbytes, state_to_record
from server.strategy import GuardedStrategy
from shared_model.config import get_preset
from shared_model.exchange import WIRE_DTYPES, get_exchanged_state, state_shapes
from simulation.bench_aggregation import (STRATEGIES, memory_footprint, random_state, time_strategies,
                                          train_metrics)
from simulation.inprocess import InProcessGrid

DEMO = Path(__file__).resolve().parent / "configs" / "demo.yaml"

DEFINITIONS = {
    "up_bytes": "one client's train reply: its delta as a wire ArrayRecord (tensor payload bytes)",
    "down_bytes": "the global state as one wire ArrayRecord; sent in the train and in the evaluate message",
    "down_bytes_per_round": "2 x down_bytes (train + federated evaluate message)",
    "aggregation_seconds": "GuardedStrategy.aggregate_train over K replies (decode, validation of keys, shapes, "
                           "finite values and norm, FedAvg, float32 re-encode); median, min, max of --repeats "
                           "after --warmup untimed rounds",
    "aggregation_scaling": "per K: 'limit' = one sum(dim=0) over the K float32 deltas stacked (K x D), and per "
                           "strategy the seconds of aggregate_train (float32 wire), timed interleaved with the "
                           "limit (order rotated per repeat), with ratio_to_limit = the spread of the per-repeat "
                           "ratios strategy / limit; streaming = each reply folded into a running weighted sum (FedAvg, "
                           "FedProx, FedAdam) rather than all deltas kept (FedMedian, FedTrimmedAvg)",
    "aggregation_memory": "peak RSS above baseline while aggregating K fresh updates, each run in a fresh process: "
                          "generator = replies produced one at a time (streaming), list = all replies held as a "
                          "Flower Grid returns them, hold-all = all held and Flower's aggregation of full states",
    "round_seconds": "server wall time of one round (FederatedServer.run_round): train, aggregate, federated "
                     "evaluate, global evaluation",
    "client_app_seconds": "summed wall time inside ClientApp calls (model build, data load, wire decode/encode, "
                          "training, evaluation), by message type",
    "client_train_seconds": "sum of the clients' 'train-seconds' metric (their local training loops only)",
    "server_eval_seconds": "the server's global evaluation inside the round",
    "flower_overhead_seconds": "round_seconds - client_app_seconds.total - server_eval_seconds: Flower messages, "
                               "strategy sampling/configure, wire encoding of the global state, reply validation "
                               "and aggregation, in process (no gRPC / Ray transport)",
    "flower_overhead_share": "flower_overhead_seconds / client_app_seconds.total (clients run one after another)",
    "flower_overhead_share_of_train": "flower_overhead_seconds / client_train_seconds",
}


# -- payload ------------------------------------------------------------------------------------


def payload_bytes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, int]]:
    """Per-client bytes per round for every wire dtype, measured on real wire records.

    Returns:
        ``{dtype: {"up_bytes", "down_bytes", "down_bytes_per_round"}}``; the delta and the global
        state have the same shapes, so ``up_bytes == down_bytes``.
    """
    state = random_state(shapes, 1.0, torch.Generator().manual_seed(0))
    out = {}
    for dtype in WIRE_DTYPES:
        nbytes = record_nbytes(state_to_record(state, dtype))
        out[dtype] = {"up_bytes": nbytes, "down_bytes": nbytes, "down_bytes_per_round": 2 * nbytes}
    return out


# -- aggregation --------------------------------------------------------------------------------


def guarded_round(
    shapes: Mapping[str, tuple[int, ...]],
    global_state: Mapping[str, torch.Tensor],
    deltas: list[Mapping[str, torch.Tensor]],
    wire_dtype: str,
    num_examples: list[int] | None = None,
) -> tuple[GuardedStrategy, list[Message]]:
    """A GuardedStrategy (FedAvg) configured for round 1 and the K client replies to aggregate.

    Each reply is built like ``client.app.train`` builds it: ``arrays`` = the delta in
    ``wire_dtype``, ``metrics`` = the train metrics, ``reply_to`` the strategy's train message.

    Returns:
        ``(strategy, replies)``; call ``strategy.aggregate_train(1, replies)`` once (it consumes them).
    """
    k = len(deltas)
    num_examples = num_examples or [10] * k
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=k, min_evaluate_nodes=k,
                   min_available_nodes=k)
    strategy = GuardedStrategy(inner, shapes, wire_dtype)
    grid = InProcessGrid(None, {}, k)  # type: ignore[arg-type] - only its node ids are used
    messages = list(strategy.configure_train(1, state_to_record(global_state, "float32"), ConfigRecord(), grid))
    if len(messages) != k:
        raise RuntimeError(f"FedAvg sampled {len(messages)} nodes, expected {k}")
    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies = []
    for i, node in enumerate(sorted(by_node)):
        content = RecordDict({"arrays": state_to_record(deltas[i], wire_dtype),
                              "metrics": train_metrics(i, num_examples[i])})
        replies.append(Message(content=content, reply_to=by_node[node]))
    return strategy, replies


# -- one federated round in process -------------------------------------------------------------


class TimedGrid(InProcessGrid):
    """An :class:`InProcessGrid` that sums the wall time of the ClientApp calls by message type."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: dict[str, float] = {}

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        """Run every message through the ClientApp, timing each call."""
        replies = []
        for msg in messages:
            start = time.perf_counter()
            replies += super().send_and_receive([msg], timeout=timeout)
            kind = msg.metadata.message_type
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - start
        return replies


def bench_inprocess_rounds(hospitals: int, rounds: int, local_steps: int, run_dir: Path,
                           per_centre: int = 8, image_size: int = 64) -> list[dict[str, Any]]:
    """Run ``rounds`` rounds of the tiny demo with ``hospitals`` clients; time each round's parts.

    Returns:
        One dict per round with the keys described in :data:`DEFINITIONS`.
    """
    from client.app import app as client_app
    from server.loop import FederatedServer
    from shared_model.config import from_run_config
    from simulation.experiment import prepare_run

    overrides = {
        "federation.num_server_rounds": rounds, "federation.local_steps": local_steps,
        "federation.min_nodes": min(2, hospitals), "train.batch_size": 2,
        "synthetic.centres": hospitals, "synthetic.per_centre": per_centre, "synthetic.image_size": image_size,
        "simulation.num_supernodes": hospitals,
    }
    exp, run_dir = prepare_run(DEMO, overrides, run_dir)
    run_config = exp.run_config()
    server = FederatedServer(from_run_config(run_config), run_config)
    grid = TimedGrid(client_app, run_config, hospitals)
    eval_seconds = [0.0]
    evaluate = server.evaluate

    def timed_evaluate(state, dataset=None):
        start = time.perf_counter()
        out = evaluate(state, dataset)
        eval_seconds[0] += time.perf_counter() - start
        return out

    server.evaluate = timed_evaluate  # type: ignore[method-assign]
    state = get_exchanged_state(server.model)
    results = []
    for rnd in range(1, rounds + 1):
        grid.seconds, eval_seconds[0] = {}, 0.0
        state, rows = server.run_round(grid, rnd, state)
        round_row = rows[-1]
        train = [r for r in rows if r["kind"] == "train" and r["accepted"]]
        app_total = sum(grid.seconds.values())
        train_seconds = sum(r["train-seconds"] for r in train)
        overhead = round_row["seconds"] - app_total - eval_seconds[0]
        results.append({
            "round": rnd,
            "accepted": round_row["accepted"],
            "round_seconds": round_row["seconds"],
            "client_app_seconds": {**{k: v for k, v in sorted(grid.seconds.items())}, "total": app_total},
            "client_train_seconds": train_seconds,
            "server_eval_seconds": eval_seconds[0],
            "flower_overhead_seconds": overhead,
            "flower_overhead_share": overhead / app_total if app_total > 0 else None,
            "flower_overhead_share_of_train": overhead / train_seconds if train_seconds > 0 else None,
            "measured_bytes_up": round_row["bytes-up"],
            "measured_bytes_down": round_row["bytes-down"],
        })
    return results


# -- the command ----------------------------------------------------------------------------------


def bench_round(hospitals: int = 3, updates: tuple[int, ...] = (10, 100, 1000), rounds: int = 2,
                agg_preset: str = "base", local_steps: int = 2, repeats: int = 3,
                run_dir: str | Path | None = None, strategies: tuple[str, ...] = STRATEGIES,
                memory_updates: int = 1000, memory_cap_gb: float = 4.0, warmup: int = 1) -> dict[str, Any]:
    """All three measurements (see the module docstring) as one JSON-serialisable dict.

    ``memory_updates`` = 0 skips the memory runs.
    """
    if hospitals < 1 or rounds < 1 or local_steps < 1 or repeats < 1 or any(u < 1 for u in updates):
        raise ValueError("bench round: --hospitals, --rounds, --local-steps, --repeats and --updates must be >= 1")
    from shared_model.modeling.prompt_sam import build_model

    start = time.perf_counter()
    agg_shapes = OrderedDict((k, tuple(v)) for k, v in state_shapes(build_model(get_preset(agg_preset))).items())
    tiny_shapes = OrderedDict((k, tuple(v)) for k, v in state_shapes(build_model(get_preset("tiny"))).items())
    aggregation = {}
    for dtype in WIRE_DTYPES:
        timed = time_strategies(agg_shapes, updates, ("fedavg",), dtype, repeats, warmup=warmup)
        aggregation[dtype] = {k: {"seconds": row["strategies"]["fedavg"]["median"],
                                  "ms_per_update": 1000 * row["strategies"]["fedavg"]["median"] / int(k),
                                  **row["strategies"]["fedavg"]} for k, row in timed.items()}
    scaling = time_strategies(agg_shapes, updates, tuple(strategies), "float32", repeats, warmup=warmup)
    memory = memory_footprint(agg_shapes, memory_updates, memory_cap_gb) if memory_updates > 0 else []
    with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
        rounds_out = bench_inprocess_rounds(hospitals, rounds, local_steps, Path(run_dir or tmp))
    return {
        "hospitals": hospitals,
        "rounds": rounds,
        "local_steps": local_steps,
        "torch_threads": torch.get_num_threads(),
        "payload": {
            "aggregation_preset": agg_preset,
            "aggregation_preset_numel": sum(int(torch.Size(s).numel()) for s in agg_shapes.values()),
            "per_client_per_round": payload_bytes(agg_shapes),
            "simulated_preset": "tiny",
            "simulated_preset_per_client_per_round": payload_bytes(tiny_shapes),
        },
        "aggregation_seconds": {"preset": agg_preset, "strategy": "fedavg", "by_wire_dtype": aggregation},
        "aggregation_scaling": {"preset": agg_preset, "wire_dtype": "float32", "by_updates": scaling},
        "aggregation_memory": memory,
        "flower_overhead": {"preset": "tiny", "wire_dtype": "float32", "per_round": rounds_out},
        "definitions": DEFINITIONS,
        "bench_seconds": time.perf_counter() - start,
    }


def format_aggregation(result: dict[str, Any]) -> str:
    """The aggregation-scaling and memory sections of :func:`bench_round` as a text table."""
    scaling = result["aggregation_scaling"]["by_updates"]
    names = list(next(iter(scaling.values()))["strategies"]) if scaling else []
    lines = [f"validate + aggregate, {result['aggregation_scaling']['preset']} state, float32, seconds: "
             "median (min-max) and ratio to the limit (one sum over the stacked deltas), median of the "
             "per-repeat ratios",
             f"{'updates':>8} {'limit':>8} " + " ".join(f"{n:>26}" for n in names)]
    for k, row in scaling.items():
        cells = [f"{t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f}) {t['ratio_to_limit']['median']:4.1f}x"
                 for t in row["strategies"].values()]
        lines.append(f"{k:>8} {row['limit']['median']:8.4f} " + " ".join(f"{c:>26}" for c in cells))
    for m in result["aggregation_memory"]:
        what = f"{m['strategy']} {m['variant']}, {m['updates']} updates"
        lines.append(f"peak memory {what}: " + (m["skipped"] if "skipped" in m else
                     f"{m['peak_rss_above_base_bytes'] / 2**20:,.0f} MiB above baseline "
                     f"({m['peak_in_updates']:.1f} updates' worth)"))
    return "\n".join(lines)
