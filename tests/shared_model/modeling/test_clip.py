"""BiomedCLIP through open_clip: towers, tokenizer and checkpoint folders (tiny preset; one base-size test)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import open_clip
import pytest
import torch

from shared_model.modeling.biomedclip import CheckpointError, build_clip, create_open_clip, preset_folder
from shared_model.modeling.clip_text import ClipText
from shared_model.modeling.clip_vision import ClipVision
from shared_model.config import ClipConfig, ConfigError, get_preset, merge
from shared_model.modeling.tokenizer import TINY_VOCAB_PATH, Tokenizer, tiny_vocab

CAPTIONS = ["one small pink round polyp, located in the left of the image", "two large polyps"]


def tiny(**overrides) -> ClipConfig:
    return merge(get_preset("tiny").clip, overrides, "model.clip") if overrides else get_preset("tiny").clip


def plain_towers(cfg: ClipConfig) -> tuple[ClipVision, ClipText, Tokenizer, torch.nn.Module]:
    """The towers without adapters, their tokenizer, and the open_clip model they share modules with."""
    model, tok, folder = create_open_clip(cfg)
    return ClipVision(model.visual, cfg), ClipText(model.text, cfg), Tokenizer(tok, cfg.text.vocab_size, folder), model


def build_tokenizer(cfg: ClipConfig) -> Tokenizer:
    return build_clip(cfg)[2]


def names(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.fixture()
def towers():
    torch.manual_seed(0)
    vision, text, tok = build_clip(tiny())
    return vision.eval(), text.eval(), tok


# ------------------------------------------------------------------------------------------ vision


def test_vision_shapes_and_preprocess(towers):
    vision, _, _ = towers
    assert vision.grid == 8
    img = torch.full((2, 3, 96, 80), 0.5)
    x = vision.preprocess(img)
    assert x.shape == (2, 3, 64, 64)
    expected = [(0.5 - m) / s for m, s in zip(vision.cfg.vision.mean, vision.cfg.vision.std)]
    assert torch.allclose(x[0, :, 10, 10], torch.tensor(expected), atol=1e-5)
    assert vision.forward_to(x, 2).shape == (2, 1 + 64, 64)
    assert vision(img).shape == (2, 64)
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        vision.preprocess(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="layer 5"):
        vision.forward_to(x, 5)


def test_split_forward_matches_open_clip():
    vision, _, _, model = plain_towers(tiny())
    vision.eval()
    img = torch.rand(2, 3, 64, 64)
    x = vision.preprocess(img)
    with torch.no_grad():
        reference = model.eval().encode_image(x)
        features = vision.trunk.forward_features(x)
        assert torch.allclose(vision(img), reference, atol=1e-6)
        for layer in range(vision.depth + 1):
            emb, tokens = vision.forward_from(vision.forward_to(x, layer), layer)
            assert torch.allclose(emb, reference, atol=1e-6)
            assert torch.allclose(tokens, features, atol=1e-6)


# ------------------------------------------------------------------------------------------ text


def test_text_shapes_and_context(towers):
    _, text, tok = towers
    ids, mask = tok(CAPTIONS)
    out = text(ids, mask)
    assert out.shape == (2, 64)
    # Padding must not change a text's embedding: encode the short caption alone and in the batch.
    alone = text(*tok(CAPTIONS[1:]))
    assert torch.allclose(alone[0], out[1], atol=1e-5)
    # The context vectors take part in the computation.
    with torch.no_grad():
        text.ctx.add_(torch.randn_like(text.ctx))  # (a constant shift would vanish in LayerNorm)
    assert not torch.allclose(text(ids, mask), out, atol=1e-3)
    too_long = torch.full((1, 61), 5)
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        text(too_long, torch.ones_like(too_long))


@pytest.mark.parametrize("pooler", ["cls_last_hidden_state_pooler", "mean_pooler"])
def test_text_without_context_equals_open_clip(pooler):
    _, text, tok, model = plain_towers(tiny(text={"n_ctx": 0, "pooler": pooler}))
    ids, mask = tok(CAPTIONS)
    with torch.no_grad():
        assert torch.allclose(text.eval()(ids, mask), model.eval().encode_text(tok.open_clip(CAPTIONS)), atol=1e-6)


def test_mean_pooler_averages_the_real_tokens_in_both_forms():
    """``text.pooler: mean_pooler``: open_clip's text embedding, padding left out, also in the vmappable form."""
    _, text, tok, model = plain_towers(tiny(text={"n_ctx": 0, "pooler": "mean_pooler"}))
    assert type(text.pooler) is open_clip.hf_model.MeanPooler
    ids, mask = tok(CAPTIONS)
    with torch.no_grad():
        text.eval()
        reference = model.eval().encode_text(tok.open_clip(CAPTIONS))
        assert torch.allclose(text(ids, mask), reference, atol=1e-5)
        assert torch.allclose(text(ids, mask, vmappable=True), reference, atol=1e-5)
        one = text(ids[:1, : int(mask[0].sum())], mask[:1, : int(mask[0].sum())])
        assert torch.allclose(one, reference[:1], atol=1e-5)  # padding does not enter the mean


