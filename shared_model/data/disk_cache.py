"""A disk cache of a dataset's validation, keyed by the manifest of the files it reads.

A deployed hospital's ClientApp is a fresh process every round, and building its datasets reads
every image header and decodes every mask at full resolution to check it (about 10 s for the 1,000
Kvasir-SEG pairs on the shared 2-core machine) before a single training step. What that check
finds (the pairs kept, each image's size, each mask resized to the model's input, the reasons
of the pairs skipped) depends only on the files and on the settings that shape it, so it is
stored once under ``<cache_dir>/<key>/`` and read back in later rounds.

The key is a SHA-256 of a format version, the settings (input size, resize mode, error mode)
and, for every pair in order, both paths with their size in bytes and modification time in
nanoseconds: adding, removing, renaming, rewriting or touching any file of the data folder
gives a new key, so a stale entry is never used (it is pruned when more than :data:`KEEP`
entries exist). Entries are written to a temporary folder and renamed into place, so a crash
or two processes filling the same key leave either no entry or a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from shared_model.data.dataset import PolypDataset

VERSION = 1
KEEP = 16  # entries kept per cache folder (the most recently used)


def default_cache_dir() -> Path:
    """``$PROMPTSAM_CACHE/data``, else ``$XDG_CACHE_HOME/promptsam/data``, else ``~/.cache/promptsam/data``."""
    if os.environ.get("PROMPTSAM_CACHE"):
        return Path(os.environ["PROMPTSAM_CACHE"]) / "data"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "promptsam" / "data"


def manifest_key(dataset: "PolypDataset") -> str:
    """SHA-256 over the settings and every pair's paths, sizes and modification times.

    Raises:
        OSError: If a file cannot be stat'ed (the caller then validates without the cache).
    """
    digest = hashlib.sha256(json.dumps([VERSION, dataset.image_size, dataset.resize, dataset.on_error]).encode())
    for sample in dataset.samples:
        for path in (sample.image_path, sample.mask_path):
            st = os.stat(path)
            digest.update(f"{os.fspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read(entry: Path) -> dict:
    meta = json.loads((entry / "meta.json").read_text())
    return {"kept": meta["kept"], "skipped": meta["skipped"], "sizes": np.load(entry / "sizes.npy"),
            "masks": np.load(entry / "masks.npy")}


def _write(cache_dir: Path, key: str, state: dict) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=cache_dir))
    try:
        np.save(tmp / "sizes.npy", state["sizes"])
        np.save(tmp / "masks.npy", state["masks"])
        (tmp / "meta.json").write_text(json.dumps({"kept": state["kept"], "skipped": state["skipped"]}))
        os.rename(tmp, cache_dir / key)  # atomic; fails if another process put the entry first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def prune(cache_dir: Path, keep: int = KEEP) -> None:
    """Delete all but the ``keep`` most recently used entries."""
    entries = sorted((p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def validate_cached(dataset: "PolypDataset", cache_dir: str | Path) -> bool:
    """Validate ``dataset`` (built with ``validate=False, cache=True``) from the cache, or validate
    it and fill the cache.

    Returns:
        True when the validation came from the cache.
    """
    cache_dir = Path(cache_dir)
    try:
        key = manifest_key(dataset)
    except OSError:
        dataset.validate()  # a file went missing: validation reports it as it always does
        return False
    entry = cache_dir / key
    if (entry / "meta.json").is_file():
        try:
            state = _read(entry)
        except (OSError, ValueError, KeyError):
            state = None
        if state is not None and state["masks"].shape[1:] == (dataset.image_size, dataset.image_size):
            dataset.restore_validation(state)
            os.utime(entry)  # most recently used
            return True
    dataset.validate()
    _write(cache_dir, key, dataset.validation_state())
    prune(cache_dir)
    return False
