"""``promptsam adapt`` (a task adapter from K examples) and the few-shot options of ``predict`` /
``evaluate``: ``--adapter FILE`` (a trained task adapter on the base checkpoint) and ``--support DIR
--shots K`` (in-context: the support set prompts the frozen model, no training)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.argtypes import add_command, positive_float, positive_int

ADAPT_DESCRIPTION = (
    "Learn a new task from K labelled examples without retraining the backbone (GMISeg-style): draw --shots "
    "image/mask pairs from --support (any dataset folder, drawn with --seed), freeze every weight of the base "
    "--checkpoint (image encoders, text towers, the base's own adapters) and train only a task adapter: peft "
    "LoRA on the mask decoder and the prompt projections, and a task embedding for --name (context vectors, "
    "SAM's prompt embeddings). Writes the small adapter file --out, which records the base model's fingerprint; "
    "`promptsam predict|evaluate --checkpoint BASE --adapter OUT` use it, and several adapters can live beside "
    "one base model.")


def add_fewshot_options(p: argparse.ArgumentParser) -> None:
    """``--adapter``, ``--support``, ``--shots``, ``--support-seed``, ``--name`` of predict / evaluate."""
    p.add_argument("--adapter", help="task adapter file written by `promptsam adapt` for this --checkpoint")
    p.add_argument("--support", help="in-context mode: a folder of support images with masks (dataset layout) "
                                     "whose frozen-encoder prototypes prompt the model; no training")
    p.add_argument("--shots", type=positive_int, help="support pairs drawn from --support (default: all)")
    p.add_argument("--support-seed", type=int, default=0, help="seed of the --shots draw (default: 0)")
    p.add_argument("--name", help="the task name (text prompt) of --support; default: --prompt")


def load_task_model(args: argparse.Namespace, load_base):
    """The model ``predict`` / ``evaluate`` run: the base checkpoint, with ``--adapter`` attached and/or
    wrapped for in-context prompting by ``--support``.

    Args:
        args: Parsed arguments (``checkpoint``, ``adapter``, ``support``, ``shots``, ``support_seed``,
            ``name``, ``prompt``).
        load_base: ``args -> (model, payload)`` (the base checkpoint, checked against --preset/--config).

    Returns:
        ``(model, checkpoint payload, task prompt or None, lines describing the task)``.
    """
    from shared_model.fewshot.adapter import apply_adapter, read_adapter
    from shared_model.fewshot.support import SupportError, check_task_name, load_support

    if args.shots is not None and not args.support:
        raise SupportError("--shots: needs --support DIR (the folder to draw the support pairs from)")
    adapter = read_adapter(args.adapter) if args.adapter else None  # a bad file fails before the model build
    model, payload = load_base(args)
    prompt, lines = None, []
    if adapter is not None:
        apply_adapter(model, adapter, args.adapter, base_label=f"--checkpoint {args.checkpoint}")
        prompt = adapter["name"]
        support = adapter.get("extra", {}).get("support", {})
        lines.append(f"task adapter {args.adapter}: \"{adapter['name']}\", {adapter.get('nbytes', 0):,} B, trained "
                     f"on {support.get('shots', '?')} example(s) of {support.get('folder', '?')}")
    if args.support:
        from shared_model.fewshot.incontext import InContextSAM

        name = check_task_name(args.name or args.prompt or prompt, "--name")
        folder = Path(args.support)
        shots = args.shots
        if shots is None:
            from shared_model.data.folder import DataError, list_samples

            try:
                shots = len(list_samples(folder)[0]) if folder.exists() else 1
            except DataError as err:
                raise SupportError(str(err)) from None
        support = load_support(folder, shots, name, seed=args.support_seed)
        model = InContextSAM(model, support.dataset(model.image_size, resize=model.cfg.sam.input_resize), name)
        prompt = name
        lines.append(f"in-context: {shots} support pair(s) of {folder} (seed {args.support_seed}) prompt the "
                     "frozen model (prototype map -> box + click)")
    return model, payload, args.prompt or prompt, lines


def cmd_adapt(args: argparse.Namespace) -> int:
    from shared_model.checkpoint import load_model_checkpoint
    from shared_model.config import AdapterConfig, TrainConfig
    from shared_model.fewshot.adapt import ADAPT_TRAIN, adapt
    from shared_model.fewshot.support import check_task_name, load_support
    from shared_model.inference import check_device

    name = check_task_name(args.name, "--name")
    device = check_device(args.device)
    support = load_support(args.support, args.shots, name, seed=args.seed)
    model, _ = load_model_checkpoint(args.checkpoint)
    train = TrainConfig(**{**ADAPT_TRAIN.__dict__})
    for key in ("steps", "batch_size", "lr"):
        if getattr(args, key) is not None:
            setattr(train, key, getattr(args, key))
    train.seed = args.seed
    adapter = AdapterConfig(rank=args.rank, alpha=float(2 * args.rank))
    print(f"support: {support.shots} of {support.pool} pair(s) in {support.folder} (seed {support.seed}), "
          f"task \"{name}\"", flush=True)
    result = adapt(model, support, args.out, args.checkpoint, train, adapter, device=str(device))
    print(f"trained {result.train.steps} steps in {result.train.seconds:.1f} s (total {result.seconds:.1f} s), "
          f"final loss {result.train.loss:.4f}")
    print(f"adapter: {result.path} ({result.file_bytes:,} B on disk; {result.parameters:,} values = "
          f"{result.nbytes:,} B of tensors)")
    if args.json:
        print(json.dumps({"adapter": str(result.path), "file_bytes": result.file_bytes, "values": result.parameters,
                          "seconds": result.seconds, "train_seconds": result.train.seconds,
                          "loss": result.train.loss}))
    return 0


def cmd_fewshot(args: argparse.Namespace) -> int:
    from cli.argtypes import parse_set
    from simulation.fewshot import run_fewshot

    summary = run_fewshot(args.config, args.out, parse_set(args.set), args.upper_bound)
    print((Path(args.out) / "table.md").read_text())
    print(f"plot: {Path(args.out) / 'dice_vs_k.png'}; results: {Path(args.out) / 'results.json'}")
    return 0 if summary else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``adapt`` and ``fewshot`` to the ``promptsam`` subcommands."""
    p = add_command(sub, "adapt", "learn a new task from K examples: a small task adapter on a frozen base model",
                    ADAPT_DESCRIPTION)
    p.add_argument("--checkpoint", required=True, help="the base model's checkpoint (model.pt, final_model.pt, ...)")
    p.add_argument("--support", required=True, help="folder of support images with masks (dataset layout)")
    p.add_argument("--shots", type=positive_int, required=True, help="K: support pairs drawn from --support")
    p.add_argument("--name", required=True, help="the new task's name, its text prompt (e.g. \"skin lesion\")")
    p.add_argument("--out", required=True, help="adapter file to write (e.g. adapters/skin_lesion.pt)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --shots draw, batch order and augmentation")
    p.add_argument("--steps", type=positive_int, help="optimiser steps (default: 300)")
    p.add_argument("--batch-size", type=positive_int, help="images per step (default: 4)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default: 0.003)")
    p.add_argument("--rank", type=positive_int, default=4, help="LoRA rank (default: 4; alpha = 2 x rank)")
    p.add_argument("--json", action="store_true", help="also print a JSON summary line")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.set_defaults(func=cmd_adapt)
    f = add_command(sub, "fewshot", "leave one task out: a held-out task from K examples, in-context vs adapter "
                    "vs fine-tuning vs the whole training split",
                    "Evaluate few-shot learning of a task the base model was never trained on: for each K and "
                    "support draw of the config's fewshot section, in-context prompting, a task adapter and "
                    "fine-tuning the usual trainable parts, scored on the task's test split next to a model "
                    "trained on its whole training split. Writes OUT/results.json (resumable), summary.json, "
                    "table.md and dice_vs_k.png.")
    f.add_argument("--config", required=True, help="YAML with model, data and fewshot sections "
                                                   "(e.g. simulation/configs/fewshot_polyp_tiny.yaml)")
    f.add_argument("--out", required=True, help="output folder (an existing one resumes: finished jobs are kept)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML field, e.g. --set fewshot.draws=1 (repeatable)")
    f.add_argument("--upper-bound", help="checkpoint of a model trained on the task's whole training split "
                                         "(default: fewshot.upper_bound.checkpoint, else trained here)")
    f.set_defaults(func=cmd_fewshot)


__all__ = ["add_fewshot_options", "cmd_adapt", "cmd_fewshot", "load_task_model", "register"]