def test_unknown_pooler_is_named():
    with pytest.raises(ConfigError, match="model.clip.text.pooler: 'last' is not an open_clip text pooler.*mean_pooler"):
        build_clip(tiny(text={"pooler": "last"}))


# ------------------------------------------------------------------------------------------ adapters


def test_trainable_parameters_are_exactly_the_adapters(towers):
    vision, text, _ = towers
    lora = lambda prefix: {f"{prefix}.lora_{m}.default.weight" for m in "AB"}  # noqa: E731
    assert names(vision) == lora("trunk.blocks.2.attn.qkv") | lora("trunk.blocks.3.attn.qkv")
    assert names(text) == {"ctx"} | lora("transformer.encoder.layer.1.attention.self.query") | lora(
        "transformer.encoder.layer.1.attention.self.value"
    )
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    # Vision: 2 blocks x (A 4x64 + B 192x4). Text: ctx 4x64 + 2 targets x (A 4x64 + B 64x4).
    assert count(vision) == 2 * (4 * 64 + 192 * 4)
    assert count(text) == 4 * 64 + 2 * (4 * 64 + 64 * 4)


def test_unfrozen_blocks_are_trainable():
    vision = build_clip(tiny(vision={"unfreeze_last_blocks": 1, "lora_last_blocks": 1}))[0]
    block = {n for n in names(vision) if n.startswith("trunk.blocks.3.")}
    assert names(vision) == block
    # LayerNorms 2 x 128, qkv 64x192+192, proj 64x64+64, fc1 64x256+256, fc2 256x64+64, LoRA 4x64+192x4.
    expected = 2 * 128 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64) + (4 * 64 + 192 * 4)
    assert sum(p.numel() for p in vision.parameters() if p.requires_grad) == expected


def test_adapters_start_as_identity_and_get_gradients():
    torch.manual_seed(0)
    vision, text, tok, _ = plain_towers(tiny())
    vision.eval()
    text.eval()
    img, (ids, mask) = torch.rand(2, 3, 64, 64), tok(CAPTIONS)
    with torch.no_grad():
        before = vision(img), text(ids, mask)
    vision.add_adapters()
    text.add_adapters()
    with torch.no_grad():
        assert torch.allclose(vision(img), before[0], atol=1e-6)
        assert torch.allclose(text(ids, mask), before[1], atol=1e-6)
        for p in [*vision.parameters(), *text.parameters()]:
            if p.requires_grad and p.ndim == 2 and not p.any():
                p.normal_(0, 0.1)  # LoRA B starts at zero, which would zero the gradient of A
    (vision(img) * text(ids, mask)).sum().backward()
    for module in (vision, text):
        for name, p in module.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name


def test_bad_adapter_config_is_named():
    with pytest.raises(ConfigError, match="model.clip.vision.lora_last_blocks"):
        build_clip(tiny(vision={"lora_last_blocks": 5}))
    with pytest.raises(ConfigError, match="model.clip.text.lora_targets"):
        build_clip(tiny(text={"lora_targets": ["qkv"]}))
    with pytest.raises(ConfigError, match="model.clip.text.context_length"):
        build_clip(tiny(text={"context_length": 65}))


# ------------------------------------------------------------------------------------------ tokenizer


