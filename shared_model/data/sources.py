"""The folders, centres and tasks of a :class:`~shared_model.config.DataConfig`, and their samples.

A data config names its images either in the single-root form (``root``, ``centres``, ``task``:
polyps by default, as before tasks existed) or as ``sources``, a list of ``{root, centres, task}``
that may mix roots and tasks::

    data:
      sources:
        - {root: ../shared/data/polyp, centres: [kvasir_seg], task: polyp}
        - {root: ../shared/data/tasks, centres: [busi], task: breast-tumour}

Every listing of a config's samples goes through :func:`list_config_samples`, so each sample
carries its source's task (its prompt and caption words). Splits stay per centre (centre names
must be distinct over the sources). With sources, ``data.centres`` (when set) keeps only those of
the sources' centres, as it restricts the root's centres in the single-root form (one client's,
one single-site job's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared_model.config import ConfigError, DataConfig
from shared_model.data.folder import DataError, Sample, list_samples, resolve_centres
from shared_model.data.tasks import Task, get_task, task_registry, user_task


@dataclass(frozen=True)
class DataSource:
    """One folder of a data config: a dataset root (or one centre's folder), its centres, its task."""

    root: str
    centres: tuple[str, ...]
    task: Task


def config_tasks(cfg: DataConfig) -> dict[str, Task]:
    """The built-in tasks and the config's ``data.tasks``, by name.

    Raises:
        ConfigError: A user task is invalid or reuses a taken name (naming the field).
    """
    extra = []
    for i, t in enumerate(cfg.tasks):
        try:
            extra.append(user_task(t.name, t.class_name, t.modality, t.image_noun, t.caption))
        except ValueError as err:
            raise ConfigError(f"data.tasks[{i}]: {err}") from None
    try:
        return task_registry(extra)
    except ValueError as err:
        raise ConfigError(f"data.tasks: {err}") from None


def data_sources(cfg: DataConfig) -> list[DataSource]:
    """The config's folders: its ``sources``, else the single ``root`` / ``centres`` / ``task``.

    Raises:
        ConfigError: A source names an unknown task (naming the field and the valid tasks).
    """
    registry = config_tasks(cfg)
    if not cfg.sources:
        return [DataSource(cfg.root, tuple(cfg.centres), _task(registry, cfg.task, "data.task"))]
    return [DataSource(s.root, tuple(s.centres), _task(registry, s.task, f"data.sources[{i}].task"))
            for i, s in enumerate(cfg.sources)]


def _task(registry: dict[str, Task], name: str, where: str) -> Task:
    try:
        return get_task(name, registry)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def config_task(cfg: DataConfig) -> Task:
    """The task of the single-root form (``data.task``), for folders given apart from the config
    (a hospital's ``data-path``, ``--data``): they hold that task's images."""
    return _task(config_tasks(cfg), cfg.task, "data.task")


def list_config_samples(cfg: DataConfig, on_error: str | None = None) -> tuple[list[Sample], list[str]]:
    """List the samples of every source of ``cfg``, each carrying its source's task.

    Args:
        cfg: The data config.
        on_error: ``"raise"`` / ``"skip"``; default ``cfg.on_error``.

    Returns:
        ``(samples sorted by (centre, stem), skipped reasons)``.

    Raises:
        ConfigError: Unknown task.
        DataError: A folder problem (see :func:`~shared_model.data.folder.list_samples`), or two
            sources with a centre of the same name (the message names both folders).
    """
    on_error = on_error or cfg.on_error
    samples: list[Sample] = []
    skipped: list[str] = []
    owner: dict[str, Path] = {}
    for source in data_sources(cfg):
        root, centres = resolve_centres(source.root, source.centres or None, on_error, skipped)
        for centre in centres:
            if centre in owner and owner[centre] != root:
                raise DataError(f"{root / centre}: centre {centre!r} is also in {owner[centre]}; centre names "
                                "must be distinct over data.sources (splits name samples '<centre>/<stem>')")
            owner[centre] = root
        if not centres:  # every named centre was missing and skipped
            continue
        found, reasons = list_samples(root, centres, on_error, source.task)
        samples.extend(found)
        skipped.extend(reasons)
    if cfg.sources and cfg.centres:
        samples = _restrict(samples, cfg.centres, on_error, skipped)
    if not samples:
        raise DataError(f"no image/mask pairs found in the data sources (skipped: {skipped})")
    samples.sort(key=lambda s: (s.centre, s.stem))
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        raise DataError("a centre is listed by two sources of data.sources (same root and centre twice)")
    return samples, skipped


def _restrict(samples: list[Sample], centres: list[str], on_error: str, skipped: list[str]) -> list[Sample]:
    """The samples of ``centres`` (``data.centres`` over the sources), naming unknown centres."""
    available = sorted({s.centre for s in samples})
    for centre in sorted(set(centres) - set(available)):
        message = f"data.centres: no centre {centre!r} in data.sources; valid centres: {available}"
        if on_error == "raise":
            raise DataError(message)
        skipped.append(message)
    return [s for s in samples if s.centre in set(centres)]


def centre_folders(cfg: DataConfig) -> set[Path]:
    """The resolved ``<root>/<centre>`` folders the config names (no file is listed).

    A source whose folder is missing names none (a checkpoint's record may come from elsewhere).
    """
    folders: set[Path] = set()
    for source in data_sources(cfg):
        try:
            root, centres = resolve_centres(source.root, source.centres or None, "skip", [])
        except DataError:
            continue
        if cfg.sources and cfg.centres:
            centres = [c for c in centres if c in set(cfg.centres)]
        folders |= {(root / c).resolve() for c in centres}
    return folders


def class_names(cfg: DataConfig) -> str:
    """The class noun(s) of the config's prompts, for reports: the override, else each task's."""
    if cfg.class_name:
        return cfg.class_name
    return ", ".join(dict.fromkeys(source.task.class_name for source in data_sources(cfg)))
