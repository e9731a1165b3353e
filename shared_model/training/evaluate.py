"""Evaluation (no Flower imports): Dice, IoU, precision, recall and HD95 per image and aggregate,
and the same model scored under several text-prompt styles (:func:`evaluate_prompt_styles`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from shared_model.training.metrics import aggregate, binary_metrics, segmentation_metrics
from shared_model.modeling.boxes import box_agreement
from shared_model.modeling.prompt_sam import PromptSAM
from shared_model.training.loop import autocast_for, make_loader, resolve_device


RESOLUTIONS = ("model", "original")


@dataclass
class EvalResult:
    """Aggregate metrics (means, ``*_std``, ``n``) and one dict per image (with stem and centre).

    ``resolution`` says where the metrics were computed: ``"original"`` (each mask's own pixels;
    HD95 in image pixels) or ``"model"`` (the S x S model input).
    """

    aggregate: dict[str, float]
    per_image: list[dict] = field(default_factory=list)
    resolution: str = "model"

    def by_centre(self) -> dict[str, dict[str, float]]:
        """Aggregate metrics per centre (hospital) of the evaluated images."""
        groups: dict[str, list[dict]] = {}
        for row in self.per_image:
            groups.setdefault(row["centre"], []).append(
                {k: v for k, v in row.items() if k not in ("stem", "centre")}
            )
        return {centre: aggregate(rows) for centre, rows in sorted(groups.items())}


@torch.no_grad()
def evaluate_model(
    model: PromptSAM,
    dataset: Dataset,
    device: str | torch.device | None = "cpu",
    batch_size: int = 8,
    threshold: float = 0.5,
    prompt: str | Sequence[str] | None = None,
    progress: bool = False,
    amp: bool = True,
    desc: str = "evaluate",
    resolution: str = "model",
) -> EvalResult:
    """Segment every item of ``dataset`` and score it against its mask.

    Models whose box prompts are their own (from the saliency, or from the first-pass mask) also
    get, per image, ``box_iou``, ``box_hit`` and ``box_coverage``
    (:func:`~shared_model.modeling.boxes.box_agreement`).

    ``resolution="original"`` maps each predicted probability map back to its image's own size
    (padding cropped, bilinear resize; :meth:`Frame.to_image`) and scores it against the mask
    decoded at full resolution: the figures a clinician reads (test reports). ``"model"`` scores
    the S x S prediction against the resized mask (cheaper; used for validation during training).

    Args:
        model: The model (put in eval mode here).
        dataset: Items ``{"image", "mask", "text", "stem", "centre"}``.
        device: Device (``"auto"`` picks CUDA when present).
        batch_size: Images per forward pass.
        threshold: Probability threshold of the predicted mask.
        prompt: Override every item's text with this prompt (e.g. the class name only).
        progress: Show a progress bar.
        amp: bf16 autocast on CUDA.
        desc: Label of the progress bar.
        resolution: ``"model"`` or ``"original"`` (needs a dataset with ``frame(i)`` and
            ``original_mask(i)``, e.g. :class:`~shared_model.data.dataset.PolypDataset`).

    Returns:
        :class:`EvalResult`.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    _check_resolution(resolution, dataset)
    device = resolve_device(device)
    was_training = model.training
    model.to(device).eval()
    per_image: list[dict] = []
    scores: list[dict] = []
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0)
    start = 0  # index of the batch's first item (the loader keeps the dataset's order)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = batch["image"].to(device)
        texts = list(batch["text"])
        if prompt is not None:
            texts = [prompt] * len(texts) if isinstance(prompt, str) else list(prompt)[: len(texts)]
        masks = batch["mask"].to(device)
        with autocast_for(device, amp):
            out = model(images, texts, **model.oracle_prompts(masks))
        prob = torch.sigmoid(out.mask_logits.float()).cpu()  # B x 1 x S x S
        if resolution == "original":
            rows = [_score_original(dataset, start + j, prob[j], threshold) for j in range(len(texts))]
        else:
            rows = segmentation_metrics(prob > threshold, batch["mask"] > 0.5)
        if model.uses_saliency_boxes or model.uses_mask_boxes:  # do the model's own boxes find the target?
            rows = [{**row, **agree} for row, agree in
                    zip(rows, box_agreement(out.boxes.cpu(), out.box_valid.cpu(), batch["mask"]))]
        start += len(texts)
        scores += rows
        for i, row in enumerate(rows):
            per_image.append({"stem": batch["stem"][i], "centre": batch["centre"][i], **row})
    model.train(was_training)
    return EvalResult(aggregate=aggregate(scores), per_image=per_image, resolution=resolution)


