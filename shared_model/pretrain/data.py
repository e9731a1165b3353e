"""The data of pretraining: public task folders (training splits only) and synthetic scenes, never
the federation's data, drawn per step from a generator seeded by ``(seed, step)``.

A step's batch depends on nothing but the config and the step index, so a resumed run draws the
same batches as an uninterrupted one without any data-loader state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared_model.config import ConfigError, DataConfig
from shared_model.config.experiment import PROJECT_ROOT
from shared_model.config.pretrain import PretrainConfig
from shared_model.data.dataset import PolypDataset
from shared_model.data.negatives import absent_prompt
from shared_model.data.scene_dataset import SCENE_CENTRE, SceneDataset
from shared_model.data.sources import data_sources
from shared_model.data.splits import build_splits

PROMPT_KINDS = ("box", "point", "text")
SCENE_KINDS = ("polyp", "instrument")  # what a scene may show: never named as absent in one
_NEGATIVE_STREAM = 0x6E6567  # negatives' own draw: the batches of a run without them stay as they were


@dataclass
class PretrainBatch:
    """One step's items and prompts.

    Attributes:
        images: B x 3 x S x S in [0, 1].
        masks: B x 1 x S x S in {0, 1}.
        kind: The prompt kind of the batch (one of :data:`PROMPT_KINDS`).
        texts: B text prompts (class name or caption of task items, the scene prompts).
        boxes: B x 1 x 4 jittered boxes (x0, y0, x1, y1, input pixels) when ``kind == "box"``.
        points: (B x 2 x 2 coordinates, B x 2 labels: 1 foreground, 0 background, -1 none) for ``"point"``.
        captions: Captions of the rows of ``clip_rows`` (the CLIP pairs).
        clip_rows: Indices of the items paired with their caption for the contrastive loss.
    """

    images: torch.Tensor
    masks: torch.Tensor
    kind: str
    texts: list[str]
    boxes: torch.Tensor | None
    points: tuple[torch.Tensor, torch.Tensor] | None
    captions: list[str]
    clip_rows: list[int]


def project_path(path: str) -> Path:
    """A config's path: absolute as given, relative ones against the project root (as experiments do)."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() else PROJECT_ROOT / p).resolve()


def resolved_data(cfg: DataConfig) -> DataConfig:
    """``cfg`` with its sources' roots made absolute by :func:`project_path`."""
    sources = [dataclasses.replace(s, root=str(project_path(s.root))) for s in cfg.sources]
    return dataclasses.replace(cfg, sources=sources)


def check_forbidden(cfg: PretrainConfig) -> None:
    """Refuse any task folder that is, lies in, or contains one of ``cfg.forbidden_roots``.

    Raises:
        ConfigError: Naming the source, its resolved folder and the forbidden root.
    """
    if not cfg.data.sources:
        return
    forbidden = [project_path(r) for r in cfg.forbidden_roots]
    for i, source in enumerate(data_sources(cfg.data)):
        root = project_path(source.root)
        folders = [root / c for c in source.centres] or [root]
        for folder in folders:
            folder = folder.resolve()
            for bad in forbidden:
                if folder == bad or bad in folder.parents or folder in bad.parents:
                    raise ConfigError(
                        f"data.sources[{i}].root: {source.root} ({folder}) overlaps the forbidden root {bad} "
                        "(forbidden_roots): the foundation is never trained on the federation's data")


class PretrainData:
    """The task folders' training splits and the scenes, and the batch of each step.

    Args:
        cfg: The pretraining config (checked against ``forbidden_roots`` here).
    """

    def __init__(self, cfg: PretrainConfig) -> None:
        check_forbidden(cfg)
        self.cfg = cfg
        t = cfg.pretrain
        size, resize = cfg.model.sam.image_size, cfg.model.sam.input_resize
        self.tasks: PolypDataset | None = None
        self.by_centre: dict[str, np.ndarray] = {}
        if cfg.data.sources and t.task_fraction > 0:
            splits, _ = build_splits(resolved_data(cfg.data))
            if not splits["train"]:
                raise ConfigError("data.sources: the training split is empty")
            self.tasks = PolypDataset(splits["train"], size, augment=cfg.data.augment, prompt_mode="attributes",
                                      seed=t.seed, on_error=cfg.data.on_error, resize=resize)
            centres = [s.centre for s in self.tasks.samples]
            self.by_centre = {c: np.flatnonzero(np.array(centres) == c) for c in sorted(set(centres))}
        self.scenes = (SceneDataset(cfg.scenes.frames, size, cfg.scenes.seed)
                       if cfg.scenes.frames and t.task_fraction < 1 else None)
        weights = np.array(t.prompt_weights, dtype=float)
        self.kind_p = weights / weights.sum()
        if self.by_centre:
            sizes = np.array([len(v) for v in self.by_centre.values()], dtype=float)
            self.centre_p = np.full(len(sizes), 1 / len(sizes)) if t.balance_centres else sizes / sizes.sum()

    def counts(self) -> dict[str, int]:
        """Training items per source: each task folder's, and ``scenes`` (frame, prompt) items."""
        out = {c: len(v) for c, v in self.by_centre.items()}
        if self.scenes is not None:
            out[SCENE_CENTRE] = len(self.scenes)
        return out

    def batch(self, step: int) -> PretrainBatch:
        """The batch of ``step``: items, prompt kind and prompts, from ``default_rng([seed, step])``."""
        t = self.cfg.pretrain
        rng = np.random.default_rng([t.seed, step])
        n_task = round(t.batch_size * t.task_fraction) if self.scenes is not None else t.batch_size
        items, captions, clip_rows, own = [], [], [], []
        if self.tasks is not None and n_task:
            self.tasks.set_epoch(step)
            centres = list(self.by_centre)
            for _ in range(n_task):
                pool = self.by_centre[centres[rng.choice(len(centres), p=self.centre_p)]]
                index = int(pool[rng.integers(len(pool))])
                item = self.tasks[index]
                caption = item["text"]
                class_prompt = self.tasks.samples[index].task.class_prompt()
                clip_rows.append(len(items))
                captions.append(caption)
                items.append((item, class_prompt if rng.random() < t.class_prompt_fraction else caption))
                own.append((self.tasks.samples[index].task.class_name,))
        for _ in range(t.batch_size - len(items)):
            index = int(rng.integers(len(self.scenes)))
            item = self.scenes[index]
            if t.clip_on_scenes:
                clip_rows.append(len(items))
                captions.append(self.scenes.frame_caption(index))
            items.append((item, item["text"]))
            own.append(SCENE_KINDS)
        images = torch.stack([it["image"] for it, _ in items])
        masks = torch.stack([it["mask"] for it, _ in items])
        texts = [text for _, text in items]
        kind = PROMPT_KINDS[int(rng.choice(len(PROMPT_KINDS), p=self.kind_p))]
        boxes = jittered_boxes(masks, t.box_jitter, rng) if kind == "box" else None
        points = sample_points(masks, t.negative_point, rng) if kind == "point" else None
        if kind == "text" and t.negative_prompts:
            masks = negate_prompts(texts, masks, own, t.negative_prompts, t.negative_classes,
                                   np.random.default_rng([t.seed, step, _NEGATIVE_STREAM]))
        return PretrainBatch(images, masks, kind, texts, boxes, points, captions, clip_rows)


