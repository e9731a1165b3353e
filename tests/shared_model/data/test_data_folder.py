"""Folder listing, per-item validation, the skip mode and PolypDataset items."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared_model.data import DataError, PolypDataset, attribute_caption, list_samples
from shared_model.data.folder import load_image, load_mask, resize_mask


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _pair(root: Path, centre: str, stem: str, size=(40, 30), image_ext=".png", mask=None) -> None:
    w, h = size
    image = np.full((h, w, 3), 120, np.uint8)
    if mask is None:
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2, w // 4: w // 2] = 255
    _write(root / centre / "images" / f"{stem}{image_ext}", image)
    _write(root / centre / "masks" / f"{stem}.png", mask)


# ---------------------------------------------------------------------------- listing


def test_list_samples_synthetic(synthetic_root):
    samples, skipped = list_samples(synthetic_root)
    assert skipped == []
    assert len(samples) == 24
    assert [s.key for s in samples] == sorted(s.key for s in samples)
    assert {s.centre for s in samples} == {"centre_0", "centre_1", "centre_2"}
    assert all(s.image_path.stem == s.mask_path.stem == s.stem for s in samples)
    only, _ = list_samples(synthetic_root, ["centre_2"])
    assert {s.centre for s in only} == {"centre_2"} and len(only) == 8


def test_pairs_by_sorted_stem_across_extensions(tmp_path):
    for stem, ext in [("b", ".jpg"), ("a", ".bmp"), ("c", ".TIF"), ("10", ".jpeg")]:
        _pair(tmp_path, "x", stem, image_ext=ext)
    (tmp_path / "x" / "images" / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
    samples, skipped = list_samples(tmp_path)
    assert [s.stem for s in samples] == ["10", "a", "b", "c"]
    assert samples[1].image_path.name == "a.bmp" and samples[1].mask_path.name == "a.png"
    assert skipped == []


def test_missing_root_raises_naming_it(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        list_samples(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere"):
        list_samples(tmp_path / "nowhere", on_error="skip")


def test_invalid_on_error(synthetic_root):
    with pytest.raises(ValueError, match="on_error"):
        list_samples(synthetic_root, on_error="ignore")


def test_missing_centre_raise_and_skip(synthetic_root, caplog):
    with pytest.raises(DataError, match="centre_9"):
        list_samples(synthetic_root, ["centre_0", "centre_9"])
    with caplog.at_level(logging.WARNING):
        samples, skipped = list_samples(synthetic_root, ["centre_0", "centre_9"], on_error="skip")
    assert len(samples) == 8
    assert len(skipped) == 1 and "centre_9" in skipped[0]
    assert "centre_9" in caplog.text


def test_empty_centre_raise_and_skip(synthetic_root, caplog):
    empty = synthetic_root / "empty_centre"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(DataError, match=r"empty_centre.images.*no images"):
        list_samples(synthetic_root)
    with caplog.at_level(logging.WARNING):
        samples, skipped = list_samples(synthetic_root, on_error="skip")
    assert len(samples) == 24 and len(skipped) == 1 and "empty_centre" in skipped[0]
    assert "empty_centre" in caplog.text


def test_image_without_mask_and_mask_without_image(synthetic_root, caplog):
    (synthetic_root / "centre_1" / "masks" / "centre_1_0003.png").unlink()
    (synthetic_root / "centre_2" / "images" / "centre_2_0005.png").unlink()
    with pytest.raises(DataError, match=r"centre_1_0003\.png: image without a mask"):
        list_samples(synthetic_root)
    with caplog.at_level(logging.WARNING):
        samples, skipped = list_samples(synthetic_root, on_error="skip")
    assert len(samples) == 22
    assert any("centre_1_0003.png: image without a mask" in r for r in skipped)
    assert any("centre_2_0005.png: mask without an image" in r for r in skipped)
    assert caplog.text.count("skipped:") == 2


def test_duplicate_stem_and_unsupported_file(tmp_path):
    _pair(tmp_path, "x", "a")
    _pair(tmp_path, "x", "b")
    _write(tmp_path / "x" / "images" / "a.jpg", np.zeros((30, 40, 3), np.uint8))
    with pytest.raises(DataError, match=r"duplicate stem 'a'.*a\.jpg.*a\.png"):
        list_samples(tmp_path)
    samples, skipped = list_samples(tmp_path, on_error="skip")
    assert [s.stem for s in samples] == ["b"]
    # A mask left without an image after the duplicate is dropped is reported too.
    assert any("duplicate stem 'a'" in r for r in skipped)
    (tmp_path / "x" / "images" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type"):
        list_samples(tmp_path)


def test_nothing_left_raises(tmp_path):
    (tmp_path / "x" / "images").mkdir(parents=True)
    (tmp_path / "x" / "masks").mkdir()
    with pytest.raises(DataError, match="no image/mask pairs"):
        list_samples(tmp_path, on_error="skip")


# ---------------------------------------------------------------------------- per-item checks


def test_corrupt_image_raise_and_skip(synthetic_root, caplog):
    bad = synthetic_root / "centre_0" / "images" / "centre_0_0002.png"
    bad.write_bytes(b"this is not an image at all" * 10)
    samples, _ = list_samples(synthetic_root)
    with pytest.raises(DataError, match=r"centre_0_0002\.png: unreadable or corrupt image"):
        PolypDataset(samples, 32)
    with caplog.at_level(logging.WARNING):
        ds = PolypDataset(samples, 32, on_error="skip")
    assert len(ds) == 23
    assert "centre_0_0002" not in {s.stem for s in ds.samples}
    assert len(ds.skipped) == 1 and "centre_0_0002.png" in ds.skipped[0]
    assert "centre_0_0002.png" in caplog.text


def test_mask_of_wrong_size(synthetic_root):
    _write(synthetic_root / "centre_1" / "masks" / "centre_1_0000.png", np.zeros((63, 64), np.uint8))
    samples, _ = list_samples(synthetic_root)
    message = r"centre_1_0000\.png: mask size 64x63 differs from its image's 64x64"
    with pytest.raises(DataError, match=message):
        PolypDataset(samples, 32)
    ds = PolypDataset(samples, 32, on_error="skip")
    assert len(ds) == 23 and "centre_1_0000.png" in ds.skipped[0]


def test_non_binary_mask(synthetic_root):
    mask = np.zeros((64, 64), np.uint8)
    mask[:10], mask[10:20] = 255, 128
    _write(synthetic_root / "centre_2" / "masks" / "centre_2_0007.png", mask)
    samples, _ = list_samples(synthetic_root)
    message = r"centre_2_0007\.png: mask is not binary: 3 distinct values \(0, 128, 255\)"
    with pytest.raises(DataError, match=message):
        PolypDataset(samples, 32)
    ds = PolypDataset(samples, 32, on_error="skip")
    assert len(ds) == 23 and "not binary" in ds.skipped[0]


@pytest.mark.parametrize("fg_value", [1, 37, 255])
def test_binary_masks_with_any_single_foreground_value(tmp_path, fg_value):
    mask = np.zeros((30, 40), np.uint8)
    mask[5:10, 5:20] = fg_value
    path = _write(tmp_path / "m.png", mask)
    out = load_mask(path, (40, 30))
    assert out.dtype == bool and out.sum() == 75 and out[5:10, 5:20].all()


def test_rgb_and_one_bit_masks(tmp_path):
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:, :10] = 255
    assert load_mask(_write(tmp_path / "rgb.png", rgb)).sum() == 300
    one_bit = Image.fromarray(rgb[..., 0] > 0).convert("1")
    one_bit.save(tmp_path / "bit.png")
    assert load_mask(tmp_path / "bit.png").sum() == 300


def test_truncated_image_found_at_load_time(synthetic_root, caplog):
    path = synthetic_root / "centre_0" / "images" / "centre_0_0001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact: passes validation, fails to decode
    samples, _ = list_samples(synthetic_root)
    ds = PolypDataset(samples, 32)
    assert len(ds) == 24
    with pytest.raises(DataError, match=r"centre_0_0001\.png"):
        ds[1]
    ds = PolypDataset(samples, 32, on_error="skip")
    with caplog.at_level(logging.WARNING):
        item = ds[1]
    assert item["stem"] == "centre_0_0002"  # falls back to the next loadable item
    assert len(ds.skipped) == 1 and "centre_0_0001.png" in ds.skipped[0]
    assert "centre_0_0001.png" in caplog.text
    ds[1]
    assert len(ds.skipped) == 1  # reported once


# ---------------------------------------------------------------------------- items


def test_item_format(synthetic_root):
    samples, _ = list_samples(synthetic_root)
    ds = PolypDataset(samples, 48, augment=True)
    item = ds[5]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (1, 48, 48) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["stem"] == samples[5].stem and item["centre"] == samples[5].centre
    assert isinstance(item["text"], str) and "polyp" in item["text"]
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 48, 48) and len(batch["text"]) == 2


def _red_blue_pair(root):
    """One 30 x 40 pair: the left half red with its mask, the right half blue."""
    image = np.zeros((30, 40, 3), np.uint8)
    image[:, :20] = (255, 0, 0)
    image[:, 20:] = (0, 0, 255)
    _write(root / "c" / "images" / "s.png", image)
    mask = np.zeros((30, 40), np.uint8)
    mask[:, :20] = 255
    _write(root / "c" / "masks" / "s.png", mask)
    return list_samples(root)[0]


def test_resize_bilinear_image_and_nearest_mask(tmp_path):
    samples = _red_blue_pair(tmp_path)
    item = PolypDataset(samples, 16, prompt_mode="class", resize="squash")[0]
    img, m = item["image"], item["mask"][0]
    assert torch.all(img[0, :, :7] == 1.0) and torch.all(img[2, :, :7] == 0.0)
    assert torch.all(img[2, :, 9:] == 1.0) and torch.all(img[0, :, 9:] == 0.0)
    assert torch.equal(m[:, :8], torch.ones(16, 8)) and torch.equal(m[:, 8:], torch.zeros(16, 8))
    assert item["text"] == "polyp"


def test_letterbox_keeps_the_aspect_ratio_and_pads_the_bottom(tmp_path):
    samples = _red_blue_pair(tmp_path)
    ds = PolypDataset(samples, 16, prompt_mode="class")  # letterbox is the default
    item = ds[0]
    img, m = item["image"], item["mask"][0]
    assert ds.frame(0).content == (12, 16)  # 30 x 40 -> 12 x 16: the aspect ratio kept
    assert torch.all(img[0, :12, :7] == 1.0) and torch.all(img[2, :12, 9:] == 1.0)
    assert torch.all(img[:, 12:] == 0.0) and torch.all(m[12:] == 0.0)  # padding: black, background
    assert torch.equal(m[:12, :8], torch.ones(12, 8)) and torch.equal(m[:12, 8:], torch.zeros(12, 8))
    assert ds.original_mask(0).shape == (30, 40)


def test_unaugmented_item_matches_files_and_caption(synthetic_root):
    samples, _ = list_samples(synthetic_root)
    ds = PolypDataset(samples, 32, augment=False, class_name="lesion")
    item = ds[3]
    image = load_image(samples[3].image_path, 32)
    mask = resize_mask(load_mask(samples[3].mask_path), 32)
    assert torch.equal(item["image"], torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert torch.equal(item["mask"][0].bool(), torch.from_numpy(mask))
    assert item["text"] == attribute_caption(mask, image, "lesion")
    assert "lesion" in item["text"]


def test_augmentation_seeded_per_item_and_epoch(synthetic_root):
    samples, _ = list_samples(synthetic_root)
    a = PolypDataset(samples, 32, augment=True, seed=3)
    b = PolypDataset(list(samples), 32, augment=True, seed=3, cache=False)
    assert torch.equal(a[4]["image"], b[4]["image"]) and torch.equal(a[4]["mask"], b[4]["mask"])
    assert torch.equal(a[4]["image"], a[4]["image"])
    first = a[4]["image"]
    a.set_epoch(1)
    assert not torch.equal(a[4]["image"], first)
    c = PolypDataset(samples, 32, augment=True, seed=4)
    assert any(not torch.equal(c[i]["image"], b[i]["image"]) for i in range(4))


def test_cache_avoids_rereading(synthetic_root):
    samples, _ = list_samples(synthetic_root, ["centre_0"])
    cached = PolypDataset(samples, 32)
    cached.preload(num_threads=2)
    uncached = PolypDataset(samples, 32, cache=False)
    for s in samples:
        s.image_path.unlink()
    assert cached[2]["stem"] == samples[2].stem
    with pytest.raises(DataError, match=samples[2].image_path.name):
        uncached[2]


def test_mixed_prompts_draw_name_or_caption_per_item_and_epoch(synthetic_root):
    """``prompt_mode="mixed"``: each item is its class name or its caption (the same caption as the
    attributes mode), drawn per (seed, epoch, index) with even odds; images and masks are untouched."""
    samples, _ = list_samples(synthetic_root)
    mixed, captions = PolypDataset(samples, 32, prompt_mode="mixed"), PolypDataset(samples, 32)
    named = {}
    for epoch in (0, 1):
        mixed.set_epoch(epoch)
        for i in range(len(mixed)):
            item, caption = mixed[i], captions[i]
            assert item["text"] == ("polyp" if mixed.names_class(i) else caption["text"])
            assert torch.equal(item["image"], caption["image"]) and torch.equal(item["mask"], caption["mask"])
            named[epoch, i] = mixed.names_class(i)
    per_epoch = [sum(named[e, i] for i in range(len(mixed))) for e in (0, 1)]
    assert all(0 < n < len(mixed) for n in per_epoch)  # 24 items at even odds: some of each
    assert any(named[0, i] != named[1, i] for i in range(len(mixed)))  # drawn again each epoch
    again = PolypDataset(samples, 32, prompt_mode="mixed")
    assert [again[i]["text"] for i in range(len(again))] == [mixed.set_epoch(0) or mixed[i]["text"]
                                                             for i in range(len(mixed))]


def test_constructor_argument_checks(synthetic_root):
    samples, _ = list_samples(synthetic_root)
    with pytest.raises(ValueError, match="prompt_mode"):
        PolypDataset(samples, 32, prompt_mode="free")
    with pytest.raises(ValueError, match="on_error"):
        PolypDataset(samples, 32, on_error="warn")
    with pytest.raises(IndexError):
        PolypDataset(samples, 32)[24]


# ---------------------------------------------------------------------------- real data


def test_real_data_listing(polyp_root):
    samples, skipped = list_samples(polyp_root)
    counts = {}
    for s in samples:
        counts[s.centre] = counts.get(s.centre, 0) + 1
    assert counts == {"kvasir_seg": 1000, "cvc_clinicdb": 550, "cvc_colondb": 380}
    assert skipped == []


# ---------------------------------------------------------------------------- single-centre folders


def test_centre_folder_is_one_centre(synthetic_root):
    """``--data <root>/<centre>`` (a folder holding images/ and masks/) is that one centre."""
    centre = synthetic_root / "centre_1"
    samples, skipped = list_samples(centre)
    assert skipped == [] and len(samples) == 8
    assert {s.centre for s in samples} == {"centre_1"}
    assert samples == list_samples(synthetic_root, ["centre_1"])[0]  # same keys as via the root
    assert list_samples(centre, ["centre_1"])[0] == samples
    with pytest.raises(DataError, match=r"single centre 'centre_1'.*\['centre_0'\]"):
        list_samples(centre, ["centre_0"])


def test_flat_images_masks_pair(tmp_path):
    for stem in ("a", "b"):
        _pair(tmp_path, "hospital", stem)
    samples, _ = list_samples(tmp_path / "hospital")
    assert [s.key for s in samples] == ["hospital/a", "hospital/b"]


def test_wrong_centre_lists_the_valid_ones(synthetic_root):
    with pytest.raises(DataError, match=r"no centre 'kvasir'; valid centres: \['centre_0', 'centre_1', 'centre_2'\]"):
        list_samples(synthetic_root, ["kvasir"])


def test_resolve_centres(synthetic_root):
    from shared_model.data.folder import is_centre_folder, resolve_centres

    assert resolve_centres(synthetic_root) == (synthetic_root, ["centre_0", "centre_1", "centre_2"])
    assert resolve_centres(synthetic_root / "centre_2") == (synthetic_root, ["centre_2"])
    assert is_centre_folder(synthetic_root / "centre_0") and not is_centre_folder(synthetic_root)
    with pytest.raises(DataError, match=r"is an images/ folder; give the folder above it \(.*centre_0\)"):
        resolve_centres(synthetic_root / "centre_0" / "images")
    with pytest.raises(DataError, match="no centre folders"):
        resolve_centres(synthetic_root / "centre_0" / "masks")