def _check_resolution(resolution: str, dataset: Dataset) -> None:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {list(RESOLUTIONS)}, got {resolution!r}")
    if resolution == "original" and not (hasattr(dataset, "frame") and hasattr(dataset, "original_mask")):
        raise ValueError(f"resolution='original' needs a dataset with frame() and original_mask() "
                         f"(e.g. PolypDataset), got {type(dataset).__name__}")


def _score_original(dataset: Dataset, index: int, values: torch.Tensor, threshold: float) -> dict[str, float]:
    """Metrics of one 1 x S x S map (probability, or a 0/1 mask) at the item's own resolution."""
    pred = dataset.frame(index).to_image(values)[0] > threshold  # H x W
    return binary_metrics(pred.numpy(), dataset.original_mask(index))


BASELINE_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def fit_constant_mask(train: Dataset, thresholds: Sequence[float] = BASELINE_THRESHOLDS) -> dict:
    """The best constant predictor of a training set: its mean mask, thresholded.

    The threshold is the one of ``thresholds`` with the best mean Dice on ``train`` itself.

    Returns:
        ``{"mask": 1 x S x S bool tensor, "threshold": t, "train_dice": ..., "train_images": n}``
        (storable in a checkpoint's ``extra``).
    """
    masks = torch.stack([train[i]["mask"] for i in range(len(train))]) > 0.5  # N x 1 x S x S
    mean = masks.float().mean(0)
    best_t, best_dice = thresholds[0], -1.0
    for t in thresholds:
        pred = (mean > t).expand_as(masks)
        dice = aggregate(segmentation_metrics(pred, masks))["dice"]
        if dice > best_dice:
            best_t, best_dice = t, dice
    return {"mask": mean > best_t, "threshold": best_t, "train_dice": best_dice, "train_images": len(train)}


def score_constant_mask(mask: torch.Tensor, dataset: Dataset, chunk: int = 32,
                        resolution: str = "model") -> EvalResult:
    """Score the same mask (1 x S x S bool, resized to the items' size if needed) on every item.

    With ``resolution="original"`` the mask is placed on each image like a prediction (its
    padding cropped, resized to the image's own size) and scored against the full-size mask.
    """
    _check_resolution(resolution, dataset)
    per_image: list[dict] = []
    if resolution == "original":
        const = mask.to(torch.bool).float()
        if const.shape[-1] != dataset.image_size:
            const = F.interpolate(const[None], size=(dataset.image_size,) * 2, mode="nearest")[0]
        for index in range(len(dataset)):
            sample = dataset.samples[index]
            per_image.append({"stem": sample.stem, "centre": sample.centre,
                              **_score_original(dataset, index, const, 0.5)})
    for start in range(0, len(dataset) if resolution == "model" else 0, chunk):
        items = [dataset[i] for i in range(start, min(start + chunk, len(dataset)))]
        target = torch.stack([item["mask"] for item in items]) > 0.5  # B x 1 x S x S
        const = mask.to(torch.bool)
        if const.shape[-2:] != target.shape[-2:]:
            const = F.interpolate(const[None].float(), size=target.shape[-2:], mode="nearest")[0] > 0.5
        rows = segmentation_metrics(const.expand_as(target), target)
        per_image += [{"stem": item.get("stem", ""), "centre": item.get("centre", ""), **row}
                      for item, row in zip(items, rows)]
    scores = [{k: v for k, v in row.items() if k not in ("stem", "centre")} for row in per_image]
    return EvalResult(aggregate=aggregate(scores), per_image=per_image, resolution=resolution)


