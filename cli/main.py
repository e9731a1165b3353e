"""The ``promptsam`` command line: train, evaluate, predict, inspect; the other subcommands
(``bench``, ``simulate``/``experiment``, ``deploy``, ``report``/``resume``) come from the other
modules of this package, each through its ``register(subparsers)``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from cli.argtypes import add_command, positive_float, positive_int, probability
from shared_model.config import (
    ConfigError,
    PRESETS,
    SiteExperiment,
    check_data,
    check_train,
    get_preset,
    load_yaml,
    site_experiment_from_dict,
    to_dict,
)
from cli import bench as bench_cli, data as data_cli, deploy as deploy_cli, server as server_cli
from cli import adapt as adapt_cli, pretrain as pretrain_cli, selection as selection_cli, simulation as simulation_cli
from cli.evaluate import SPLIT_CHOICES
from shared_model.config.site import EVAL_PROMPTS

# Kept in sync with shared_model.training.evaluate.PROMPT_STYLES (not imported here: it pulls in torch).
PROMPT_STYLE_NAMES = ("class-name", "attribute-caption", "generic", "wrong-organ", "empty")


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
    check_data(exp.data)
    check_train(exp.train)
    return exp


def cmd_train(args: argparse.Namespace) -> int:
    from shared_model.checkpoint import save_model_checkpoint
    from shared_model.data import build_datasets
    from shared_model.data.folder import describe_eval_prompt
    from shared_model.data.sources import class_names
    from shared_model.training.evaluate import evaluate_model, fit_constant_mask, score_constant_mask
    from cli.evaluate import training_record
    from shared_model.modeling.prompt_sam import build_model
    from shared_model.training.loop import train_model

    exp = _experiment(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sam = exp.model.sam
    splits = build_datasets(exp.data, sam.image_size, resize=sam.input_resize)
    print("data: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()), flush=True)
    if exp.data.rehearsal_scenes or exp.data.negative_prompts:
        from shared_model.data.negatives import site_training_set

        train = site_training_set(splits["train"], exp.data, sam.image_size)
        added = []
        if exp.data.rehearsal_scenes:
            added.append(f"rehearsal: {len(train) - len(splits['train'])} synthetic scene items")
        if exp.data.negative_prompts:
            added.append(f"negative prompts: {exp.data.negative_prompts:.0%} of the own items")
        print("training set: " + "; ".join(added), flush=True)
        splits["train"] = train
    model = build_model(exp.model)
    result = train_model(model, splits["train"], exp.train, device=args.device)
    print(f"trained {result.steps} steps in {result.seconds:.1f} s, final loss {result.loss:.4f}", flush=True)
    report = {"train": {"steps": result.steps, "seconds": result.seconds, "loss": result.loss},
              "eval_prompt": exp.data.eval_prompt}
    extra = {"train": report["train"], "data": training_record(exp.data)}
    ckpt = save_model_checkpoint(out / "model.pt", model, extra=extra)
    print(f"val/test prompt: {describe_eval_prompt(exp.data.eval_prompt, class_names(exp.data))}", flush=True)
    for split in ("val", "test"):
        if split in splits and len(splits[split]):
            ev = evaluate_model(model, splits[split], device=args.device, batch_size=exp.train.eval_batch_size,
                                resolution="original")
            report[split] = ev.aggregate
            print(f"{split}: " + json.dumps({k: round(v, 4) for k, v in ev.aggregate.items()}), flush=True)
    train_plain = build_datasets(replace(exp.data, augment=False), sam.image_size, resize=sam.input_resize)["train"]
    extra["baseline"] = fit_constant_mask(train_plain)  # evaluate's constant-mask baseline
    if "test" in splits and len(splits["test"]):
        report["constant_baseline_test"] = {
            "threshold": extra["baseline"]["threshold"], "train_dice": extra["baseline"]["train_dice"],
            **score_constant_mask(extra["baseline"]["mask"], splits["test"], resolution="original").aggregate}
        print(f"constant-mask baseline test dice: {report['constant_baseline_test']['dice']:.4f}", flush=True)
    save_model_checkpoint(ckpt, model, extra={**extra, "metrics": report})
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "experiment.json").write_text(
        json.dumps({"model": to_dict(exp.model), "data": to_dict(exp.data), "train": to_dict(exp.train)}, indent=2)
    )
    print(f"checkpoint: {ckpt}")
    return 0


def _load_checked(args: argparse.Namespace):
    """Load ``--checkpoint``, requiring ``--preset`` and ``--config`` (a YAML file or preset) if given."""
    from shared_model.checkpoint import expected_model_config, load_model_checkpoint

    expect = expected_model_config(args.config) if getattr(args, "config", None) else None
    return load_model_checkpoint(args.checkpoint, expect_preset=args.preset, expect_config=expect)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from shared_model.training.evaluate import evaluate_model, evaluate_prompt_styles, format_prompt_table, score_constant_mask
    from cli.evaluate import baseline_mask, evaluation_images, format_centre_table
    from shared_model.inference import check_device

    styles_mode = args.prompt_styles or args.styles is not None
    if styles_mode and args.prompt is not None:
        raise ValueError("--prompt and --prompt-styles/--styles exclude each other")
    if args.eval_prompt is not None and (styles_mode or args.prompt is not None):
        raise ValueError("--eval-prompt and --prompt or --prompt-styles/--styles exclude each other")
    check_device(args.device)
    model, payload, task_prompt, task_lines = adapt_cli.load_task_model(args, _load_checked)
    if task_prompt is not None and args.prompt is None and not styles_mode and args.eval_prompt is None:
        args.prompt = task_prompt
    for line in task_lines:
        print(line, flush=True)
    dataset, split, lines = evaluation_images(payload, model.image_size, args.data, args.centres,
                                              args.data_config, args.split, args.eval_prompt,
                                              resize=model.cfg.sam.input_resize)
    if args.prompt is not None:
        lines[2] = f'evaluation prompt: --prompt "{args.prompt}" for every image'
    elif styles_mode:
        lines[2] = "evaluation prompts: one per style (attribute-caption = the ground-truth oracle)"
    for line in lines:
        print(line, flush=True)
    if styles_mode:
        results = evaluate_prompt_styles(model, dataset, styles=args.styles or None, device=args.device,
                                         batch_size=args.batch_size, progress=True, resolution=args.resolution)
        print(format_prompt_table(results))
        if args.out:
            Path(args.out).write_text(json.dumps(
                {"checkpoint": str(args.checkpoint), "split": split, "images": lines[1], "styles": results},
                indent=2))
        return 0
    ev = evaluate_model(
        model, dataset, device=args.device, batch_size=args.batch_size, prompt=args.prompt, progress=True,
        resolution=args.resolution,
    )
    mask, baseline_line = baseline_mask(payload)
    base = score_constant_mask(mask, dataset, resolution=args.resolution) if mask is not None else None
    print("metrics at each mask's own resolution (HD95 in image pixels)" if args.resolution == "original"
          else f"metrics at the model's input resolution ({model.image_size} px)")
    print(baseline_line)
    print(format_centre_table(ev.by_centre(), ev.aggregate, base.by_centre() if base else None,
                              base.aggregate if base else None))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "checkpoint": str(args.checkpoint), "split": split, "images": lines[1],
            "eval_prompt": dataset.eval_prompt if args.prompt is None else "--prompt", "resolution": args.resolution,
            "prompt": lines[2], "aggregate": ev.aggregate, "by_centre": ev.by_centre(),
            "constant_mask_baseline": {"description": baseline_line,
                                       "aggregate": base.aggregate if base else None,
                                       "by_centre": base.by_centre() if base else None},
            "per_image": ev.per_image}, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from shared_model.inference import check_device
    from cli.predict import NoImagesError, list_images, load_user_boxes, predict_folder

    check_device(args.device)  # fail before the (slow) model build
    try:
        list_images(args.inputs)
    except NoImagesError as err:  # nothing to predict: status 1, as for every image skipped
        print(f"error: {err}", file=sys.stderr)
        return 1
    model, _, task_prompt, task_lines = adapt_cli.load_task_model(args, _load_checked)
    for line in task_lines:
        print(line, flush=True)
    boxes = load_user_boxes(args.boxes) if args.boxes else None
    prompt = args.prompt or task_prompt or "polyp"
    index = predict_folder(model, args.inputs, args.out, prompt=prompt, threshold=args.threshold,
                           batch_size=args.batch_size, device=args.device, user_boxes=boxes,
                           checkpoint=args.checkpoint, masks=args.masks)
    if task_lines:  # which adapter / support set made these predictions
        index["task"] = {"adapter": args.adapter, "support": args.support, "shots": args.shots,
                         "support_seed": args.support_seed if args.support else None, "lines": task_lines}
        (Path(args.out) / "predictions.json").write_text(json.dumps(index, indent=2))
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

    from shared_model.exchange import get_exchanged_state, state_nbytes, state_numel
    from shared_model.modeling.prompt_sam import build_model, component_parameter_counts

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


DESCRIPTION = ("promptsam: a text-prompted SAM + BiomedCLIP polyp segmenter. Train on one site, evaluate, "
               "predict new images, inspect model sizes, run benchmarks, and run federated experiments "
               "(simulate, experiment, deploy, report).")
EVALUATE_DESCRIPTION = (
    "Score a checkpoint against ground-truth masks: Dice, IoU, HD95 per centre and overall, next to the "
    "constant-mask baseline stored by `train` (the training split's mean mask). Which images: --split all "
    "scores every image of --data, --split train|val|test that split. Without --split, a --data folder the "
    "checkpoint was not trained on is scored whole; the training data (same root, a common centre), no "
    "--data, or a checkpoint that does not record its training data gets its test split scored. With "
    "--prompt-styles the same images are segmented once per text-prompt style and a Markdown table shows "
    "the Dice of each. Prompt: the class name (e.g. \"polyp\") by default, as a new hospital has no mask "
    "before it segments; --eval-prompt oracle-caption gives each image the caption built from its "
    "ground-truth mask (as in training): an optimistic oracle, labelled as such in the output. In "
    "--prompt-styles the attribute-caption style is that oracle.")
PREDICT_DESCRIPTION = (
    "Segment image files or folders with a trained checkpoint and a text prompt. Writes OUT/masks/<name>.png "
    "(0/255, the image's own size), OUT/masks/<name>.json (boxes, area, components, score, confidence, "
    "Dice when a ground-truth mask is known), OUT/overlays/<name>.png (with a legend), the index OUT/predictions.json (checkpoint, preset, config fingerprint, "
    "prompt, threshold, skipped files with reasons) and OUT/predictions.csv. Unreadable files are skipped "
    "and listed. Exit status: 0 when at least one image was predicted; 1 when none could be (an empty "
    "folder, or every file skipped); 2 on a bad argument, a missing input or an unusable checkpoint.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptsam", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")

    p = add_command(sub, "train", "train on one site's data, evaluate, save a checkpoint",
                    "Train the model on one site's data (the train split), evaluate it on the val and test "
                    "splits, and write OUT/model.pt (with the training data and the constant-mask baseline "
                    "recorded in it), OUT/metrics.json and OUT/experiment.json.")
    p.add_argument("--config", help="YAML with model/data/train sections (flags below override it)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model preset (replaces the config's model)")
    p.add_argument("--data", help="dataset root (<root>/<centre>/images + masks) or one centre's folder "
                                  "(<folder>/images + masks)")
    p.add_argument("--centres", nargs="+", metavar="CENTRE", help="centre folders to use (default: all)")
    p.add_argument("--steps", type=positive_int, help="optimiser steps (>= 1)")
    p.add_argument("--batch-size", type=positive_int, help="images per step (>= 1)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate of AdamW (> 0)")
    p.add_argument("--seed", type=int, help="seed of the batch order and augmentation (the frozen random "
                                            "initialisation has its own, model.init_seed)")
    p.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    common(p)
    p.set_defaults(func=cmd_train)

    def checked(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, help="model checkpoint (model.pt, best_model.pt, ...)")
        p.add_argument("--preset", choices=sorted(PRESETS), help="require the checkpoint's preset")
        p.add_argument("--config", help="require the checkpoint's model config to equal this one: a YAML "
                                        "file (with a model section, or a model section itself) or a preset")

    p = add_command(sub, "evaluate", "score a checkpoint on a folder or a split, per centre, with a baseline",
                    EVALUATE_DESCRIPTION)
    checked(p)
    p.add_argument("--data", help="dataset root or one centre's folder (default: the checkpoint's training "
                                  "data, else ../shared/data/polyp)")
    p.add_argument("--data-config", help="YAML with DataConfig fields (split fractions and seed, ...)")
    p.add_argument("--centres", nargs="+", metavar="CENTRE", help="centre folders to use (default: all)")
    p.add_argument("--split", choices=list(SPLIT_CHOICES),
                   help="all = every image; train/val/test = that split (default: see above)")
    p.add_argument("--prompt", help="override every image's text prompt")
    p.add_argument("--eval-prompt", choices=list(EVAL_PROMPTS),
                   help="class = the class name (default, or the --data-config's eval_prompt); oracle-caption "
                        "= each image's caption from its ground-truth mask (optimistic: an upper bound)")
    p.add_argument("--prompt-styles", action="store_true",
                   help="evaluate once per prompt style (class name, attribute captions = the ground-truth "
                        "oracle, generic, wrong organ, empty) and print a Markdown table of the Dice of each")
    p.add_argument("--styles", nargs="+", choices=list(PROMPT_STYLE_NAMES), metavar="STYLE",
                   help=f"prompt styles to compare (implies --prompt-styles): {', '.join(PROMPT_STYLE_NAMES)}")
    p.add_argument("--resolution", choices=["original", "model"], default="original",
                   help="original = predictions mapped back to each image's size and scored against the "
                        "full-size mask (default; HD95 in image pixels); model = at the model's input size")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--out", help="write the metrics as JSON here (per centre and image, or per prompt style)")
    adapt_cli.add_fewshot_options(p)
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = add_command(sub, "predict", "segment new images: masks, overlays, per-image JSON, predictions.json/.csv",
                    PREDICT_DESCRIPTION)
    p.add_argument("inputs", nargs="+", help="image files or folders")
    checked(p)
    p.add_argument("--prompt", help="text prompt of every image (default: the --adapter's task name, else polyp)")
    p.add_argument("--boxes", help="JSON {image file name: [x0, y0, x1, y1] or a list of boxes} of user boxes")
    p.add_argument("--masks", help="folder of ground-truth masks named like the images: draws their contour on "
                                   "the overlays and writes per-image Dice (default: a masks/ folder next to a "
                                   "folder input, as in <centre>/{images,masks})")
    p.add_argument("--threshold", type=probability, default=0.5,
                   help="probability threshold of the mask, in [0, 1] (default: 0.5)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images segmented together (default: 4)")
    p.add_argument("--out", default="runs/predict", help="output folder (default: runs/predict)")
    adapt_cli.add_fewshot_options(p)
    common(p)
    p.set_defaults(func=cmd_predict)

    p = add_command(sub, "inspect", "parameter counts and exchanged-state size of a preset")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (default: tiny)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    p.set_defaults(func=cmd_inspect)


    data_cli.register(sub)
    bench_cli.register(sub, common)
    for module in (adapt_cli, pretrain_cli, selection_cli, simulation_cli, deploy_cli, server_cli):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by the benchmarks' --out
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    # Flower's logger prints through its own console handler: in-process runs (`experiment`) would
    # print every Flower record twice if it also reached the root logger's.
    logging.getLogger("flwr").propagate = False
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
