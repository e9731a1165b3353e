"""BiomedCLIP checkpoint folders: read, load, write, and the full build flow.

A folder in open_clip's local layout (what ``open_clip.create_model("local-dir:/path")`` reads and the
Hub repository ``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` holds):

- ``open_clip_config.json``: ``{"model_cfg": {"embed_dim", "vision_cfg", "text_cfg"}, "preprocess_cfg"}``;
- ``open_clip_pytorch_model.bin`` (or ``open_clip_model.safetensors``): ``visual.*``, ``text.*``,
  ``logit_scale``;
- tokenizer files (``vocab.txt``, ``tokenizer_config.json`` and/or ``tokenizer.json``);
- optionally ``config.json``: the BERT config (text sizes; BERT-base when absent).

Vision sizes come from ``timm_model_name`` (``vit_<family>_patch<P>_<S>``). Folders written by
:func:`save_biomedclip_folder` for sizes that no timm ViT name describes carry the sizes as open_clip's
``CLIPVisionCfg`` keys (``width``, ``layers``, ``head_width``, ``patch_size``, ``mlp_ratio``) instead;
only this module reads those back.

Loading is strict: a missing, unexpected or wrongly shaped key raises :class:`CheckpointError` naming
the file and the keys. Ignored: ``logit_scale``/``logit_bias`` (unused), the non-persistent
``text.transformer.embeddings.position_ids`` of older transformers, and
``text.transformer.pooler.*`` (BERT's pooling layer, written by some BiomedCLIP-era open_clip versions
and unused by CLS-of-last-hidden-state pooling). Adapter parameters (LoRA, ``ctx``) are not part of
the layout: loading skips them (and maps peft's ``.base_layer.`` names back), saving leaves them out.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared_model.clip_text import ClipText
from shared_model.clip_vision import ClipVision
from shared_model.config import ClipConfig, ClipTextConfig, ClipVisionConfig, ConfigError
from shared_model.tokenizer import Tokenizer, build_tokenizer

CONFIG_NAME = "open_clip_config.json"
BERT_CONFIG_NAME = "config.json"
WEIGHTS_BIN = "open_clip_pytorch_model.bin"
WEIGHTS_SAFETENSORS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")
BIOMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
# ViT families of timm: width, depth, heads.
VIT_FAMILIES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
_VIT_NAME = re.compile(r"^vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)$")
_IGNORED = re.compile(
    r"^(logit_scale|logit_bias|text\.transformer\.embeddings\.position_ids|text\.transformer\.pooler\..*)$"
)
_BERT_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "width",
    "num_hidden_layers": "depth",
    "num_attention_heads": "heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
}


class CheckpointError(ValueError):
    """A checkpoint folder or file does not match the model; the message names the file and keys."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def _require_dir(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: BiomedCLIP checkpoint folder not found")
    return folder


def _vision_from_cfg(vc: dict[str, Any], path: Path) -> ClipVisionConfig:
    where = f"{path}: model_cfg.vision_cfg"
    # open_clip's defaults when a key is absent: timm_pool "avg", timm_proj "linear".
    if vc.get("timm_pool", "avg") not in ("", "token") or vc.get("timm_proj", "linear") != "linear" \
            or vc.get("timm_proj_bias", False):
        raise ConfigError(
            f"{where}: only timm_pool '' / 'token', timm_proj 'linear' without bias is supported "
            f"(got {vc.get('timm_pool')!r}, {vc.get('timm_proj')!r}, bias {vc.get('timm_proj_bias', False)})"
        )
    name = vc.get("timm_model_name")
    if name:
        match = _VIT_NAME.match(str(name).split(".")[0])
        if not match:
            raise ConfigError(f"{where}.timm_model_name: {name!r} is not a timm ViT name vit_<family>_patch<P>_<S>")
        width, depth, heads = VIT_FAMILIES[match.group(1)]
        patch, size = int(match.group(2)), int(match.group(3))
        mlp_ratio = 4.0
    else:
        missing = [k for k in ("width", "layers", "head_width", "patch_size") if k not in vc]
        if missing:
            raise ConfigError(f"{where}: no timm_model_name and no explicit sizes {missing}")
        width, depth, patch = int(vc["width"]), int(vc["layers"]), int(vc["patch_size"])
        heads = width // int(vc["head_width"])
        size, mlp_ratio = 224, float(vc.get("mlp_ratio", 4.0))
    size = vc.get("image_size", size)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"{where}.image_size: only square images are supported, got {size}")
        size = size[0]
    return ClipVisionConfig(
        image_size=int(size), patch_size=patch, width=width, depth=depth,
        heads=heads, mlp_ratio=mlp_ratio,
    )