def test_tiny_vocab_asset():
    vocab = TINY_VOCAB_PATH.read_text().splitlines()
    assert vocab == tiny_vocab()
    assert len(vocab) < 512 and len(set(vocab)) == len(vocab)
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_tokenizer_round_trip_and_padding():
    tok = build_tokenizer(tiny())
    ids, mask = tok(["One small PINK polyp.", "zebra-like lesion"])
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == mask.shape
    assert ids[:, 0].tolist() == [tok.cls_id] * 2
    assert tok.decode(ids[0]) == "one small pink polyp."
    assert tok.decode(ids[1]) == "zebra - like lesion"  # spelled with single characters and ## pieces
    assert tok.hf.unk_token_id not in ids.tolist()
    lengths = mask.sum(1).tolist()
    assert ids.shape[1] == max(lengths)
    short = lengths.index(min(lengths))
    assert ids[short, min(lengths) - 1] == tok.sep_id and (ids[short, min(lengths):] == tok.pad_id).all()
    with pytest.raises(TypeError):
        tok("a single string")


def test_tokenizer_truncates_to_context_minus_ctx():
    tok = build_tokenizer(tiny())
    assert tok.max_length == 48 - 4
    ids, mask = tok(["polyp " * 100])
    assert ids.shape == (1, 44) and mask.all()
    assert ids[0, 0] == tok.cls_id and ids[0, -1] == tok.sep_id


def test_tokenizer_vocab_must_fit_embedding_table():
    with pytest.raises(ConfigError, match="vocab_size"):
        build_tokenizer(tiny(text={"vocab_size": 100}))


def test_preset_build_logs_one_line(caplog):
    """The tokenizer rule is logged; open_clip's step-by-step log of building a weightless folder is not."""
    with caplog.at_level("INFO"):
        build_clip(tiny())
    assert [(r.name, r.levelname) for r in caplog.records] == [("shared_model.modeling.biomedclip", "INFO")]
    assert "packaged tiny vocabulary" in caplog.text


# ------------------------------------------------------------------------------------------ folders


