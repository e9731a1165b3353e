"""``promptsam bench ...``: the benchmarks (step, memory, dp, attention, round), each printing JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from cli.argtypes import add_command, image_size, non_negative_int, positive_int
from shared_model.config import ATTENTION_IMPLS, GRAD_SAMPLE_MODES, PRESETS
from shared_model.config.privacy import DP_BENCH_MODES


def start_timing(args: argparse.Namespace) -> list[float] | None:
    """Pin torch's threads to ``--threads``, warn on stderr when the machine is busy; the load average."""
    from shared_model.benchmarks.record import load_average
    from shared_model.benchmarks.timing import busy_warning, pin_threads

    threads = pin_threads(args.threads)
    load = load_average()
    warning = busy_warning(load, threads)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return load

AGG_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg")  # simulation.bench_aggregation


def cmd_bench_step(args: argparse.Namespace) -> int:
    from shared_model.benchmarks.step import bench_step
    from shared_model.benchmarks.record import bench_record, write_bench_record

    load_start = start_timing(args)
    results = []
    for size in args.image_size or [None]:
        result = bench_step(
            preset=args.preset,
            image_size=size,
            batch_size=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            device=args.device,
            compile_encoder=args.compile,
            activation_checkpointing=args.checkpointing,
            attention=args.attention,
        )
        print(json.dumps(result, indent=2), flush=True)
        results.append(result)
    if args.out:
        write_bench_record(args.out, bench_record(args.argv, args.warmup, results, load_start))
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from shared_model.benchmarks.record import bench_record, load_average, write_bench_record
    from shared_model.benchmarks.step import saved_activation_bytes

    load_start, results = load_average(), []
    for size in args.image_size or [None]:
        for checkpointing in (False, True):
            result = saved_activation_bytes(args.preset, size, args.batch, checkpointing,
                                            torch_dtype(args.dtype), device=args.device, attention=args.attention)
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.out:  # byte counts: no timing, so no warm-up
        write_bench_record(args.out, bench_record(args.argv, 0, results, load_start))
    return 0


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def cmd_bench_dp(args: argparse.Namespace) -> int:
    from shared_model.benchmarks.dp import bench_dp_step, format_bench
    from shared_model.benchmarks.record import bench_record, write_bench_record

    load_start = start_timing(args)
    result = bench_dp_step(args.preset, batch_size=args.batch, steps=args.steps, device=args.device,
                           warmup=args.warmup, modes=args.modes)
    print(format_bench(result), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2), flush=True)
    if args.out:
        write_bench_record(args.out, bench_record(args.argv, args.warmup, [result], load_start))
    return 0


def cmd_bench_attention(args: argparse.Namespace) -> int:
    from shared_model.benchmarks.attention import bench_attention
    from shared_model.benchmarks.record import attention_summary, bench_record, write_bench_record

    load_start = start_timing(args)
    results = bench_attention(args.preset, args.image_size, args.batch, args.warmup, args.steps, args.device)
    print(json.dumps(results, indent=2), flush=True)
    record = bench_record(args.argv, args.warmup, results, load_start)
    print(attention_summary(record), file=sys.stderr, flush=True)
    if args.out:
        write_bench_record(args.out, record)
    return 0


def cmd_bench_round(args: argparse.Namespace) -> int:
    """Entry point of ``promptsam bench round``."""
    from shared_model.benchmarks.record import bench_record, load_average, write_bench_record
    from simulation.bench import bench_round, format_aggregation

    load_start = load_average()
    result = bench_round(args.hospitals, tuple(args.updates), args.rounds, args.agg_preset, args.local_steps,
                         args.repeats, args.run_dir, tuple(args.strategies), args.memory_updates, args.memory_cap_gb,
                         args.warmup)
    if args.out:
        write_bench_record(args.out, bench_record(args.argv, args.warmup, [result], load_start))
    if args.json:
        print(json.dumps(result, indent=2), flush=True)
        return 0
    for dtype, row in result["payload"]["per_client_per_round"].items():
        print(f"{dtype:>8}: up {row['up_bytes']:,} B, down {row['down_bytes_per_round']:,} B per client per round; "
              "aggregation " + ", ".join(f"{k} updates {v['seconds'] * 1000:.1f} ms"
                                         for k, v in result["aggregation_seconds"]["by_wire_dtype"][dtype].items()))
    print(format_aggregation(result))
    for r in result["flower_overhead"]["per_round"]:
        print(f"round {r['round']}: {r['round_seconds']:.2f} s, clients {r['client_app_seconds']['total']:.2f} s, "
              f"Flower overhead {r['flower_overhead_seconds']:.3f} s ({100 * r['flower_overhead_share']:.1f}% of "
              "client compute)")
    return 0


