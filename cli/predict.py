"""``promptsam predict`` as a plain function: image files/folders -> masks, overlays, JSON and CSV.

:func:`predict_folder` writes, under the output folder:

* ``masks/<name>.png``: the binary mask (0/255) at the image's own size;
* ``masks/<name>.json``: that image's summary (boxes, area, components, score, confidence, ...,
  and ``dice`` / ``iou`` against its ground-truth mask when there is one);
* ``overlays/<name>.png``: the image with the saliency heatmap, mask contour, box prompts and the
  ground-truth contour (when known), above a legend band;
* ``predictions.json``: the index: checkpoint, preset, config fingerprint, prompt, threshold,
  device, one summary per image, and every skipped file with its reason;
* ``predictions.csv``: one row per predicted image (for a spreadsheet).

``<name>`` is the file's stem; when two inputs share a stem the later ones get their suffix
appended (``a.png``, ``a.jpg`` -> ``a``, ``a_jpg``). Unreadable images, files of other types found
in a folder and images whose user boxes do not fit them are skipped and listed, never silently.

Ground truth: ``--masks DIR`` (masks named by the images' stems, any image type), else, for a
folder input in the project's dataset layout, its ``masks/`` child or, for ``<centre>/images``,
the sibling ``<centre>/masks``. Masks follow :func:`~shared_model.data.folder.load_mask` (binary,
the image's size); an image without a usable mask gets ``dice: null`` and the reason.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from shared_model.checkpoint import config_fingerprint
from shared_model.data.folder import IMAGE_EXTENSIONS, DataError, load_mask
from shared_model.inference import check_device, overlay, predict_images
from shared_model.training.metrics import segmentation_metrics
from shared_model.modeling.prompt_sam import PromptSAM

class NoImagesError(FileNotFoundError):
    """The inputs exist but hold no image file (``promptsam predict`` exits with status 1)."""


CSV_COLUMNS = ("image", "width", "height", "area_pixels", "area_fraction", "components", "score",
               "confidence", "dice", "iou", "boxes", "mask", "overlay", "truth")


def list_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Image files named directly or found (not recursively) in folders, in the given order.

    Folder contents are sorted; hidden files are ignored; other file types in a folder are
    returned as skipped. A file named directly is always tried, whatever its suffix.

    Returns:
        ``(files, skipped)`` with skipped entries ``{"image": path, "reason": ...}``.

    Raises:
        FileNotFoundError: An input does not exist.
        NoImagesError: The inputs hold no candidate image at all (e.g. an empty folder).
    """
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.name.startswith(".") or f.is_dir():
                    continue
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(f)
                else:
                    reason = f"not an image file type ({', '.join(IMAGE_EXTENSIONS)})"
                    skipped.append({"image": str(f), "reason": reason})
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image file or folder")
    if not files:
        raise NoImagesError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(map(str, inputs))}")
    return files, skipped


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file as H x W x 3 uint8 RGB.

    Raises:
        ValueError: The file cannot be decoded (the message names it and the decoder's error).
    """
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")).copy()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        raise ValueError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None


def load_user_boxes(path: str | Path) -> dict[str, list[list[float]]]:
    """Read ``{image file name: [x0, y0, x1, y1] or a list of such boxes}`` (original pixels).

    Raises:
        ValueError: Unreadable JSON or a value that is not one or more 4-number boxes.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the boxes JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object {{image file name: box(es)}}")
    def is_box(b: Any) -> bool:
        return isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)

    out = {}
    for name, value in raw.items():
        boxes = [value] if is_box(value) else value
        if not (isinstance(boxes, list) and boxes and all(is_box(b) for b in boxes)):
            raise ValueError(f"{path}: boxes of {name!r} must be [x0, y0, x1, y1] or a list of them, "
                             f"got {value!r}")
        out[name] = [[float(v) for v in b] for b in boxes]
    return out


