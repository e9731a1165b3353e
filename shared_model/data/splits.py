"""Train/val/test splits per centre, split files, and the datasets of a :class:`DataConfig`.

Splits are stratified by centre: each centre is split on its own, with its samples sorted by stem
and shuffled by a generator seeded from ``(seed, crc32(centre name))``. The result therefore does
not depend on the input order, nor on which other centres are present: the split of all centres
is the union of the per-centre splits, so centralised and federated runs see the same test images.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from shared_model.config import DataConfig
from shared_model.data.dataset import PolypDataset, evaluation_dataset
from shared_model.data.folder import DataError, Sample
from shared_model.data.sources import list_config_samples

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    if n_test + n_val >= n and n > 0:  # keep at least one training sample
        n_val = max(0, n - 1 - n_test)
        n_test = min(n_test, n - 1 - n_val)
    return n_val, n_test


def split_samples(
    samples: Sequence[Sample], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Sample]]:
    """Split samples into train/val/test, per centre, deterministically.

    Per centre with n samples, ``round(test_fraction * n)`` go to test and
    ``round(val_fraction * n)`` to val (reduced if needed so that at least one remains for
    training); the rest train. Each list is sorted by (centre, stem).

    Raises:
        ValueError: Fractions outside [0, 1) or summing to 1 or more, or duplicate samples.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"data.{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"data.val_fraction + data.test_fraction must be < 1, got "
                         f"{val_fraction} + {test_fraction}")
    by_centre: dict[str, list[Sample]] = {}
    for sample in samples:
        by_centre.setdefault(sample.centre, []).append(sample)
    out: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for centre, group in by_centre.items():
        group = sorted(group, key=lambda s: s.stem)
        stems = [s.stem for s in group]
        if len(set(stems)) != len(stems):
            raise ValueError(f"duplicate samples in centre {centre!r}")
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(centre.encode())])
        order = rng.permutation(len(group))
        n_val, n_test = _split_counts(len(group), val_fraction, test_fraction)
        out["test"] += [group[i] for i in order[:n_test]]
        out["val"] += [group[i] for i in order[n_test:n_test + n_val]]
        out["train"] += [group[i] for i in order[n_test + n_val:]]
    for name in SPLITS:
        out[name].sort(key=lambda s: (s.centre, s.stem))
    return out


def save_split_file(path: str | Path, splits: dict[str, list[Sample]]) -> None:
    """Write ``{"train": ["centre/stem", ...], "val": [...], "test": [...]}`` as JSON."""
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split name(s) {sorted(unknown)}; expected {SPLITS}")
    data = {name: [s.key for s in splits.get(name, [])] for name in SPLITS}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def load_split_file(path: str | Path, samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    """Read a split file written by :func:`save_split_file` and resolve it against ``samples``.

    Samples not named in the file are left out (logged); a split missing from the file is empty.

    Raises:
        DataError: Missing or malformed file, an unknown split name, an entry naming no sample of
            ``samples`` (the message names the entry and the file), or an entry listed twice.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(data, dict) or set(data) - set(SPLITS):
        raise DataError(f"{path}: expected a mapping with keys among {SPLITS}, got "
                        f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    by_key = {s.key: s for s in samples}
    seen: dict[str, str] = {}
    out: dict[str, list[Sample]] = {}
    for name in SPLITS:
        entries = data.get(name, [])
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise DataError(f"{path}: split {name!r} must be a list of 'centre/stem' strings")
        out[name] = []
        for entry in entries:
            if entry not in by_key:
                raise DataError(f"{path}: unknown sample {entry!r} in split {name!r} "
                                "(not found in the dataset)")
            if entry in seen:
                raise DataError(f"{path}: sample {entry!r} listed in both {seen[entry]!r} and {name!r}")
            seen[entry] = name
            out[name].append(by_key[entry])
    unused = len(by_key) - len(seen)
    if unused:
        log.info("%s: %d sample(s) of the dataset are in no split", path, unused)
    return out


def build_splits(cfg: DataConfig) -> tuple[dict[str, list[Sample]], list[str]]:
    """List the samples of ``cfg`` and split them.

    If ``cfg.split_file`` names an existing file it is loaded (restricted to the listed samples);
    if it names a missing file, the computed split is written there; if None, the split is
    computed from ``val_fraction``, ``test_fraction`` and ``split_seed``.

    Returns:
        ``(splits, skipped_reasons)`` from
        :func:`~shared_model.data.sources.list_config_samples` (root or sources, each with its task).
    """
    samples, skipped = list_config_samples(cfg)
    split_file = Path(cfg.split_file) if cfg.split_file else None
    if split_file is not None and split_file.exists():
        splits = load_split_file(split_file, samples)
    else:
        splits = split_samples(samples, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        if split_file is not None:
            save_split_file(split_file, splits)
            log.info("wrote split file %s", split_file)
    return splits, skipped


def build_datasets(
    cfg: DataConfig, image_size: int, seed: int = 0, cache: bool = True, resize: str = "letterbox"
) -> dict[str, PolypDataset]:
    """The train/val/test datasets of a data config (train augmented if ``cfg.augment``).

    The training set is prompted per ``cfg.prompt_mode``; val and test are scored sets
    (:func:`~shared_model.data.dataset.evaluation_dataset`, prompt ``cfg.eval_prompt``).

    Args:
        cfg: Data config; ``cfg.centres`` restricts to those centres (e.g. one client's).
        image_size: Side S of the square items.
        seed: Augmentation seed of the training set.
        cache: Keep decoded, resized arrays in memory.
        resize: ``"letterbox"`` or ``"squash"`` (the model's ``sam.input_resize``).

    Returns:
        ``{"train", "val", "test"}`` -> :class:`PolypDataset`; a split with no samples is omitted.
        Listing skips are in each dataset's ``skipped`` (train's also holds the listing's).
    """
    splits, skipped = build_splits(cfg)
    out: dict[str, PolypDataset] = {}
    for name in SPLITS:
        if not splits[name]:
            log.warning("data split %r is empty", name)
            continue
        if name == "train":
            out[name] = PolypDataset(
                splits[name], image_size, augment=cfg.augment, prompt_mode=cfg.prompt_mode,
                class_name=cfg.class_name, seed=seed, on_error=cfg.on_error, cache=cache, resize=resize,
            )
        else:
            out[name] = evaluation_dataset(splits[name], image_size, cfg.eval_prompt, cfg.class_name,
                                           cfg.on_error, cache, resize)
    if "train" in out:
        out["train"].skipped[:0] = skipped
    return out
