"""``promptsam text-selection``: does the text choose the target? (see :mod:`shared_model.pretrain.selection`)"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli.argtypes import add_command, positive_int, probability

# Kept equal to shared_model.pretrain.selection's (not imported here: it pulls in torch; a test checks).
DEFAULT_SCENE_SEED = 12345
DEFAULT_MARGIN = 0.3

DESCRIPTION = (
    "Show whether the text selects the target: draw N held-out synthetic scenes (several targets per frame: "
    "polyps of different size, colour and place, an instrument), segment every (scene, prompt) pair from the "
    "image and the prompt text, and report for kind prompts (\"the instrument\", \"the polyp\") and attribute "
    "prompts (\"the large polyp\", \"the red polyp\", \"the polyp in the top left\") the mean Dice against the "
    "named target, against the best-matching other target of the same frame (the maximum over the targets the "
    "prompt does not name), their difference and the count, then each rule alone. The model is either a "
    "PromptSAM checkpoint (--checkpoint; prompted as evaluation prompts it, its saliency paths as configured) or "
    "a foundation as pre-trained (--foundation; its own text -> token projection, no saliency, no boxes). The "
    "scene seed must differ from the one the foundation was pre-trained on (recorded in its provenance.json).")


def cmd_text_selection(args: argparse.Namespace) -> int:
    from shared_model.checkpoint import CheckpointError
    from shared_model.config import ConfigError
    from shared_model.inference import check_device
    from shared_model.pretrain import selection as S

    check_device(args.device)
    try:
        if args.checkpoint is not None:
            predict, info = S.checkpoint_predictor(args.checkpoint, args.device)
        else:
            predict, info = S.foundation_predictor(args.foundation, args.device)
    except CheckpointError as err:
        raise ValueError(f"--checkpoint: {err}") from None
    except ConfigError as err:
        text = str(err)
        if args.foundation is not None and text.startswith("model.foundation: "):
            text = "--foundation: " + text[len("model.foundation: "):]
        raise ConfigError(text) from None
    what = f"the foundation {info.get('foundation')!r}" if args.foundation else (
        f"the foundation {info['foundation']!r} of {args.checkpoint}" if info.get("foundation") else None)
    if what:
        S.check_held_out(args.scene_seed, info["pretraining_scene_seed"], what)
    print(f"model: {info.get('checkpoint') or info.get('folder')} (preset {info['preset']}); {info['path']}",
          flush=True)
    result = S.text_selection(predict, args.scenes, info["image_size"], args.scene_seed, args.batch_size,
                              args.margin, progress=True)
    print(f"scenes: {args.scenes} held-out frames (seed {args.scene_seed}, {info['image_size']} px), "
          f"{result['prompts']} prompts; other = the best-matching other target of the same frame", flush=True)
    print(S.format_selection_table(result["summary"]))
    if info.get("text_similarity"):
        print("text embeddings (cosine similarity; near 1 everywhere: the text cannot change the output):")
        print(S.format_similarity(info["text_similarity"]))
    for group in S.GROUPS:
        s = result["summary"].get(group)
        if s is not None:
            verdict = "meets" if s["meets_margin"] else "misses"
            print(f"{group}: named - other = {s['difference']:+.3f} ({verdict} the margin {args.margin:g})")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": info, "command": ["promptsam", *getattr(args, "argv", sys.argv[1:])],
                                   **result}, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``text-selection`` subcommand to ``promptsam``."""
    p = add_command(subparsers, "text-selection", "Dice of the named target vs another target, on held-out scenes",
                    DESCRIPTION)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a PromptSAM checkpoint (model.pt, best_model.pt, final_model.pt)")
    model.add_argument("--foundation", help="a foundation as pre-trained: a packaged name (tiny) or a folder "
                                            "written by `promptsam pretrain`")
    p.add_argument("--scenes", type=positive_int, default=150, help="held-out frames to draw (>= 1; default: 150)")
    p.add_argument("--scene-seed", type=int, default=DEFAULT_SCENE_SEED,
                   help=f"seed of the frames; not the pretraining's (default: {DEFAULT_SCENE_SEED})")
    p.add_argument("--margin", type=probability, default=DEFAULT_MARGIN,
                   help=f"difference named - other a group must reach, in [0, 1] (default: {DEFAULT_MARGIN})")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass (default: 16)")
    p.add_argument("--out", help="write the summary and every (scene, prompt) row as JSON here")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.set_defaults(func=cmd_text_selection)
    return p
