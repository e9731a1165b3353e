"""Folder datasets ``<root>/<centre>/{images,masks}/<stem>.<ext>`` of images and binary masks.

The root may also be one centre's folder ``<folder>/{images,masks}`` (see :func:`is_centre_folder`).

Pairing is by file stem over *sorted* listings, never by the order the file system returns.

Error handling (``on_error``):

* ``"raise"``: the first problem raises :class:`DataError` whose message names the file or folder.
* ``"skip"``: the offending item (or centre) is left out, the reason is logged with
  ``logging.warning`` and recorded (``list_samples`` returns the reasons; a dataset keeps them in
  :attr:`shared_model.data.dataset.PolypDataset.skipped`). Skips are never silent.

Validation happens in two stages (documented choice):

1. **Eagerly, in the constructor** (``validate=True``): for every pair the image header is read
   (garbage bytes fail here) and the mask is decoded fully: it must be the image's size and binary
   (at most one non-zero value ``v``: 0/255, 0/1, ...; foreground = non-zero). The resized mask is
   cached, so this decode is not repeated. Cost: about 2 ms per pair (~4 s for the 1930 real pairs).
2. **Lazily, at first load**: the full image decode (a truncated file can pass the header check).
   With ``"skip"`` a failing item is recorded and ``__getitem__`` returns the next loadable item
   instead (so the returned ``stem`` can differ from the requested index's). In DataLoader worker
   processes such skips are logged but not added to the main process's ``skipped``;
   :meth:`shared_model.data.dataset.PolypDataset.preload` finds them all up front in the main process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared_model.data.geometry import Frame
from shared_model.data.tasks import POLYP, Task


log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ON_ERROR = ("raise", "skip")
CAPTION_MAX_SIZE = 256  # captions of larger items are computed on a strided subsample
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def describe_eval_prompt(eval_prompt: str | None, class_name: str | None = None) -> str:
    """The evaluation prompt in words, for every report and table that scores a model."""
    if eval_prompt == "oracle-caption":
        return ("oracle-caption (each image's caption is built from its ground-truth mask: optimistic, "
                "an upper bound a new hospital cannot reach)")
    noun = f' "{class_name}"' if class_name else ""
    return f"class (the class name{noun} only; no ground truth in the prompt)"


class DataError(ValueError):
    """A data file or folder is missing or invalid; the message names it."""


@dataclass(frozen=True)
class Sample:
    """One image/mask pair of a centre, and the task its mask marks (polyps unless told)."""

    centre: str
    stem: str
    image_path: Path
    mask_path: Path
    task: Task = POLYP

    @property
    def key(self) -> str:
        """``"<centre>/<stem>"``: the identifier used in split files."""
        return f"{self.centre}/{self.stem}"


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def report_problem(message: str, on_error: str, skipped: list[str]) -> None:
    """Raise ``message`` as a DataError, or record and log it as a skip."""
    if on_error == "raise":
        raise DataError(message)
    log.warning("skipped: %s", message)
    skipped.append(message)


def _list_files(folder: Path, on_error: str, skipped: list[str]) -> dict[str, Path]:
    """Image files of ``folder`` keyed by stem; hidden files are ignored, duplicate stems dropped."""
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            report_problem(f"{path}: unsupported file type (expected one of {IMAGE_EXTENSIONS})",
                     on_error, skipped)
            continue
        by_stem.setdefault(path.stem, []).append(path)
    files = {}
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            report_problem(f"{folder}: duplicate stem {stem!r}: {[p.name for p in paths]}", on_error, skipped)
        else:
            files[stem] = paths[0]
    return files


def _list_centre(root: Path, centre: str, on_error: str, skipped: list[str], task: Task) -> list[Sample]:
    centre_dir = root / centre
    image_dir, mask_dir = centre_dir / "images", centre_dir / "masks"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            report_problem(f"{folder}: folder not found (centre {centre!r} needs images/ and masks/)", on_error, skipped)
            return []
    images = _list_files(image_dir, on_error, skipped)
    masks = _list_files(mask_dir, on_error, skipped)
    if not images:
        report_problem(f"{image_dir}: no images in centre {centre!r}", on_error, skipped)
        return []
    samples = []
    for stem in sorted(set(images) | set(masks)):
        if stem not in masks:
            report_problem(f"{images[stem]}: image without a mask in {mask_dir}", on_error, skipped)
        elif stem not in images:
            report_problem(f"{masks[stem]}: mask without an image in {image_dir}", on_error, skipped)
        else:
            samples.append(Sample(centre, stem, images[stem], masks[stem], task))
    return samples


def is_centre_folder(path: str | Path) -> bool:
    """Whether ``path`` is one centre's folder (it holds ``images/`` itself) rather than a dataset root.

    This is the one rule that lets every ``--data`` / ``data.root`` / ``data-path`` be either a
    root of centre folders or a single centre (a flat ``images/`` + ``masks/`` pair).
    """
    return (Path(path) / "images").is_dir()


def resolve_centres(
    root: str | Path, centres: Sequence[str] | None = None, on_error: str = "raise",
    skipped: list[str] | None = None,
) -> tuple[Path, list[str]]:
    """The dataset root and the centre names that ``root`` and ``centres`` designate.

    Args:
        root: A dataset root ``<root>/<centre>/{images,masks}``, or one centre's folder
            ``<folder>/{images,masks}`` (then the centre is the folder's name and the root its parent).
        centres: Centre folder names; ``None`` or empty = every centre.
        on_error: ``"skip"`` drops (and records in ``skipped``) named centres that do not exist.
        skipped: Where skip reasons are appended.

    Returns:
        ``(root, sorted unique centre names)``.

    Raises:
        DataError: The folder is missing, holds no centre folder, or (``on_error="raise"``) a named
            centre is not there (the message lists the valid centres).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root.resolve()}: dataset root folder not found")
    if is_centre_folder(root):
        extra = sorted(set(centres or ()) - {root.name})
        if extra:
            raise DataError(f"{root}: is the folder of the single centre {root.name!r} (it holds images/), "
                            f"so centres {extra} are not in it; give the dataset root to choose centres")
        return root.parent, [root.name]
    available = [p.name for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if not available and root.name == "images" and (root.parent / "masks").is_dir():
        raise DataError(f"{root}: is an images/ folder; give the folder above it ({root.parent}), which holds "
                        "images/ and masks/")
    if not available:
        raise DataError(f"{root}: no centre folders; expected <root>/<centre>/images + masks, or "
                        "<folder>/images + masks for a single centre")
    if not centres:
        return root, available
    for centre in sorted(set(centres) - set(available)):
        report_problem(f"{root / centre}: no centre {centre!r}; valid centres: {available}", on_error,
                 [] if skipped is None else skipped)
    return root, sorted(set(centres) & set(available))


def list_samples(
    root: str | Path, centres: Sequence[str] | None = None, on_error: str = "raise", task: Task = POLYP,
) -> tuple[list[Sample], list[str]]:
    """List the image/mask pairs under ``root``, sorted by (centre, stem).

    Args:
        root: Dataset root holding one folder per centre, or one centre's folder (see
            :func:`resolve_centres`).
        centres: Centre folder names to use; ``None`` or empty = every non-hidden folder of ``root``.
        on_error: ``"raise"`` or ``"skip"`` (see module docstring).
        task: What the masks mark; every sample carries it (its prompt and caption follow it).

    Returns:
        ``(samples, skipped_reasons)``.

    Raises:
        DataError: The root is missing, a named centre does not exist (listing the valid ones), no
            pair is found at all, or (``on_error="raise"``) a centre lacks images/ or masks/ or is
            empty, an image has no mask or vice versa, a stem is duplicated, or a file has an
            unsupported type. The message names the file or folder.
    """
    check_on_error(on_error)
    skipped: list[str] = []
    root, centres = resolve_centres(root, centres, on_error, skipped)
    samples: list[Sample] = []
    for centre in centres:
        samples.extend(_list_centre(root, centre, on_error, skipped, task))
    if not samples:
        raise DataError(f"{root}: no image/mask pairs found (centres {centres}; skipped: {skipped})")
    return samples, skipped


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def read_image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header. Raises DataError naming the file."""
    try:
        with Image.open(path) as img:
            return img.size
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: unreadable or corrupt image: {err}") from None


def load_image(path: Path, size: int, resize: str = "letterbox") -> np.ndarray:
    """Decode an image as RGB placed in a ``size x size`` input (see :class:`~shared_model.data.geometry.Frame`).

    ``resize="letterbox"`` keeps the aspect ratio (longer side -> ``size``, zero padding at the
    bottom/right); ``"squash"`` scales both sides to ``size``. Bilinear, antialiased when
    shrinking. JPEGs are decoded at a reduced DCT scale (``Image.draft``) no smaller than
    ``size``, which makes large Kvasir frames ~3x cheaper to load.

    Returns:
        uint8 array, size x size x 3.
    """
    try:
        with Image.open(path) as img:
            frame = Frame(img.size[1], img.size[0], size, resize)
            img.draft("RGB", (size, size))
            return frame.image(img)
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: unreadable or corrupt image: {err}") from None


def read_mask(path: Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a mask's grey values at full resolution (1-bit, palette and RGB(A) files as grey).

    Args:
        path: Mask file.
        expected_size: ``(width, height)`` the mask must have (its image's size), if given.

    Returns:
        uint8 array, H x W, the stored values.

    Raises:
        DataError: Unreadable file, wrong size or more than one channel.
    """
    try:
        with Image.open(path) as img:
            if expected_size is not None and img.size != tuple(expected_size):
                raise DataError(f"{path}: mask size {img.size[0]}x{img.size[1]} differs from its "
                                f"image's {expected_size[0]}x{expected_size[1]}")
            if img.mode in ("1", "L", "P", "LA", "RGB", "RGBA"):
                img = img.convert("L")
            arr = np.asarray(img)
    except _DECODE_ERRORS as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: unreadable or corrupt mask: {err}") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: mask must be single-channel, got shape {arr.shape}")
    return arr


def check_binary(path: Path, values: np.ndarray) -> None:
    """Raise DataError naming ``path`` unless the sorted distinct ``values`` hold at most one non-zero value."""
    nonzero = values[values != 0]
    if len(nonzero) > 1:
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise DataError(f"{path}: mask is not binary: {len(values)} distinct values ({shown}); "
                        "expected 0 and one foreground value (e.g. 0/255)")


def load_mask(path: Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a binary mask at full resolution (:func:`read_mask`, then :func:`check_binary`).

    Returns:
        bool array, H x W (True = foreground, i.e. any non-zero value).

    Raises:
        DataError: Unreadable file, wrong size, or more than one non-zero value (non-binary).
    """
    arr = read_mask(path, expected_size)
    check_binary(path, np.unique(arr))
    return arr != 0


def resize_mask(mask: np.ndarray, size: int, resize: str = "letterbox") -> np.ndarray:
    """An H x W bool mask placed in a ``size x size`` input like its image (:func:`load_image`)."""
    return Frame(mask.shape[0], mask.shape[1], size, resize).mask(mask)
