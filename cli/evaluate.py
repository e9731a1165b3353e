"""``promptsam evaluate`` as plain functions: which images to score, the per-centre table.

Which images (the rule, also in ``promptsam evaluate --help`` and the README):

* ``--split all`` scores every image of ``--data``; ``--split train|val|test`` scores that split
  (split settings of ``--data-config``, else those recorded with the training data when ``--data``
  is it, else val 0.1 / test 0.2 / seed 0).
* Without ``--split``: when ``--data`` is a folder the checkpoint was *not* trained on, every image
  is scored; when it is the training data (the same root with a common centre), or no ``--data`` is
  given, or the checkpoint does not record its training data (federated and older checkpoints),
  the test split is scored, so that training images are never scored by default.

Which prompt: the class name (``data.class_name``) by default; ``--eval-prompt oracle-caption`` (or
``eval_prompt: oracle-caption`` in ``--data-config``) gives each image the caption of its own
ground-truth mask, an optimistic oracle (see :func:`shared_model.data.dataset.evaluation_dataset`).

``promptsam train`` records its data (root, centres, split settings) and the constant-mask
baseline (the training split's mean mask, thresholded at the threshold best on the training
split) in the checkpoint's ``extra``; :func:`baseline_mask` reads it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from shared_model.config import DataConfig, to_dict

if TYPE_CHECKING:
    import torch

    from shared_model.data.dataset import PolypDataset

SPLIT_CHOICES = ("all", "train", "val", "test")


def training_record(data: DataConfig) -> dict[str, Any]:
    """The training data of a checkpoint, as stored in its ``extra["data"]`` (roots made absolute).

    With ``data.sources``, each source's root is made absolute and ``root`` keeps its default.
    """
    from shared_model.data.folder import resolve_centres

    if data.sources:
        sources = [{**to_dict(s), "root": str(resolve_centres(s.root, s.centres or None)[0].resolve())}
                   for s in data.sources]
        return {**to_dict(data), "sources": sources}
    root, centres = resolve_centres(data.root, data.centres or None)
    return {**to_dict(data), "root": str(root.resolve()), "centres": centres}


def recorded_data(record: Mapping[str, Any]) -> DataConfig:
    """The DataConfig of a training record (its known fields; records predate some fields)."""
    from shared_model.config import from_dict

    return from_dict(DataConfig, {k: v for k, v in record.items() if k in DataConfig.__dataclass_fields__})


def is_training_data(data: DataConfig, record: Mapping[str, Any]) -> bool:
    """Whether ``data`` shares a centre folder (``<root>/<centre>``) with the recorded training data."""
    from shared_model.data.sources import centre_folders

    return bool(centre_folders(data) & centre_folders(recorded_data(record)))


def _task_of_folder(data: DataConfig, folder: str) -> str:
    """The task of the source of ``data`` that holds ``folder`` (a root or one centre's folder)."""
    from shared_model.data.sources import centre_folders

    given = centre_folders(DataConfig(root=folder, tasks=data.tasks))
    for source in data.sources:
        if given & centre_folders(DataConfig(root=source.root, centres=source.centres, tasks=data.tasks)):
            return source.task
    return data.task


def choose_split(data: DataConfig, data_given: bool, split: str | None,
                 record: Mapping[str, Any] | None) -> tuple[str, str]:
    """The split to score (one of :data:`SPLIT_CHOICES`) and why, per the module's rule."""
    if split is not None:
        return split, f"--split {split}"
    if not data_given:
        where = "the checkpoint's training data" if record is not None else f"the default data ({data.root})"
        return "test", f"no --data: the test split of {where}"
    if record is None:
        return "test", ("the checkpoint does not record its training data, so --data may be it: its test "
                        "split is scored (--split all scores every image)")
    if is_training_data(data, record):
        return "test", "--data is the checkpoint's training data: its held-out test split is scored"
    return "all", "--data is not the checkpoint's training data: every image is scored"


def evaluation_images(payload: Mapping[str, Any], image_size: int, data_arg: str | None = None,
                      centres: list[str] | None = None, data_config: str | None = None,
                      split: str | None = None, eval_prompt: str | None = None,
                      resize: str = "letterbox") -> tuple["PolypDataset", str, list[str]]:
    """The images ``promptsam evaluate`` scores, per the module's rule.

    Args:
        payload: The checkpoint (its ``extra["data"]`` is the training data, if recorded).
        image_size: The model's input size S.
        data_arg: ``--data`` (a dataset root or one centre's folder).
        centres: ``--centres``.
        data_config: ``--data-config`` (a YAML of DataConfig fields).
        split: ``--split`` (one of :data:`SPLIT_CHOICES`) or None for the default rule.
        eval_prompt: ``--eval-prompt`` (``class`` or ``oracle-caption``); None: the data config's
            ``eval_prompt`` (``class`` unless a ``--data-config`` says otherwise). The recorded
            training data's prompt mode never carries over: the default is the class prompt.
        resize: The model's ``sam.input_resize`` (``letterbox`` or ``squash``).

    Returns:
        ``(dataset, split scored, [why these images, which images, which prompt])``.

    Raises:
        ConfigError, DataError, ValueError: Bad data settings or folders (naming them), or an
            empty split.
    """
    from shared_model.config import ConfigError, check_data, from_dict, load_yaml
    from shared_model.data.dataset import evaluation_dataset
    from shared_model.data.folder import describe_eval_prompt
    from shared_model.data.sources import class_names, list_config_samples
    from shared_model.data.splits import build_splits

    record = (payload.get("extra") or {}).get("data")
    record = record if isinstance(record, dict) and "root" in record else None
    if data_config:
        raw = load_yaml(data_config)
        try:
            data = from_dict(DataConfig, raw, "data")
        except ConfigError as err:
            raise ConfigError(f"{data_config}: {err}") from None
    elif record is not None and (not data_arg or is_training_data(
            DataConfig(root=data_arg, centres=list(centres or [])), record)):
        # The training data: its split settings (so "test" is the held-out split); the recorded
        # centres only when no --data names the folder to score.
        data = recorded_data({k: v for k, v in record.items() if k != "eval_prompt"})
        if data_arg:
            data.centres = []
            if data.sources:  # --data is one of them: score it alone, as its source's task
                data.task, data.sources = _task_of_folder(data, data_arg), []
    else:
        data = DataConfig()
    if data_arg:
        data.root = data_arg
    if centres:
        data.centres = list(centres)
    data.augment = False
    if eval_prompt is not None:
        data.eval_prompt = eval_prompt
    check_data(data, f"{data_config}: data." if data_config else "data.")
    split, why = choose_split(data, bool(data_arg), split, record)
    where = " + ".join(s.root for s in data.sources) if data.sources else data.root
    if split == "all":
        samples, _ = list_config_samples(data)
    else:
        samples = build_splits(data)[0][split]
        if not samples:
            raise ValueError(f"the {split} split of {where} is empty (fractions val {data.val_fraction}, "
                             f"test {data.test_fraction}); --split all scores every image")
    dataset = evaluation_dataset(samples, image_size, data.eval_prompt, data.class_name, data.on_error,
                                 resize=resize)
    return dataset, split, [why, describe_images(dataset.samples, where, split),
                            f"evaluation prompt: {describe_eval_prompt(data.eval_prompt, class_names(data))}"]


def baseline_mask(payload: Mapping[str, Any]) -> tuple["torch.Tensor | None", str]:
    """The constant-mask baseline stored at training time, and a line saying what it is.

    Returns:
        ``(1 x S x S bool mask or None, description)``; None when the checkpoint stores none
        (federated checkpoints: the server never sees a hospital's masks).
    """
    import torch

    base = (payload.get("extra") or {}).get("baseline")
    if not isinstance(base, dict) or not isinstance(base.get("mask"), torch.Tensor):
        return None, ("constant-mask baseline: not available (the checkpoint stores no mean training mask; "
                      "only `promptsam train` checkpoints do)")
    return base["mask"], (f"constant-mask baseline: the mean mask of the {base.get('train_images', '?')} "
                          f"training images thresholded at {base.get('threshold')} (stored in the checkpoint)")


def describe_images(samples: list, root: str | Path, split: str) -> str:
    """``"scored 40 images (all) of ROOT: centre_0 8, centre_1 32"``."""
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.centre] = counts.get(s.centre, 0) + 1
    per = ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
    which = "every image" if split == "all" else f"the {split} split"
    return f"images: {len(samples)} ({which}) of {root}: {per}"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_centre_table(by_centre: Mapping[str, Mapping[str, float]], overall: Mapping[str, float],
                        baseline: Mapping[str, Mapping[str, float]] | None,
                        baseline_overall: Mapping[str, float] | None) -> str:
    """Markdown table: one row per centre and an ``all`` row (n, Dice, IoU, HD95, baseline Dice)."""
    lines = ["| centre | n | Dice | IoU | HD95 (px) | constant-mask Dice |", "|---|---|---|---|---|---|"]
    rows = [*by_centre.items(), ("all", overall)]
    for centre, m in rows:
        base = baseline_overall if centre == "all" else (baseline or {}).get(centre)
        lines.append(f"| {centre} | {int(m['n'])} | {_fmt(m['dice'])} | {_fmt(m['iou'])} | "
                     f"{_fmt(m['hd95'], 2)} | {_fmt(base['dice'] if base else None)} |")
    return "\n".join(lines)


__all__ = ["SPLIT_CHOICES", "baseline_mask", "choose_split", "describe_images", "evaluation_images",
           "format_centre_table", "is_training_data", "training_record"]
