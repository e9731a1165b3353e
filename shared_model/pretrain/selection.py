"""Does the text select the target? Dice against the target a prompt names vs against the others.

On held-out synthetic scenes (:mod:`shared_model.data.scenes`: several targets per frame, prompts
that each name one of them), every (frame, prompt) pair is segmented from the image and the prompt
text alone, and the predicted mask is scored against every target of the frame:

* **named**: Dice against the target the prompt names;
* **other**: Dice against the *best-matching other* target of the same frame (the maximum over the
  targets the prompt does not name). This is the strict choice: a model that segments the wrong
  polyp, or every target at once, scores high here, so ``named - other`` is large only when the
  output follows the text. ``other_mean`` (the mean over the other targets) is reported beside it.

Pairs are grouped by prompt kind: **kind** prompts (rule ``kind``: "the instrument", "the polyp")
and **attribute** prompts (rules ``size``, ``colour``, ``location``: "the large polyp", "the red
polyp", "the polyp in the top left"); each rule is also reported alone.

Two ways to predict (a :data:`Predictor`: B x 3 x S x S images in [0, 1] and B texts -> B x 1 x S x S
mask probabilities):

* :func:`foundation_predictor`: a foundation as pre-trained, through the pretraining's own path
  (:meth:`shared_model.pretrain.model.Foundation.segment` with text prompts: the text embedding
  through its own text -> sparse-token projection, no saliency, no boxes);
* :func:`checkpoint_predictor`: any PromptSAM checkpoint, prompted as evaluation prompts it
  (:func:`shared_model.training.evaluate.evaluate_model`: ``model(images, texts)``); its other
  prompt paths (dense saliency, saliency boxes) run as configured. The ground-truth box oracle is
  refused: it would hand the model the named target.

The scenes must be held out: a seed the foundation's pretraining drew its scenes from is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from shared_model.config import ConfigError, ModelConfig, get_preset
from shared_model.data.scene_dataset import generate_scenes, scene_items

Predictor = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
DEFAULT_SCENE_SEED = 12345  # the tiny foundation's pretraining drew its scenes from seed 0
DEFAULT_MARGIN = 0.3  # issue 13's target: the named target's Dice at least 0.3 above the other's
GROUPS = {"kind": ("kind",), "attribute": ("size", "colour", "location")}
RULE_GROUP = {rule: group for group, rules in GROUPS.items() for rule in rules}
# Prompts whose text embeddings text_similarity compares: the kind prompts, bare class names, and a
# class of another task.
SIMILARITY_PROMPTS = ("the polyp", "the instrument", "polyp", "instrument", "breast tumour")
THRESHOLD = 0.5


# --------------------------------------------------------------------------------------------
# Metric
# --------------------------------------------------------------------------------------------


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two H x W bool masks (1.0 when both are empty)."""
    total = int(pred.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & target).sum()) / total


def score_prediction(pred: np.ndarray, targets: Sequence[np.ndarray], named: int) -> dict[str, Any]:
    """Dice of one prediction against the named target and against the others of its frame.

    Args:
        pred: H x W bool predicted mask.
        targets: The frame's T >= 2 target masks (H x W bool each).
        named: Index of the target the prompt names.

    Returns:
        ``{"named", "other" (best-matching other target), "other_mean", "dice" (T floats)}``.
    """
    if len(targets) < 2:
        raise ValueError(f"a frame needs at least two targets to score selection, got {len(targets)}")
    scores = [dice(pred, t) for t in targets]
    others = [s for i, s in enumerate(scores) if i != named]
    return {"named": scores[named], "other": max(others), "other_mean": float(np.mean(others)), "dice": scores}