def cmd_bench_scale(args: argparse.Namespace) -> int:
    """Entry point of ``promptsam bench scale``."""
    from shared_model.benchmarks.record import bench_record, load_average, write_bench_record
    from simulation.bench_scale import bench_scale, format_scale, plot_scale

    if args.out and not args.out.endswith(".json"):
        raise ValueError(f"--out {args.out}: expected a .json file")
    load_start = load_average()
    result = bench_scale(args.config, tuple(args.sampled), args.rounds, args.local_steps, args.run_dir, args.timeout)
    if args.out:
        write_bench_record(args.out, bench_record(args.argv, 1, [result], load_start))
    if args.figure:
        print(f"figure: {plot_scale(result, args.figure)}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else format_scale(result), flush=True)
    return 0 if all(p["ok"] for p in result["points"]) else 1


def add_timing_options(b: argparse.ArgumentParser) -> None:
    """``--threads``: torch's intra-op threads, pinned for the run and recorded."""
    b.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads, pinned and recorded (default: 1, what reproduces on a shared machine)")


def register(subparsers: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``promptsam bench`` and its benchmarks; ``common`` adds the shared --device/--verbose options."""
    p = add_command(subparsers, "bench", "benchmarks that print JSON")
    bench = p.add_subparsers(dest="bench", required=True, title="benchmarks", metavar="BENCHMARK")
    b = add_command(bench, "step", "local training step: ours vs the plain SAMed recipe, same batch")
    b.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (default: tiny)")
    b.add_argument("--image-size", type=image_size, nargs="*", help="e.g. 512 1024 (default: the preset's)")
    b.add_argument("--batch", type=positive_int, default=4, help="images per step (default: 4)")
    b.add_argument("--steps", type=positive_int, default=5,
                   help="timed repeats, interleaved (median, min, max and IQR are reported)")
    b.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps before the repeats")
    b.add_argument("--out", help="also write FILE.json: the command, machine, load average, warm-up and results")
    b.add_argument("--compile", action="store_true", help="torch.compile the SAM image encoder")
    b.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing of the SAM encoder blocks (this project's paths)")
    b.add_argument("--attention", choices=ATTENTION_IMPLS, default=None,
                   help="this project's sam.attention (default: the preset's, auto)")
    add_timing_options(b)
    common(b)
    b.set_defaults(func=cmd_bench_step)
    b = add_command(bench, "memory", "activation bytes kept for backward, with and without checkpointing "
                    "(device independent; runs on CPU)")
    b.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (default: tiny)")
    b.add_argument("--image-size", type=image_size, nargs="*", help="e.g. 512 1024 (default: the preset's)")
    b.add_argument("--batch", type=positive_int, default=1, help="images per step (default: 1)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="activation dtype (default: float32)")
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    b.add_argument("--attention", choices=ATTENTION_IMPLS, default="sdpa",
                   help="sam.attention (default: sdpa, what auto uses on CUDA)")
    b.add_argument("--out", help="also write FILE.json: the command, machine and results")
    b.set_defaults(func=cmd_bench_memory)
    b = add_command(bench, "dp", "DP-SGD step (Opacus clipping + noise) vs the non-DP step, same batch")
    common(b)
    b.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (default: tiny)")
    b.add_argument("--batch", type=positive_int, default=8, help="images per step (default: 8)")
    b.add_argument("--steps", type=positive_int, default=5,
                   help="timed repeats, interleaved (median, min, max and IQR are reported)")
    b.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps before the repeats")
    b.add_argument("--out", help="also write FILE.json: the command, machine, load average, warm-up and results")
    b.add_argument("--modes", nargs="+", choices=GRAD_SAMPLE_MODES, default=list(DP_BENCH_MODES),
                   help=f"per-example-gradient modes to time (default: {' '.join(DP_BENCH_MODES)})")
    add_timing_options(b)
    b.set_defaults(func=cmd_bench_dp)
    b = add_command(bench, "attention", "SAM image encoder forward + backward with segment-anything's attention "
                    "and this project's eager and SDPA implementations, interleaved")
    b.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (default: tiny)")
    b.add_argument("--image-size", type=image_size, nargs="+", default=[128, 256, 512],
                   help="input sizes (default: 128 256 512)")
    b.add_argument("--batch", type=positive_int, nargs="+", default=[8, 4, 2],
                   help="batch per size, as many as sizes (default: 8 4 2)")
    b.add_argument("--steps", type=positive_int, default=7, help="timed repeats (default: 7)")
    b.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds before the repeats")
    b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    b.add_argument("--out", help="also write FILE.json: the command, machine, load average, warm-up and results")
    add_timing_options(b)
    b.set_defaults(func=cmd_bench_attention)
    b = add_command(bench, "round", "one federated round's costs: bytes, aggregation time, "
                                               "Flower overhead (tiny preset, CPU)")
    b.add_argument("--hospitals", type=positive_int, default=3, help="simulated hospitals in the in-process round")
    b.add_argument("--updates", type=positive_int, nargs="+", default=[10, 100, 1000],
                   help="numbers of updates to aggregate (default: 10 100 1000)")
    b.add_argument("--strategies", nargs="+", default=list(AGG_STRATEGIES), choices=AGG_STRATEGIES,
                   help="strategies timed against the one-pass limit (default: all)")
    b.add_argument("--memory-updates", type=non_negative_int, default=1000,
                   help="updates aggregated in the peak-memory runs (0 = skip them)")
    b.add_argument("--memory-cap-gb", type=float, default=4.0,
                   help="skip the hold-all memory run when its estimate exceeds this many GiB")
    b.add_argument("--rounds", type=positive_int, default=2, help="in-process rounds (the first one includes warm-up)")
    b.add_argument("--agg-preset", default="base", choices=sorted(PRESETS),
                   help="preset whose exchanged state is aggregated (tiny for a fast check)")
    b.add_argument("--local-steps", type=positive_int, default=2, help="local training steps per client per round")
    b.add_argument("--repeats", type=positive_int, default=3,
                   help="aggregation timing: repeats (median, min and max are reported)")
    b.add_argument("--warmup", type=non_negative_int, default=1,
                   help="aggregation timing: untimed rounds (limit and every strategy) before the repeats")
    b.add_argument("--out", help="also write FILE.json: the command, machine, load average and results")
    b.add_argument("--run-dir", default=None, help="keep the in-process run here (default: a temporary folder)")
    b.add_argument("--json", action="store_true", help="print the full JSON (default: a summary)")
    b.set_defaults(func=cmd_bench_round)
    b = add_command(bench, "scale", "round time of a 100-hospital simulation (Flower + Ray) against the "
                                    "hospitals sampled per round; peak memory of the run and per client actor")
    b.add_argument("--config", default=None,
                   help="experiment YAML (default: simulation/configs/hospitals100_tiny.yaml, or "
                        "hospitals100_synthetic.yaml when the real data is missing)")
    b.add_argument("--sampled", type=positive_int, nargs="+", default=[10, 20, 50],
                   help="hospitals sampled per round, one run each (default: 10 20 50)")
    b.add_argument("--rounds", type=positive_int, default=3,
                   help="rounds per run, >= 2; round 1 (actor start-up) is not timed (default: 3)")
    b.add_argument("--local-steps", type=positive_int, default=1, help="local steps per hospital (default: 1)")
    b.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per run (default: 900)")
    b.add_argument("--run-dir", default=None, help="keep the runs here (default: a temporary folder)")
    b.add_argument("--out", help="also write FILE.json: the command, machine, load average and results")
    b.add_argument("--figure", help="also draw round time against sampled hospitals (FILE.png or .svg)")
    b.add_argument("--json", action="store_true", help="print the full JSON (default: a summary)")
    b.set_defaults(func=cmd_bench_scale)
