"""Partitioners: by centre, IID, Dirichlet size skew, and the hospitals' splits."""

from dataclasses import dataclass

import numpy as np
import pytest

from shared_model.config import DataConfig, PartitionConfig
from shared_model.data.partition import (
    PartitionError,
    dirichlet_sizes,
    hospital_splits,
    partition_by_centre,
    partition_dirichlet,
    partition_iid,
    partition_samples,
)


@dataclass(frozen=True)
class S:
    centre: str
    stem: str


SAMPLES = [S(c, f"{i:03d}") for c, n in (("a", 5), ("b", 3), ("c", 4)) for i in range(n)]


def _flat(parts):
    return [s for p in parts for s in p]


def test_by_centre_gives_one_hospital_per_centre_in_sorted_order():
    parts = partition_by_centre(SAMPLES, 3)
    assert [len(p) for p in parts] == [5, 3, 4]
    assert [{s.centre for s in p} for p in parts] == [{"a"}, {"b"}, {"c"}]
    with pytest.raises(PartitionError, match="2 hospitals but 3 centres \\['a', 'b', 'c'\\]"):
        partition_by_centre(SAMPLES, 2)


def test_iid_is_a_seeded_near_equal_disjoint_cover():
    parts = partition_iid(SAMPLES, 5, seed=1)
    assert sorted(len(p) for p in parts) == [2, 2, 2, 3, 3]
    assert sorted(_flat(parts), key=lambda s: (s.centre, s.stem)) == SAMPLES
    assert parts == partition_iid(SAMPLES, 5, seed=1)
    assert parts != partition_iid(SAMPLES, 5, seed=2)
    with pytest.raises(PartitionError, match="cannot split 12 samples into 13"):
        partition_iid(SAMPLES, 13, 0)


def test_dirichlet_sizes_respect_the_minimum_and_skew_with_small_alpha():
    sizes = dirichlet_sizes(100, 4, alpha=0.5, min_size=5, seed=0)
    assert sum(sizes) == 100 and min(sizes) >= 5
    assert sizes == dirichlet_sizes(100, 4, alpha=0.5, min_size=5, seed=0)
    spread = lambda a: np.mean([np.std(dirichlet_sizes(1000, 5, a, 1, s)) for s in range(20)])  # noqa: E731
    assert spread(0.1) > 2 * spread(100.0)
    with pytest.raises(PartitionError, match="cannot give 4 hospitals partition-min-size=4"):
        dirichlet_sizes(12, 4, 0.5, 4, 0)


def test_dirichlet_partition_covers_every_sample_once():
    parts = partition_dirichlet(SAMPLES, 3, alpha=0.3, min_size=2, seed=7)
    assert [len(p) for p in parts] == dirichlet_sizes(12, 3, 0.3, 2, 7)
    assert sorted(_flat(parts), key=lambda s: (s.centre, s.stem)) == SAMPLES


def test_dispatch_on_mode():
    assert partition_samples(SAMPLES, PartitionConfig(mode="centre"), 3) == partition_by_centre(SAMPLES, 3)
    assert partition_samples(SAMPLES, PartitionConfig(mode="iid", seed=4), 2) == partition_iid(SAMPLES, 2, 4)
    with pytest.raises(PartitionError, match="unknown mode 'x'"):
        partition_samples(SAMPLES, PartitionConfig(mode="x"), 2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from shared_model.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("syn"), centres=3, per_centre=10, image_size=32, seed=0)


@pytest.mark.parametrize("mode", ["centre", "iid", "dirichlet"])
def test_hospital_splits_keep_the_pooled_split(folder, mode):
    from shared_model.data.folder import list_samples
    from shared_model.data.splits import split_samples

    data = DataConfig(root=str(folder), val_fraction=0.2, test_fraction=0.2)
    sites = hospital_splits(data, PartitionConfig(mode=mode, min_size=3), 3)
    pooled = split_samples(list_samples(folder)[0], 0.2, 0.2, 0)
    for split in ("train", "val", "test"):
        union = sorted(s.key for site in sites for s in getattr(site, split))
        assert union == sorted(s.key for s in pooled[split])
    names = [site.name for site in sites]
    assert names == (["centre_0", "centre_1", "centre_2"] if mode == "centre" else ["site-0", "site-1", "site-2"])


def test_hospital_splits_need_an_existing_split_file(folder, tmp_path):
    data = DataConfig(root=str(folder), split_file=str(tmp_path / "none.json"))
    with pytest.raises(PartitionError, match="data.split_file: .*none.json not found"):
        hospital_splits(data, PartitionConfig(), 3)
