"""The real non-polyp tasks (``../shared/data/tasks``): listing, prompts, captions and ``data check``.

Reads a few files only; skips without the folder, fails under CI (see ``tasks_root`` in conftest).
"""

from __future__ import annotations

import shutil

import pytest

from shared_model.config import DataConfig, check_data, from_dict
from shared_model.data import PolypDataset
from shared_model.data.check import check_folder, format_check
from shared_model.data.sources import list_config_samples

PER_TASK = 3


@pytest.fixture(scope="module")
def task_samples(tasks_root):
    cfg = from_dict(DataConfig, {"sources": [
        {"root": str(tasks_root), "centres": ["busi"], "task": "breast-tumour"},
        {"root": str(tasks_root / "retina_vessels"), "task": "retinal-vessels"}]}, "data")
    check_data(cfg)
    samples, skipped = list_config_samples(cfg)
    assert not skipped
    return samples


def test_sources_list_both_tasks_with_their_counts(task_samples):
    counts = {c: sum(s.centre == c for s in task_samples) for c in ("busi", "retina_vessels")}
    assert counts == {"busi": 647, "retina_vessels": 68}  # the README's table
    assert {s.centre: s.task.name for s in task_samples} == {"busi": "breast-tumour",
                                                             "retina_vessels": "retinal-vessels"}


def test_prompts_and_captions_name_the_task_not_a_polyp(task_samples):
    picked = [s for c in ("busi", "retina_vessels") for s in [x for x in task_samples if x.centre == c][:PER_TASK]]
    captions = PolypDataset(picked, 128, prompt_mode="attributes")
    classes = PolypDataset(picked, 128, prompt_mode="class")
    for i, sample in enumerate(captions.samples):
        text = captions[i]["text"]
        if sample.centre == "busi":
            assert "breast tumour" in text and text.endswith("of an ultrasound image"), text
            assert classes[i]["text"] == "breast tumour"
        else:
            assert text.endswith("network of thin retinal blood vessels in a fundus photograph"), text
            assert not {"round", "oval", "irregular", "one"} & set(text.split()), text
            assert classes[i]["text"] == "retinal blood vessels"
        assert "polyp" not in text


def test_data_check_reads_the_task_layout(tasks_root, tmp_path):
    for task in ("busi", "retina_vessels"):
        stems = sorted(p.stem for p in (tasks_root / task / "masks").iterdir())[:PER_TASK]
        for kind, ext in (("images", ".jpg"), ("masks", ".png")):
            (tmp_path / task / kind).mkdir(parents=True)
            for stem in stems:
                shutil.copy(tasks_root / task / kind / f"{stem}{ext}", tmp_path / task / kind)
    (tmp_path / "README.md").write_text("a file beside the task folders is not a centre\n")
    result = check_folder(tmp_path)
    assert result.ok and [(c.name, c.usable) for c in result.centres] == [("busi", PER_TASK),
                                                                         ("retina_vessels", PER_TASK)]
    assert {v for c in result.centres for v in c.mask_values} == {0, 255}
    assert f"problems: none; {2 * PER_TASK} pairs ready for training" in format_check(result)
