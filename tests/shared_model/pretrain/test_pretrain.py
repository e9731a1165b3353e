"""Tests for shared_model.pretrain: the foundation's files load through the real weights' code paths,
resume equals an uninterrupted run, the federation's data is refused, provenance and fingerprint.

Tiny preset, synthetic folders and scenes only, a few steps each (~1 min on 2 cores in all).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_model.config import ConfigError, get_preset
from shared_model.config.experiment import source_commit
from shared_model.config.pretrain import (
    PretrainConfig,
    PretrainTrainConfig,
    ScenesConfig,
    load_pretrain_config,
    pretrain_config_from_dict,
    pretrain_fingerprint,
)
from shared_model.config.site import DataConfig, SourceConfig
from shared_model.modeling.biomedclip import create_open_clip
from shared_model.modeling.prompt_sam import build_model
from shared_model.modeling.sam import build_sam_parts
from shared_model.pretrain.data import (SCENE_KINDS, PretrainData, check_forbidden, jittered_boxes, negate_prompts,
                                        sample_points)
from shared_model.pretrain.export import read_provenance, sha256_file
from shared_model.pretrain.run import STATE, pretrain

REPO = Path(__file__).resolve().parents[3]
TINY_YAML = REPO / "simulation" / "configs" / "pretrain_tiny.yaml"
FOUNDATION = REPO / "shared_model" / "assets" / "foundation"


def small_config(root: Path | None, steps: int = 3, half: bool = True, **train: object) -> PretrainConfig:
    """Tiny model; two synthetic centres as task folders (or none) and a few scenes; batches of 4."""
    sources = ([SourceConfig(root=str(root), centres=["centre_0"], task="breast-tumour"),
                SourceConfig(root=str(root), centres=["centre_1"], task="retinal-vessels")] if root else [])
    settings = dict(steps=steps, batch_size=4, warmup_steps=1, progress=False, log_every=1, save_every=1,
                    half_precision=half, task_fraction=0.5 if root else 0.0, prompt_weights=[1.0, 1.0, 1.0])
    return PretrainConfig(
        model=get_preset("tiny"),
        data=DataConfig(sources=sources, val_fraction=0.0, test_fraction=0.25),
        scenes=ScenesConfig(frames=4, seed=0),
        pretrain=PretrainTrainConfig(**{**settings, **train}),
        forbidden_roots=[str(root.parent / "polyp")] if root else [],
    )


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / STATE, weights_only=True)["model"]


@pytest.fixture(scope="module")
def foundation(tmp_path_factory, _synthetic_master):
    """One 3-step pretraining run (float16 files) and its record."""
    out = tmp_path_factory.mktemp("foundation")
    cfg = small_config(_synthetic_master)
    record = pretrain(cfg, out, device="cpu", command=["test"])
    return cfg, out, record


def test_files_load_through_the_real_weights_paths(foundation):
    """sam_tiny.pth goes through load_sam_checkpoint, clip/ through open_clip's local-dir loader, and
    build_model with model.sam.checkpoint / model.clip.checkpoint starts from the pretrained weights."""
    cfg, out, _ = foundation
    trained = saved_weights(out)
    sam_file = torch.load(out / "sam_tiny.pth", weights_only=True)
    assert {k.split(".")[0] for k in sam_file} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert all(v.dtype == torch.float16 for v in sam_file.values() if v.is_floating_point())
    clip_file = torch.load(out / "clip" / "open_clip_pytorch_model.bin", weights_only=True)
    assert all(v.dtype == torch.float16 for v in clip_file.values() if v.is_floating_point())

    model_cfg = get_preset("tiny")
    sam_cfg = dataclasses.replace(model_cfg.sam, checkpoint=str(out / "sam_tiny.pth"))
    clip_cfg = dataclasses.replace(model_cfg.clip, checkpoint=str(out / "clip"))
    torch.manual_seed(123)  # a random init would differ from the file's weights
    parts = build_sam_parts(sam_cfg, adapters=False)
    clip = create_open_clip(clip_cfg)[0]
    for prefix, module in (("sam.", parts), ("clip.", clip)):
        state = module.state_dict()
        assert state, prefix
        for key, value in state.items():
            assert value.dtype == torch.float32 or not value.is_floating_point()
            expected = trained[prefix + key].half().float() if value.is_floating_point() else trained[prefix + key]
            assert torch.equal(value, expected), prefix + key

    model = build_model(dataclasses.replace(model_cfg, sam=sam_cfg, clip=clip_cfg))
    pairs = [(model.sam.image_encoder.patch_embed.proj.weight, "sam.image_encoder.patch_embed.proj.weight"),
             (model.sam.mask_decoder.iou_token.weight, "sam.mask_decoder.iou_token.weight"),
             (model.clip_vision.trunk.patch_embed.proj.weight, "clip.visual.trunk.patch_embed.proj.weight"),
             (model.clip_text.transformer.embeddings.word_embeddings.weight,
              "clip.text.transformer.embeddings.word_embeddings.weight")]
    for param, key in pairs:
        assert torch.equal(param.detach(), trained[key].half().float()), key
    model.prompts.sparse.load_state_dict(torch.load(out / "text_to_sparse.pt", weights_only=True))  # same layout
    assert torch.equal(model.prompts.sparse.proj.weight.detach(), trained["text_to_sparse.proj.weight"])
    assert not torch.equal(trained["sam.image_encoder.patch_embed.proj.weight"],
                           build_sam_parts(model_cfg.sam, adapters=False).image_encoder.patch_embed.proj.weight)


def test_provenance_records_data_steps_and_fingerprint(foundation):
    cfg, out, record = foundation
    assert read_provenance(out) == json.loads(json.dumps(record))
    assert record["fingerprint"] == pretrain_fingerprint(cfg) and record["complete"] and record["steps"] == 3
    assert record["data"]["train_items"] == {"centre_0": 6, "centre_1": 6, "scenes": len(PretrainData(cfg).scenes)}
    assert record["files"] == {name: sha256_file(out / name) for name in record["files"]}
    assert {"sam_tiny.pth", "clip/open_clip_pytorch_model.bin", "text_to_sparse.pt"} <= set(record["files"])
    assert record["started_utc"] <= record["finished_utc"]
    assert {"torch", "open_clip"} <= set(record["versions"]) and record["seed"] == 0
    assert record["code_commit"] == source_commit()  # the code behind the config's fields
    assert pretrain_config_from_dict(record["config"]) == cfg


def test_fingerprint_follows_the_weights_not_the_watching():
    cfg = small_config(None)
    same = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, progress=True, log_every=7,
                                                                 save_every=9, time_limit_s=60.0))
    assert pretrain_fingerprint(same) == pretrain_fingerprint(cfg)
    how = dataclasses.replace(cfg, model=get_preset("tiny", {"sam": {"attention": "sam",
                                                                     "activation_checkpointing": True}}))
    assert pretrain_fingerprint(how) == pretrain_fingerprint(dataclasses.replace(cfg, model=get_preset("tiny")))
    for changed in (dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, lr=1e-3)),
                    dataclasses.replace(cfg, scenes=ScenesConfig(frames=5)),
                    dataclasses.replace(cfg, model=get_preset("tiny", {"sam": {"depth": 2,
                                                                               "global_attn_indexes": [1]}})),
                    dataclasses.replace(cfg, model=get_preset("tiny", {"clip": {"text": {"pooler": "mean_pooler"}}}))):
        assert pretrain_fingerprint(changed) != pretrain_fingerprint(cfg)


def test_resume_gives_the_uninterrupted_result(tmp_path, synthetic_root):
    cfg = small_config(synthetic_root, steps=3, half=False)
    pretrain(cfg, tmp_path / "straight", device="cpu")
    stopped = pretrain(cfg, tmp_path / "resumed", device="cpu", until=1)
    assert stopped == {"steps": 1, "complete": False} and not (tmp_path / "resumed" / "sam_tiny.pth").exists()
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(cfg, tmp_path / "resumed", device="cpu")
    other = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, lr=1e-3))
    with pytest.raises(ConfigError, match="another config"):
        pretrain(other, tmp_path / "resumed", device="cpu", resume=True)
    record = pretrain(cfg, tmp_path / "resumed", device="cpu", resume=True)
    assert record["steps"] == 3
    a, b = saved_weights(tmp_path / "straight"), saved_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight = torch.load(tmp_path / "straight" / "sam_tiny.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "sam_tiny.pth", weights_only=True)
    assert all(v.dtype == torch.float32 for v in straight.values())
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_the_federations_data_is_refused(tmp_path):
    (tmp_path / "polyp" / "kvasir_seg").mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    base = small_config(None)

    def with_source(root: Path, centres: list[str]) -> PretrainConfig:
        data = DataConfig(sources=[SourceConfig(root=str(root), centres=centres, task="polyp")])
        return dataclasses.replace(base, data=data, forbidden_roots=[str(tmp_path / "polyp")])

    for root, centres in ((tmp_path / "polyp", []), (tmp_path / "polyp" / "kvasir_seg", []),
                          (tmp_path / "polyp", ["kvasir_seg"]), (tmp_path, [])):
        with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.root: .*forbidden root .*polyp"):
            check_forbidden(with_source(root, centres))
    check_forbidden(with_source(tmp_path / "tasks", []))
    # The shipped config forbids the real polyp folder, relative to the project root.
    cfg = load_pretrain_config(TINY_YAML, {"data.sources": [{"root": "../shared/data/polyp", "task": "polyp"}]})
    with pytest.raises(ConfigError, match="forbidden"):
        PretrainData(cfg)


def test_tiny_yaml_parses_and_names_bad_fields():
    cfg = load_pretrain_config(TINY_YAML)
    assert cfg.model.preset == "tiny" and cfg.forbidden_roots == ["../shared/data/polyp"]
    assert [s.task for s in cfg.data.sources] == ["breast-tumour", "retinal-vessels"]
    assert load_pretrain_config(TINY_YAML, {"pretrain.steps": "20"}).pretrain.steps == 20
    with pytest.raises(ConfigError, match=r"--set pretrain.batch_size=1: pretrain.batch_size: must be >= 2"):
        load_pretrain_config(TINY_YAML, {"pretrain.batch_size": "1"})
    with pytest.raises(ConfigError, match=r"pretrain: unknown key\(s\) \['stepz'\]"):
        pretrain_config_from_dict({"pretrain": {"stepz": 1}, "scenes": {"frames": 2}})


def test_prompts_follow_the_masks():
    masks = torch.zeros(3, 1, 32, 32)
    masks[0, 0, 4:10, 20:30] = 1
    masks[1, 0] = 1
    gen = np.random.default_rng(0)
    boxes = jittered_boxes(masks, 0.1, gen)
    x0, y0, x1, y1 = boxes[0, 0].tolist()
    assert abs(x0 - 20) <= 1 and abs(x1 - 30) <= 1 and abs(y0 - 4) <= 0.6 and abs(y1 - 10) <= 0.6
    assert boxes[2, 0].tolist() == [0, 0, 32, 32]  # empty mask: the whole image
    coords, labels = sample_points(masks, 1.0, gen)
    x, y = coords[0, 0].long().tolist()
    assert labels[0].tolist() == [1, 0] and masks[0, 0, y, x] == 1
    xn, yn = coords[0, 1].long().tolist()
    assert masks[0, 0, yn, xn] == 0
    assert labels[1].tolist() == [1, -1] and labels[2].tolist() == [-1, 0]


def test_negative_prompts_name_an_absent_class_against_an_empty_mask():
    texts = ["a small breast tumour in an ultrasound image", "the large polyp", "retinal blood vessels"]
    own = [("breast tumour",), SCENE_KINDS, ("retinal blood vessels",)]
    masks = torch.ones(3, 1, 8, 8)
    classes = ["polyp", "instrument", "breast tumour", "retinal blood vessels"]
    out = negate_prompts(texts, masks, own, 0.999, classes, np.random.default_rng(0))
    assert out.sum() == 0 and masks.sum() == 3 * 64  # the batch's own tensor is left alone
    assert texts[0].startswith("a small ") and texts[0].endswith(" in an ultrasound image")
    assert "breast tumour" not in texts[0]
    assert texts[1].startswith("the large ") and texts[1][len("the large "):] in ("breast tumour", "retinal blood vessels")
    assert texts[2] in ("polyp", "instrument", "breast tumour")
    kept, one = ["the polyp"], torch.ones(1, 1, 8, 8)
    assert negate_prompts(kept, one, [SCENE_KINDS], 0.0, classes, np.random.default_rng(0)) is one
    assert kept == ["the polyp"]


def test_negative_prompts_change_only_text_batches_and_leave_other_runs_alone(synthetic_root):
    base = small_config(synthetic_root, prompt_weights=[0.0, 0.0, 1.0])
    neg = dataclasses.replace(base, pretrain=dataclasses.replace(base.pretrain, negative_prompts=0.5))
    plain, negated = PretrainData(base), PretrainData(neg)
    changed = 0
    for step in range(6):
        a, b = plain.batch(step), negated.batch(step)
        assert torch.equal(a.images, b.images) and a.captions == b.captions  # CLIP pairs untouched
        for ta, tb, ma, mb in zip(a.texts, b.texts, a.masks, b.masks):
            if ta != tb:
                changed += 1
                assert mb.sum() == 0
            else:
                assert torch.equal(ma, mb)
    assert changed > 0
    assert pretrain_fingerprint(neg) != pretrain_fingerprint(base)
    box_plain, box_neg = (PretrainData(dataclasses.replace(c, pretrain=dataclasses.replace(
        c.pretrain, prompt_weights=[1.0, 0.0, 0.0]))) for c in (base, neg))
    for step in range(3):  # box batches are never negated
        a, b = box_plain.batch(step), box_neg.batch(step)
        assert a.texts == b.texts and torch.equal(a.masks, b.masks) and torch.equal(a.boxes, b.boxes)
    with pytest.raises(ConfigError, match=r"pretrain.negative_prompts: must be in \[0, 1\)"):
        pretrain_config_from_dict({"pretrain": {"negative_prompts": 1.0}, "scenes": {"frames": 2},
                                   "data": {"sources": []}})


def test_clip_pairs_scene_frames_with_their_frame_caption():
    data = PretrainData(small_config(None, clip_on_scenes=True))
    batch = data.batch(0)
    assert batch.clip_rows == list(range(len(batch.texts)))
    assert all(c.endswith(" in a colonoscopy image") for c in batch.captions)
    assert not set(batch.captions) & set(batch.texts)  # the frame, not the item's one-target prompt
    assert PretrainData(small_config(None)).batch(0).clip_rows == []


def test_words_config_is_the_committed_config_plus_its_three_keys():
    """pretrain_tiny_words.yaml: the committed foundation's config with the mean pooler and both text switches."""
    configs = REPO / "simulation" / "configs"
    words, committed = (load_pretrain_config(configs / name) for name in ("pretrain_tiny_words.yaml",
                                                                            "pretrain_tiny.yaml"))
    assert (words.model.clip.text.pooler, words.pretrain.negative_prompts, words.pretrain.clip_on_scenes) == (
        "mean_pooler", 0.25, True)
    assert pretrain_fingerprint(words) != pretrain_fingerprint(committed)
    text = dataclasses.replace(words.model.clip.text, pooler=committed.model.clip.text.pooler)
    model = dataclasses.replace(words.model, clip=dataclasses.replace(words.model.clip, text=text))
    reset = dataclasses.replace(words, model=model, pretrain=dataclasses.replace(
        words.pretrain, negative_prompts=0.0, clip_on_scenes=False))
    assert reset == committed


def test_committed_foundation_is_what_its_config_produces():
    """Each committed foundation's provenance names the fingerprint of the repository's config and the hashes
    of the committed files (the command run from that config writes these files)."""
    for folder in sorted(p for p in FOUNDATION.iterdir() if p.is_dir()):
        record = read_provenance(folder)
        cfg = load_pretrain_config(REPO / "simulation" / "configs" / f"pretrain_{record['preset']}.yaml")
        assert record["fingerprint"] == pretrain_fingerprint(cfg), folder
        assert record["complete"] and record["half_precision"]
        assert record["files"] == {name: sha256_file(folder / name) for name in record["files"]}

