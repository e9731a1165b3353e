"""Tests for shared_model.modeling.sam: SAM steps, batched decoder, adapters, attention implementations, checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import sam_model_registry

from shared_model.config import ConfigError, SamConfig, get_preset
from shared_model.modeling.sam import SamParts, build_sam_parts, load_sam_checkpoint
from shared_model.modeling.sam_attention import CheckpointedBlock, RelPosAttention, resolve_attention


def tiny_cfg(**overrides: object) -> SamConfig:
    return dataclasses.replace(get_preset("tiny").sam, **overrides)


def tiny_parts(seed: int = 0, **overrides: object) -> SamParts:
    torch.manual_seed(seed)
    return SamParts(tiny_cfg(**overrides)).eval()


def randomise_lora(module: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def randomise_rel_pos(module: torch.nn.Module, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------------------------------------
# Forward steps (tiny preset: 128 px, patch 8 -> 16 x 16 grid, prompt_dim 64)
# ---------------------------------------------------------------------------------------------


def test_tiny_shapes() -> None:
    m = tiny_parts()
    emb = m.encode(torch.rand(2, 3, 128, 128))
    assert emb.shape == (2, 64, 16, 16)
    boxes = torch.tensor([[[10.0, 20, 60, 90], [0, 0, 127, 127]], [[5, 5, 50, 50], [30, 40, 100, 120]]])
    points = (torch.tensor([[[30.0, 40]], [[64, 64]]]), torch.tensor([[1], [0]]))
    assert m.embed_prompts(boxes).shape == (2, 4, 64)
    assert m.embed_prompts(boxes, points).shape == (2, 5, 64)
    assert m.embed_prompts(None, points).shape == (2, 2, 64)  # + padding point
    assert m.no_mask_dense(2).shape == (2, 64, 16, 16)
    assert m.dense_pe().shape == (1, 64, 16, 16)
    sparse = m.embed_prompts(boxes)
    low, iou = m.decode(emb, sparse, m.no_mask_dense(2))
    assert low.shape == (2, 1, 64, 64) and iou.shape == (2, 1)
    low, iou = m.decode(emb, sparse, m.no_mask_dense(2), multimask=True)
    assert low.shape == (2, 3, 64, 64) and iou.shape == (2, 3)
    rows = m.embed_prompts(boxes.reshape(4, 1, 4))
    low, iou = m.decode(emb, rows, m.no_mask_dense(2), rows_per_image=2)
    assert low.shape == (4, 1, 64, 64) and iou.shape == (4, 1)
    assert m.upscale(low).shape == (4, 1, 128, 128)
    assert m.upscale(low, 32).shape == (4, 1, 32, 32)
    assert m.upscale(low, (32, 48)).shape == (4, 1, 32, 48)
    assert m.embed_prompts(None, None, batch_size=3).shape == (3, 0, 64)
    low, iou = m.decode(emb, m.embed_prompts(batch_size=2), m.no_mask_dense(2))
    assert low.shape == (2, 1, 64, 64)


def test_bad_inputs_raise() -> None:
    m = tiny_parts()
    with pytest.raises(ValueError, match="3 x 128 x 128"):
        m.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="B x K x 4"):
        m.embed_prompts(torch.rand(2, 4))
    with pytest.raises(ValueError, match="boxes, points or batch_size"):
        m.embed_prompts()
    with pytest.raises(ValueError, match="batch sizes"):
        m.embed_prompts(torch.rand(2, 1, 4), batch_size=3)
    emb = torch.randn(2, 64, 16, 16)
    with pytest.raises(ValueError, match="sparse"):
        m.decode(emb, torch.randn(3, 2, 64), m.no_mask_dense(2))
    with pytest.raises(ValueError, match="dense"):
        m.decode(emb, torch.randn(2, 2, 64), torch.randn(2, 64, 8, 8))
    with pytest.raises(ConfigError, match="sam.decoder_mode"):
        SamParts(tiny_cfg(decoder_mode="partly"))
    with pytest.raises(ConfigError, match="sam.attention"):
        SamParts(tiny_cfg(attention="flash"))
    with pytest.raises(ConfigError, match="sam.lora_blocks"):
        SamParts(tiny_cfg(lora_blocks=[7]))


def test_encode_normalises_with_pixel_mean_and_std() -> None:
    m = tiny_parts()
    mean = torch.tensor(m.cfg.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(m.cfg.pixel_std).view(1, 3, 1, 1)
    # An image equal to the pixel mean is encoded as an all-zero input; mean + std as all-ones.
    img = (mean / 255).expand(1, 3, 128, 128)
    torch.testing.assert_close(m.encode(img), m.image_encoder(torch.zeros(1, 3, 128, 128)), rtol=0, atol=1e-5)
    img = ((mean + std) / 255).expand(1, 3, 128, 128)
    torch.testing.assert_close(m.encode(img), m.image_encoder(torch.ones(1, 3, 128, 128)), rtol=0, atol=1e-5)


def test_embed_prompts_matches_sam_prompt_encoder() -> None:
    m = tiny_parts()
    pe = m.prompt_encoder
    boxes = torch.tensor([[[10.0, 20, 60, 90], [0, 0, 127, 127]], [[5, 5, 50, 50], [30, 40, 100, 120]]])
    points = (torch.tensor([[[30.0, 40], [2, 3]], [[64, 64], [100, 9]]]), torch.tensor([[1, 0], [0, -1]]))
    with torch.no_grad():
        ref_box, ref_dense = pe(points=None, boxes=boxes[:, 0], masks=None)
        torch.testing.assert_close(m.embed_prompts(boxes[:, :1]), ref_box, rtol=0, atol=0)
        torch.testing.assert_close(m.no_mask_dense(2), ref_dense, rtol=0, atol=0)
        ref_both, _ = pe(points=points, boxes=boxes[:, 1], masks=None)
        torch.testing.assert_close(m.embed_prompts(boxes[:, 1:], points), ref_both, rtol=0, atol=0)
        ref_pts, _ = pe(points=points, boxes=None, masks=None)
        torch.testing.assert_close(m.embed_prompts(None, points), ref_pts, rtol=0, atol=0)
        # K boxes = the K single-box embeddings side by side.
        two = m.embed_prompts(boxes)
        second, _ = pe(points=None, boxes=boxes[:, 1], masks=None)
        torch.testing.assert_close(two, torch.cat([ref_box, second], dim=1), rtol=0, atol=0)
        torch.testing.assert_close(m.dense_pe(), pe.get_dense_pe(), rtol=0, atol=0)


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
def test_batched_decode_matches_sam_mask_decoder_per_image(multimask: bool, rows: int) -> None:
    m = tiny_parts()
    torch.manual_seed(5)
    b = 3
    emb = torch.randn(b, 64, 16, 16)
    sparse = torch.randn(b * rows, 4, 64)
    dense = torch.randn(b * rows, 64, 16, 16)
    with torch.no_grad():
        low, iou = m.decode(emb, sparse, dense, multimask=multimask, rows_per_image=rows)
        for i in range(b):
            sl = slice(i * rows, (i + 1) * rows)
            ref_low, ref_iou = m.mask_decoder(emb[i : i + 1], m.dense_pe(), sparse[sl], dense[sl], multimask)
            torch.testing.assert_close(low[sl], ref_low, rtol=0, atol=1e-5)
            torch.testing.assert_close(iou[sl], ref_iou, rtol=0, atol=1e-5)
        # A per-image dense embedding is shared by that image's rows.
        shared = m.decode(emb, sparse, dense[::rows], multimask=multimask, rows_per_image=rows)[0]
        ref = m.decode(emb, sparse, dense[::rows].repeat_interleave(rows, 0), multimask, rows)[0]
        torch.testing.assert_close(shared, ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------


def trainable(module: torch.nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["lora", "train", "frozen"])
@pytest.mark.parametrize("prompt_trainable", [True, False])
def test_trainable_parameters_per_decoder_mode(mode: str, prompt_trainable: bool) -> None:
    m = tiny_parts(decoder_mode=mode, prompt_encoder_trainable=prompt_trainable)
    decoder_total = sum(p.numel() for p in m.mask_decoder.parameters())
    m.add_adapters()
    enc = trainable(m.image_encoder)
    # 4 blocks x qkv (128 -> 384): A 4 x 128 + B 384 x 4.
    assert sum(enc.values()) == 4 * (4 * 128 + 384 * 4)
    assert all(".attn.qkv.lora_" in n for n in enc) and len(enc) == 8
    dec = trainable(m.mask_decoder)
    if mode == "lora":
        assert all(".lora_" in n and ("q_proj" in n or "v_proj" in n) for n in dec)
        # self-attention 64 -> 64 (2 blocks), cross-attention 64 -> 32 (2 per block + final): r = 4.
        self_attn = 2 * (4 * 64 + 64 * 4)
        cross_attn = 2 * (4 * 64 + 32 * 4)
        assert sum(dec.values()) == 2 * self_attn + 5 * cross_attn == 5888
    elif mode == "train":
        # all but the multimask hypernetworks 1..3, which single-mask training never reaches
        unused = sum(p.numel() for mlp in m.mask_decoder.output_hypernetworks_mlps[1:] for p in mlp.parameters())
        assert unused > 0 and sum(dec.values()) == decoder_total - unused
    else:
        assert dec == {}
    pe = trainable(m.prompt_encoder)
    if prompt_trainable:
        # box-corner embeddings and no_mask_embed train; the mask-input branch and the point-label
        # embeddings are never reached in training and stay frozen
        assert sorted(pe) == ["no_mask_embed.weight", "point_embeddings.2.weight", "point_embeddings.3.weight"]
    else:
        assert pe == {}
    with pytest.raises(RuntimeError, match="already"):
        m.add_adapters()


def test_lora_blocks_subset_and_bad_targets() -> None:
    m = tiny_parts(lora_blocks=[1, 3])
    m.add_adapters()
    enc = trainable(m.image_encoder)
    assert sorted({n.split(".")[1] for n in enc}) == ["1", "3"]
    assert sum(enc.values()) == 2 * (4 * 128 + 384 * 4)
    with pytest.raises(ConfigError, match="sam.lora_targets"):
        tiny_parts(lora_targets=["nope"]).add_adapters()


def test_base_lora_counts() -> None:
    torch.manual_seed(0)
    m = SamParts(get_preset("base").sam)
    m.add_adapters()
    assert sum(trainable(m.image_encoder).values()) == 147_456 == 12 * (4 * 768 + 2304 * 4)
    # q_proj / v_proj: 2 self-attn 256->256, 5 cross-attn 256->128, r = 4.
    assert sum(trainable(m.mask_decoder).values()) == 2 * 2 * 2048 + 5 * 2 * 1536 == 23_552


def run_tiny(m: SamParts, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 128, 128, generator=gen)
    boxes = torch.tensor([[[10.0, 20, 60, 90]], [[30, 40, 100, 120]]])
    emb = m.encode(images)
    return m.decode(emb, m.embed_prompts(boxes), m.no_mask_dense(2), multimask=True)


def test_zero_init_lora_leaves_outputs_unchanged_and_gradients_reach_it() -> None:
    m = tiny_parts(decoder_mode="lora")
    with torch.no_grad():
        before = run_tiny(m)
    m.add_adapters()
    with torch.no_grad():
        after = run_tiny(m)
    torch.testing.assert_close(after, before, rtol=0, atol=0)

    low, iou = run_tiny(m)
    (low.square().mean() + iou.mean()).backward()
    for name, p in m.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
        elif ".lora_B." in name or name.startswith("prompt_encoder.point_embeddings.2"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    randomise_lora(m)
    m.zero_grad()
    low2, iou2 = run_tiny(m)
    assert not torch.allclose(low2, low)
    (low2.square().mean() + iou2.mean()).backward()
    lora = [(n, p) for n, p in m.named_parameters() if ".lora_" in n]
    assert len(lora) == 4 * 2 + 7 * 2 * 2
    for name, p in lora:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# Attention implementations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "sdpa", "auto"])
def test_attention_implementations_match_sam_attention(impl: str) -> None:
    ref = tiny_parts(attention="sam")
    fast = tiny_parts(attention=impl)
    assert not any(isinstance(mod, RelPosAttention) for mod in ref.modules())
    assert [mod.impl for mod in fast.modules() if isinstance(mod, RelPosAttention)] == [impl] * 4
    randomise_rel_pos(ref)
    assert list(ref.state_dict()) == list(fast.state_dict())
    fast.load_state_dict(ref.state_dict())
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(fast.encode(images), ref.encode(images), rtol=0, atol=1e-5)

    for m in (ref, fast):
        m.add_adapters()
    randomise_lora(ref)
    fast.load_state_dict(ref.state_dict())  # peft draws LoRA A at random: copy it
    out_ref, out_fast = run_tiny(ref), run_tiny(fast)
    torch.testing.assert_close(out_fast[0], out_ref[0], rtol=0, atol=1e-5)
    out_ref[0].square().mean().backward()
    out_fast[0].square().mean().backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    grads_fast = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    assert grads_ref.keys() == grads_fast.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_auto_attention_is_sdpa_on_cuda_and_eager_elsewhere() -> None:
    assert resolve_attention("auto", torch.device("cuda", 0)) == "sdpa"
    assert resolve_attention("auto", torch.device("cpu")) == "eager"
    assert resolve_attention("sdpa", torch.device("cpu")) == "sdpa"
    assert tiny_cfg().attention == "auto"


def test_activation_checkpointing_gives_the_same_outputs_and_gradients() -> None:
    ref = tiny_parts()
    ckpt = tiny_parts(activation_checkpointing=True)
    assert sum(isinstance(mod, CheckpointedBlock) for mod in ckpt.modules()) == 4
    assert not any(isinstance(mod, CheckpointedBlock) for mod in ref.modules())
    for m in (ref, ckpt):
        m.add_adapters()
    randomise_lora(ref)
    assert list(ref.state_dict()) == list(ckpt.state_dict())  # same names: checkpoints interchange
    ckpt.load_state_dict(ref.state_dict())
    out_ref, out_ckpt = run_tiny(ref), run_tiny(ckpt)
    torch.testing.assert_close(out_ckpt[0], out_ref[0], rtol=0, atol=0)
    saved: list[int] = []

    def count(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        loss_ckpt = run_tiny(ckpt)[0].square().mean()
    kept_ckpt, saved[:] = sum(saved), []
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        loss_ref = run_tiny(ref)[0].square().mean()
    assert kept_ckpt < 0.6 * sum(saved)  # the encoder's activations are no longer kept
    loss_ref.backward()
    loss_ckpt.backward()
    for name, p in ref.named_parameters():
        if p.requires_grad:
            other = dict(ckpt.named_parameters())[name].grad
            torch.testing.assert_close(other, p.grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------
# Checkpoints (base architecture: ViT-B, saved from segment-anything's own builder)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    randomise_rel_pos(sam)  # pos_embed and rel_pos start at zero: make interpolation visible
    state = sam.state_dict()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(state, path)
    return path, state


def test_load_official_checkpoint_at_1024(vit_b_checkpoint: tuple[Path, dict]) -> None:
    path, state = vit_b_checkpoint
    parts = SamParts(get_preset("base").sam)
    load_sam_checkpoint(parts, str(path))
    own = parts.state_dict()
    assert own.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    parts.add_adapters()
    with pytest.raises(RuntimeError, match="before"):
        load_sam_checkpoint(parts, path)


def test_load_official_checkpoint_at_512_interpolates(vit_b_checkpoint: tuple[Path, dict]) -> None:
    path, state = vit_b_checkpoint
    cfg = dataclasses.replace(get_preset("base").sam, image_size=512)
    parts = build_sam_parts(dataclasses.replace(cfg, checkpoint=str(path)), adapters=False)
    own = parts.state_dict()
    # Bilinear 64 -> 32 (align_corners=False) averages each 2 x 2 block.
    pos = state["image_encoder.pos_embed"]
    expected = pos.reshape(1, 32, 2, 32, 2, 768).mean(dim=(2, 4))
    torch.testing.assert_close(own["image_encoder.pos_embed"], expected, rtol=0, atol=1e-6)
    # Global blocks: rel_pos 127 -> 63 rows, linear, sample i at source (i + 0.5) * 127 / 63 - 0.5.
    src = state["image_encoder.blocks.2.attn.rel_pos_h"].numpy()
    x = np.clip((np.arange(63) + 0.5) * 127 / 63 - 0.5, 0, None)
    expected_rel = np.stack([np.interp(x, np.arange(127), src[:, c]) for c in range(src.shape[1])], axis=1)
    got = own["image_encoder.blocks.2.attn.rel_pos_h"].numpy()
    np.testing.assert_allclose(got, expected_rel, rtol=0, atol=1e-4)  # float32 index maths
    for i in (2, 5, 8, 11):
        assert own[f"image_encoder.blocks.{i}.attn.rel_pos_w"].shape == (63, 64)
    # Windowed blocks and everything else: unchanged.
    resized = {"image_encoder.pos_embed"} | {
        f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in (2, 5, 8, 11) for a in "hw"
    }
    for key, value in state.items():
        if key not in resized:
            assert torch.equal(own[key], value), key
    parts.add_adapters()
    with torch.no_grad():
        emb = parts.encode(torch.rand(1, 3, 512, 512))
        sparse = parts.embed_prompts(torch.tensor([[[100.0, 120, 300, 400]]]))
        low, _ = parts.decode(emb, sparse, parts.no_mask_dense(1))
    assert emb.shape == (1, 256, 32, 32) and low.shape == (1, 1, 128, 128)
    assert torch.isfinite(low).all()


def test_checkpoint_errors(tmp_path: Path) -> None:
    base = SamParts(get_preset("base").sam)
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_sam_checkpoint(base, missing)

    wrong = tmp_path / "tiny_sam.pth"
    torch.save({"model": tiny_parts().state_dict()}, wrong)
    with pytest.raises(ValueError, match="tiny_sam.pth") as err:
        load_sam_checkpoint(base, wrong)
    msg = str(err.value)
    assert "missing keys" in msg and "image_encoder.blocks.11.attn.qkv.weight" in msg
    assert "mismatched shapes" in msg
    assert "image_encoder.blocks.0.attn.proj.weight: checkpoint (128, 128) vs model (768, 768)" in msg
    assert "... and" in msg  # long listings are cut

    extra = tmp_path / "extra.pth"
    torch.save({**tiny_parts().state_dict(), "head.weight": torch.zeros(2)}, extra)
    with pytest.raises(ValueError, match="unexpected keys \\(1\\):\n    head.weight"):
        load_sam_checkpoint(tiny_parts(), extra)

    junk = tmp_path / "junk.pth"
    torch.save({"model": {"a": 1}}, junk)
    with pytest.raises(ValueError, match="junk.pth.*state dict"):
        load_sam_checkpoint(base, junk)


def test_tiny_round_trip_with_model_key(tmp_path: Path) -> None:
    src = tiny_parts(seed=4)
    path = tmp_path / "tiny.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = tiny_parts(seed=5)
    load_sam_checkpoint(dst, path)
    with torch.no_grad():
        torch.testing.assert_close(run_tiny(dst), run_tiny(src), rtol=0, atol=0)
