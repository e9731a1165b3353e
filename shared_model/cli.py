"""The ``promptsam`` command line: train, evaluate, predict, inspect (+ federation plugins).

Subcommands of other packages (``simulation.cli``, ``deploy.cli``) register themselves through a
``register(subparsers)`` function when those packages are importable.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from .config import (
    ConfigError,
    DataConfig,
    PRESETS,
    SiteExperiment,
    get_preset,
    load_yaml,
    site_experiment_from_dict,
    to_dict,
)

PLUGINS = ("simulation.cli", "deploy.cli", "server.cli")
# Kept in sync with shared_model.evaluate.PROMPT_STYLES (not imported here: it pulls in torch).
PROMPT_STYLE_NAMES = ("class-name", "attribute-caption", "generic", "wrong-organ", "empty")
# Other packages may add `promptsam bench ...` subcommands through this list (see build_parser).
BENCH_SUBPARSERS: list = []


def _experiment(args: argparse.Namespace) -> SiteExperiment:
    raw = load_yaml(args.config) if args.config else {}
    exp = site_experiment_from_dict(raw, str(args.config or "command line"))
    if args.preset:
        exp.model = get_preset(args.preset)
    if args.data:
        exp.data.root = args.data
    if args.centres:
        exp.data.centres = args.centres
    for key in ("steps", "batch_size", "lr", "seed"):
        if getattr(args, key, None) is not None:
            setattr(exp.train, key, getattr(args, key))
    return exp


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import save_model_checkpoint
    from .data import build_datasets
    from .evaluate import constant_mask_baseline, evaluate_model
    from .model import build_model
    from .train import train_model

    exp = _experiment(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = build_datasets(exp.data, exp.model.sam.image_size)
    print("data: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()), flush=True)
    model = build_model(exp.model)
    result = train_model(model, splits["train"], exp.train, device=args.device)
    print(f"trained {result.steps} steps in {result.seconds:.1f} s, final loss {result.loss:.4f}", flush=True)
    report = {"train": {"steps": result.steps, "seconds": result.seconds, "loss": result.loss}}
    ckpt = save_model_checkpoint(out / "model.pt", model, extra={"train": report["train"]})
    for split in ("val", "test"):
        if split in splits and len(splits[split]):
            ev = evaluate_model(model, splits[split], device=args.device, batch_size=exp.train.eval_batch_size)
            report[split] = ev.aggregate
            print(f"{split}: " + json.dumps({k: round(v, 4) for k, v in ev.aggregate.items()}), flush=True)
    if "test" in splits and len(splits["test"]):
        train_plain = build_datasets(replace(exp.data, augment=False), exp.model.sam.image_size)["train"]
        report["constant_baseline_test"] = constant_mask_baseline(train_plain, splits["test"])
        print(f"constant-mask baseline test dice: {report['constant_baseline_test']['dice']:.4f}", flush=True)
    save_model_checkpoint(ckpt, model, extra={"metrics": report})
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "experiment.json").write_text(
        json.dumps({"model": to_dict(exp.model), "data": to_dict(exp.data), "train": to_dict(exp.train)}, indent=2)
    )
    print(f"checkpoint: {ckpt}")
    return 0


def _load_checked(args: argparse.Namespace):
    """Load ``--checkpoint``, requiring ``--preset`` and ``--config`` (a YAML file or preset) if given."""
    from .checkpoint import expected_model_config, load_model_checkpoint

    expect = expected_model_config(args.config) if getattr(args, "config", None) else None
    return load_model_checkpoint(args.checkpoint, expect_preset=args.preset, expect_config=expect)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import from_dict
    from .data import build_datasets
    from .evaluate import evaluate_model, evaluate_prompt_styles, format_prompt_table
    from .inference import check_device

    styles_mode = args.prompt_styles or args.styles is not None
    if styles_mode and args.prompt is not None:
        raise ValueError("--prompt and --prompt-styles/--styles exclude each other")
    check_device(args.device)
    model, _ = _load_checked(args)
    data = from_dict(DataConfig, load_yaml(args.data_config)) if args.data_config else DataConfig()
    if args.data:
        data.root = args.data
    if args.centres:
        data.centres = args.centres
    data.augment = False
    splits = build_datasets(data, model.image_size)
    if args.split not in splits:
        raise ValueError(f"split {args.split!r} is empty for this data (have {sorted(splits)})")
    if styles_mode:
        results = evaluate_prompt_styles(model, splits[args.split], styles=args.styles or None, device=args.device,
                                         batch_size=args.batch_size, progress=True)
        print(format_prompt_table(results))
        if args.out:
            Path(args.out).write_text(json.dumps(
                {"checkpoint": str(args.checkpoint), "split": args.split, "styles": results}, indent=2))
        return 0
    ev = evaluate_model(
        model, splits[args.split], device=args.device, batch_size=args.batch_size, prompt=args.prompt, progress=True
    )
    print(json.dumps(ev.aggregate, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"aggregate": ev.aggregate, "per_image": ev.per_image}, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import check_device
    from .predict_cli import load_user_boxes, predict_folder

    check_device(args.device)  # fail before the (slow) model build
    model, _ = _load_checked(args)
    boxes = load_user_boxes(args.boxes) if args.boxes else None
    index = predict_folder(model, args.inputs, args.out, prompt=args.prompt, threshold=args.threshold,
                           batch_size=args.batch_size, device=args.device, user_boxes=boxes,
                           checkpoint=args.checkpoint, masks=args.masks)
    skipped = f", skipped {len(index['skipped'])} (see predictions.json)" if index["skipped"] else ""
    print(f"wrote {index['count']} predictions to {args.out}{skipped}")
    if index["with_truth"]:
        print(f"mean Dice {index['mean_dice']:.4f} over the {index['with_truth']} image(s) with a ground-truth "
              f"mask ({', '.join(index['masks'])})")
    return 0 if index["count"] else 1


def inspect_model(preset: str) -> dict:
    """Parameter counts and exchanged-state size of a preset (random init, CPU).

    Sizes of the state one client sends (and receives) per round, per wire dtype:
    ``exchange_bytes_raw*`` = values x bytes per value; ``exchange_bytes_wire*`` = the payload of
    the state serialised as the run does (:func:`client.wire.state_to_record`: one Flower
    ``Array`` per tensor, NumPy ``.npy`` bytes with their headers), the figure the run reports
    count as bytes up / down; ``exchange_bytes_protobuf*`` = the whole ArrayRecord protobuf
    message (payloads plus keys, dtypes and shapes).
    """
    from flwr.common.serde import array_record_to_proto

    from client.wire import record_nbytes, state_to_record

    from .exchange import get_exchanged_state, state_nbytes, state_numel
    from .model import build_model, component_parameter_counts

    model = build_model(get_preset(preset))
    state = get_exchanged_state(model)
    sizes: dict[str, int] = {}
    for dtype, suffix in (("float32", ""), ("float16", "_fp16"), ("bfloat16", "_bf16")):
        record = state_to_record(state, dtype)
        sizes[f"exchange_bytes_raw{suffix}"] = state_nbytes(state, dtype)
        sizes[f"exchange_bytes_wire{suffix}"] = record_nbytes(record)
        sizes[f"exchange_bytes_protobuf{suffix}"] = array_record_to_proto(record).ByteSize()
    return {
        "preset": preset,
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": state_numel(state),
        **sizes,
        "exchange_tensors": len(state),
        "components": component_parameter_counts(model),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_model(args.preset)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"preset {info['preset']}: {info['total_params']:,} parameters, "
              f"{info['trainable_params']:,} trainable; exchanged state (float32) "
              f"{info['exchange_bytes_raw']:,} B raw, {info['exchange_bytes_wire']:,} B on the wire (with the "
              "arrays' headers)")
        for name, c in info["components"].items():
            print(f"  {name:<14} total {c['total']:>12,}  trainable {c['trainable']:>10,}")
    return 0


def cmd_bench_step(args: argparse.Namespace) -> int:
    from .bench import bench_step
    from .bench_record import bench_record, load_average, write_bench_record

    load_start = load_average()
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
        )
        print(json.dumps(result, indent=2), flush=True)
        results.append(result)
    if args.out:
        write_bench_record(args.out, bench_record(args.argv, args.warmup, results, load_start))
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from .bench import saved_activation_bytes

    for size in args.image_size or [None]:
        for checkpointing in (False, True):
            result = saved_activation_bytes(args.preset, size, args.batch, checkpointing,
                                            torch_dtype(args.dtype), device=args.device)
            print(json.dumps(result), flush=True)
    return 0


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def cmd_bench_dp(args: argparse.Namespace) -> int:
    from .bench_record import bench_record, load_average, write_bench_record
    from .privacy import bench_dp_step, format_bench

    load_start = load_average()
    result = bench_dp_step(args.preset, batch_size=args.batch, steps=args.steps, device=args.device,
                           warmup=args.warmup)
    print(format_bench(result), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2), flush=True)
    if args.out:
        write_bench_record(args.out, bench_record(args.argv, args.warmup, [result], load_start))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptsam", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")

    p = sub.add_parser("train", help="train on one site's data, evaluate, save a checkpoint")
    p.add_argument("--config", help="YAML with model/data/train sections")
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--data", help="dataset root (<root>/<centre>/{images,masks})")
    p.add_argument("--centres", nargs="+")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", default="runs/train")
    common(p)
    p.set_defaults(func=cmd_train)

    def checked(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, help="model checkpoint (model.pt, best_model.pt, ...)")
        p.add_argument("--preset", choices=sorted(PRESETS), help="require the checkpoint's preset")
        p.add_argument("--config", help="require the checkpoint's model config to equal this one: a YAML "
                                        "file (with a model section, or a model section itself) or a preset")

    p = sub.add_parser(
        "evaluate", help="evaluate a checkpoint on a split (optionally per prompt style)",
        description="Evaluate a checkpoint on a data split: Dice, IoU, precision, recall, HD95. With "
                    "--prompt-styles the same images are segmented once per text-prompt style and a "
                    "Markdown table shows the Dice of each and its change against the attribute captions "
                    "(which are derived from the ground-truth masks, as in training).")
    checked(p)
    p.add_argument("--data")
    p.add_argument("--data-config", help="YAML with DataConfig fields")
    p.add_argument("--centres", nargs="+")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--prompt", help="override every image's text prompt")
    p.add_argument("--prompt-styles", action="store_true",
                   help="evaluate once per prompt style (class name, attribute captions, generic, wrong "
                        "organ, empty) and print a Markdown table of the Dice of each")
    p.add_argument("--styles", nargs="+", choices=list(PROMPT_STYLE_NAMES), metavar="STYLE",
                   help=f"prompt styles to compare (implies --prompt-styles): {', '.join(PROMPT_STYLE_NAMES)}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="write the metrics as JSON here (per image, or per prompt style)")
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict", help="segment new images: masks, overlays, per-image JSON, predictions.json/.csv",
        description="Segment image files or folders with a trained checkpoint and a text prompt. Writes "
                    "OUT/masks/<name>.png (0/255, the image's own size), OUT/masks/<name>.json (boxes, area, "
                    "components, score, confidence, Dice when a ground-truth mask is known), OUT/overlays/<name>.png "
                    "(with a legend), the index OUT/predictions.json "
                    "(checkpoint, preset, config fingerprint, prompt, threshold, skipped files with reasons) "
                    "and OUT/predictions.csv. Unreadable files are skipped and listed. Exit status 1 when "
                    "no image could be predicted.")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    checked(p)
    p.add_argument("--prompt", default="polyp")
    p.add_argument("--boxes", help="JSON {image file name: [x0, y0, x1, y1] or a list of boxes} of user boxes")
    p.add_argument("--masks", help="folder of ground-truth masks named like the images: draws their contour on "
                                   "the overlays and writes per-image Dice (default: a masks/ folder next to a "
                                   "folder input, as in <centre>/{images,masks})")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=4, help="images segmented together")
    p.add_argument("--out", default="runs/predict")
    common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("inspect", help="parameter counts and exchanged-state size of a preset")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="benchmarks that print JSON")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("step", help="local training step: ours vs the plain SAMed recipe, same batch")
    b.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    b.add_argument("--image-size", type=int, nargs="*", help="e.g. 512 1024 (default: the preset's)")
    b.add_argument("--batch", type=int, default=4)
    b.add_argument("--steps", type=int, default=5, help="timed repeats (median, min and max are reported)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps before the repeats")
    b.add_argument("--out", help="also write FILE.json: the command, machine, load average, warm-up and results")
    b.add_argument("--compile", action="store_true", help="torch.compile the SAM image encoder")
    b.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing of the SAM encoder blocks (this project's paths)")
    common(b)
    b.set_defaults(func=cmd_bench_step)
    b = bench.add_parser("memory", help="activation bytes kept for backward, with and without checkpointing "
                         "(device independent; runs on CPU)")
    b.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    b.add_argument("--image-size", type=int, nargs="*", help="e.g. 512 1024 (default: the preset's)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    b.add_argument("--device", default="cpu")
    b.set_defaults(func=cmd_bench_memory)
    b = bench.add_parser("dp", help="DP-SGD step (Opacus clipping + noise) vs the non-DP step, same batch")
    common(b)
    b.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--steps", type=int, default=5, help="timed repeats (median, min and max are reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed steps before the repeats")
    b.add_argument("--out", help="also write FILE.json: the command, machine, load average, warm-up and results")
    b.set_defaults(func=cmd_bench_dp)
    BENCH_SUBPARSERS.append(bench)

    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by the benchmarks' --out
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
