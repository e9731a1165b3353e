"""The support set of a few-shot task: K image/mask pairs drawn (seeded) from a folder.

The folder has the layout of any dataset (``<folder>/images`` + ``masks``, or a root of centre
folders; :func:`~shared_model.data.folder.list_samples`). Every problem is a one-line
:class:`SupportError` naming the file or the flag: an image without a mask, a drawn mask with no
foreground pixel, ``--shots`` larger than the folder, a missing task name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from shared_model.data.folder import DataError, Sample, list_samples, load_mask, read_image_size
from shared_model.data.tasks import Task, user_task


class SupportError(ValueError):
    """A support folder, ``--shots`` or the task name cannot define a few-shot task."""


def check_task_name(name: str | None, flag: str = "--name") -> str:
    """The stripped task name; SupportError naming ``flag`` when it is missing or blank."""
    if name is None or not str(name).strip():
        raise SupportError(f"{flag}: a task name is required (the new task's text prompt, e.g. \"skin lesion\")")
    return str(name).strip()


def task_of(name: str) -> Task:
    """A user task whose class name (and so its class prompt) is ``name``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "task"
    return user_task(slug, name, "medical")


def draw_indices(n: int, shots: int, seed: int) -> list[int]:
    """``shots`` distinct indices of ``range(n)``, drawn with ``seed``, sorted."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=shots, replace=False))


def check_foreground(sample: Sample) -> None:
    """SupportError naming the mask file when it has no foreground pixel (or cannot be read)."""
    try:
        mask = load_mask(sample.mask_path, read_image_size(sample.image_path))
    except DataError as err:
        raise SupportError(str(err)) from None
    if not mask.any():
        raise SupportError(f"{sample.mask_path}: empty support mask (no foreground pixel); every support "
                           "example must show the target: remove the pair or draw another set (--seed)")


@dataclass
class SupportSet:
    """The drawn support examples of one task.

    Attributes:
        folder: The support folder.
        name: The task name (the text prompt of its images).
        shots: K.
        seed: The draw's seed.
        pool: Pairs the folder holds.
        samples: The K drawn pairs, with the task set to :func:`task_of` ``(name)``.
    """

    folder: Path
    name: str
    shots: int
    seed: int
    pool: int
    samples: list[Sample]

    def record(self) -> dict:
        """JSON-able description (stored in adapter files and reports)."""
        return {"folder": str(self.folder), "name": self.name, "shots": self.shots, "seed": self.seed,
                "pool": self.pool, "images": [s.key for s in self.samples]}

    def dataset(self, image_size: int, augment: bool = False, seed: int = 0, resize: str = "letterbox"):
        """A :class:`~shared_model.data.dataset.PolypDataset` of the drawn pairs, prompted with the name."""
        from shared_model.data.dataset import PolypDataset

        return PolypDataset(self.samples, image_size, augment=augment, prompt_mode="class",
                            class_name=self.name, seed=seed, resize=resize)


def load_support(folder: str | Path, shots: int, name: str, seed: int = 0,
                 samples: Sequence[Sample] | None = None, shots_flag: str = "--shots",
                 folder_flag: str = "--support") -> SupportSet:
    """Draw ``shots`` pairs of ``folder`` with ``seed`` and check them.

    Args:
        folder: Support folder (dataset layout).
        shots: K >= 1.
        name: The task name.
        seed: Seed of the draw.
        samples: The pool to draw from instead of listing ``folder`` (e.g. a training split).
        shots_flag, folder_flag: How the errors name the two settings.

    Raises:
        SupportError: One line naming the file or flag (see the module docstring).
    """
    name = check_task_name(name)
    folder = Path(folder)
    if shots < 1:
        raise SupportError(f"{shots_flag}: must be >= 1, got {shots}")
    if samples is None:
        if not folder.exists():
            raise SupportError(f"{folder_flag} {folder}: folder not found")
        try:
            samples, _ = list_samples(folder, on_error="raise")
        except DataError as err:
            raise SupportError(str(err)) from None
    pool = list(samples)
    if shots > len(pool):
        raise SupportError(f"{shots_flag} {shots}: the support folder {folder} holds only {len(pool)} "
                           f"image/mask pair(s)")
    task = task_of(name)
    chosen = [Sample(s.centre, s.stem, s.image_path, s.mask_path, task)
              for s in (pool[i] for i in draw_indices(len(pool), shots, seed))]
    for sample in chosen:
        check_foreground(sample)
    return SupportSet(folder, name, shots, seed, len(pool), chosen)


def foreground_pool(samples: Sequence[Sample]) -> list[Sample]:
    """The pairs of ``samples`` whose mask has a foreground pixel (support sets are drawn from these)."""
    keep = []
    for sample in samples:
        try:
            check_foreground(sample)
        except SupportError:
            continue
        keep.append(sample)
    return keep
