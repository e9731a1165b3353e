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

import numpy as np

from .config import (
    ConfigError,
    DataConfig,
    PRESETS,
    SiteExperiment,
    TrainConfig,
    get_preset,
    load_yaml,
    site_experiment_from_dict,
    to_dict,
)

PLUGINS = ("simulation.cli", "deploy.cli", "server.cli")
# Other packages may add `promptsam bench ...` subcommands through this list (see build_parser).
BENCH_SUBPARSERS: list = []
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


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
    print(f"data: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()), flush=True)
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model_checkpoint
    from .config import from_dict
    from .data import build_datasets
    from .evaluate import evaluate_model

    model, _ = load_model_checkpoint(args.checkpoint, expect_preset=args.preset)
    data = from_dict(DataConfig, load_yaml(args.data_config)) if args.data_config else DataConfig()
    if args.data:
        data.root = args.data
    if args.centres:
        data.centres = args.centres
    data.augment = False
    splits = build_datasets(data, model.image_size)
    ev = evaluate_model(
        model, splits[args.split], device=args.device, batch_size=args.batch_size, prompt=args.prompt, progress=True
    )
    print(json.dumps(ev.aggregate, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"aggregate": ev.aggregate, "per_image": ev.per_image}, indent=2))
    return 0


def _list_images(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image file or folder")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {inputs}")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm.auto import tqdm

    from .checkpoint import load_model_checkpoint
    from .inference import overlay, predict_images

    model, _ = load_model_checkpoint(args.checkpoint, expect_preset=args.preset)
    files = _list_images(args.inputs)
    out = Path(args.out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    user_boxes = json.loads(Path(args.boxes).read_text()) if args.boxes else {}
    for path in tqdm(files, desc="predict"):
        try:
            image = np.asarray(Image.open(path).convert("RGB"))
        except Exception as err:  # noqa: BLE001 - report the file, keep going
            print(f"skipped {path}: unreadable image ({err})", file=sys.stderr)
            continue
        boxes = [user_boxes[path.name]] if path.name in user_boxes else None
        (pred,) = predict_images(model, [image], args.prompt, boxes=boxes, threshold=args.threshold,
                                 device=args.device)
        Image.fromarray((pred.mask * 255).astype(np.uint8)).save(out / "masks" / f"{path.stem}.png")
        overlay(image, pred).save(out / "overlays" / f"{path.stem}.png")
        summary = {"image": str(path), "prompt": args.prompt, **pred.summary()}
        (out / "masks" / f"{path.stem}.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {len(files)} predictions to {out}")
    return 0


def inspect_model(preset: str) -> dict:
    """Parameter counts and exchanged-state size of a preset (random init, CPU)."""
    from .exchange import get_exchanged_state, state_nbytes, state_numel
    from .model import build_model, component_parameter_counts

    model = build_model(get_preset(preset))
    state = get_exchanged_state(model)
    return {
        "preset": preset,
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": state_numel(state),
        "exchange_bytes": state_nbytes(state, "float32"),
        "exchange_bytes_fp16": state_nbytes(state, "float16"),
        "exchange_tensors": len(state),
        "components": component_parameter_counts(model),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_model(args.preset)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"preset {info['preset']}: {info['total_params']:,} parameters, "
              f"{info['trainable_params']:,} trainable, exchanged {info['exchange_bytes'] / 2**20:.3f} MiB (fp32)")
        for name, c in info["components"].items():
            print(f"  {name:<14} total {c['total']:>12,}  trainable {c['trainable']:>10,}")
    return 0


def cmd_bench_step(args: argparse.Namespace) -> int:
    from .bench import bench_step

    for size in args.image_size or [None]:
        result = bench_step(
            preset=args.preset,
            image_size=size,
            batch_size=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            device=args.device,
            compile_encoder=args.compile,
        )
        print(json.dumps(result, indent=2), flush=True)
    return 0


def cmd_bench_dp(args: argparse.Namespace) -> int:
    from .privacy import bench_dp_step, format_bench

    result = bench_dp_step(args.preset, batch_size=args.batch, steps=args.steps, device=args.device)
    print(format_bench(result), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2), flush=True)
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

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), help="require the checkpoint's preset")
    p.add_argument("--data")
    p.add_argument("--data-config", help="YAML with DataConfig fields")
    p.add_argument("--centres", nargs="+")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--prompt", help="override every image's text prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="write per-image metrics JSON here")
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="segment new images: masks, overlays and per-image JSON")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), help="require the checkpoint's preset")
    p.add_argument("--prompt", default="polyp")
    p.add_argument("--boxes", help="JSON {image file name: [x0, y0, x1, y1]} of user boxes")
    p.add_argument("--threshold", type=float, default=0.5)
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
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--compile", action="store_true", help="torch.compile the SAM image encoder")
    common(b)
    b.set_defaults(func=cmd_bench_step)
    b = bench.add_parser("dp", help="DP-SGD step (Opacus clipping + noise) vs the non-DP step, same batch")
    common(b)
    b.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--steps", type=int, default=5)
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
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
