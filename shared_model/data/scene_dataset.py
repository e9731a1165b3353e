"""Synthetic scenes (:mod:`shared_model.data.scenes`) as a dataset of (image, text, target mask)
items, and as files: ``OUT/images``, ``OUT/masks`` (all targets), ``OUT/targets`` (one mask per
target) and ``OUT/prompts.json`` (which text names which target)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from shared_model.data.scenes import Scene, synthetic_scene

SCENE_CENTRE = "scenes"
PROMPT_RULES = ("kind", "size", "colour", "location")


@dataclass(frozen=True)
class SceneItem:
    """One (frame, prompt) item: the text, its rule, the named target and another one of the frame."""

    frame: int
    text: str
    rule: str
    kind: str  # of the named target
    target: int
    distractor: int | None


def generate_scenes(n_frames: int, image_size: int = 128, seed: int = 0) -> list[Scene]:
    """Frames ``0 .. n_frames - 1``; frame ``i`` is drawn from ``np.random.default_rng([seed, i])``,
    so any frame can be drawn alone and a longer run starts with the same frames."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    return [synthetic_scene(np.random.default_rng([seed, i]), image_size) for i in range(n_frames)]


def scene_items(scenes: Sequence[Scene], rules: Sequence[str] = PROMPT_RULES) -> list[SceneItem]:
    """Every (frame, prompt) pair whose prompt rule is among ``rules``, in frame then prompt order."""
    unknown = sorted(set(rules) - set(PROMPT_RULES))
    if unknown:
        raise ValueError(f"unknown prompt rule(s) {unknown}; valid: {list(PROMPT_RULES)}")
    return [SceneItem(f, p.text, p.rule, scene.targets[p.target].kind, p.target, scene.distractor(j))
            for f, scene in enumerate(scenes) for j, p in enumerate(scene.prompts) if p.rule in rules]


class SceneDataset(Dataset):
    """Synthetic scenes where the text names one of several targets.

    Items are dicts like :class:`~shared_model.data.dataset.PolypDataset`'s, so the training loop
    takes them unchanged: ``image`` float32 3 x S x S in [0, 1]; ``mask`` float32 1 x S x S, the
    named target only; ``text`` the prompt (``"the large polyp"``, ``"the instrument"``, ...);
    ``stem`` ``"scene_<frame>_<item index>"`` (one per item); ``centre`` ``"scenes"``. Not augmented:
    flips would move the targets the location words name.

    :meth:`distractor_mask` gives another target of the same frame for an item, to score a model's
    output against the named target and against the other one.

    Args:
        n_frames: Frames to draw (:func:`generate_scenes`); each has several items.
        image_size: Side S.
        seed: Seed of the frames.
        rules: Keep only the prompts of these rules (default all, :data:`PROMPT_RULES`).
    """

    def __init__(self, n_frames: int, image_size: int = 128, seed: int = 0,
                 rules: Sequence[str] = PROMPT_RULES) -> None:
        scenes = generate_scenes(n_frames, image_size, seed)
        self.image_size = int(image_size)
        self.seed = seed
        self.class_name = None  # prompts name targets of several kinds
        self.items = scene_items(scenes, rules)
        if not self.items:
            raise ValueError(f"no prompt of rules {list(rules)} in {n_frames} frame(s)")
        self._images = [s.image for s in scenes]
        self._labels = [s.label_map() for s in scenes]
        self._captions = [s.caption() for s in scenes]

    def __len__(self) -> int:
        return len(self.items)

    def _target(self, frame: int, target: int) -> torch.Tensor:
        return torch.from_numpy(self._labels[frame] == target + 1)[None].float()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        item = self.items[index]
        image = torch.from_numpy(self._images[item.frame]).permute(2, 0, 1).float().div_(255.0)
        return {"image": image, "mask": self._target(item.frame, item.target), "text": item.text,
                "stem": f"scene_{item.frame:05d}_{index:06d}", "centre": SCENE_CENTRE}

    def frame_caption(self, index: int) -> str:
        """The caption of item ``index``'s whole frame (:meth:`~shared_model.data.scenes.Scene.caption`),
        naming every target: what CLIP pairs with the frame, where the item's prompt names one target."""
        return self._captions[self.items[index].frame]

    def distractor_mask(self, index: int) -> torch.Tensor | None:
        """1 x S x S float mask of another target of item ``index``'s frame (see
        :meth:`~shared_model.data.scenes.Scene.distractor`), or None when the frame has one target."""
        item = self.items[index]
        return None if item.distractor is None else self._target(item.frame, item.distractor)

    def centres(self) -> list[str]:
        """``["scenes"]`` (the interface of PolypDataset)."""
        return [SCENE_CENTRE]


