"""BiomedCLIP towers, tokenizer and checkpoint folders (tiny preset; one base-size test)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from shared_model.biomedclip import (
    CheckpointError,
    architecture,
    build_clip,
    clip_config_from_folder,
    load_biomedclip,
    save_biomedclip_folder,
)
from shared_model.clip_text import ClipText
from shared_model.clip_vision import ClipVision
from shared_model.config import ClipConfig, ConfigError, get_preset, merge
from shared_model.tokenizer import TINY_VOCAB_PATH, build_tokenizer, tiny_vocab

CAPTIONS = ["one small pink round polyp, located in the left of the image", "two large polyps"]


def tiny(**overrides) -> ClipConfig:
    return merge(get_preset("tiny").clip, overrides, "model.clip") if overrides else get_preset("tiny").clip


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


def test_split_forward_matches_timm(towers):
    vision, _, _ = towers
    img = torch.rand(2, 3, 64, 64)
    x = vision.preprocess(img)
    with torch.no_grad():
        reference = vision.head(vision.trunk(x))  # open_clip TimmModel.forward
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


def test_text_without_context_equals_plain_bert():
    torch.manual_seed(0)
    text = ClipText(tiny(text={"n_ctx": 0})).eval()
    ids, mask = build_tokenizer(tiny(text={"n_ctx": 0}))(CAPTIONS)
    with torch.no_grad():
        hidden = text.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(text(ids, mask), text.proj(hidden[:, 0]), atol=1e-6)


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
    vision = ClipVision(tiny(vision={"unfreeze_last_blocks": 1, "lora_last_blocks": 1}))
    vision.add_adapters()
    block = {n for n in names(vision) if n.startswith("trunk.blocks.3.")}
    assert names(vision) == block
    # LayerNorms 2 x 128, qkv 64x192+192, proj 64x64+64, fc1 64x256+256, fc2 256x64+64, LoRA 4x64+192x4.
    expected = 2 * 128 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64) + (4 * 64 + 192 * 4)
    assert sum(p.numel() for p in vision.parameters() if p.requires_grad) == expected


def test_adapters_start_as_identity_and_get_gradients():
    torch.manual_seed(0)
    cfg = tiny()
    vision, text, tok = ClipVision(cfg).eval(), ClipText(cfg).eval(), build_tokenizer(cfg)
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
        ClipVision(tiny(vision={"lora_last_blocks": 5}))
    with pytest.raises(ConfigError, match="model.clip.text.lora_targets"):
        ClipText(tiny(text={"lora_targets": ["qkv"]})).add_adapters()
    with pytest.raises(ConfigError, match="model.clip.text.context_length"):
        ClipText(tiny(text={"context_length": 65}))


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


# ------------------------------------------------------------------------------------------ folders


def test_folder_round_trip(tmp_path, towers):
    vision, text, tok = towers
    with torch.no_grad():
        for p in vision.parameters():  # randomise LoRA B (and zero biases): adapters must stay out of the folder
            if not p.any():
                p.normal_(0, 0.1)
    folder = save_biomedclip_folder(tmp_path / "ckpt", vision, text, tiny())
    assert {p.name for p in folder.iterdir()} >= {
        "open_clip_config.json", "open_clip_pytorch_model.bin", "config.json", "vocab.txt", "tokenizer_config.json"
    }
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    assert "logit_scale" in state and "visual.head.proj.weight" in state and "text.proj.2.weight" in state
    assert not [k for k in state if "lora" in k or "base_layer" in k or k.endswith("ctx")]
    assert architecture(clip_config_from_folder(folder)) == architecture(tiny())

    cfg = dataclasses.replace(tiny(), checkpoint=str(folder))
    vision2, text2, tok2 = build_clip(cfg)
    vision2.eval()
    text2.eval()
    plain = ClipVision(tiny()).eval()  # the loaded backbone alone, without the trained LoRA
    load_biomedclip(folder, plain, ClipText(tiny()))
    with torch.no_grad():
        text2.ctx.copy_(text.ctx)
        img, (ids, mask) = torch.rand(2, 3, 64, 64), tok(CAPTIONS)
        assert torch.equal(tok2(CAPTIONS)[0], ids)
        assert torch.equal(text2(ids, mask), text(ids, mask))
        assert torch.equal(vision2(img), plain(img))
        # Loading after LoRA injection maps peft's base_layer names back and leaves the adapters as
        # they were (the file has none); with B = 0 LoRA is the identity.
        adapters = {k: v.clone() for k, v in vision.state_dict().items() if "lora_" in k}
        assert adapters and any(v.any() for k, v in adapters.items() if "lora_B" in k)
        load_biomedclip(folder, vision, text)
        assert all(torch.equal(vision.state_dict()[k], v) for k, v in adapters.items())
        for name, p in vision.named_parameters():
            if "lora_B" in name:
                p.zero_()
        assert torch.equal(vision(img), plain(img))


def test_safetensors_file_is_preferred(tmp_path, towers):
    from safetensors.torch import save_file

    vision, text, _ = towers
    folder = save_biomedclip_folder(tmp_path, vision, text, tiny())
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    state["visual.head.proj.weight"] = torch.zeros_like(state["visual.head.proj.weight"])
    save_file(state, str(folder / "open_clip_model.safetensors"))
    plain = ClipVision(tiny()).eval()
    load_biomedclip(folder, plain, ClipText(tiny()))
    assert not plain.head.proj.weight.any()


def test_wrong_architecture_names_file_and_keys(tmp_path, towers):
    vision, text, _ = towers
    folder = save_biomedclip_folder(tmp_path, vision, text, tiny())
    weights = str(folder / "open_clip_pytorch_model.bin")
    shallow = tiny(vision={"depth": 3, "lora_last_blocks": 1})
    with pytest.raises(CheckpointError, match=re.escape(weights) + ".*unexpected keys.*visual.trunk.blocks.3"):
        load_biomedclip(folder, ClipVision(shallow), ClipText(shallow))
    wider = tiny(text={"intermediate_size": 96})
    with pytest.raises(CheckpointError, match="shape-mismatched.*text.transformer.encoder.layer.0.intermediate"):
        load_biomedclip(folder, ClipVision(wider), ClipText(wider))
    with pytest.raises(ConfigError, match="model.clip.vision.depth=3 \\(folder: 4\\)"):
        build_clip(dataclasses.replace(shallow, checkpoint=str(folder)))
    # A missing key, an extra key; BERT's unused pooling layer and position ids are tolerated.
    state = torch.load(weights, weights_only=True)
    del state["visual.trunk.norm.weight"]
    state["text.transformer.pooler.dense.weight"] = torch.zeros(64, 64)
    state["text.transformer.embeddings.position_ids"] = torch.arange(64)[None]
    state["text.extra.weight"] = torch.zeros(1)
    torch.save(state, weights)
    with pytest.raises(CheckpointError) as err:
        load_biomedclip(folder, ClipVision(tiny()), ClipText(tiny()))
    message = str(err.value)
    assert "missing keys (1: visual.trunk.norm.weight)" in message
    assert "unexpected keys (1: text.extra.weight)" in message


def test_missing_folder_and_files_are_named(tmp_path, towers):
    vision, text, _ = towers
    absent = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(absent))):
        build_clip(dataclasses.replace(tiny(), checkpoint=str(absent)))
    with pytest.raises(FileNotFoundError, match=re.escape(str(absent))):
        load_biomedclip(absent, vision, text)
    folder = save_biomedclip_folder(tmp_path / "ckpt", vision, text, tiny())
    (folder / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model.bin"):
        load_biomedclip(folder, vision, text)
    (folder / "open_clip_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "open_clip_config.json"))):
        clip_config_from_folder(folder)


def test_biomedclip_hub_config_is_the_base_architecture(tmp_path):
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    hub = {
        "model_cfg": {
            "embed_dim": 512,
            "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                         "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                         "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                         "context_length": 256},
        },
        "preprocess_cfg": {"mean": mean, "std": std},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(hub))
    cfg = clip_config_from_folder(tmp_path)
    assert architecture(cfg) == architecture(get_preset("base").clip)
    assert cfg.text.context_length == 256 and cfg.checkpoint == str(tmp_path)
    hub["model_cfg"]["vision_cfg"]["timm_model_name"] = "convnext_base"
    (tmp_path / "open_clip_config.json").write_text(json.dumps(hub))
    with pytest.raises(ConfigError, match="open_clip_config.json: model_cfg.vision_cfg.timm_model_name"):
        clip_config_from_folder(tmp_path)
    del hub["model_cfg"]["vision_cfg"]["timm_pool"]  # open_clip would then average-pool: not BiomedCLIP
    (tmp_path / "open_clip_config.json").write_text(json.dumps(hub))
    with pytest.raises(ConfigError, match="timm_pool"):
        clip_config_from_folder(tmp_path)


# ------------------------------------------------------------------------------------------ base size


def test_base_architecture_sizes_and_open_clip_compatibility(tmp_path, monkeypatch):
    """BiomedCLIP ViT-B/16 + BERT-base, offline: sizes; open_clip loads our folder strictly and computes the
    same embeddings as the towers rebuilt from it (~20-30 s on 2 cores). Context vectors are off here
    (open_clip has none); they are covered by the tiny tests."""
    from open_clip.model import CustomTextCLIP

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    base = get_preset("base").clip
    assert base.text.n_ctx * base.text.width == 12_288  # the CoOp context of REFERENCE.md
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, n_ctx=0))
    vision, text = ClipVision(cfg), ClipText(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # ViT-B/16 trunk: patch 3*16*16*768+768, cls 768, pos 197*768, 12 blocks of 7,087,872, final norm 1536.
    assert count(vision.trunk) == 590_592 + 768 + 151_296 + 12 * 7_087_872 + 1_536 == 85_798_656
    assert count(vision.head) == 768 * 512
    # BERT-base without pooler: embeddings (30522+512+2)*768+1536 = 23,837,184, then 12 layers of 7,087,872.
    assert count(text.transformer) == 23_837_184 + 12 * 7_087_872 == 108_891_648
    assert count(text.proj) == 768 * 640 + 640 * 512 == 819_200

    folder = save_biomedclip_folder(tmp_path, vision, text, cfg)
    del vision, text
    reference = CustomTextCLIP(
        embed_dim=512,
        vision_cfg={"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                    "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        text_cfg={"hf_model_name": str(folder), "hf_model_pretrained": False, "hf_proj_type": "mlp",
                  "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    ).eval()
    reference.load_state_dict(torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True), strict=True)
    vision2, text2, tok = build_clip(dataclasses.replace(cfg, checkpoint=str(folder)))
    img = torch.rand(1, 3, 224, 224)
    ids, mask = tok(["one small pink polyp"])
    with torch.no_grad():
        assert torch.allclose(reference.encode_image(vision2.preprocess(img)), vision2.eval()(img), atol=1e-5)
        assert torch.allclose(reference.encode_text(ids), text2.eval()(ids, mask), atol=1e-5)