def constant_mask_baseline(train: Dataset, test: Dataset,
                           thresholds: Sequence[float] = BASELINE_THRESHOLDS,
                           resolution: str = "model") -> dict[str, float]:
    """The best constant predictor: the mean training mask, thresholded (see :func:`fit_constant_mask`).

    The threshold is chosen on the training set (by mean Dice), then the same mask is scored on
    ``test``. This is the bar a model must clear to have learned anything image-dependent.

    Returns:
        ``{"threshold": t, "train_dice": ..., **aggregate test metrics}``.
    """
    fit = fit_constant_mask(train, thresholds)
    return {"threshold": fit["threshold"], "train_dice": fit["train_dice"],
            **score_constant_mask(fit["mask"], test, resolution=resolution).aggregate}


# --------------------------------------------------------------------------------------------
# Prompt styles: does the text prompt change the segmentation?
# --------------------------------------------------------------------------------------------

CAPTION_STYLE = "attribute-caption"  # the ground-truth oracle (see evaluate_prompt_styles)
ORACLE_LABEL = "<oracle: each image's caption from its ground-truth mask>"
# Style name -> prompt template (``{class_name}`` is filled in), or None for each image's own caption.
PROMPT_STYLES: dict[str, str | None] = {
    "class-name": "{class_name}",
    CAPTION_STYLE: None,
    "generic": "a medical image",
    "wrong-organ": "a breast tumour in an ultrasound image",  # another task of the tiny foundation
    "empty": "",
}


def _caption_view(dataset: Dataset) -> Dataset:
    """``dataset`` with each image's attribute caption as its text (a shallow copy if needed)."""
    from shared_model.data.dataset import PolypDataset

    if isinstance(dataset, PolypDataset) and dataset.prompt_mode != "attributes":
        view = copy.copy(dataset)  # shares the decoded-image cache, not the caption cache
        view.prompt_mode = "attributes"
        view._captions = {}
        return view
    return dataset


def _class_view(dataset: Dataset) -> Dataset | None:
    """A view of a PolypDataset that mixes tasks with each item's class prompt as its text, else None."""
    from shared_model.data.dataset import PolypDataset

    if not isinstance(dataset, PolypDataset) or dataset.class_name is not None:
        return None
    view = copy.copy(dataset)
    view.prompt_mode = "class"
    return view


CLASS_PER_TASK_LABEL = "<each image's task class name>"


