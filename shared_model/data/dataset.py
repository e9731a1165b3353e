"""The training/evaluation dataset over folder samples: resized image/mask pairs with a text prompt.

Reading and validation rules are those of :mod:`shared_model.data.folder`; this module adds the
resizing, caching, seeded augmentation and the prompt per item.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from shared_model.config.site import EVAL_PROMPTS, PROMPT_MODES
from shared_model.data.folder import (
    CAPTION_MAX_SIZE,
    DataError,
    Sample,
    check_on_error,
    load_image,
    load_mask,
    read_image_size,
    report_problem,
    resize_mask,
)
from shared_model.data.geometry import Frame, check_resize
from shared_model.data.transforms import JointTransform, item_seed, single_thread

log = logging.getLogger(__name__)
_MIX_STREAM = 0x6D6978  # separates the mixed mode's draw from the augmentation's (seed, epoch, index) stream


class PolypDataset(Dataset):
    """Image/mask pairs placed in the model's square input, with a text prompt per item.

    Each image is placed by its :class:`~shared_model.data.geometry.Frame`: ``resize="letterbox"``
    (default) keeps the aspect ratio and pads, ``"squash"`` stretches to the square.
    :meth:`frame` and :meth:`original_mask` give what evaluation needs to score a prediction at
    the mask's own resolution.

    Items are dicts: ``image`` float32 3 x S x S in [0, 1]; ``mask`` float32 1 x S x S in {0, 1};
    ``text`` the caption (``prompt_mode="attributes"``: the caption of the sample's task
    (:meth:`~shared_model.data.tasks.Task.caption`; for polyps :func:`attribute_caption`) of the
    (augmented) mask and image, so the location words follow flips; ``"class"``: the class name;
    ``"mixed"``: either, drawn per item and epoch, :meth:`names_class`);
    ``stem`` and ``centre`` strings. Each sample's task (:attr:`Sample.task`) gives its class name
    and caption words, so one dataset can mix tasks; ``class_name`` overrides the noun for all.

    Augmentation (``augment=True``) is seeded per item from ``(seed, epoch, index)``: the same
    index in the same epoch gives the same result in any process or worker. Call
    :meth:`set_epoch` once per pass over the data to get fresh augmentations.

    With ``cache=True`` the decoded, resized uint8 arrays are kept in memory (4 x S^2 bytes per
    item: 65 KB at 128 px, 1 MB at 512 px), filled on first access or by :meth:`preload`.

    Sets that score a model are built by :func:`evaluation_dataset` (class prompt unless the
    ground-truth oracle is named; its ``eval_prompt`` attribute says which), never directly.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        augment: bool = False,
        prompt_mode: str = "attributes",
        class_name: str | None = None,
        seed: int = 0,
        on_error: str = "raise",
        cache: bool = True,
        validate: bool = True,
        resize: str = "letterbox",
    ) -> None:
        check_on_error(on_error)
        self.resize = check_resize(resize)
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.samples = list(samples)
        self.image_size = int(image_size)
        self.augment = augment
        self.prompt_mode = prompt_mode
        # The noun of every prompt: the override, else the samples' task's when they share one
        # (None when tasks are mixed: each item then names its own task's class).
        tasks = {s.task for s in self.samples}
        self.class_name = class_name or (tasks.pop().class_name if len(tasks) == 1 else None)
        self.seed = seed
        self.on_error = on_error
        self.cache = cache
        self.eval_prompt: str | None = None  # set by evaluation_dataset()
        self.epoch = 0
        self.skipped: list[str] = []
        self.transform = JointTransform() if augment else None
        self._images: dict[int, np.ndarray] = {}
        self._masks: dict[int, np.ndarray] = {}
        self._captions: dict[int, str] = {}
        self._bad: set[int] = set()
        self._sizes: dict[int, tuple[int, int]] = {}  # index -> (width, height)
        self._kept: list[int] = list(range(len(self.samples)))  # indices into the samples given
        if validate:
            self.validate()
        if not self.samples:
            raise DataError(f"no usable samples (skipped: {self.skipped})")

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream (the per-item seed includes ``epoch``)."""
        self.epoch = int(epoch)

    def validate(self) -> list[str]:
        """Check every pair (image header, mask decode/size/binary); drop or raise on failures.

        Returns:
            The reasons of the items skipped by this pass (also appended to :attr:`skipped`).
        """
        kept: list[Sample] = []
        self._kept = []
        masks: dict[int, np.ndarray] = {}
        sizes: dict[int, tuple[int, int]] = {}
        reasons: list[str] = []
        for position, sample in enumerate(self.samples):
            try:
                size = read_image_size(sample.image_path)
                mask = load_mask(sample.mask_path, size)
            except DataError as err:
                report_problem(str(err), self.on_error, reasons)
                continue
            if self.cache:
                masks[len(kept)] = resize_mask(mask, self.image_size, self.resize)
            sizes[len(kept)] = size
            self._kept.append(position)
            kept.append(sample)
        self.samples = kept
        self._masks, self._images, self._captions, self._bad = masks, {}, {}, set()
        self._sizes = sizes
        self.skipped.extend(reasons)
        return reasons

    def validation_state(self) -> dict:
        """What :meth:`validate` found (after it ran with ``cache=True``), for a disk cache:
        ``kept`` (indices into the samples given), ``sizes`` (N x 2 width, height), ``masks``
        (N x S x S bool, resized), ``skipped`` (reasons)."""
        n = len(self.samples)
        return {"kept": list(self._kept), "sizes": np.array([self._sizes[i] for i in range(n)], dtype=np.int64)
                .reshape(n, 2), "masks": np.stack([self._masks[i] for i in range(n)]) if n else
                np.zeros((0, self.image_size, self.image_size), dtype=bool), "skipped": list(self.skipped)}

    def restore_validation(self, state: dict) -> None:
        """Take :meth:`validation_state` of the same samples instead of running :meth:`validate`."""
        self.samples = [self.samples[i] for i in state["kept"]]
        self._kept = list(state["kept"])
        self._sizes = {i: (int(w), int(h)) for i, (w, h) in enumerate(state["sizes"])}
        self._masks = {i: np.asarray(m, dtype=bool) for i, m in enumerate(state["masks"])}
        self._images, self._captions, self._bad = {}, {}, set()
        self.skipped.extend(state["skipped"])
        if not self.samples:
            raise DataError(f"no usable samples (skipped: {self.skipped})")

    def preload(self, num_threads: int = 2) -> None:
        """Decode every item into the cache now (threads; PIL releases the GIL while decoding).

        Call before creating a DataLoader with workers so that they share the filled cache.
        """
        if not self.cache:
            raise ValueError("preload() needs cache=True")
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            list(pool.map(self._try_load, range(len(self))))

    def _try_load(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`_load`, but in skip mode a failure is recorded once and gives None."""
        try:
            return self._load(index)
        except DataError as err:
            if self.on_error == "raise":
                raise
            if index not in self._bad:
                self._bad.add(index)
                report_problem(str(err), "skip", self.skipped)
            return None

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Resized (uint8 S x S x 3 image, bool S x S mask) of item ``index``."""
        if index in self._images:
            return self._images[index], self._masks[index]
        sample = self.samples[index]
        mask = self._masks.get(index)
        if mask is None:
            mask = self.frame(index).mask(load_mask(sample.mask_path, self._image_size(index)))
        image = load_image(sample.image_path, self.image_size, self.resize)
        if self.cache:
            self._images[index], self._masks[index] = image, mask
        return image, mask

    def _image_size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of item ``index``'s image (header read once)."""
        if index not in self._sizes:
            self._sizes[index] = read_image_size(self.samples[index].image_path)
        return self._sizes[index]

    def frame(self, index: int) -> Frame:
        """How item ``index``'s image sits in the S x S input."""
        width, height = self._image_size(index)
        return Frame(height, width, self.image_size, self.resize)

    def original_mask(self, index: int) -> np.ndarray:
        """Item ``index``'s mask at its own resolution (H x W bool; decoded on each call)."""
        return load_mask(self.samples[index].mask_path, self._image_size(index))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        for offset in range(n):
            candidate = (index + offset) % n
            arrays = None if candidate in self._bad else self._try_load(candidate)
            if arrays is not None:
                with single_thread():
                    return self._item(candidate, *arrays)
        raise DataError(f"no loadable sample left (skipped: {self.skipped})")

    def _item(self, index: int, image_np: np.ndarray, mask_np: np.ndarray) -> dict:
        # Augment and caption the image's own part of the input; the padding is added back after,
        # so flips and rotations never move padding into the picture.
        h, w = self.frame(index).content
        # contiguous: v2 kernels are ~40x slower on the channels-last view.
        image = torch.from_numpy(image_np[:h, :w]).permute(2, 0, 1).contiguous()  # 3 x h x w uint8
        mask = torch.from_numpy(mask_np[:h, :w])[None].to(torch.uint8)  # 1 x h x w
        if self.transform is not None:
            image, mask = self.transform(image, mask, item_seed(self.seed, self.epoch, index))
        text = self._text(index, image, mask)
        if (h, w) != (self.image_size, self.image_size):
            pad = (0, self.image_size - w, 0, self.image_size - h)
            image, mask = torch.nn.functional.pad(image, pad), torch.nn.functional.pad(mask, pad)
        sample = self.samples[index]
        return {
            "image": image.float().div_(255.0),
            "mask": mask.float(),
            "text": text,
            "stem": sample.stem,
            "centre": sample.centre,
        }

    def _text(self, index: int, image: torch.Tensor, mask: torch.Tensor) -> str:
        """The item's prompt; captions describe the unpadded image (3 x h x w) and mask (1 x h x w)."""
        task = self.samples[index].task
        if self.prompt_mode == "class" or (self.prompt_mode == "mixed" and self.names_class(index)):
            return task.class_prompt(self.class_name)
        if self.transform is None and index in self._captions:
            return self._captions[index]
        step = -(-max(mask.shape[-2:]) // CAPTION_MAX_SIZE)  # words use fractions: subsample big items
        caption = task.caption(mask[0, ::step, ::step].numpy() > 0,
                               image[:, ::step, ::step].permute(1, 2, 0).numpy(), self.class_name)
        if self.transform is None and self.cache:
            self._captions[index] = caption
        return caption

    def names_class(self, index: int) -> bool:
        """Whether item ``index`` is prompted by its class name in this epoch (``prompt_mode="mixed"``:
        even odds, drawn from ``(seed, epoch, index)`` apart from the augmentation's draw)."""
        return bool(np.random.default_rng([self.seed, self.epoch, index, _MIX_STREAM]).random() < 0.5)

    def centres(self) -> list[str]:
        """Sorted distinct centres of the samples."""
        return sorted({s.centre for s in self.samples})


def evaluation_dataset(
    samples: Sequence[Sample],
    image_size: int,
    eval_prompt: str = "class",
    class_name: str | None = None,
    on_error: str = "raise",
    cache: bool = True,
    resize: str = "letterbox",
    validate: bool = True,
) -> PolypDataset:
    """The one rule for every dataset that is scored (evaluation, validation, test): not augmented,
    and prompted with the class name unless the ground-truth oracle is asked for by name.

    A new hospital has no mask before it segments, so the default prompt is the class prompt
    (e.g. ``"polyp"``); ``eval_prompt="oracle-caption"`` gives each image the attribute caption of
    its own ground-truth mask (optimistic: an upper bound, never a deployment figure). Training
    sets keep their ``prompt_mode``.

    Args:
        samples: The image/mask pairs to score.
        image_size: Side S of the square items.
        eval_prompt: One of :data:`~shared_model.config.site.EVAL_PROMPTS`.
        class_name: The class noun of the prompt; None: each sample's task's class name.
        on_error: ``"raise"`` or ``"skip"`` on unreadable pairs.
        cache: Keep decoded, resized arrays in memory.
        resize: ``"letterbox"`` or ``"squash"`` (see :class:`~shared_model.data.geometry.Frame`).
        validate: Check every pair now (False: the caller restores a cached validation).

    Returns:
        A :class:`PolypDataset` whose ``eval_prompt`` attribute names the prompt used.

    Raises:
        ValueError: ``eval_prompt`` is not one of :data:`~shared_model.config.site.EVAL_PROMPTS`.
    """
    if eval_prompt not in EVAL_PROMPTS:
        raise ValueError(f"eval_prompt must be one of {list(EVAL_PROMPTS)}, got {eval_prompt!r}")
    mode = "attributes" if eval_prompt == "oracle-caption" else "class"
    dataset = PolypDataset(samples, image_size, augment=False, prompt_mode=mode, class_name=class_name,
                           on_error=on_error, cache=cache, resize=resize, validate=validate)
    dataset.eval_prompt = eval_prompt
    return dataset