def _text_from_cfg(tc: dict[str, Any], folder: Path, path: Path) -> ClipTextConfig:
    where = f"{path}: model_cfg.text_cfg"
    if not tc.get("hf_model_name"):
        raise ConfigError(f"{where}.hf_model_name: missing; only a HuggingFace BERT text tower is supported")
    if tc.get("hf_proj_type", "mlp") != "mlp":
        raise ConfigError(f"{where}.hf_proj_type: {tc['hf_proj_type']!r} is not supported (expected 'mlp')")
    if tc.get("hf_pooler_type") != "cls_last_hidden_state_pooler":
        raise ConfigError(
            f"{where}.hf_pooler_type: {tc.get('hf_pooler_type')!r} is not supported "
            "(expected 'cls_last_hidden_state_pooler')"
        )
    text = ClipTextConfig(context_length=int(tc.get("context_length", 77)))
    bert_path = folder / BERT_CONFIG_NAME
    if bert_path.is_file():
        bert = _read_json(bert_path)
        if bert.get("model_type", "bert") != "bert":
            raise ConfigError(f"{bert_path}: model_type {bert.get('model_type')!r} is not 'bert'")
        for key, field_name in _BERT_KEYS.items():
            if key in bert:
                setattr(text, field_name, int(bert[key]))
    return text


def clip_config_from_folder(folder: str | Path) -> ClipConfig:
    """The architecture described by a BiomedCLIP folder.

    Adapter fields (LoRA, n_ctx, ...) keep their :class:`ClipConfig` defaults; ``checkpoint`` is the folder.

    Raises:
        FileNotFoundError: If the folder or ``open_clip_config.json`` is missing (naming the path).
        ConfigError: If the config is malformed or describes an unsupported architecture.
    """
    folder = _require_dir(folder)
    path = folder / CONFIG_NAME
    data = _read_json(path)
    model_cfg = data.get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise ConfigError(f"{path}: missing 'model_cfg' object")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise ConfigError(f"{path}: model_cfg.{key} missing")
    try:
        vision = _vision_from_cfg(model_cfg["vision_cfg"], path)
        pre = data.get("preprocess_cfg", {})
        if "mean" in pre:
            vision.mean = [float(x) for x in pre["mean"]]
        if "std" in pre:
            vision.std = [float(x) for x in pre["std"]]
        text = _text_from_cfg(model_cfg["text_cfg"], folder, path)
        embed_dim = int(model_cfg["embed_dim"])
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as err:
        raise ConfigError(f"{path}: malformed model_cfg / preprocess_cfg value: {err}") from None
    return ClipConfig(embed_dim=embed_dim, vision=vision, text=text, checkpoint=str(folder))


def architecture(cfg: ClipConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that a checkpoint fixes, keyed by dotted path (``model.clip...``)."""
    out: dict[str, Any] = {"model.clip.embed_dim": cfg.embed_dim}
    for name in ("image_size", "patch_size", "width", "depth", "heads", "mlp_ratio", "mean", "std"):
        out[f"model.clip.vision.{name}"] = getattr(cfg.vision, name)
    for name in _BERT_KEYS.values():
        out[f"model.clip.text.{name}"] = getattr(cfg.text, name)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))
    return a == b


def check_matches_folder(cfg: ClipConfig, folder: str | Path) -> None:
    """Raise ConfigError if ``cfg``'s architecture differs from the folder's, naming each field."""
    want, have = architecture(clip_config_from_folder(folder)), architecture(cfg)
    diff = [f"{k}={have[k]!r} (folder: {want[k]!r})" for k in want if not _same(have[k], want[k])]
    if diff:
        raise ConfigError(f"{Path(folder) / CONFIG_NAME}: the config does not match the checkpoint: {'; '.join(diff)}")


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def weights_file(folder: str | Path) -> Path:
    """The weights file of a folder: safetensors first, then ``open_clip_pytorch_model.bin``."""
    folder = _require_dir(folder)
    for name in (*WEIGHTS_SAFETENSORS, WEIGHTS_BIN):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no weights file ({', '.join((*WEIGHTS_SAFETENSORS, WEIGHTS_BIN))})")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported with its path
        raise CheckpointError(f"{path}: cannot read weights: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _base_names(module: nn.Module) -> dict[str, str]:
    """Checkpoint-style name (peft's ``.base_layer`` removed) -> module state-dict name, adapters skipped."""
    out = {}
    for name in module.state_dict():
        if ".lora_A." in name or ".lora_B." in name or name == "ctx":
            continue
        out[name.replace(".base_layer.", ".")] = name
    return out


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)}: {shown}" + (", ..." if len(keys) > limit else "")