def truth_folders(inputs: Sequence[str | Path], masks: str | Path | None = None) -> dict[Path | None, Path]:
    """Ground-truth mask folder of each folder input (``--masks`` applies to every input).

    Without ``masks``: a folder's ``masks/`` child, or the sibling ``masks/`` of a folder named
    ``images`` (the dataset layout ``<centre>/{images,masks}``); folders with neither are absent.
    With ``masks``, the key None maps to it (for every image, files named directly too).

    Raises:
        FileNotFoundError: ``masks`` is given but is not a folder.
    """
    if masks is not None:
        if not Path(masks).is_dir():
            raise FileNotFoundError(f"--masks {masks}: folder not found")
        return {None: Path(masks)}
    found: dict[Path | None, Path] = {}
    for item in map(Path, inputs):
        if not item.is_dir():
            continue
        for candidate in (item / "masks", item.parent / "masks" if item.name == "images" else None):
            if candidate is not None and candidate.is_dir():
                found[item] = candidate
                break
    return found


def _mask_index(folder: Path) -> dict[str, Path]:
    """Mask files of ``folder`` by stem (image types only; hidden files ignored)."""
    return {f.stem: f for f in sorted(folder.iterdir())
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS}


class TruthLookup:
    """Finds and reads the ground-truth mask of an image from :func:`truth_folders`."""

    def __init__(self, folders: dict[Path | None, Path]) -> None:
        self.folders = folders
        self._index = {folder: _mask_index(folder) for folder in set(folders.values())}

    def folder_of(self, image: Path) -> Path | None:
        """The mask folder that applies to ``image`` (None: no ground truth is known)."""
        return self.folders.get(None) or self.folders.get(image.parent)

    def read(self, image: Path, width: int, height: int) -> tuple[np.ndarray | None, str | None, str | None]:
        """``(H x W bool mask, mask path, problem)`` of ``image``; the mask is None on a problem."""
        folder = self.folder_of(image)
        if folder is None:
            return None, None, None
        path = self._index[folder].get(image.stem)
        if path is None:
            return None, None, f"no mask named {image.stem}.* in {folder}"
        try:
            return load_mask(path, (width, height)), str(path), None
        except DataError as err:
            return None, str(path), str(err)


def _box_problem(boxes: list[list[float]], width: int, height: int) -> str | None:
    for box in boxes:
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            return (f"user box {box} does not fit the {width}x{height} image "
                    "(need 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H)")
    return None


def _unique_names(files: Sequence[Path]) -> list[str]:
    used: set[str] = set()
    names = []
    for f in files:
        name = f.stem
        if name in used:
            name = f"{f.stem}_{f.suffix.lstrip('.').lower()}" if f.suffix else f"{f.stem}_"
        base, k = name, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``predictions.csv``: :data:`CSV_COLUMNS`, boxes as a JSON list of [x0, y0, x1, y1]."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "boxes": json.dumps(row["boxes"])})


