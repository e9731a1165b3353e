"""Tests for shared_model.modeling.foundation: a model built from ``model.foundation`` carries the
foundation's weights through the real weights' loaders, records its digest, and refuses mix-ups."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from shared_model.checkpoint import CheckpointError, load_model_checkpoint, read_checkpoint, save_model_checkpoint
from shared_model.config import ConfigError, get_preset
from shared_model.exchange import get_exchanged_state
from shared_model.modeling import foundation as F
from shared_model.modeling.prompt_sam import build_model

TINY = F.ASSETS / "tiny"


def _tiny(**kw):
    return dataclasses.replace(get_preset("tiny"), **kw)


@pytest.fixture(scope="module")
def adapted():
    return build_model(_tiny(foundation="tiny"))


def test_packaged_tiny_foundation_is_committed():
    assert "tiny" in F.packaged_foundations()
    assert (TINY / "sam_tiny.pth").is_file() and (TINY / "clip" / "open_clip_pytorch_model.bin").is_file()


def test_weights_come_from_the_foundation_files(adapted):
    sam_state = torch.load(TINY / "sam_tiny.pth", map_location="cpu", weights_only=True)
    own = adapted.sam.image_encoder.state_dict()
    for key in ("patch_embed.proj.weight", "pos_embed", "neck.0.weight"):
        assert torch.equal(own[key], sam_state[f"image_encoder.{key}"].float()), key
    sparse = torch.load(TINY / "text_to_sparse.pt", map_location="cpu", weights_only=True)
    for key, value in adapted.prompts.sparse.state_dict().items():
        assert torch.equal(value, sparse[key].float()), key
    random = build_model("tiny")
    assert not torch.equal(random.sam.image_encoder.patch_embed.proj.weight,
                           adapted.sam.image_encoder.patch_embed.proj.weight)
    # The clip tower differs from the random one too.
    a = next(p for n, p in adapted.clip_vision.named_parameters() if "patch_embed" in n)
    b = next(p for n, p in random.clip_vision.named_parameters() if "patch_embed" in n)
    assert not torch.equal(a, b)


def test_same_exchanged_keys_and_config_kept_as_written(adapted):
    random = build_model("tiny")
    assert list(get_exchanged_state(adapted)) == list(get_exchanged_state(random))
    assert adapted.cfg.foundation == "tiny" and adapted.cfg.sam.checkpoint is None
    assert adapted.cfg.clip.checkpoint is None  # the checkpoint records the name, not this machine's paths
    assert adapted.foundation_digest and random.foundation_digest is None


def test_a_pretrain_output_folder_works_like_the_packaged_name(tmp_path, adapted):
    folder = tmp_path / "my_foundation"
    shutil.copytree(TINY, folder)
    model = build_model(_tiny(foundation=str(folder)))
    assert model.foundation_digest == adapted.foundation_digest
    assert torch.equal(model.sam.image_encoder.pos_embed, adapted.sam.image_encoder.pos_embed)


def test_bad_foundations_are_named(tmp_path):
    with pytest.raises(ConfigError, match="model.foundation: 'nope'"):
        build_model(_tiny(foundation="nope"))
    empty = tmp_path / "empty"
    (empty / "clip").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no sam_tiny.pth"):
        build_model(_tiny(foundation=str(empty)))
    both = _tiny(foundation="tiny")
    both = dataclasses.replace(both, sam=dataclasses.replace(both.sam, checkpoint=str(TINY / "sam_tiny.pth")))
    with pytest.raises(ConfigError, match="model.sam.checkpoint: set together with model.foundation"):
        build_model(both)
    with pytest.raises(ConfigError, match="sam_base.pth"):  # the tiny foundation has no base weights
        build_model(dataclasses.replace(get_preset("base"), foundation="tiny"))


def test_checkpoint_roundtrip_and_another_foundation_refused(tmp_path, adapted):
    path = save_model_checkpoint(tmp_path / "model.pt", adapted)
    model, _ = load_model_checkpoint(path)
    assert model.foundation_digest == adapted.foundation_digest
    for (k, a), b in zip(get_exchanged_state(adapted).items(), get_exchanged_state(model).values()):
        assert torch.equal(a, b), k
    payload = read_checkpoint(path)
    payload["foundation"] = "0" * 64
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="another version of foundation 'tiny'"):
        load_model_checkpoint(tmp_path / "other.pt")


def test_found_in_the_installed_project_when_running_from_a_bundle_copy(tmp_path, monkeypatch):
    """A Flower app bundle carries only source and text files: the weights come from the install."""
    copy = tmp_path / "fab" / "shared_model" / "assets" / "foundation"
    (copy / "tiny").mkdir(parents=True)
    (copy / "tiny" / "provenance.json").write_text("{}")
    monkeypatch.setattr(F, "ASSETS", copy)
    folder = F.foundation_folder("tiny")
    assert folder != copy / "tiny" and (folder / "sam_tiny.pth").is_file()
