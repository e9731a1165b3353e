"""``promptsam pretrain``: the foundation every federated run adapts (see :mod:`shared_model.pretrain`)."""

from __future__ import annotations

import argparse
import json
import sys

from cli.argtypes import add_command, parse_set, positive_int

DESCRIPTION = (
    "Pretrain every weight of a preset (SAM image encoder, prompt encoder and mask decoder; both CLIP towers) "
    "on public data that no hospital of the federation owns: the training splits of the task folders of "
    "data.sources and synthetic scenes (never a folder of forbidden_roots, ../shared/data/polyp by default). "
    "CLIP learns contrastively from (image, caption) pairs; SAM segments from boxes, points or text. Writes "
    "OUT/sam_<preset>.pth (segment-anything's layout, for model.sam.checkpoint), OUT/clip/ (an open_clip "
    "folder, for model.clip.checkpoint), OUT/provenance.json (data, steps, seed, time, config fingerprint) "
    "and the resumable OUT/state.pt.")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from shared_model.config.pretrain import load_pretrain_config
    from shared_model.pretrain.run import pretrain

    overrides = parse_set(args.set)
    if args.steps is not None:
        overrides["pretrain.steps"] = args.steps
    cfg = load_pretrain_config(args.config, overrides)
    record = pretrain(cfg, args.out, resume=args.resume, device=args.device,
                      command=["promptsam", *getattr(args, "argv", sys.argv[1:])])
    print(f"foundation: {args.out} ({record['steps']} of {record['steps_planned']} steps, "
          f"{record['seconds']:.0f} s, fingerprint {record['fingerprint'][:16]})")
    print(json.dumps(record["last_losses"]))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``pretrain`` subcommand to ``promptsam``."""
    p = add_command(subparsers, "pretrain", "pretrain the foundation (SAM + CLIP) on public data", DESCRIPTION)
    p.add_argument("--config", required=True, help="pretraining YAML (e.g. simulation/configs/pretrain_tiny.yaml)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt (same config and steps)")
    p.add_argument("--steps", type=positive_int, help="optimiser steps (sets pretrain.steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML field, e.g. --set pretrain.batch_size=8 (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.set_defaults(func=cmd_pretrain)
    return p
