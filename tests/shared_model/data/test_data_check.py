"""``promptsam data check``: counts, sizes and mask values of a good folder; each kind of problem."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from shared_model.data.check import check_folder, format_check
from shared_model.data.folder import DataError


def _write(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def test_a_good_dataset_root(synthetic_root, capsys):
    check = check_folder(synthetic_root)
    assert check.ok and not check.single_centre and check.root == synthetic_root.resolve()
    assert [c.name for c in check.centres] == ["centre_0", "centre_1", "centre_2"]
    for centre in check.centres:
        assert (centre.pairs, centre.usable) == (8, 8)
        assert dict(centre.sizes) == {(64, 64): 8}
        assert centre.mask_values == {0, 255}
    assert main(["data", "check", str(synthetic_root)]) == 0
    out = capsys.readouterr().out
    assert "(3 centre folders)" in out and "problems: none; 24 pairs ready for training" in out
    assert re.search(r"\ncentre_1 +8 +8 +0 +64x64 \(8\) +0, 255\n", out), out


def test_one_centres_folder(synthetic_root):
    check = check_folder(synthetic_root / "centre_1")
    assert check.ok and check.single_centre and check.root == synthetic_root.resolve()
    assert [(c.name, c.usable) for c in check.centres] == [("centre_1", 8)]
    assert "centre_1 (one centre's folder)" in format_check(check)


def test_every_kind_of_problem_is_listed(synthetic_root, capsys, caplog):
    centre = synthetic_root / "centre_0"
    images, masks = centre / "images", centre / "masks"
    (masks / "centre_0_0000.png").unlink()  # image without a mask
    shutil.move(images / "centre_0_0001.png", synthetic_root / "elsewhere.png")  # mask without an image
    (images / "notes.txt").write_text("not an image")  # unsupported file type
    (images / "centre_0_0002.png").write_bytes(b"garbage")  # unreadable image
    _write(masks / "centre_0_0003.png", np.arange(64 * 64, dtype=np.uint8).reshape(64, 64) % 3)  # non-binary
    _write(masks / "centre_0_0004.png", np.zeros((32, 32), np.uint8))  # wrong size
    _write(masks / "centre_0_0005.png", np.zeros((64, 64), np.uint8))  # empty: allowed, counted
    (synthetic_root / "centre_3").mkdir()  # a centre without images/ and masks/

    check = check_folder(synthetic_root)
    text = "\n".join(check.problems)
    assert len(check.problems) == 7, text
    assert f"{images / 'centre_0_0000.png'}: image without a mask" in text
    assert f"{masks / 'centre_0_0001.png'}: mask without an image" in text
    assert f"{images / 'notes.txt'}: unsupported file type" in text
    assert f"{images / 'centre_0_0002.png'}: unreadable or corrupt image" in text
    assert f"{masks / 'centre_0_0003.png'}: mask is not binary: 3 distinct values (0, 1, 2)" in text
    assert f"{masks / 'centre_0_0004.png'}: mask size 32x32 differs from its image's 64x64" in text
    assert f"{synthetic_root / 'centre_3' / 'images'}: folder not found (centre 'centre_3' needs images/" in text
    first = check.centres[0]
    assert (first.name, first.pairs, first.usable, first.empty_masks) == ("centre_0", 6, 3, 1)
    assert first.mask_values == {0, 1, 2, 255}
    assert [(c.name, c.pairs) for c in check.centres][1:] == [("centre_1", 8), ("centre_2", 8), ("centre_3", 0)]

    assert main(["data", "check", str(synthetic_root)]) == 1
    out = capsys.readouterr().out
    assert "problems (7; 19 of 22 pairs usable" in out and "mask is not binary" in out
    assert not [r for r in caplog.records if r.name == "shared_model.data.folder"]  # listed once, not logged too


def test_a_truncated_image_is_found_by_the_full_decode(synthetic_root):
    image = synthetic_root / "centre_2" / "images" / "centre_2_0000.png"
    image.write_bytes(image.read_bytes()[:200])  # the header still reads
    check = check_folder(synthetic_root / "centre_2")
    assert check.problems == [f"{image}: unreadable or corrupt image: " + check.problems[0].split(": ", 2)[2]]
    assert check.centres[0].usable == 7


def test_a_missing_folder_or_one_without_pairs_is_an_error(tmp_path, capsys):
    with pytest.raises(DataError, match="data folder not found"):
        check_folder(tmp_path / "absent")
    assert main(["data", "check", str(tmp_path / "absent")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(DataError, match="no image/mask pairs found"):
        check_folder(tmp_path / "empty")
