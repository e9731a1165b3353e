"""The validated-data disk cache: a hit gives the freshly validated dataset; any change of the data
folder's files (content, time stamp, a new or removed pair) misses."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from client.task import data_cache_dir, parse_node_config
from shared_model.data.dataset import PolypDataset
from shared_model.data.disk_cache import manifest_key, validate_cached
from shared_model.data.folder import list_samples


@pytest.fixture
def counted(monkeypatch):
    """Counts the datasets validated from the files (a cache hit does not validate)."""
    calls = []
    original = PolypDataset.validate

    def validate(self):
        calls.append(len(self.samples))
        return original(self)

    monkeypatch.setattr(PolypDataset, "validate", validate)
    return calls


def _dataset(root, cache, on_error="raise"):
    samples, _ = list_samples(root, ["centre_0"], on_error)
    ds = PolypDataset(samples, 32, on_error=on_error, validate=False)
    return ds, validate_cached(ds, cache)


def _same(a: PolypDataset, b: PolypDataset) -> None:
    assert [s.key for s in a.samples] == [s.key for s in b.samples] and a.skipped == b.skipped
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert np.array_equal(x["image"].numpy(), y["image"].numpy()) and np.array_equal(x["mask"], y["mask"])
        assert a.frame(i) == b.frame(i) and x["text"] == y["text"]


def test_a_hit_gives_the_freshly_validated_dataset(synthetic_root, tmp_path, counted):
    first, hit = _dataset(synthetic_root, tmp_path / "cache")
    assert not hit and len(counted) == 1
    second, hit = _dataset(synthetic_root, tmp_path / "cache")
    assert hit and len(counted) == 1  # read from disk, not validated again
    fresh = PolypDataset(second.samples, 32)
    _same(second, fresh)
    _same(first, second)


@pytest.mark.parametrize("change", ["rewrite mask", "touch image", "add pair", "remove pair"])
def test_any_change_of_the_folder_misses(synthetic_root, tmp_path, counted, change):
    _dataset(synthetic_root, tmp_path / "cache")
    centre = synthetic_root / "centre_0"
    masks = sorted((centre / "masks").iterdir())
    images = sorted((centre / "images").iterdir())
    if change == "rewrite mask":
        arr = np.zeros(np.asarray(Image.open(masks[0])).shape[:2], dtype=np.uint8)
        arr[:4, :4] = 255
        Image.fromarray(arr).save(masks[0])
    elif change == "touch image":
        st = os.stat(images[0])
        os.utime(images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif change == "add pair":
        shutil.copy(images[0], centre / "images" / "extra.png")
        shutil.copy(masks[0], centre / "masks" / "extra.png")
    else:
        images[0].unlink()
        masks[0].unlink()
    ds, hit = _dataset(synthetic_root, tmp_path / "cache")
    assert not hit and len(counted) == 2
    _same(ds, PolypDataset(ds.samples, 32))  # what the folder holds now, not the stale entry


def test_skipped_pairs_are_remembered(synthetic_root, tmp_path, counted):
    bad = sorted((synthetic_root / "centre_0" / "masks").iterdir())[2]
    bad.write_bytes(b"not a png")
    first, _ = _dataset(synthetic_root, tmp_path / "cache", on_error="skip")
    second, hit = _dataset(synthetic_root, tmp_path / "cache", on_error="skip")
    assert hit and len(second.skipped) == 1 and second.skipped == first.skipped
    assert len(second) == len(first) and bad.stem not in {s.stem for s in second.samples}


def test_the_key_covers_the_settings(synthetic_root):
    samples, _ = list_samples(synthetic_root, ["centre_0"], "raise")
    keys = {manifest_key(PolypDataset(samples, size, resize=resize, validate=False))
            for size in (32, 64) for resize in ("letterbox", "squash")}
    assert len(keys) == 4


def test_where_a_hospital_keeps_its_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTSAM_CACHE", str(tmp_path))
    assert data_cache_dir(parse_node_config({"data-path": "/data/site"})) == tmp_path / "data"
    assert data_cache_dir(parse_node_config({"data-path": "/data/site", "data-cache": "off"})) is None
    assert data_cache_dir(parse_node_config({"data-path": "/d", "data-cache": "/c"})) == type(tmp_path)("/c")
    assert data_cache_dir(parse_node_config({"partition-id": 0, "num-partitions": 3})) is None  # simulation