def evaluate_prompt_styles(
    model: PromptSAM,
    dataset: Dataset,
    styles: Sequence[str] | None = None,
    device: str | torch.device | None = "cpu",
    batch_size: int = 8,
    threshold: float = 0.5,
    class_name: str | None = None,
    progress: bool = False,
    amp: bool = True,
    resolution: str = "model",
) -> dict[str, dict[str, float | str | None]]:
    """Evaluate the same model and images once per prompt style (see :data:`PROMPT_STYLES`).

    Styles: ``class-name`` (the class name only, e.g. ``"polyp"``), ``attribute-caption`` (each
    image's own attribute caption, e.g. ``"one small pink round polyp, located in the left of the
    image"``, as :class:`~shared_model.data.folder.PolypDataset` produces it with
    ``prompt_mode="attributes"``), ``generic`` (``"a medical image"``), ``wrong-organ``
    (``"a breast tumour in an ultrasound image"``, another organ and modality) and ``empty`` (``""``).

    Note: attribute captions are computed from the ground-truth mask (size, shape, colour and
    location of each polyp), as in the training recipe, so the ``attribute-caption`` style is an
    oracle and its score optimistic: at deployment nobody knows the mask before segmenting (the
    default evaluation prompt is the class name; see
    :func:`shared_model.data.dataset.evaluation_dataset`). A PolypDataset in
    ``prompt_mode="class"`` is evaluated with captions all the same; any other dataset's own
    ``text`` is used as the caption.

    Args:
        model: The model.
        dataset: Items ``{"image", "mask", "text", "stem", "centre"}`` (not augmented).
        styles: Style names (default: all, in :data:`PROMPT_STYLES` order).
        device: Device (``"auto"``: CUDA when present).
        batch_size: Images per forward pass.
        threshold: Probability threshold of the predicted mask.
        class_name: Class noun of ``class-name`` (default: the dataset's ``class_name``; for a
            PolypDataset that mixes tasks, each item's own task class name; else ``"polyp"``).
        progress: Show a progress bar per style.
        amp: bf16 autocast on CUDA.
        resolution: Where metrics are computed (see :func:`evaluate_model`).

    Returns:
        Style -> the aggregate metrics of :func:`evaluate_model` (``dice``, ``iou``, ``hd95``, ...,
        ``n``) plus ``prompt`` (the text, or :data:`ORACLE_LABEL`),
        ``delta_dice_vs_caption`` (the style's mean Dice minus the caption style's) and
        ``mean_abs_image_delta_vs_caption`` (mean over images of the absolute per-image Dice
        change); both deltas are None when the caption style is not among ``styles``.

    Raises:
        ValueError: An unknown style name (the message names it and lists the valid ones).
    """
    styles = list(PROMPT_STYLES) if styles is None else list(styles)
    unknown = [s for s in styles if s not in PROMPT_STYLES]
    if unknown:
        raise ValueError(f"unknown prompt style(s) {unknown}; valid styles: {list(PROMPT_STYLES)}")
    if not styles:
        raise ValueError(f"no prompt styles given; valid styles: {list(PROMPT_STYLES)}")
    name = class_name or getattr(dataset, "class_name", None) or "polyp"
    kwargs = dict(device=device, batch_size=batch_size, threshold=threshold, progress=progress, amp=amp,
                  resolution=resolution)
    runs: dict[str, tuple[str, EvalResult]] = {}
    for style in dict.fromkeys(styles):  # unique, in the given order
        template = PROMPT_STYLES[style]
        kwargs["desc"] = f"evaluate [{style}]"
        if template is None:
            ev = evaluate_model(model, _caption_view(dataset), **kwargs)
            runs[style] = (ORACLE_LABEL, ev)
        elif style == "class-name" and class_name is None and (per_task := _class_view(dataset)) is not None:
            runs[style] = (CLASS_PER_TASK_LABEL, evaluate_model(model, per_task, **kwargs))
        else:
            prompt = template.format(class_name=name)
            runs[style] = (prompt, evaluate_model(model, dataset, prompt=prompt, **kwargs))
    reference = runs.get(CAPTION_STYLE, (None, None))[1]
    results: dict[str, dict[str, float | str | None]] = {}
    for style, (prompt, ev) in runs.items():
        row: dict = {"prompt": prompt, **ev.aggregate, "delta_dice_vs_caption": None,
                     "mean_abs_image_delta_vs_caption": None}
        if reference is not None:
            row["delta_dice_vs_caption"] = ev.aggregate["dice"] - reference.aggregate["dice"]
            pairs = list(zip(ev.per_image, reference.per_image))
            if all(a["stem"] == b["stem"] for a, b in pairs):
                changes = [abs(a["dice"] - b["dice"]) for a, b in pairs]
                row["mean_abs_image_delta_vs_caption"] = sum(changes) / len(changes)
        results[style] = row
    return results


def format_prompt_table(results: dict[str, dict[str, float | str | None]]) -> str:
    """Markdown table of :func:`evaluate_prompt_styles` results (one row per style)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    def signed(value: float | None) -> str:
        return "-" if value is None else f"{value:+.4f}"

    lines = [
        "| prompt style | prompt | Dice | IoU | HD95 (px) | n | Dice - caption Dice "
        "| mean abs per-image change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for style, r in results.items():
        prompt = r["prompt"] if r["prompt"].startswith("<") else f'"{r["prompt"]}"'
        change = r.get("mean_abs_image_delta_vs_caption")
        lines.append(
            f"| {cell(style)} | {cell(prompt)} | {r['dice']:.4f} | {r['iou']:.4f} | {r['hd95']:.2f} | "
            f"{int(r['n'])} | {signed(r.get('delta_dice_vs_caption'))} | "
            f"{'-' if change is None else f'{change:.4f}'} |"
        )
    return "\n".join(lines)