def load_biomedclip(folder: str | Path, vision: ClipVision, text: ClipText) -> None:
    """Load a folder's weights into the towers, strictly (before or after :meth:`add_adapters`).

    Raises:
        FileNotFoundError: If the folder or its weights file is missing.
        CheckpointError: On missing, unexpected or wrongly shaped keys (naming the file and keys).
    """
    path = weights_file(folder)
    state = _read_weights(path)
    parts = {"visual.": vision, "text.": text}
    targets = {prefix + ck: (mod, mk) for prefix, mod in parts.items() for ck, mk in _base_names(mod).items()}
    found = {k for k in state if not _IGNORED.match(k)}
    missing = sorted(set(targets) - found)
    unexpected = sorted(found - set(targets))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs model {tuple(mod.state_dict()[mk].shape)}"
        for k, (mod, mk) in targets.items()
        if k in found and tuple(state[k].shape) != tuple(mod.state_dict()[mk].shape)
    )
    errors = [
        f"{what} keys ({_listing(keys)})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
        if keys
    ]
    if errors:
        raise CheckpointError(f"{path}: checkpoint does not match the model: " + "; ".join(errors))
    for prefix, mod in parts.items():
        sub = {mk: state[prefix + ck] for ck, mk in _base_names(mod).items()}
        # Adapters (LoRA, ``ctx``) are not in the file: they keep their own values; every key is loaded.
        mod.load_state_dict({**mod.state_dict(), **sub}, strict=True)


def _base_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    sd = module.state_dict()
    return {prefix + ck: sd[mk].detach().clone().contiguous() for ck, mk in _base_names(module).items()}


def _vision_cfg_json(v: ClipVisionConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for family, sizes in VIT_FAMILIES.items():
        if sizes == (v.width, v.depth, v.heads) and v.mlp_ratio == 4.0:
            out["timm_model_name"] = f"vit_{family}_patch{v.patch_size}_{v.image_size}"
    out.update(timm_model_pretrained=False, timm_pool="", timm_proj="linear", image_size=v.image_size)
    if "timm_model_name" not in out:
        out.update(width=v.width, layers=v.depth, head_width=v.width // v.heads, patch_size=v.patch_size,
                   mlp_ratio=v.mlp_ratio)
    return out


def save_biomedclip_folder(folder: str | Path, vision: ClipVision, text: ClipText, cfg: ClipConfig) -> Path:
    """Write the towers' backbone weights, configs and tokenizer files as a BiomedCLIP folder.

    Adapters (LoRA, ``ctx``) are not written. The tokenizer is ``build_tokenizer(cfg)``.

    Returns:
        The folder.

    Raises:
        ConfigError: If the towers were built from a different architecture than ``cfg``.
    """
    for name, tower in (("vision", vision), ("text", text)):
        theirs, ours = architecture(tower.cfg), architecture(cfg)
        diff = [k for k in ours if not _same(ours[k], theirs[k]) and (f".{name}." in k or k.endswith("embed_dim"))]
        if diff:
            raise ConfigError(f"save_biomedclip_folder: the {name} tower differs from cfg in {diff}")
    tokenizer = build_tokenizer(cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {**_base_state(vision, "visual."), **_base_state(text, "text."),
             "logit_scale": torch.tensor(math.log(1 / 0.07))}
    torch.save(state, folder / WEIGHTS_BIN)
    t = cfg.text
    config = {
        "model_cfg": {
            "embed_dim": cfg.embed_dim,
            "vision_cfg": _vision_cfg_json(cfg.vision),
            "text_cfg": {
                "hf_model_name": BIOMEDBERT, "hf_tokenizer_name": BIOMEDBERT, "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": t.context_length,
            },
        },
        "preprocess_cfg": {"mean": list(cfg.vision.mean), "std": list(cfg.vision.std)},
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    bert = {"model_type": "bert", "architectures": ["BertModel"], "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "type_vocab_size": 2, "pad_token_id": 0,
            **{key: getattr(t, name) for key, name in _BERT_KEYS.items()}}
    (folder / BERT_CONFIG_NAME).write_text(json.dumps(bert, indent=2) + "\n")
    tokenizer.save(folder)
    return folder


# --------------------------------------------------------------------------------------------
# Build flow
# --------------------------------------------------------------------------------------------


def build_clip(cfg: ClipConfig) -> tuple[ClipVision, ClipText, Tokenizer]:
    """Build both towers and the tokenizer; load ``cfg.checkpoint`` if set; add adapters and freeze.

    Raises:
        FileNotFoundError: If ``cfg.checkpoint`` or one of its files is missing.
        ConfigError: If ``cfg``'s architecture differs from the checkpoint's.
        CheckpointError: If the weights do not match.
    """
    if cfg.checkpoint:
        check_matches_folder(cfg, cfg.checkpoint)
    tokenizer = build_tokenizer(cfg)
    vision, text = ClipVision(cfg), ClipText(cfg)
    if cfg.checkpoint:
        load_biomedclip(cfg.checkpoint, vision, text)
    vision.add_adapters()
    text.add_adapters()
    return vision, text, tokenizer
