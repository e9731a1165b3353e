"""The ``pretrain`` command's YAML: the foundation every federated run adapts.

A pretraining file has four sections, parsed strictly like the others (an unknown key or a wrong
type raises :class:`~shared_model.config.ConfigError` naming the file and the dotted field)::

    model: {preset: tiny}                      # the architecture whose every weight is trained
    data:                                      # public task folders (training splits only)
      sources:
        - {root: ../shared/data/tasks, centres: [busi], task: breast-tumour}
        - {root: ../shared/data/tasks, centres: [retina_vessels], task: retinal-vessels}
    scenes: {frames: 2000, seed: 0}            # synthetic scenes, generated in memory
    pretrain: {steps: 3000, batch_size: 16, lr: 0.0003, seed: 0, ...}      # PretrainTrainConfig
    forbidden_roots: [../shared/data/polyp]    # data no source may come from (the federation's)

:func:`pretrain_fingerprint` is the sha256 of the canonical JSON of the parsed config without the
fields that only say how a run is watched or interrupted (:data:`RUNTIME_FIELDS`): equal
fingerprints mean the same foundation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from shared_model.config.model import ModelConfig, model_config_from_dict
from shared_model.config.experiment import apply_overrides
from shared_model.config.parse import ConfigError, _coerce, _raise_first, blame_overrides, from_dict, load_yaml, to_dict
from shared_model.config.site import DEFAULT_NEGATIVE_CLASSES, DataConfig, check_data

SECTIONS = ("model", "data", "scenes", "pretrain", "forbidden_roots")
DEFAULT_FORBIDDEN_ROOTS = ("../shared/data/polyp",)
# Fields of ``pretrain`` that do not change the weights a run produces (time_limit_s only stops a
# run early; the provenance records the steps actually taken).
RUNTIME_FIELDS = ("progress", "log_every", "save_every", "time_limit_s")
# Class names the text prompts of pretraining may name where the image does not show them
# (``pretrain.negative_prompts``): every task's class and the scenes' two kinds.
PRETRAIN_NEGATIVE_CLASSES = ("polyp", "instrument", "breast tumour", "retinal blood vessels")
# Fields added after the committed foundation was made, left out of the fingerprint while they
# hold these values (their defaults, which give the weights the foundation was made with).
LATER_FIELDS = {("model", "foundation"): None, ("model", "loss", "coarse"): 1.0,
                ("data", "rehearsal_scenes"): 0, ("data", "rehearsal_seed"): 0,
                ("data", "negative_prompts"): 0.0,
                ("data", "negative_classes"): list(DEFAULT_NEGATIVE_CLASSES), ("data", "negative_phrases"): 0.0,
                ("pretrain", "negative_prompts"): 0.0,
                ("pretrain", "negative_classes"): list(PRETRAIN_NEGATIVE_CLASSES),
                ("model", "clip", "text", "pooler"): "cls_last_hidden_state_pooler"}


@dataclass
class ScenesConfig:
    """Synthetic scenes (:class:`~shared_model.data.scene_dataset.SceneDataset`), drawn in memory."""

    frames: int = 1000  # 0 = no scenes
    seed: int = 0


@dataclass
class PretrainTrainConfig:
    """Optimisation, batch composition and prompts of pretraining.

    Each step draws ``batch_size`` items: a fraction ``task_fraction`` from the task folders (each
    task folder equally likely when ``balance_centres``, else in proportion to its size), the rest
    from the scenes; and one prompt kind for the whole batch, ``box`` / ``point`` / ``text`` in
    proportion to ``prompt_weights``.
    """

    steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0  # weights' initialisation, batches, prompts, augmentation, dropout
    amp: bool = True  # bf16 autocast on CUDA
    task_fraction: float = 0.5
    balance_centres: bool = True
    # Weights of the prompt kinds (box, point, text), per batch.
    prompt_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 2.0])
    box_jitter: float = 0.1  # box corners move by up to this fraction of the box side
    negative_point: float = 0.5  # probability of a background click next to the foreground one
    class_prompt_fraction: float = 0.5  # text prompts of task items: the class name, else the caption
    # Fraction of the rows of a text-prompted batch whose prompt names a class the image does not
    # show (own class name swapped for one of negative_classes), trained against an empty mask: the
    # text tower must then tell the classes of different tasks apart, which segmentation with
    # positive prompts alone never asks (a busi image never meets the word "polyp").
    negative_prompts: float = 0.0
    negative_classes: list[str] = field(default_factory=lambda: list(PRETRAIN_NEGATIVE_CLASSES))
    # Loss weights: SAM's mask (Dice + BCE), its IoU head, and the CLIP contrastive loss.
    dice: float = 1.0
    bce: float = 0.2  # at 1 the background-dominated BCE drives the first steps to empty masks (LossConfig.bce)
    iou: float = 1.0
    clip: float = 1.0
    # Pair scene frames with their frame caption (every target's kind, "two polyps and an instrument in
    # a colonoscopy image") in the CLIP loss: the word "polyp" then meets the other tasks' images.
    # (Pairing a frame with an item's prompt, which names one target, made "the polyp" and "the
    # instrument" one text: kind selection fell from +0.88 to +0.06.)
    clip_on_scenes: bool = False
    half_precision: bool = True  # store the output weights in float16 (loaded as float32)
    # How the run is watched and interrupted (not part of the fingerprint):
    progress: bool = True
    log_every: int = 50
    save_every: int = 200  # write the resumable state every N steps (and at the end)
    time_limit_s: float = 0.0  # stop after this many seconds, state saved (0 = no limit)


@dataclass
class PretrainConfig:
    """A pretraining run: the model to build, the public data, the scenes and the optimisation."""

    model: ModelConfig
    data: DataConfig
    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    pretrain: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    forbidden_roots: list[str] = field(default_factory=lambda: list(DEFAULT_FORBIDDEN_ROOTS))


def pretrain_config_from_dict(data: dict[str, Any], source: str = "config") -> PretrainConfig:
    """Parse a pretraining mapping strictly, naming ``source`` in errors.

    ``data.sources`` must be given (the single-root form defaults to the polyp folder).
    """
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; valid: {sorted(SECTIONS)}")
    try:
        cfg = PretrainConfig(
            model=model_config_from_dict(data.get("model")),
            data=from_dict(DataConfig, data.get("data") or {}, "data"),
            scenes=from_dict(ScenesConfig, data.get("scenes") or {}, "scenes"),
            pretrain=from_dict(PretrainTrainConfig, data.get("pretrain") or {}, "pretrain"),
            forbidden_roots=_coerce(data.get("forbidden_roots", list(DEFAULT_FORBIDDEN_ROOTS)), list[str],
                                    "forbidden_roots"),
        )
        check_pretrain(cfg)
        return cfg
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_pretrain_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> PretrainConfig:
    """Read a pretraining YAML with dotted ``overrides`` (``pretrain.steps=20``; values parsed as YAML).

    Raises:
        ConfigError: Naming the file and field, or the ``--set`` override to blame.
    """
    raw = load_yaml(path)
    try:
        return pretrain_config_from_dict(apply_overrides(raw, overrides), str(path))
    except ConfigError as err:
        if not overrides:
            raise
        raise blame_overrides(err, str(path), overrides, lambda: pretrain_config_from_dict(raw, str(path))) from None


def check_pretrain(cfg: PretrainConfig) -> None:
    """Ranges and choices of a :class:`PretrainConfig`, raising ConfigError naming the field."""
    check_data(cfg.data)
    if cfg.data.rehearsal_scenes:
        raise ConfigError("data.rehearsal_scenes: pretraining draws its scenes from scenes.frames; leave it 0")
    if cfg.data.negative_prompts:
        raise ConfigError("data.negative_prompts: pretraining trains text selection on scenes.frames; leave it 0")
    if not cfg.data.sources and cfg.scenes.frames == 0:
        raise ConfigError("data.sources: name the public task folders (or set scenes.frames > 0)")
    if cfg.model.foundation:
        raise ConfigError("model.foundation: pretraining starts from model.sam.checkpoint / model.clip.checkpoint "
                          "(e.g. a foundation's sam_<preset>.pth and clip/ folder), not from a foundation name")
    t = cfg.pretrain
    _raise_first([
        ("steps", t.steps >= 1, "must be >= 1"),
        ("batch_size", t.batch_size >= 2, "must be >= 2 (the contrastive loss needs pairs)"),
        ("lr", t.lr > 0, "must be > 0"),
        ("weight_decay", t.weight_decay >= 0, "must be >= 0"),
        ("warmup_steps", t.warmup_steps >= 0, "must be >= 0"),
        ("grad_clip", t.grad_clip >= 0, "must be >= 0 (0 = no clipping)"),
        ("task_fraction", 0.0 <= t.task_fraction <= 1.0, "must be in [0, 1]"),
        ("prompt_weights", len(t.prompt_weights) == 3 and min(t.prompt_weights) >= 0 and sum(t.prompt_weights) > 0,
         "expected 3 weights >= 0 (box, point, text), not all 0"),
        ("box_jitter", 0.0 <= t.box_jitter < 1.0, "must be in [0, 1)"),
        ("negative_point", 0.0 <= t.negative_point <= 1.0, "must be in [0, 1]"),
        ("class_prompt_fraction", 0.0 <= t.class_prompt_fraction <= 1.0, "must be in [0, 1]"),
        ("negative_prompts", 0.0 <= t.negative_prompts < 1.0, "must be in [0, 1)"),
        ("negative_classes", not t.negative_prompts or len({str(c).strip().lower() for c in t.negative_classes
                                                           if str(c).strip()}) >= 2,
         "name at least two class names (an item's own class is never drawn)"),
        ("dice", t.dice >= 0, "must be >= 0"),
        ("bce", t.bce >= 0, "must be >= 0"),
        ("iou", t.iou >= 0, "must be >= 0"),
        ("clip", t.clip >= 0, "must be >= 0"),
        ("log_every", t.log_every >= 1, "must be >= 1"),
        ("save_every", t.save_every >= 1, "must be >= 1"),
        ("time_limit_s", t.time_limit_s >= 0, "must be >= 0 (0 = no limit)"),
    ], "pretrain.")
    _raise_first([("frames", cfg.scenes.frames >= 0, "must be >= 0 (0 = no scenes)")], "scenes.")
    if cfg.scenes.frames == 0 and t.task_fraction < 1.0:
        raise ConfigError("pretrain.task_fraction: must be 1 when scenes.frames is 0 (no scenes to draw)")
    if not cfg.data.sources and t.task_fraction > 0.0:
        raise ConfigError("pretrain.task_fraction: must be 0 without data.sources (no task folders to draw)")


# How SAM's encoder computes, not what it computes (outputs equal within tolerance, tested).
SAM_RUNTIME_FIELDS = ("attention", "activation_checkpointing")


def pretrain_fingerprint(cfg: PretrainConfig) -> str:
    """sha256 (hex) of the canonical JSON of ``cfg`` without :data:`RUNTIME_FIELDS`, the model's
    :data:`SAM_RUNTIME_FIELDS`, and the :data:`LATER_FIELDS` that hold their defaults."""
    data = to_dict(cfg)
    for name in RUNTIME_FIELDS:
        data["pretrain"].pop(name)
    for name in SAM_RUNTIME_FIELDS:
        data["model"]["sam"].pop(name)
    for path, default in LATER_FIELDS.items():
        *parents, name = path
        section = data
        for key in parents:
            section = section[key]
        if section.get(name, default) == default:
            section.pop(name, None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
