"""PromptSAM wired end to end on the tiny preset: shapes, gradients, exchanged state, prompts."""

import pytest
import torch

from shared_model.config import get_preset, merge
from shared_model.exchange import get_exchanged_state, set_exchanged_state, trainable_names
from shared_model.modeling.prompt_sam import build_model


@pytest.fixture(scope="module")
def model():
    return build_model("tiny")


def batch(b=2, s=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, s, s, generator=g)
    masks = torch.zeros(b, 1, s, s)
    masks[:, :, 40:90, 30:80] = 1
    return images, masks, ["one small pink round polyp", "one large red oval polyp"][:b]


def test_forward_shapes(model):
    images, _, texts = batch()
    out = model(images, texts)
    assert out.mask_logits.shape == (2, 1, 128, 128)
    assert out.saliency.shape == out.refined_saliency.shape == (2, 1, 128, 128)
    sal = out.refined_saliency.detach()
    assert 0 <= float(sal.min()) and float(sal.max()) <= 1
    assert out.boxes.shape[0] == 2 and out.boxes.shape[-1] == 4
    assert out.image_embedding.shape == out.text_embedding.shape == (2, 64)
    assert out.iou_pred.shape == (2, 1)


def test_every_exchanged_parameter_gets_a_gradient():
    model = build_model("tiny").train()
    # LoRA B and the dense projection's last layer start at zero, which zeroes the gradients of
    # the layers before them; move every trainable tensor off zero so each path is exercised.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.abs().sum() > 0:
                p.normal_(0, 0.02)
    images, masks, texts = batch()
    loss, parts = model.compute_losses(model(images, texts), masks)
    loss.backward()
    assert {"dice", "bce", "nce", "ib", "saliency", "total"} <= set(parts)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen_with_grad == []
    gates = [p for n, p in model.named_parameters() if n.startswith("bottleneck.")]
    assert gates and all(p.grad.abs().sum() > 0 for p in gates)


def test_exchanged_keys_are_trainable_and_contain_no_frozen_weight(model):
    state = get_exchanged_state(model)
    assert list(state) == trainable_names(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not (frozen & set(state))
    kinds = {"lora_", "ctx", "bottleneck.", "prompts.", "sam.prompt_encoder.", "sam.mask_decoder."}
    assert all(any(k in name for k in kinds) for name in state), [n for n in state if not any(k in n for k in kinds)]
    # the frozen image encoders contribute nothing but LoRA
    assert not [n for n in state if n.startswith("sam.image_encoder.") and "lora_" not in n]
    assert not [n for n in state if n.startswith("clip_vision.") and "lora_" not in n]


def test_build_is_deterministic_and_state_round_trips():
    a, b = build_model("tiny"), build_model("tiny")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    state = get_exchanged_state(a)
    state = {k: v + 0.01 for k, v in state.items()}
    set_exchanged_state(b, state)
    for k, v in get_exchanged_state(b).items():
        torch.testing.assert_close(v, state[k])


def test_user_boxes_replace_saliency_boxes(model):
    images, _, texts = batch()
    model.eval()
    boxes = torch.tensor([[[10.0, 10.0, 60.0, 70.0]], [[0.0, 0.0, 128.0, 128.0]]])
    with torch.no_grad():
        out = model(images, texts, boxes=boxes)
        auto = model(images, texts)
    assert torch.equal(out.boxes, boxes)
    assert not torch.allclose(out.mask_logits, auto.mask_logits)
    with pytest.raises(ValueError):
        model(images, texts, boxes=torch.tensor([[[50.0, 10.0, 20.0, 70.0]], [[0.0, 0.0, 9.0, 9.0]]]))


def test_points_prompt(model):
    images, _, texts = batch()
    model.eval()
    coords = torch.tensor([[[64.0, 64.0]], [[30.0, 40.0]]])
    labels = torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad():
        out = model(images, texts, points=(coords, labels))
    assert out.mask_logits.shape == (2, 1, 128, 128) and out.boxes.shape[1] == 0


def test_component_boxes_mode_merges_rows():
    cfg = merge(get_preset("tiny"), {"boxes": {"mode": "components", "top_k": 3}})
    m = build_model(cfg).eval()
    images, _, texts = batch()
    with torch.no_grad():
        out = m(images, texts)
    assert out.boxes.shape == (2, 3, 4) and out.mask_logits.shape == (2, 1, 128, 128)


def test_wrong_input_size_is_a_clear_error(model):
    with pytest.raises(ValueError, match="128x128"):
        model(torch.rand(1, 3, 64, 64), ["polyp"])


def test_optimizer_step_changes_only_exchanged_state():
    m = build_model("tiny").train()
    images, masks, texts = batch()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss, _ = m.compute_losses(m(images, texts), masks)
    loss.backward()
    opt.step()
    exchanged = set(trainable_names(m))
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= exchanged
