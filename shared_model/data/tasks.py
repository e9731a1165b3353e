"""Segmentation tasks: what a dataset's masks mark, in which kind of image, and how to say it.

A :class:`Task` names the target class (``"polyp"``, ``"breast tumour"``, ``"retinal blood
vessels"``), the imaging modality, and the caption rules its attribute captions follow:

* ``"polyp"``: :func:`~shared_model.data.captions.attribute_caption` exactly as before tasks
  existed (size, colour red/pink/white, shape, location; ``"... of the image"``), so polyp
  captions, prompts and the models trained on them are unchanged;
* ``"objects"``: :func:`~shared_model.data.captions.object_caption`: size, brightness against
  the surroundings (``dark``/``bright``), shape, location, and the modality's image noun
  (``"... of an ultrasound image"``); the default of user-defined tasks;
* ``"network"``: :func:`~shared_model.data.captions.network_caption`: thin branching structures
  described by density and thickness, never as round objects.

The class prompt of every task is its class name (the learned context vectors are prepended by the
model), as the polyp prompt ``"polyp"`` has always been; :meth:`Task.phrase` gives the longer
``"a breast tumour in an ultrasound image"`` for uses that want the modality in words.

Built-in tasks are in :data:`TASKS`; a data config adds its own (``data.tasks``) through
:func:`task_registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from shared_model.data.captions import attribute_caption, class_prompt, network_caption, object_caption

CAPTION_STYLES = ("polyp", "objects", "network")


@dataclass(frozen=True)
class Task:
    """What one dataset's masks mark.

    Attributes:
        name: Identifier used in configs (``"breast-tumour"``).
        class_name: Noun of one target, or of the structures for ``network`` (``"breast tumour"``,
            ``"retinal blood vessels"``).
        modality: The imaging modality (``"ultrasound"``).
        image_noun: The image with its article (``"an ultrasound image"``).
        caption_style: One of :data:`CAPTION_STYLES` (see the module docstring).
    """

    name: str
    class_name: str
    modality: str
    image_noun: str
    caption_style: str = "objects"

    def __post_init__(self) -> None:
        for field_name in ("name", "class_name", "modality", "image_noun"):
            if not str(getattr(self, field_name)).strip():
                raise ValueError(f"task {self.name!r}: {field_name} must be a non-empty string")
        if self.caption_style not in CAPTION_STYLES:
            raise ValueError(f"task {self.name!r}: caption_style {self.caption_style!r} not in "
                             f"{list(CAPTION_STYLES)}")

    def class_prompt(self, class_name: str | None = None) -> str:
        """The class-only prompt: ``class_name`` (an override) or the task's class name."""
        return class_prompt(class_name or self.class_name)

    def phrase(self) -> str:
        """The class in its modality, e.g. ``"a polyp in a colonoscopy image"``."""
        article = "" if self.caption_style == "network" else _article(self.class_name) + " "
        return f"{article}{self.class_name} in {self.image_noun}"

    def caption(self, mask: np.ndarray, image: np.ndarray, class_name: str | None = None) -> str:
        """The attribute caption of ``mask`` (H x W bool) on ``image`` (H x W x 3 uint8 RGB).

        Args:
            mask: H x W bool, the target.
            image: H x W x 3 uint8 RGB.
            class_name: Overrides the task's class name in the words.
        """
        name = class_name or self.class_name
        if self.caption_style == "polyp":
            return attribute_caption(mask, image, name)
        if self.caption_style == "network":
            return network_caption(mask, name, self.image_noun)
        return object_caption(mask, image, name, self.image_noun)


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def image_noun_of(modality: str) -> str:
    """``"an ultrasound image"`` for ``"ultrasound"``: the default image noun of a modality."""
    modality = modality.strip()
    return f"{_article(modality)} {modality} image"


POLYP = Task("polyp", "polyp", "colonoscopy", "a colonoscopy image", "polyp")
BREAST_TUMOUR = Task("breast-tumour", "breast tumour", "ultrasound", "an ultrasound image", "objects")
RETINAL_VESSELS = Task("retinal-vessels", "retinal blood vessels", "fundus photograph", "a fundus photograph",
                       "network")

TASKS: Mapping[str, Task] = {task.name: task for task in (POLYP, BREAST_TUMOUR, RETINAL_VESSELS)}


def user_task(name: str, class_name: str, modality: str, image_noun: str = "",
              caption_style: str = "objects") -> Task:
    """A task defined in a config: ``image_noun`` defaults to ``"a/an <modality> image"``."""
    return Task(name.strip(), class_name.strip(), modality.strip(),
                image_noun.strip() or image_noun_of(modality), caption_style)


def task_registry(extra: Iterable[Task] = ()) -> dict[str, Task]:
    """The built-in :data:`TASKS` plus ``extra`` tasks.

    Raises:
        ValueError: An extra task reuses a built-in or another extra task's name.
    """
    registry = dict(TASKS)
    for task in extra:
        if task.name in registry:
            raise ValueError(f"task name {task.name!r} is already taken; taken: {sorted(registry)}")
        registry[task.name] = task
    return registry


def get_task(name: str, registry: Mapping[str, Task] | None = None) -> Task:
    """The task called ``name``. Raises ValueError listing the valid names."""
    registry = TASKS if registry is None else registry
    if name not in registry:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(registry)}")
    return registry[name]
