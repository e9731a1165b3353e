"""``promptsam data check FOLDER``: what a data folder holds and what is wrong with it, before training.

A folder is either a dataset root holding one folder per centre (``<root>/<centre>/{images,masks}``)
or one centre's (hospital's) folder (``<folder>/{images,masks}``). Every pair goes through the
readers training uses (:mod:`shared_model.data.folder`): pairing by file stem, image header and a
full decode, mask size and binary values. Nothing is written.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from shared_model.data import folder as folder_io
from shared_model.data.folder import (
    DataError,
    Sample,
    check_binary,
    is_centre_folder,
    list_samples,
    load_image,
    read_image_size,
    read_mask,
    resolve_centres,
)

DECODE_SIZE = 16  # the full image decode only has to succeed; JPEGs decode at a reduced scale


@dataclass
class CentreCheck:
    """What one centre folder holds."""

    name: str
    pairs: int = 0  # image/mask pairs found by stem
    usable: int = 0  # pairs without a problem
    empty_masks: int = 0  # usable pairs whose mask has no foreground
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> readable images
    mask_values: set[int] = field(default_factory=set)  # distinct values over the readable masks


@dataclass
class DataCheck:
    """The result of :func:`check_folder`."""

    root: Path
    single_centre: bool  # the folder given was one centre's folder
    centres: list[CentreCheck]
    problems: list[str]

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


@contextmanager
def _skips_unlogged() -> Iterator[None]:
    """The folder reader logs every skip; here the problems are listed once, in the report."""
    logger = logging.getLogger(folder_io.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_pair(sample: Sample, centre: CentreCheck) -> None:
    """Read one pair as training does; record its size and mask values. Raises DataError."""
    size = read_image_size(sample.image_path)
    centre.sizes[size] += 1
    load_image(sample.image_path, DECODE_SIZE)  # a truncated file passes the header read
    values = np.unique(read_mask(sample.mask_path, size))
    centre.mask_values.update(int(v) for v in values)
    check_binary(sample.mask_path, values)
    if not values.any():
        centre.empty_masks += 1


def check_folder(path: str | Path) -> DataCheck:
    """Check every centre and pair under ``path``.

    Raises:
        DataError: The folder does not exist or holds no image/mask pair at all (the message says
            what was found instead).
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise DataError(f"{path}: data folder not found")
    root, names = resolve_centres(path)
    with _skips_unlogged():
        samples, problems = list_samples(root, names, on_error="skip")
    centres = {name: CentreCheck(name) for name in names}
    for sample in samples:
        centre = centres[sample.centre]
        centre.pairs += 1
        try:
            _check_pair(sample, centre)
        except DataError as err:
            problems.append(str(err))
            continue
        centre.usable += 1
    return DataCheck(root, is_centre_folder(path), list(centres.values()), problems)


def _sizes_text(sizes: Counter) -> str:
    if not sizes:
        return "-"
    if len(sizes) <= 3:
        return ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(sizes.items()))
    by_area = sorted(sizes, key=lambda wh: (wh[0] * wh[1], wh))
    (w0, h0), (w1, h1) = by_area[0], by_area[-1]
    return f"{len(sizes)} sizes, {w0}x{h0} to {w1}x{h1}"


def _values_text(values: set[int]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    if len(ordered) <= 4:
        return ", ".join(str(v) for v in ordered)
    return f"{len(ordered)} values, {ordered[0]} to {ordered[-1]}"


def format_check(check: DataCheck) -> str:
    """The report printed by ``promptsam data check``: one row per centre, then the problems."""
    pairs = sum(c.pairs for c in check.centres)
    usable = sum(c.usable for c in check.centres)
    where = (f"{check.root / check.centres[0].name} (one centre's folder)" if check.single_centre
             else f"{check.root} ({len(check.centres)} centre folders)")
    header = ("centre", "pairs", "usable", "empty masks", "image sizes (count)", "mask values")
    rows = [header] + [(c.name, str(c.pairs), str(c.usable), str(c.empty_masks), _sizes_text(c.sizes),
                        _values_text(c.mask_values)) for c in check.centres]
    if len(check.centres) > 1:
        rows.append(("total", str(pairs), str(usable), str(sum(c.empty_masks for c in check.centres)), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"data: {where}"]
    for row in rows:
        cells = [cell.ljust(w) if i in (0, 4, 5) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    if check.ok:
        lines.append(f"problems: none; {usable} pairs ready for training")
    else:
        lines.append(f"problems ({len(check.problems)}; {usable} of {pairs} pairs usable; training stops at the "
                     "first problem, or skips them with data.on_error: skip):")
        lines.extend(f"  {problem}" for problem in check.problems)
    return "\n".join(lines)
