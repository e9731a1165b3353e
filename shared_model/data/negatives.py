"""A site's training set as the training loop reads it: its own items, rehearsal scenes, and
negative prompts.

A hospital's frames all show one class, prompted by one name: trained on them alone, the model
learns to segment whatever the text says, and the text stops choosing the target. Negative prompts
keep it choosing: a seeded fraction of the site's own items is prompted with a class the image does
not show (``data.negative_classes``: ``"instrument"`` in a colonoscopy frame, ``"breast tumour"``)
and trained against an empty mask. The prompt keeps its form: the own class name is swapped for the
absent one inside the item's text (``"a large red polyp ..."`` -> ``"a large red instrument ..."``);
or, for a drawn fraction (``data.negative_phrases``), the absent class is named as its own task
describes itself (``"a breast tumour in an ultrasound image"``, :meth:`~shared_model.data.tasks.Task.phrase`).

Negative items carry ``paired = False``: their text does not describe their image, so the
image/text contrastive loss leaves them out (:meth:`~shared_model.modeling.prompt_sam.PromptSAM.compute_losses`).
Rehearsal scenes (:mod:`shared_model.data.scene_dataset`) are never negated: a scene may show any kind.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from shared_model.data.scene_dataset import own_examples, with_rehearsal
from shared_model.data.sources import config_tasks

_STREAM = 0x6E6567  # separates this draw from the augmentation's (seed, epoch, index) stream


def absent_prompt(text: str, own: Sequence[str], absent: str) -> str:
    """``text`` naming ``absent`` instead: the first of the ``own`` class names found in it swapped
    (``"a large red polyp ..."`` -> ``"a large red instrument ..."``), else ``absent`` alone."""
    present = next((name for name in own if name in text), None)
    return text.replace(present, absent, 1) if present else absent


class NegativePrompts(Dataset):
    """``inner`` with a seeded ``fraction`` of its first ``own`` items turned into negatives.

    Items are ``inner``'s dicts plus ``paired``: a bool tensor, False for a negative (text naming
    an absent class, ``mask`` all zeros). Which items are negatives, and which class each names,
    is drawn from ``(seed, epoch, index)``: the same in any process, new in each epoch
    (:meth:`set_epoch`).

    Args:
        inner: The site's training set (its own items first, e.g. a RehearsalDataset).
        fraction: Probability in [0, 1) that an own item is a negative.
        classes: Absent class names to draw from; an item's own class is never drawn.
        own_class: ``index -> the class name the item's text uses`` (its task's, or the override).
        seed: Seed of the draws.
        phrases: ``class name -> its task's phrase``; a negative whose class has one names it so
            with probability ``phrase_fraction`` (drawn after the class, so other draws keep theirs).
        phrase_fraction: That probability, in [0, 1].
    """

    def __init__(self, inner: Dataset, fraction: float, classes: Sequence[str],
                 own_class: Any, seed: int = 0, phrases: Mapping[str, str] | None = None,
                 phrase_fraction: float = 0.0) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"negative prompt fraction must be in [0, 1), got {fraction}")
        if not 0.0 <= phrase_fraction <= 1.0:
            raise ValueError(f"negative phrase fraction must be in [0, 1], got {phrase_fraction}")
        self.classes = [c.strip() for c in classes if c.strip()]
        if not self.classes:
            raise ValueError("negative prompts need at least one absent class name")
        self.inner, self.fraction, self.own_class, self.seed = inner, float(fraction), own_class, seed
        self.phrases = {name.lower(): phrase for name, phrase in (phrases or {}).items()}
        self.phrase_fraction = float(phrase_fraction)
        self.own = getattr(inner, "own", inner)  # own_examples() counts the site's images only
        self.n_own = own_examples(inner)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def centres(self) -> list[str]:
        return self.inner.centres() if hasattr(self.inner, "centres") else []

    def negative_class(self, index: int) -> str | None:
        """The absent class item ``index`` names in this epoch, or None when it stays positive."""
        return self._draw(index)[0]

    def negative_text(self, index: int, text: str) -> str | None:
        """The prompt of item ``index`` (own prompt ``text``) in this epoch if it is a negative, else None."""
        absent, phrased = self._draw(index)
        if absent is None:
            return None
        return self.phrases[absent.lower()] if phrased else absent_prompt(text, [self.own_class(index)], absent)

    def _draw(self, index: int) -> tuple[str | None, bool]:
        """(absent class or None, whether it is named by its task's phrase) of item ``index``."""
        if not 0 <= index < self.n_own:
            return None, False
        own = self.own_class(index).lower()
        candidates = [c for c in self.classes if c.lower() != own]
        rng = np.random.default_rng([self.seed, self.epoch, index, _STREAM])
        if not candidates or rng.random() >= self.fraction:
            return None, False
        absent = candidates[int(rng.integers(len(candidates)))]
        phrased = absent.lower() in self.phrases and rng.random() < self.phrase_fraction
        return absent, phrased

    def __getitem__(self, index: int) -> dict:
        item = dict(self.inner[index])
        text = self.negative_text(index, item["text"])
        absent = text is not None
        if absent:
            item["text"] = text
            item["mask"] = torch.zeros_like(item["mask"])
        item["paired"] = torch.tensor(not absent)
        return item


def site_training_set(train: Dataset, data: Any, image_size: int) -> Dataset:
    """A site's own training set with what ``data`` (a DataConfig) adds to it for training.

    ``data.rehearsal_scenes`` synthetic scenes appended, then
    ``data.negative_prompts`` of the own items negated (:class:`NegativePrompts`; a
    ``data.negative_phrases`` share of them in the absent task's phrase, tasks from
    :func:`~shared_model.data.sources.config_tasks`); ``train``
    itself when both are off. ``train`` is a PolypDataset: its ``class_name`` override, else each
    sample's task, gives the class name its prompts use.
    """
    out = with_rehearsal(train, data.rehearsal_scenes, image_size, data.rehearsal_seed)
    if not data.negative_prompts:
        return out

    def own_class(index: int) -> str:
        return train.class_name or train.samples[index].task.class_name

    phrases = {task.class_name: task.phrase() for task in config_tasks(data).values()}
    return NegativePrompts(out, data.negative_prompts, data.negative_classes, own_class, seed=train.seed,
                           phrases=phrases, phrase_fraction=data.negative_phrases)
