"""Data and single-site training settings, and the ``train`` command's YAML (model + data + train)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared_model.config.model import ModelConfig, model_config_from_dict
from shared_model.config.parse import ConfigError, _raise_first, from_dict

# Prompts of scored sets: the class name (default), or the oracle built from each ground-truth mask.
EVAL_PROMPTS = ("class", "oracle-caption")
# Prompts of a site's training items: each item's attribute caption, its class name, or either of the
# two drawn per item and epoch with even odds ("mixed": a model that answers both).
PROMPT_MODES = ("attributes", "class", "mixed")


DEFAULT_DATA_ROOT = "../shared/data/polyp"
# Absent classes of negative prompts (``DataConfig.negative_classes``). "instrument": endoscopy frames
# can show one, but the datasets' masks never mark it.
DEFAULT_NEGATIVE_CLASSES = ("instrument", "breast tumour", "retinal blood vessels")
CAPTION_STYLES = ("objects", "network")  # of user-defined tasks (the "polyp" style is the polyp task's)
# Names of the built-in tasks of shared_model.data.tasks.TASKS (kept here so that parsing a config
# does not import the data package).
BUILTIN_TASKS = ("polyp", "breast-tumour", "retinal-vessels")


@dataclass
class TaskConfig:
    """A user-defined segmentation task (``data.tasks``); see :mod:`shared_model.data.tasks`."""

    name: str = ""  # how sources refer to it, e.g. "skin-lesion"
    class_name: str = ""  # noun of one target, e.g. "skin lesion"
    modality: str = ""  # e.g. "dermoscopy"
    image_noun: str = ""  # the image with its article; "" = "a/an <modality> image"
    caption: str = "objects"  # caption words: "objects" (size, brightness, shape, place) or "network"


@dataclass
class SourceConfig:
    """One folder of ``data.sources``: a dataset root (or one centre's folder), its centres, its task."""

    root: str = ""
    centres: list[str] = field(default_factory=list)  # empty = every centre folder under root
    task: str = "polyp"


@dataclass
class DataConfig:
    """A folder dataset ``<root>/<centre>/{images,masks}`` and its split.

    ``root`` may also be one centre's own folder ``<folder>/{images,masks}`` (the centre is then the
    folder's name; see :func:`shared_model.data.folder.resolve_centres`). Its masks mark ``task``.

    ``sources`` instead mixes folders of several roots and tasks (``root`` and ``task`` must then
    keep their defaults, and ``centres``, when set, keeps only those of the sources' centres);
    centre names must be distinct over all sources, as splits and split files name samples
    ``<centre>/<stem>``. See :mod:`shared_model.data.sources`.
    """

    root: str = DEFAULT_DATA_ROOT
    centres: list[str] = field(default_factory=list)  # empty = every centre folder under root
    task: str = "polyp"  # what the masks of root mark: a built-in task or one of ``tasks``
    sources: list[SourceConfig] = field(default_factory=list)  # several roots/tasks instead of root
    tasks: list[TaskConfig] = field(default_factory=list)  # user-defined tasks, beside the built-in ones
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    split_file: str | None = None
    on_error: str = "raise"  # "raise" or "skip" (skips are reported, never silent)
    augment: bool = True
    prompt_mode: str = "attributes"  # one of PROMPT_MODES: "attributes" captions, "class" name, or "mixed"
    class_name: str | None = None  # None = each sample's task's class name; a string overrides all
    # Prompt of every scored set (val/test/evaluate): "class" (the class name, default) or
    # "oracle-caption" (captions of the ground-truth masks: optimistic, an upper bound).
    eval_prompt: str = "class"
    # Rehearsal: synthetic scenes (public, generated at each site; shared_model.data.scene_dataset)
    # added to every training set, so that adapting to one class keeps the text choosing the target.
    rehearsal_scenes: int = 0  # frames (each gives ~3 (image, prompt, target) items); 0 = off
    rehearsal_seed: int = 0  # seed of their frames
    # Negative prompts (shared_model.data.negatives): this fraction of a site's own training items is
    # prompted with a class its images do not show, the target then empty, so that the text keeps
    # deciding what is segmented while the model adapts to one class. 0 = off.
    negative_prompts: float = 0.0
    # The absent classes drawn from (the item's own class is never drawn).
    negative_classes: list[str] = field(default_factory=lambda: list(DEFAULT_NEGATIVE_CLASSES))
    # Probability that a negative names its absent class the way that class's task describes itself
    # ("a breast tumour in an ultrasound image", Task.phrase) instead of inside the item's own prompt;
    # classes of no known task keep the swap.
    negative_phrases: float = 0.0


@dataclass
class TrainConfig:
    """Single-site training."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    num_workers: int = 0
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA
    eval_batch_size: int = 8
    progress: bool = True
    proximal_mu: float = 0.0
    time_limit_s: float = 0.0  # stop early after this many seconds (0 = no limit)


@dataclass
class SiteExperiment:
    """A single-site run: model, data and training settings (the ``train`` command's YAML)."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig


def site_experiment_from_dict(data: dict[str, Any], source: str = "config") -> SiteExperiment:
    """Parse ``{"model": {...}, "data": {...}, "train": {...}}`` strictly, naming ``source`` in errors."""
    unknown = sorted(set(data) - {"model", "data", "train"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; valid: ['data', 'model', 'train']")
    try:
        exp = SiteExperiment(
            model=model_config_from_dict(data.get("model")),
            data=from_dict(DataConfig, data.get("data") or {}, "data"),
            train=from_dict(TrainConfig, data.get("train") or {}, "train"),
        )
        check_data(exp.data)
        check_train(exp.train)
        return exp
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def check_train(cfg: TrainConfig, prefix: str = "train.") -> None:
    """Check the ranges of a :class:`TrainConfig`, raising ConfigError naming the field.

    Args:
        cfg: Training settings.
        prefix: Prepended to the field name in errors (``train.`` in YAML, ``train-config.``
            for the run config's JSON).
    """
    _raise_first([
        ("steps", cfg.steps >= 1, "must be >= 1 (optimiser steps)"),
        ("batch_size", cfg.batch_size >= 1, "must be >= 1"),
        ("eval_batch_size", cfg.eval_batch_size >= 1, "must be >= 1"),
        ("lr", cfg.lr > 0.0, "must be > 0"),
        ("weight_decay", cfg.weight_decay >= 0.0, "must be >= 0"),
        ("warmup_steps", cfg.warmup_steps >= 0, "must be >= 0"),
        ("grad_clip", cfg.grad_clip >= 0.0, "must be >= 0 (0 = no clipping)"),
        ("num_workers", cfg.num_workers >= 0, "must be >= 0 (0 = load in the main process)"),
        ("proximal_mu", cfg.proximal_mu >= 0.0, "must be >= 0"),
        ("time_limit_s", cfg.time_limit_s >= 0.0, "must be >= 0 (0 = no limit)"),
    ], prefix)


def check_data(cfg: DataConfig, prefix: str = "data.") -> None:
    """Check the choices and split fractions of a :class:`DataConfig`, naming the field."""
    choices = [("on_error", ("raise", "skip")), ("prompt_mode", PROMPT_MODES),
               ("eval_prompt", EVAL_PROMPTS)]
    for name, valid in choices:
        if getattr(cfg, name) not in valid:
            raise ConfigError(f"{prefix}{name}: {getattr(cfg, name)!r} not in {list(valid)}")
    _raise_first([
        ("val_fraction", 0.0 <= cfg.val_fraction < 1.0, "must be in [0, 1)"),
        ("test_fraction", 0.0 <= cfg.test_fraction < 1.0, "must be in [0, 1)"),
        ("test_fraction", cfg.val_fraction + cfg.test_fraction < 1.0,
         f"val_fraction + test_fraction must be < 1, got {cfg.val_fraction} + {cfg.test_fraction}"),
        ("root", bool(cfg.root), "must name a folder"),
        ("class_name", cfg.class_name is None or bool(cfg.class_name.strip()),
         "must be a non-empty string, or unset (each task's class name)"),
        ("rehearsal_scenes", cfg.rehearsal_scenes >= 0, "must be >= 0 (0 = no rehearsal)"),
        ("negative_prompts", 0.0 <= cfg.negative_prompts < 1.0, "must be in [0, 1) (0 = no negative prompts)"),
        ("negative_classes", not cfg.negative_prompts or any(str(c).strip() for c in cfg.negative_classes),
         "must name at least one class when negative_prompts > 0"),
        ("negative_phrases", 0.0 <= cfg.negative_phrases <= 1.0, "must be in [0, 1]"),
    ], prefix)
    check_tasks(cfg, prefix)


def check_tasks(cfg: DataConfig, prefix: str = "data.") -> None:
    """Check ``tasks``, ``task`` and ``sources`` of a :class:`DataConfig`, naming the field."""
    names = set(BUILTIN_TASKS)
    for i, task in enumerate(cfg.tasks):
        where = f"{prefix}tasks[{i}]."
        for name in ("name", "class_name", "modality"):
            if not getattr(task, name).strip():
                raise ConfigError(f"{where}{name}: must be a non-empty string")
        if task.name in names:
            raise ConfigError(f"{where}name: {task.name!r} is already a task; taken: {sorted(names)}")
        if task.caption not in CAPTION_STYLES:
            raise ConfigError(f"{where}caption: {task.caption!r} not in {list(CAPTION_STYLES)}")
        names.add(task.name)
    if cfg.task not in names:
        raise ConfigError(f"{prefix}task: {cfg.task!r} is not a task; valid: {sorted(names)}")
    if not cfg.sources:
        return
    for name, unset in (("root", cfg.root == DEFAULT_DATA_ROOT), ("task", cfg.task == "polyp")):
        if not unset:
            raise ConfigError(f"{prefix}{name}: leave it unset when {prefix}sources is given "
                              "(each source names its own root and task)")
    for i, source in enumerate(cfg.sources):
        where = f"{prefix}sources[{i}]."
        if not source.root:
            raise ConfigError(f"{where}root: must name a folder")
        if source.task not in names:
            raise ConfigError(f"{where}task: {source.task!r} is not a task; valid: {sorted(names)}")