def predict_folder(
    model: PromptSAM,
    inputs: Sequence[str | Path],
    out: str | Path,
    prompt: str = "polyp",
    threshold: float = 0.5,
    batch_size: int = 4,
    device: str | None = "auto",
    user_boxes: dict[str, list[list[float]]] | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    masks: str | Path | None = None,
) -> dict[str, Any]:
    """Segment every image of ``inputs`` and write masks, overlays, JSON and CSV under ``out``.

    Args:
        model: A trained PromptSAM (e.g. from :func:`~shared_model.checkpoint.load_model_checkpoint`).
        inputs: Image files and/or folders of images.
        out: Output folder (created).
        prompt: Text prompt for every image.
        threshold: Probability threshold of the masks.
        batch_size: Images decoded and segmented together (images with user boxes go one at a time).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (checked by :func:`check_device`).
        user_boxes: File name -> boxes in that image's pixels (see :func:`load_user_boxes`).
        checkpoint: The checkpoint's path, recorded in the index.
        progress: Show a progress bar (per image).
        masks: Folder of ground-truth masks (by image stem); default: found next to folder
            inputs (see :func:`truth_folders`).

    Returns:
        The index written to ``predictions.json`` (with ``mean_dice`` over the images that had a
        ground-truth mask).

    Raises:
        ValueError: Bad device or batch size. FileNotFoundError: a missing input, no images or a
        ``masks`` that is not a folder.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    dev = check_device(device)
    files, skipped = list_images(inputs)
    truths = TruthLookup(truth_folders(inputs, masks))
    user_boxes = user_boxes or {}
    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    names = _unique_names(files)
    summaries: list[dict[str, Any]] = []

    def skip(path: Path, reason: str) -> None:
        skipped.append({"image": str(path), "reason": reason})
        tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)

    bar = tqdm(total=len(files), desc="predict", unit="image", disable=not progress)
    for start in range(0, len(files), batch_size):
        group = []
        for path, name in zip(files[start : start + batch_size], names[start : start + batch_size]):
            try:
                image = read_rgb(path)
            except ValueError as err:
                skip(path, str(err).removeprefix(f"{path}: "))
                bar.update(1)
                continue
            boxes = user_boxes.get(path.name)
            problem = _box_problem(boxes, image.shape[1], image.shape[0]) if boxes else None
            if problem is not None:
                skip(path, problem)
                bar.update(1)
                continue
            group.append((path, name, image, boxes))
        if not group:
            continue
        group_boxes = [g[3] for g in group]
        preds = predict_images(model, [g[2] for g in group], prompt,
                               boxes=group_boxes if any(b is not None for b in group_boxes) else None,
                               threshold=threshold, batch_size=batch_size, device=dev)
        for (path, name, image, boxes), pred in zip(group, preds):
            truth, truth_path, problem = truths.read(path, image.shape[1], image.shape[0])
            if problem is not None:
                tqdm.write(f"no ground truth for {path}: {problem}", file=sys.stderr)
            scores = (segmentation_metrics(pred.mask[None], truth[None])[0] if truth is not None
                      else {"dice": None, "iou": None})
            Image.fromarray(pred.mask.astype(np.uint8) * 255).save(out / "masks" / f"{name}.png")
            overlay(image, pred, truth).save(out / "overlays" / f"{name}.png")
            info = pred.summary()
            summary = {
                "image": str(path), "name": name,
                "width": int(image.shape[1]), "height": int(image.shape[0]),
                "prompt": prompt, "threshold": threshold, **info,
                "score": _finite(info["score"]), "confidence": _finite(info["confidence"]),
                "dice": scores["dice"], "iou": scores["iou"], "truth": truth_path, "truth_problem": problem,
                "user_boxes": boxes is not None,
                "mask": f"masks/{name}.png", "overlay": f"overlays/{name}.png",
            }
            (out / "masks" / f"{name}.json").write_text(json.dumps(summary, indent=2))
            summaries.append(summary)
            bar.update(1)
    bar.close()
    unused = sorted(set(user_boxes) - {f.name for f in files})
    if unused:
        print(f"warning: boxes given for files not among the inputs: {unused}", file=sys.stderr)
    scored = [s["dice"] for s in summaries if s["dice"] is not None]
    index = {
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "preset": model.cfg.preset,
        "config_fingerprint": config_fingerprint(model.cfg),
        "prompt": prompt,
        "threshold": threshold,
        "device": str(dev),
        "batch_size": batch_size,
        "count": len(summaries),
        "masks": sorted({str(f) for f in truths.folders.values()}),
        "with_truth": len(scored),
        "mean_dice": sum(scored) / len(scored) if scored else None,
        "images": summaries,
        "skipped": skipped,
    }
    (out / "predictions.json").write_text(json.dumps(index, indent=2))
    write_csv(out / "predictions.csv", summaries)
    return index