def summarise(rows: Sequence[dict[str, Any]], margin: float = DEFAULT_MARGIN) -> dict[str, dict[str, Any]]:
    """Means per group (``kind``, ``attribute``) and per rule (``size``, ...) of scored rows.

    Args:
        rows: Dicts with ``rule``, ``named``, ``other``, ``other_mean`` (from :func:`score_prediction`).
        margin: The difference ``named - other`` a group must reach (``meets_margin``).

    Returns:
        ``{group or rule: {"n", "named", "other", "other_mean", "difference", "meets_margin"}}``, groups
        first, then rules, each only when it has rows.
    """
    unknown = sorted({r["rule"] for r in rows} - set(RULE_GROUP))
    if unknown:
        raise ValueError(f"unknown prompt rule(s) {unknown}; known: {sorted(RULE_GROUP)}")
    out: dict[str, dict[str, Any]] = {}
    keys = [(g, set(rules)) for g, rules in GROUPS.items()] + [(r, {r}) for r in RULE_GROUP]
    for key, rules in keys:
        chosen = [r for r in rows if r["rule"] in rules]
        if not chosen:
            continue
        named = float(np.mean([r["named"] for r in chosen]))
        other = float(np.mean([r["other"] for r in chosen]))
        out[key] = {"n": len(chosen), "named": named, "other": other,
                    "other_mean": float(np.mean([r["other_mean"] for r in chosen])),
                    "difference": named - other, "meets_margin": named - other >= margin}
    return out


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def text_selection(predict: Predictor, n_scenes: int, image_size: int, seed: int = DEFAULT_SCENE_SEED,
                   batch_size: int = 16, margin: float = DEFAULT_MARGIN, progress: bool = False
                   ) -> dict[str, Any]:
    """Segment every (scene, prompt) pair of ``n_scenes`` frames and score named vs other targets.

    Args:
        predict: Images B x 3 x S x S in [0, 1] + B texts -> B x 1 x S x S probabilities.
        n_scenes: Frames to draw (:func:`~shared_model.data.scene_dataset.generate_scenes`).
        image_size: Side S (the model's input size).
        seed: Seed of the frames.
        batch_size: Pairs per forward pass.
        margin: Required ``named - other`` (reported per group as ``meets_margin``).
        progress: Show a progress bar.

    Returns:
        ``{"scenes", "scene_seed", "image_size", "prompts", "margin", "summary"}`` (see
        :func:`summarise`) and ``"items"``: one row per pair (frame, text, rule, group, target,
        Dice per target, named, other, other_mean).
    """
    if n_scenes < 1:
        raise ValueError(f"scenes: must be >= 1, got {n_scenes}")
    if batch_size < 1:
        raise ValueError(f"batch size: must be >= 1, got {batch_size}")
    scenes = generate_scenes(n_scenes, image_size, seed)
    items = scene_items(scenes)
    rows: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(items), batch_size), desc="text selection", disable=not progress, leave=False):
        chunk = items[start:start + batch_size]
        images = torch.stack([torch.from_numpy(scenes[i.frame].image).permute(2, 0, 1) for i in chunk]).float() / 255
        prob = predict(images, [i.text for i in chunk])
        if tuple(prob.shape) != (len(chunk), 1, image_size, image_size):
            raise ValueError(f"predictor returned {tuple(prob.shape)}, expected ({len(chunk)}, 1, {image_size}, "
                             f"{image_size})")
        masks = (prob.float().cpu() > THRESHOLD)[:, 0].numpy()
        for item, pred in zip(chunk, masks):
            targets = [t.mask for t in scenes[item.frame].targets]
            rows.append({"frame": item.frame, "text": item.text, "rule": item.rule, "group": RULE_GROUP[item.rule],
                         "target": item.target, **score_prediction(pred, targets, item.target)})
    return {"scenes": n_scenes, "scene_seed": seed, "image_size": image_size, "prompts": len(rows),
            "margin": margin, "summary": summarise(rows, margin), "items": rows}


