"""Split a pooled folder dataset into simulated hospitals.

Three partitioners over an ordered list of samples (``list_samples`` sorts by centre and stem, so
the same folder always gives the same partitions):

* ``centre``: one hospital per centre folder (the natural split of the real data); the number of
  hospitals must equal the number of centres.
* ``iid``: a seeded shuffle cut into near-equal parts.
* ``dirichlet``: size skew; proportions ``p ~ Dir(alpha, ..., alpha)``, every hospital gets
  ``min_size`` samples plus a multinomial share of the rest, over a seeded shuffle.

Each sample keeps its train / val / test membership of the pooled split (see :func:`hospital_splits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, TypeVar

import numpy as np

from shared_model.config import DataConfig, PartitionConfig


class HasCentre(Protocol):
    centre: str


S = TypeVar("S", bound=HasCentre)


class PartitionError(ValueError):
    """The data cannot be split as configured; the message names the setting."""


def partition_by_centre(samples: Sequence[S], num_partitions: int) -> list[list[S]]:
    """One partition per centre, centres in sorted order.

    Raises:
        PartitionError: If ``num_partitions`` differs from the number of centres.
    """
    centres = sorted({s.centre for s in samples})
    if num_partitions != len(centres):
        raise PartitionError(
            f"partition-mode 'centre': {num_partitions} hospitals but {len(centres)} centres "
            f"{centres}; set the number of simulated hospitals to {len(centres)}"
        )
    return [[s for s in samples if s.centre == c] for c in centres]


def partition_iid(samples: Sequence[S], num_partitions: int, seed: int) -> list[list[S]]:
    """Seeded shuffle, cut into ``num_partitions`` parts whose sizes differ by at most one."""
    if num_partitions < 1 or len(samples) < num_partitions:
        raise PartitionError(f"partition-mode 'iid': cannot split {len(samples)} samples into "
                             f"{num_partitions} hospitals")
    order = np.random.default_rng(seed).permutation(len(samples))
    return [[samples[i] for i in part] for part in np.array_split(order, num_partitions)]


def dirichlet_sizes(n: int, num_partitions: int, alpha: float, min_size: int, seed: int) -> list[int]:
    """Partition sizes: ``min_size`` each plus a Multinomial(n - N * min_size, Dir(alpha)) share."""
    spare = n - num_partitions * min_size
    if spare < 0:
        raise PartitionError(f"partition-mode 'dirichlet': {n} samples cannot give {num_partitions} "
                             f"hospitals partition-min-size={min_size} each")
    rng = np.random.default_rng(seed)
    proportions = rng.dirichlet([alpha] * num_partitions)
    extra = rng.multinomial(spare, proportions)
    return [int(min_size + e) for e in extra]


def partition_dirichlet(
    samples: Sequence[S], num_partitions: int, alpha: float, min_size: int, seed: int
) -> list[list[S]]:
    """Size-skewed partitions (see :func:`dirichlet_sizes`) over a seeded shuffle."""
    sizes = dirichlet_sizes(len(samples), num_partitions, alpha, min_size, seed)
    order = np.random.default_rng([seed, 1]).permutation(len(samples))
    bounds = np.cumsum([0] + sizes)
    return [[samples[i] for i in order[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


def partition_samples(samples: Sequence[S], cfg: PartitionConfig, num_partitions: int) -> list[list[S]]:
    """Dispatch on ``cfg.mode`` (``centre``, ``iid`` or ``dirichlet``)."""
    if cfg.mode == "centre":
        return partition_by_centre(samples, num_partitions)
    if cfg.mode == "iid":
        return partition_iid(samples, num_partitions, cfg.seed)
    if cfg.mode == "dirichlet":
        return partition_dirichlet(samples, num_partitions, cfg.dirichlet_alpha, cfg.min_size, cfg.seed)
    raise PartitionError(f"partition-mode: unknown mode {cfg.mode!r}")


@dataclass
class HospitalSplits:
    """One simulated hospital's samples, split."""

    name: str
    train: list
    val: list
    test: list


def hospital_splits(data: DataConfig, part: PartitionConfig, num_partitions: int) -> list[HospitalSplits]:
    """List the pooled folder, split it, partition it: one :class:`HospitalSplits` per hospital.

    The train / val / test split is that of the whole folder (``data.split_file`` when set, else
    the seeded per-centre split), so the union of the hospitals' test sets is exactly the pooled
    test set of a centralised run. Partitioning then assigns every sample to one hospital; a
    hospital's splits are its samples' memberships. Every process (each client and the server)
    computes the same result from the same settings.

    Raises:
        PartitionError: If a set split file is missing or a hospital gets no training sample.
    """
    from shared_model.data.sources import list_config_samples
    from shared_model.data.splits import load_split_file, split_samples

    samples, _ = list_config_samples(data)
    if data.split_file:
        if not Path(data.split_file).is_file():
            raise PartitionError(f"data.split_file: {data.split_file} not found (create it before the run)")
        splits = load_split_file(data.split_file, samples)
    else:
        splits = split_samples(samples, data.val_fraction, data.test_fraction, data.split_seed)
    membership = {s.key: name for name, items in splits.items() for s in items}
    parts = partition_samples(samples, part, num_partitions)
    out = []
    for i, items in enumerate(parts):
        by_split: dict[str, list] = {"train": [], "val": [], "test": []}
        for s in items:
            if s.key in membership:
                by_split[membership[s.key]].append(s)
        if not by_split["train"]:
            raise PartitionError(f"hospital {i} received no training sample (partition-mode {part.mode!r}, "
                                 f"{len(items)} samples)")
        centres = sorted({s.centre for s in items})
        name = centres[0] if part.mode == "centre" else f"site-{i}"
        out.append(HospitalSplits(name, by_split["train"], by_split["val"], by_split["test"]))
    return out
