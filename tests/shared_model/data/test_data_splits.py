"""Per-centre splits, split files and build_datasets."""

from __future__ import annotations

import json
import random

import pytest

from shared_model.config import DataConfig
from shared_model.data import (
    DataError,
    build_datasets,
    list_samples,
    load_split_file,
    save_split_file,
    split_samples,
)
from shared_model.data.splits import _split_counts


def _keys(splits):
    return {name: [s.key for s in items] for name, items in splits.items()}


def test_split_sizes_per_centre_and_partition(synthetic_root):
    samples, _ = list_samples(synthetic_root)
    splits = split_samples(samples, val_fraction=0.1, test_fraction=0.2, seed=0)
    for centre in ("centre_0", "centre_1", "centre_2"):
        # 8 per centre: test round(1.6) = 2, val round(0.8) = 1, train 5.
        sizes = [sum(s.centre == centre for s in splits[n]) for n in ("train", "val", "test")]
        assert sizes == [5, 1, 2]
    all_keys = [k for keys in _keys(splits).values() for k in keys]
    assert sorted(all_keys) == sorted(s.key for s in samples)
    assert all(items == sorted(items, key=lambda s: (s.centre, s.stem)) for items in splits.values())


def test_split_deterministic_and_order_independent(synthetic_root):
    samples, _ = list_samples(synthetic_root)
    shuffled = list(samples)
    random.Random(1).shuffle(shuffled)
    a = split_samples(samples, 0.25, 0.25, seed=7)
    assert _keys(a) == _keys(split_samples(shuffled, 0.25, 0.25, seed=7))
    assert _keys(a) != _keys(split_samples(samples, 0.25, 0.25, seed=8))


def test_split_of_all_centres_is_union_of_per_centre_splits(synthetic_root):
    samples, _ = list_samples(synthetic_root)
    whole = split_samples(samples, 0.2, 0.3, seed=2)
    for centre in ("centre_0", "centre_1", "centre_2"):
        alone = split_samples([s for s in samples if s.centre == centre], 0.2, 0.3, seed=2)
        for name in ("train", "val", "test"):
            assert [s.key for s in alone[name]] == [s.key for s in whole[name] if s.centre == centre]


def test_split_fraction_checks(synthetic_root):
    samples, _ = list_samples(synthetic_root)
    with pytest.raises(ValueError, match="data.val_fraction"):
        split_samples(samples, -0.1, 0.2, 0)
    with pytest.raises(ValueError, match="data.test_fraction"):
        split_samples(samples, 0.1, 1.0, 0)
    with pytest.raises(ValueError, match="must be < 1"):
        split_samples(samples, 0.5, 0.5, 0)


def test_split_counts_keep_one_training_sample():
    assert _split_counts(10, 0.1, 0.2) == (1, 2)
    assert _split_counts(1, 0.1, 0.2) == (0, 0)
    assert _split_counts(2, 0.4, 0.4) == (0, 1)
    assert _split_counts(3, 0.3, 0.4) == (1, 1)


def test_split_file_round_trip(synthetic_root, tmp_path):
    samples, _ = list_samples(synthetic_root)
    splits = split_samples(samples, 0.1, 0.2, seed=0)
    path = tmp_path / "sub" / "split.json"
    save_split_file(path, splits)
    data = json.loads(path.read_text())
    assert list(data) == ["train", "val", "test"] and data["test"][0].count("/") == 1
    assert _keys(load_split_file(path, samples)) == _keys(splits)


def test_split_file_errors_name_the_entry(synthetic_root, tmp_path):
    samples, _ = list_samples(synthetic_root)
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["centre_0/centre_0_0000", "centre_9/ghost"]}))
    with pytest.raises(DataError, match=r"split\.json: unknown sample 'centre_9/ghost' in split 'train'"):
        load_split_file(path, samples)
    path.write_text(json.dumps({"train": ["centre_0/centre_0_0000"], "test": ["centre_0/centre_0_0000"]}))
    with pytest.raises(DataError, match="listed in both 'train' and 'test'"):
        load_split_file(path, samples)
    path.write_text(json.dumps({"training": []}))
    with pytest.raises(DataError, match="keys among"):
        load_split_file(path, samples)
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"split\.json: invalid JSON"):
        load_split_file(path, samples)
    with pytest.raises(DataError, match=r"missing\.json: split file not found"):
        load_split_file(tmp_path / "missing.json", samples)


def test_build_datasets(synthetic_root):
    cfg = DataConfig(root=str(synthetic_root), val_fraction=0.1, test_fraction=0.2)
    ds = build_datasets(cfg, image_size=32, seed=1)
    assert {k: len(v) for k, v in ds.items()} == {"train": 15, "val": 3, "test": 6}
    assert ds["train"].augment and not ds["val"].augment and not ds["test"].augment
    assert ds["train"].transform is not None and ds["test"].transform is None
    assert ds["val"][0]["image"].shape == (3, 32, 32)
    one = build_datasets(DataConfig(root=str(synthetic_root), centres=["centre_1"]), 32)
    assert one["test"].centres() == ["centre_1"]
    assert [s.key for s in one["test"].samples] == [
        s.key for s in ds["test"].samples if s.centre == "centre_1"]


def test_build_datasets_writes_then_reads_split_file(synthetic_root, tmp_path):
    path = tmp_path / "split.json"
    cfg = DataConfig(root=str(synthetic_root), split_file=str(path), prompt_mode="class")
    first = build_datasets(cfg, 32)
    assert path.exists() and first["train"][0]["text"] == "polyp"
    data = json.loads(path.read_text())
    data = {"train": data["train"][:4], "test": data["test"][:2]}
    path.write_text(json.dumps(data))
    second = build_datasets(cfg, 32)
    assert set(second) == {"train", "test"}  # the empty val split is left out
    assert [s.key for s in second["train"].samples] == data["train"]


def test_build_datasets_reports_listing_skips(synthetic_root):
    (synthetic_root / "centre_0" / "masks" / "centre_0_0000.png").unlink()
    with pytest.raises(DataError, match="centre_0_0000.png"):
        build_datasets(DataConfig(root=str(synthetic_root)), 32)
    ds = build_datasets(DataConfig(root=str(synthetic_root), on_error="skip"), 32)
    assert sum(len(d) for d in ds.values()) == 23
    assert any("centre_0_0000.png" in r for r in ds["train"].skipped)


def test_real_data_split_is_deterministic(polyp_root):
    samples, _ = list_samples(polyp_root)
    a = split_samples(samples, 0.1, 0.2, seed=0)
    b = split_samples(list(reversed(samples)), 0.1, 0.2, seed=0)
    assert _keys(a) == _keys(b)
    assert [len(a[n]) for n in ("train", "val", "test")] == [1351, 193, 386]
    test_kvasir = [s for s in a["test"] if s.centre == "kvasir_seg"]
    assert len(test_kvasir) == 200
