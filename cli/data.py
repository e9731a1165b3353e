"""``promptsam data check FOLDER`` and ``promptsam data synth-scenes`` (the work is in
:mod:`shared_model.data.check` and :mod:`shared_model.data.scene_dataset`, imported when run)."""

from __future__ import annotations

import argparse

from cli.argtypes import add_command, positive_int


def cmd_data_check(args: argparse.Namespace) -> int:
    """Print what the folder holds and its problems; exit status 1 when there is a problem."""
    from shared_model.data.check import check_folder, format_check

    result = check_folder(args.folder)
    print(format_check(result))
    return 0 if result.ok else 1


def scene_size(text: str) -> int:
    """A frame side in pixels, >= 48 (smaller frames cannot hold several targets apart)."""
    value = positive_int(text)
    if value < 48:
        raise argparse.ArgumentTypeError(f"must be an integer >= 48, got {value}")
    return value


def cmd_data_synth_scenes(args: argparse.Namespace) -> int:
    """Write synthetic multi-target scenes and their prompts; print what was written."""
    import json
    from collections import Counter

    from shared_model.data.scene_dataset import write_scenes

    out = write_scenes(args.out, args.n, args.size, args.seed)
    items = json.loads((out / "prompts.json").read_text())["items"]
    rules = Counter(i["rule"] for i in items)
    print(f"wrote {args.n} scenes of {args.size} px and {len(items)} prompts "
          f"({', '.join(f'{k} {v}' for k, v in rules.items())}) to {out}: images/, masks/ (all targets), "
          "targets/ (one mask per target), prompts.json")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``promptsam data check`` and ``promptsam data synth-scenes`` to the ``promptsam`` subcommands."""
    p = add_command(sub, "data", "check a data folder before training; write synthetic scenes")
    data = p.add_subparsers(dest="data_command", required=True, title="data commands", metavar="COMMAND")
    d = add_command(
        data, "check", "list a data folder's centres, pairs, image sizes, mask values and problems",
        "Read every image/mask pair of a data folder the way training does and print, per centre, the "
        "pairs found, how many are usable, empty masks, image sizes and mask values, then every problem "
        "(unpaired or unsupported files, unreadable images or masks, size mismatches, non-binary masks). "
        "Exit status 1 when there is a problem, 2 when the folder is missing or holds no pair.")
    d.add_argument("folder", help="a dataset root (ROOT/<centre>/images, ROOT/<centre>/masks) "
                                  "or one centre's folder (FOLDER/images, FOLDER/masks)")
    d.set_defaults(func=cmd_data_check)
    d = add_command(
        data, "synth-scenes", "write synthetic frames with several targets and prompts that name one",
        "Write N synthetic colonoscopy-like frames, each with several targets (polyps of different size, "
        "colour and place; an instrument) and distractors (folds, highlights, bubbles), and the prompts "
        "that name exactly one target (\"the instrument\", \"the large polyp\", \"the polyp in the top "
        "left\"): OUT/images, OUT/masks (all targets, so OUT is a data folder), OUT/targets (one mask "
        "per target) and OUT/prompts.json. The same seed writes the same files.")
    d.add_argument("--out", required=True, help="output folder (created; files of the same names are overwritten)")
    d.add_argument("--n", type=positive_int, default=100, help="frames (default: 100)")
    d.add_argument("--size", type=scene_size, default=128, help="side of the square frames in pixels, >= 48 "
                                                                "(default: 128)")
    d.add_argument("--seed", type=int, default=0, help="seed of the frames (default: 0)")
    d.set_defaults(func=cmd_data_synth_scenes)
