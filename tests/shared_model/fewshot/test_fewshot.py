"""Few-shot tasks: support sets and their errors, task adapters (what trains, the base fingerprint,
save / load), in-context prototype prompting. Tiny preset, synthetic images."""

import numpy as np
import pytest
import torch
from PIL import Image

from shared_model.checkpoint import save_model_checkpoint
from shared_model.config import AdapterConfig, TrainConfig, get_preset
from shared_model.data.synthetic import generate_dataset
from shared_model.exchange import get_exchanged_state, state_shapes
from shared_model.fewshot.adapt import adapt
from shared_model.fewshot.adapter import (
    AdapterError,
    apply_adapter,
    attach_adapter,
    base_fingerprint,
    load_adapted_model,
    read_adapter,
)
from shared_model.fewshot.incontext import InContextSAM, similarity_map, support_prototypes
from shared_model.fewshot.support import SupportError, draw_indices, load_support
from shared_model.modeling.prompt_sam import build_model

FAST = TrainConfig(steps=3, batch_size=2, lr=3e-3, warmup_steps=1, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    generate_dataset(root / "data", centres=["support"], per_centre=6, image_size=64, seed=5)
    return root


def test_draw_is_seeded_and_distinct():
    assert draw_indices(10, 4, 0) == draw_indices(10, 4, 0)
    assert len(set(draw_indices(10, 10, 1))) == 10
    assert draw_indices(50, 5, 0) != draw_indices(50, 5, 1)


def test_support_set_draws_k_pairs_named_by_the_task(data):
    support = load_support(data / "data" / "support", 3, "skin lesion", seed=2)
    assert support.shots == 3 and support.pool == 6 and len(support.samples) == 3
    item = support.dataset(32)[0]
    assert item["text"] == "skin lesion" and item["image"].shape == (3, 32, 32)
    assert support.record()["images"] == [s.key for s in support.samples]


@pytest.mark.parametrize("case", ["too_many", "no_mask", "empty_mask", "no_name", "missing"])
def test_support_errors_are_one_line_naming_the_file_or_flag(data, tmp_path, case):
    folder = data / "data" / "support"
    if case in ("no_mask", "empty_mask"):
        folder = tmp_path / "site"
        generate_dataset(tmp_path, centres=["site"], per_centre=2, image_size=32, seed=1)
        mask = folder / "masks" / "site_0001.png"
        if case == "no_mask":
            mask.unlink()
        else:
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask)
    shots, name, expect = 2, "lesion", None
    if case == "too_many":
        shots, expect = 7, "--shots 7"
    elif case == "no_mask":
        expect = "site_0001.png: image without a mask"
    elif case == "empty_mask":
        expect = "site_0001.png: empty support mask"
    elif case == "no_name":
        name, expect = "  ", "--name"
    else:
        folder, expect = tmp_path / "nowhere", "--support"
    with pytest.raises(SupportError) as err:
        load_support(folder, shots, name, seed=0)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_adapter_trains_only_its_own_parts_and_leaves_the_base_unchanged(data):
    model = build_model("tiny")
    base_keys = set(state_shapes(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = attach_adapter(model, AdapterConfig())
    assert set(names) == set(state_shapes(model))
    assert not set(names) & base_keys - {"clip_text.ctx", "prompts.sparse.offset",
                                         "sam.prompt_encoder.no_mask_embed.weight",
                                         "sam.prompt_encoder.point_embeddings.2.weight",
                                         "sam.prompt_encoder.point_embeddings.3.weight"}
    assert all(".lora_A.task." in n or ".lora_B.task." in n or "lora_" not in n for n in names)
    assert any(n.startswith("sam.mask_decoder.transformer.") for n in names)
    support = load_support(data / "data" / "support", 2, "lesion")
    dataset = support.dataset(model.image_size)
    from shared_model.training.loop import train_model

    train_model(model, dataset, FAST)
    after = model.state_dict()
    for key, value in before.items():  # every base tensor (frozen ones moved under peft's base_layer)
        moved = key if key in after else ".base_layer.".join(key.rsplit(".", 1))
        if key not in names:
            assert torch.equal(after[moved], value), key


def test_attached_adapter_starts_as_the_base_model():
    model = build_model("tiny").eval()
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        ref = model(images, ["polyp", "polyp"]).mask_logits
        attach_adapter(model, AdapterConfig())
        out = model(images, ["polyp", "polyp"]).mask_logits
    assert torch.allclose(ref, out, atol=1e-5)  # LoRA B starts at zero


def test_base_with_decoder_lora_keeps_its_own_lora_active():
    model = build_model(get_preset("tiny", {"sam": {"decoder_mode": "lora"}}))
    attach_adapter(model, AdapterConfig())
    q = model.sam.mask_decoder.transformer.layers[0].self_attn.q_proj
    assert q.active_adapters == ["default", "task"]
    assert not q.lora_A["default"].weight.requires_grad and q.lora_A["task"].weight.requires_grad


def test_adapt_saves_an_adapter_that_reloads_and_refuses_another_base(data, tmp_path):
    base_path = tmp_path / "base.pt"
    save_model_checkpoint(base_path, build_model("tiny"))
    other_path = tmp_path / "other.pt"
    save_model_checkpoint(other_path, build_model(get_preset("tiny", {"init_seed": 1})))
    from shared_model.checkpoint import load_model_checkpoint

    model, _ = load_model_checkpoint(base_path)
    support = load_support(data / "data" / "support", 2, "lesion")
    result = adapt(model, support, tmp_path / "a.pt", base_path, FAST)
    assert result.path.is_file() and 0 < result.file_bytes < 300_000 and result.train.steps == 3
    payload = read_adapter(result.path)
    assert payload["name"] == "lesion" and payload["extra"]["support"]["shots"] == 2
    loaded, _, _ = load_adapted_model(base_path, result.path)
    state = get_exchanged_state(loaded)
    for key, value in get_exchanged_state(model).items():
        assert torch.equal(state[key], value), key
    with pytest.raises(AdapterError, match="made for another base model") as err:
        load_adapted_model(other_path, result.path)
    assert "\n" not in str(err.value) and str(result.path) in str(err.value)
    with pytest.raises(AdapterError, match="not a task adapter"):
        read_adapter(base_path)


def test_base_fingerprint_sees_every_weight():
    a, b = build_model("tiny"), build_model("tiny")
    assert base_fingerprint(a) == base_fingerprint(b)
    with torch.no_grad():
        b.sam.image_encoder.blocks[0].mlp.lin1.weight[0, 0] += 1e-3  # a frozen weight
    assert base_fingerprint(a) != base_fingerprint(b)


def test_applying_an_adapter_twice_is_refused(tmp_path):
    model = build_model("tiny")
    payload = {"name": "x", "base": {"fingerprint": base_fingerprint(model)}, "adapter": {}, "state": {}}
    attach_adapter(model, AdapterConfig())
    with pytest.raises(AdapterError):
        apply_adapter(model, payload, tmp_path / "x.pt")  # the fingerprint now includes the adapter


def test_prototype_map_finds_the_support_target():
    model = build_model("tiny").eval()
    images = torch.rand(2, 3, 128, 128) * 0.2
    masks = torch.zeros(2, 1, 128, 128)
    images[:, :, 32:96, 32:96] = torch.tensor([0.9, 0.2, 0.2])[:, None, None]  # a red square on dark noise
    masks[:, :, 32:96, 32:96] = 1
    fg, bg = support_prototypes(model.sam, images, masks)
    query = torch.rand(1, 3, 128, 128) * 0.2
    query[:, :, 8:56, 64:120] = torch.tensor([0.9, 0.2, 0.2])[:, None, None]
    feats = torch.nn.functional.normalize(model.sam.encode(query).float(), dim=1)
    prob = similarity_map(feats, fg, bg, 0.1, 128).detach()
    inside, outside = prob[0, 0, 16:48, 72:112].mean(), prob[0, 0, 80:, :48].mean()
    assert inside > outside + 0.2, (float(inside), float(outside))


def test_in_context_model_runs_like_promptsam(data):
    base = build_model("tiny")
    support = load_support(data / "data" / "support", 2, "lesion").dataset(128)
    model = InContextSAM(base, support, "lesion")
    assert not any(p.requires_grad for p in model.parameters())
    out = model(torch.rand(2, 3, 128, 128), ["lesion", "lesion"])
    assert out.mask_logits.shape == (2, 1, 128, 128) and out.boxes.shape == (2, 1, 4)
    assert out.saliency.min() >= 0 and out.saliency.max() <= 1
    from shared_model.training.evaluate import evaluate_model

    assert 0 <= evaluate_model(model, support).aggregate["dice"] <= 1