def negate_prompts(texts: list[str], masks: torch.Tensor, own: list[tuple[str, ...]], fraction: float,
                   classes: list[str], rng: np.random.Generator) -> torch.Tensor:
    """Turn a ``fraction`` of a text batch's rows into negatives, in place for ``texts``.

    A negative row's prompt names a class its image does not show (the first own class name in
    the text swapped for it, else the bare class name) and its target is the empty mask. CLIP's
    pairs are the captions, not these prompts, and are left as they are.

    Args:
        texts: B prompts (changed in place).
        masks: B x 1 x S x S targets.
        own: Per row, the class names its image may show (never drawn as absent).
        fraction: Probability that a row is negated.
        classes: Class names to draw the absent one from.
        rng: The step's negatives generator.

    Returns:
        The masks with the negated rows zeroed (a new tensor when any row is negated).
    """
    out = masks
    for i, names in enumerate(own):
        lower = {n.lower() for n in names}
        candidates = [c for c in classes if c.strip() and c.lower() not in lower]
        if not candidates or rng.random() >= fraction:
            continue
        texts[i] = absent_prompt(texts[i], names, candidates[int(rng.integers(len(candidates)))])
        out = out.clone() if out is masks else out
        out[i] = 0
    return out


def jittered_boxes(masks: torch.Tensor, jitter: float, rng: np.random.Generator) -> torch.Tensor:
    """Each mask's enclosing box with every corner moved by up to ``jitter`` x the box side.

    Args:
        masks: B x 1 x S x S in {0, 1}.
        jitter: Fraction of the box's width (x) or height (y).
        rng: The step's generator.

    Returns:
        B x 1 x 4 float boxes (x0, y0, x1, y1) in [0, S], at least one pixel wide and high; an empty
        mask gives the whole image.
    """
    s = masks.shape[-1]
    boxes = np.zeros((masks.shape[0], 4))
    for i, mask in enumerate(masks[:, 0].numpy() > 0.5):
        ys, xs = np.nonzero(mask)
        if not len(ys):
            boxes[i] = (0, 0, s, s)
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        w, h = x1 - x0, y1 - y0
        dx0, dy0, dx1, dy1 = rng.uniform(-jitter, jitter, 4) * (w, h, w, h)
        x0, x1 = np.clip([x0 + dx0, x1 + dx1], 0, s)
        y0, y1 = np.clip([y0 + dy0, y1 + dy1], 0, s)
        boxes[i] = (min(x0, s - 1), min(y0, s - 1), max(x1, min(x0, s - 1) + 1), max(y1, min(y0, s - 1) + 1))
    return torch.from_numpy(boxes).float()[:, None]


def sample_points(masks: torch.Tensor, negative: float, rng: np.random.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A foreground click per mask, and with probability ``negative`` a background click.

    Args:
        masks: B x 1 x S x S in {0, 1}.
        negative: Probability of the background click.
        rng: The step's generator.

    Returns:
        (B x 2 x 2 pixel coordinates (x, y) of the clicked pixels (SAM adds the 0.5), B x 2 labels:
        1 foreground, 0 background, -1 no click); an empty mask (or a full one) gives -1 where no pixel of the kind exists.
    """
    b = masks.shape[0]
    coords = np.zeros((b, 2, 2), dtype=np.float32)
    labels = np.full((b, 2), -1, dtype=np.int64)
    for i, mask in enumerate(masks[:, 0].numpy() > 0.5):
        for j, (want, label) in enumerate(((mask, 1), (~mask, 0))):
            if j == 1 and rng.random() >= negative:
                continue
            ys, xs = np.nonzero(want)
            if len(ys):
                k = rng.integers(len(ys))
                coords[i, j], labels[i, j] = (xs[k], ys[k]), label
    return torch.from_numpy(coords), torch.from_numpy(labels)