def write_scenes(out: str | Path, n_frames: int, image_size: int = 128, seed: int = 0) -> Path:
    """Write scenes in the folder layout, plus the prompts.

    ``OUT/images/scene_<frame>.png``; ``OUT/masks/scene_<frame>.png`` the union of the targets
    (0/255: so OUT is one centre's folder that ``promptsam data check`` and the folder readers
    take); ``OUT/targets/scene_<frame>_<target>.png`` one mask per target; ``OUT/prompts.json``
    ``{"generator": {...}, "items": [{"stem", "text", "rule", "kind", "target", "distractor"}]}``
    (target masks as paths relative to OUT; distractor null when the frame has one target).

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    scenes = generate_scenes(n_frames, image_size, seed)
    for sub in ("images", "masks", "targets"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for f, scene in enumerate(scenes):
        stem = f"scene_{f:05d}"
        Image.fromarray(scene.image).save(out / "images" / f"{stem}.png", compress_level=1)
        Image.fromarray((scene.label_map() > 0).astype(np.uint8) * 255).save(out / "masks" / f"{stem}.png")
        for t, target in enumerate(scene.targets):
            Image.fromarray(target.mask.astype(np.uint8) * 255).save(out / "targets" / f"{stem}_{t}.png")

    def target_path(frame: int, target: int | None) -> str | None:
        return None if target is None else f"targets/scene_{frame:05d}_{target}.png"

    items = [{"stem": f"scene_{i.frame:05d}", "text": i.text, "rule": i.rule, "kind": i.kind,
              "target": target_path(i.frame, i.target), "distractor": target_path(i.frame, i.distractor)}
             for i in scene_items(scenes)]
    meta = {"generator": {"n_frames": n_frames, "image_size": image_size, "seed": seed}, "items": items}
    (out / "prompts.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


class RehearsalDataset(ConcatDataset):
    """A site's own training set followed by synthetic scenes (``data.rehearsal_scenes``).

    Scenes are public and generated at the site, so no image leaves a hospital; mixing them into
    the batches keeps the model answering the text (which target a prompt names) while it adapts
    to one class. ``own`` is the site's own set: its size is the site's example count (FedAvg's
    weight), its ``set_epoch`` draws new augmentations (scenes are never augmented).
    """

    def __init__(self, own: Dataset, scenes: SceneDataset) -> None:
        super().__init__([own, scenes])
        self.own, self.scenes = own, scenes

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.own, "set_epoch"):
            self.own.set_epoch(epoch)

    def centres(self) -> list[str]:
        own = self.own.centres() if hasattr(self.own, "centres") else []
        return [*own, SCENE_CENTRE]


def with_rehearsal(train: Dataset, frames: int, image_size: int, seed: int = 0) -> Dataset:
    """``train`` with ``frames`` synthetic scenes appended (:class:`RehearsalDataset`), or
    ``train`` itself when ``frames`` is 0."""
    if frames <= 0:
        return train
    return RehearsalDataset(train, SceneDataset(frames, image_size, seed))


def own_examples(train: Dataset) -> int:
    """The number of a site's own training items (rehearsal scenes not counted)."""
    return len(getattr(train, "own", train))