def format_selection_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per group, then per rule (indented), named / other / difference / n."""
    lines = ["| prompts | n | Dice named | Dice other (best) | difference | other (mean) |",
             "|---|---|---|---|---|---|"]
    for key, s in summary.items():
        label = key if key in GROUPS else f"  {key}"
        lines.append(f"| {label} | {s['n']} | {s['named']:.3f} | {s['other']:.3f} | {s['difference']:+.3f} | "
                     f"{s['other_mean']:.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Predictors
# --------------------------------------------------------------------------------------------


def pretraining_scene_seed(folder: str | Path) -> int | None:
    """The seed a foundation's pretraining drew its scenes from (its ``provenance.json``), or None
    when the folder records none or used no scenes."""
    path = Path(folder) / "provenance.json"
    if not path.is_file():
        return None
    scenes = (json.loads(path.read_text()).get("config") or {}).get("scenes") or {}
    return int(scenes["seed"]) if scenes.get("frames") and "seed" in scenes else None


def check_held_out(seed: int, trained: int | None, what: str) -> None:
    """Refuse ``seed`` when it is the seed of the scenes ``what`` was pre-trained on."""
    if trained is not None and seed == trained:
        raise ConfigError(f"--scene-seed {seed}: {what} was pre-trained on the scenes of this seed; "
                          f"pick another (default {DEFAULT_SCENE_SEED})")


def _foundation_model_config(folder: Path) -> ModelConfig:
    """The model config a foundation folder was pre-trained with: its provenance's, else the preset
    of its single ``sam_<preset>.pth``."""
    from shared_model.config.pretrain import pretrain_config_from_dict

    provenance = folder / "provenance.json"
    if provenance.is_file():
        record = json.loads(provenance.read_text())
        if isinstance(record.get("config"), dict):
            return pretrain_config_from_dict(record["config"], str(provenance)).model
    presets = [p.stem[len("sam_"):] for p in folder.glob("sam_*.pth")]
    if len(presets) != 1:
        raise ConfigError(f"--foundation: {folder} has no provenance.json and {len(presets)} sam_<preset>.pth "
                          "files; cannot tell its preset")
    return get_preset(presets[0])


def foundation_predictor(spec: str, device: str | torch.device = "cpu") -> tuple[Predictor, dict[str, Any]]:
    """A foundation (packaged name or ``promptsam pretrain`` folder), prompted as in pretraining.

    Returns:
        (predictor, info: ``source``, ``folder``, ``preset``, ``image_size``, ``digest``,
        ``pretraining_scene_seed``).

    Raises:
        ConfigError: No such foundation, or one without its text -> token projection.
    """
    from shared_model.modeling.foundation import foundation_folder, with_foundation_weights
    from shared_model.pretrain.data import PretrainBatch
    from shared_model.pretrain.model import Foundation
    from shared_model.training.loop import autocast_for, resolve_device

    folder = foundation_folder(spec)
    cfg = dataclasses.replace(_foundation_model_config(folder), foundation=spec)
    resolved, files = with_foundation_weights(cfg)
    if files.text_to_sparse is None:
        raise ConfigError(f"--foundation: {folder} has no text_to_sparse.pt (the pretraining's text -> token "
                          "projection), so text cannot prompt it")
    model = Foundation(resolved)
    model.text_to_sparse.load_state_dict({k: v.float() for k, v in torch.load(
        files.text_to_sparse, map_location="cpu", weights_only=True).items()})
    device = resolve_device(device)
    model.to(device).eval()

    def predict(images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        b, s = images.shape[0], images.shape[-1]
        masks = torch.zeros(b, 1, s, s)
        batch = PretrainBatch(images.to(device), masks, "text", list(texts), None, None, [], [])
        with autocast_for(device, True):
            logits, _ = model.segment(batch)
        return torch.sigmoid(logits.float())

    info = {"source": "foundation", "foundation": spec, "folder": str(folder), "preset": resolved.preset,
            "image_size": resolved.sam.image_size, "digest": files.digest(),
            "pretraining_scene_seed": pretraining_scene_seed(folder),
            "path": "Foundation.segment: text -> text_to_sparse -> SAM sparse tokens (no saliency, no boxes)"}
    return predict, info


def checkpoint_predictor(path: str | Path, device: str | torch.device = "cpu") -> tuple[Predictor, dict[str, Any]]:
    """A PromptSAM checkpoint, prompted as evaluation prompts it (``model(images, texts)``).

    Returns:
        (predictor, info: ``source``, ``checkpoint``, ``preset``, ``image_size``, ``foundation``,
        ``pretraining_scene_seed`` (of its foundation, if any), ``prompt_paths``).

    Raises:
        CheckpointError: A missing or unusable checkpoint (naming the file).
        ConfigError: A model whose boxes are the ground-truth oracle.
    """
    from shared_model.checkpoint import load_model_checkpoint
    from shared_model.modeling.foundation import foundation_folder
    from shared_model.training.loop import autocast_for, resolve_device

    model, _ = load_model_checkpoint(path)
    p = model.cfg.prompts
    if p.use_boxes and p.box_source == "ground-truth":
        raise ConfigError(f"--checkpoint {path}: model.prompts.box_source is 'ground-truth': the oracle box of the "
                          "named target would select it, not the text")
    device = resolve_device(device)
    model.to(device).eval()

    def predict(images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        with autocast_for(device, True):
            out = model(images.to(device), list(texts))
        return torch.sigmoid(out.mask_logits.float())

    cfg = model.cfg
    similarity = text_similarity(model) if model.uses_text else None
    seed = pretraining_scene_seed(foundation_folder(cfg.foundation)) if cfg.foundation else None
    info = {"source": "checkpoint", "checkpoint": str(path), "preset": cfg.preset, "image_size": cfg.sam.image_size,
            "foundation": cfg.foundation, "digest": model.foundation_digest, "pretraining_scene_seed": seed,
            "path": "PromptSAM.forward(images, texts), as evaluation prompts it",
            "prompt_paths": {"text_tokens": p.text_tokens, "dense_saliency": p.dense_saliency,
                             "boxes": p.box_source if p.use_boxes else None},
            "text_similarity": similarity}
    return predict, info


def text_similarity(model: Any, texts: Sequence[str] = SIMILARITY_PROMPTS) -> dict[str, Any]:
    """Cosine similarity between a PromptSAM's text embeddings (``encode_text``: B x D) of ``texts``.

    Near 1 everywhere means the text tower maps every prompt to one point: no prompt can then
    change the output, whatever the decoder learned.

    Returns:
        ``{"texts": [...], "cosine": len(texts) x len(texts) nested list}``.
    """
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.encode_text(list(texts)).float(), dim=-1)
    return {"texts": list(texts), "cosine": [[round(float(x), 4) for x in row] for row in emb @ emb.T]}


def format_similarity(similarity: dict[str, Any]) -> str:
    """A Markdown table of :func:`text_similarity`'s matrix."""
    texts = similarity["texts"]
    lines = ["| cosine | " + " | ".join(f'"{t}"' for t in texts) + " |", "|---" * (len(texts) + 1) + "|"]
    lines += [f'| "{t}" | ' + " | ".join(f"{x:.3f}" for x in row) + " |"
              for t, row in zip(texts, similarity["cosine"])]
    return "\n".join(lines)


__all__ = ["DEFAULT_MARGIN", "DEFAULT_SCENE_SEED", "GROUPS", "Predictor", "check_held_out", "checkpoint_predictor",
           "dice", "format_selection_table", "format_similarity", "foundation_predictor", "pretraining_scene_seed",
           "score_prediction", "summarise", "text_selection", "text_similarity"]