def write_folder(dest, model: torch.nn.Module, cfg: ClipConfig, hf_name: str | None = None):
    """A BiomedCLIP-layout folder with ``model``'s weights; the text tower's name is the folder (or ``hf_name``)."""
    shutil.copytree(preset_folder(cfg), dest)
    config = json.loads((dest / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"].update(hf_model_name=hf_name or str(dest), hf_tokenizer_name=hf_name or str(dest))
    (dest / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), dest / "open_clip_pytorch_model.bin")
    return dest


@pytest.fixture()
def folder(tmp_path):
    torch.manual_seed(0)
    model = create_open_clip(tiny())[0]
    return write_folder(tmp_path / "biomedclip", model, tiny())


def test_folder_loads_as_open_clip_loads_it(folder):
    """The towers built from a folder compute open_clip's embeddings (context vectors off, LoRA B = 0)."""
    cfg = dataclasses.replace(tiny(text={"n_ctx": 0}), checkpoint=str(folder))
    reference, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    reference_tok = open_clip.get_tokenizer(f"local-dir:{folder}", context_length=48)
    torch.manual_seed(1)  # random init would now differ from the folder's weights
    vision, text, tok = build_clip(cfg)
    img = torch.rand(2, 3, 64, 64)
    ids, mask = tok(CAPTIONS)
    ref_ids = reference_tok(CAPTIONS)
    assert torch.equal(ref_ids[:, : ids.shape[1]], ids) and not ref_ids[:, ids.shape[1]:].any()
    with torch.no_grad():
        reference.eval()
        assert torch.allclose(vision.eval()(img), reference.encode_image(transform.transforms[-1](img)), atol=1e-6)
        assert torch.allclose(text.eval()(ids, mask), reference.encode_text(ref_ids), atol=1e-6)


def test_safetensors_file_is_preferred(folder):
    from safetensors.torch import save_file

    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    state["visual.head.proj.weight"] = torch.zeros_like(state["visual.head.proj.weight"])
    save_file(state, str(folder / "open_clip_model.safetensors"))
    vision = build_clip(dataclasses.replace(tiny(), checkpoint=str(folder)))[0]
    assert not vision.head.proj.weight.any()


def test_wrong_architecture_names_folder_and_keys(folder):
    shallow = tiny(vision={"depth": 3, "lora_last_blocks": 1})
    with pytest.raises(ConfigError, match="model.clip.vision.depth=3 \\(folder: 4\\)"):
        build_clip(dataclasses.replace(shallow, checkpoint=str(folder)))
    mean = tiny(text={"pooler": "mean_pooler"})  # the folder's tower pools the [CLS] token
    with pytest.raises(ConfigError, match="text.pooler='mean_pooler' \\(folder: 'cls_last_hidden_state_pooler'\\)"):
        build_clip(dataclasses.replace(mean, checkpoint=str(folder)))
    # A missing key, an extra key (open_clip loads strictly); the position ids of older transformers are tolerated.
    weights = folder / "open_clip_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    del state["visual.trunk.norm.weight"]
    state["text.transformer.embeddings.position_ids"] = torch.arange(64)[None]
    state["text.extra.weight"] = torch.zeros(1)
    torch.save(state, weights)
    with pytest.raises(CheckpointError, match=re.escape(str(folder))) as err:
        build_clip(dataclasses.replace(tiny(), checkpoint=str(folder)))
    assert "visual.trunk.norm.weight" in str(err.value) and "text.extra.weight" in str(err.value)
    assert "position_ids" not in str(err.value)


def test_missing_folder_and_files_are_named(tmp_path, folder):
    absent = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(absent))):
        build_clip(dataclasses.replace(tiny(), checkpoint=str(absent)))
    (folder / "open_clip_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "open_clip_config.json"))):
        build_clip(dataclasses.replace(tiny(), checkpoint=str(folder)))
    (folder / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        build_clip(dataclasses.replace(tiny(), checkpoint=str(folder)))
    (folder / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        build_clip(dataclasses.replace(tiny(), checkpoint=str(folder)))


# ------------------------------------------------------------------------------------------ base size


def test_base_preset_offline_and_hub_folder(tmp_path, monkeypatch, caplog):
    """BiomedCLIP ViT-B/16 + BERT-base, offline: sizes; the tokenizer rule is logged; a folder laid out as the
    Hub's (BiomedBERT's Hub id as the text tower, no config.json) loads the same weights (~30 s on 2 cores).
    Context vectors are off here (open_clip has none); they are covered by the tiny tests."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)
    base = get_preset("base").clip
    assert base.text.n_ctx * base.text.width == 12_288  # the CoOp context of REFERENCE.md
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, n_ctx=0))
    with caplog.at_level("WARNING", logger="shared_model.modeling.biomedclip"):
        model, _, _ = create_open_clip(cfg)
    assert "tiny vocabulary" in caplog.text
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # ViT-B/16 trunk: patch 3*16*16*768+768, cls 768, pos 197*768, 12 blocks of 7,087,872, final norm 1536.
    assert count(model.visual.trunk) == 590_592 + 768 + 151_296 + 12 * 7_087_872 + 1_536 == 85_798_656
    assert count(model.visual.head) == 768 * 512
    # BERT-base without pooler: embeddings (30522+512+2)*768+1536 = 23,837,184, then 12 layers of 7,087,872.
    assert count(model.text.transformer) == 23_837_184 + 12 * 7_087_872 == 108_891_648
    assert count(model.text.proj) == 768 * 640 + 640 * 512 == 819_200

    hub_id = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    hub = write_folder(tmp_path / "hub", model, cfg, hf_name=hub_id)
    (hub / "config.json").unlink()
    config = json.loads((hub / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "vit_base_patch16_224"
    del config["model_cfg"]["text_cfg"]["hf_model_pretrained"]
    (hub / "open_clip_config.json").write_text(json.dumps(config))
    vision, text, tok = build_clip(dataclasses.replace(cfg, checkpoint=str(hub)))
    img = torch.rand(1, 3, 224, 224)
    ids, mask = tok(["one small pink polyp"])
    with torch.no_grad():
        model.eval()
        assert torch.allclose(model.encode_image(vision.preprocess(img)), vision.eval()(img), atol=1e-5)
        assert torch.allclose(model.encode_text(ids), text.eval()(ids, mask), atol=1e-5)
