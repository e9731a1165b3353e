"""BiomedCLIP through open_clip: the towers and the tokenizer of one open_clip folder.

Both sources of a model go through the same two calls, ``open_clip.create_model("local-dir:<folder>")``
and ``open_clip.get_tokenizer("local-dir:<folder>")``:

- ``model.clip.checkpoint`` set: a user's BiomedCLIP folder as the Hub repository
  ``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` holds it (``open_clip_config.json``,
  ``open_clip_pytorch_model.bin`` or ``*.safetensors``, tokenizer files, optionally ``config.json``),
  loaded strictly by open_clip;
- no checkpoint: a folder written for the preset (random weights) under the temporary directory, named by
  a hash of its content: ``open_clip_config.json`` generated from ``model.clip``, the BERT ``config.json``
  and the packaged tiny vocabulary (``vocab.txt``, ``tokenizer_config.json``).

Nothing is downloaded. open_clip builds the text tower from ``text_cfg.hf_model_name`` through
transformers' ``AutoConfig``, which for the Hub's name (a Hub id) would fetch BiomedBERT's config; the
text config is therefore passed with ``hf_model_name`` set to a local folder holding a BERT ``config.json``:
the checkpoint folder's own, else one written from ``model.clip.text`` (BERT-base, BiomedBERT's sizes, by
default). Vision sizes that no timm model name describes (the tiny preset) are registered with timm as
``promptsam_vit_w<width>_d<depth>_h<heads>_p<patch>_s<size>_m<mlp ratio>``.

Tokenizer rule: with a checkpoint, the folder's tokenizer; without one, the packaged tiny vocabulary
for every preset (BiomedBERT's 30522-token vocabulary comes only with a BiomedCLIP folder). A log line
says so, a warning when the text tower has a BiomedBERT-size embedding table (the ``base`` preset).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import open_clip
import timm
import torch
from open_clip.hf_model import _POOLERS, HFTextEncoder
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import HFTokenizer
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from shared_model.modeling.clip_text import ClipText
from shared_model.modeling.clip_vision import ClipVision
from shared_model.config import ClipConfig, ClipTextConfig, ClipVisionConfig, ConfigError
from shared_model.logging_guard import no_new_root_handlers
from shared_model.modeling.tokenizer import Tokenizer, tiny_vocab_text

logger = logging.getLogger(__name__)
CONFIG_NAME = "open_clip_config.json"
BIOMEDBERT_VOCAB_SIZE = 30522
_FOLDER = "@FOLDER@"  # replaced by the written folder's path
# open_clip's text poolers (``text_cfg.hf_pooler_type``) that ``model.clip.text.pooler`` may name;
# its ``max_pooler`` is left out: it masks the real tokens instead of the padding (open_clip 3.x).
POOLERS = {name: _POOLERS[name] for name in ("cls_last_hidden_state_pooler", "cls_pooler", "mean_pooler")}
_BERT_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "width",
    "num_hidden_layers": "depth",
    "num_attention_heads": "heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
}


@contextlib.contextmanager
def _open_clip_logs_from(level: int) -> Iterator[None]:
    """Drop open_clip's log records below ``level`` (it logs every step of a build on the root logger,
    through ``logging.info`` & co., which also give the root logger a handler: removed on exit)."""
    package = str(Path(open_clip.__file__).parent)
    keep = lambda record: record.levelno >= level or not record.pathname.startswith(package)  # noqa: E731
    logging.getLogger().addFilter(keep)
    try:
        with no_new_root_handlers():
            yield
    finally:
        logging.getLogger().removeFilter(keep)


class CheckpointError(ValueError):
    """A checkpoint folder does not match the model; the message names the folder and open_clip's reason."""


def _write_folder(files: dict[str, str]) -> Path:
    """Write ``files`` (name -> text; ``@FOLDER@`` = the folder's path) to a content-named temporary folder."""
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"promptsam-clip-{digest}"
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        text, path = text.replace(_FOLDER, json.dumps(str(folder))[1:-1]), folder / name
        if not path.is_file() or path.read_text() != text:  # written atomically: processes may share it
            tmp = path.with_name(f"{name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return folder


def _timm_vit(v: ClipVisionConfig) -> str:
    """The timm model name of the vision trunk; sizes without a timm name are registered under ours."""
    name = f"vit_base_patch{v.patch_size}_{v.image_size}"
    if (v.width, v.depth, v.heads, v.mlp_ratio) == (768, 12, 12, 4.0) and timm.is_model(name):
        return name
    name = f"promptsam_vit_w{v.width}_d{v.depth}_h{v.heads}_p{v.patch_size}_s{v.image_size}_m{v.mlp_ratio:g}"
    name = name.replace(".", "_")
    if not timm.is_model(name):
        sizes = dict(img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth,
                     num_heads=v.heads, mlp_ratio=v.mlp_ratio)

        def entry(pretrained: bool = False, pretrained_cfg: Any = None, **kwargs: Any) -> VisionTransformer:
            return build_model_with_cfg(VisionTransformer, name, pretrained,
                                        pretrained_cfg=pretrained_cfg or {"architecture": name}, **sizes, **kwargs)

        entry.__name__ = entry.__qualname__ = name
        entry.__module__ = VisionTransformer.__module__  # timm lists the name in that module's __all__
        register_model(entry)
    return name


def _bert_config(t: ClipTextConfig) -> str:
    config = {"model_type": "bert", "architectures": ["BertModel"], "pad_token_id": 0,
              **{key: getattr(t, name) for key, name in _BERT_KEYS.items()}}
    return json.dumps(config, indent=2) + "\n"


def preset_folder(cfg: ClipConfig) -> Path:
    """The open_clip folder (no weights) for ``cfg``'s sizes with the packaged tiny vocabulary."""
    v, t = cfg.vision, cfg.text
    config = {
        "model_cfg": {
            "embed_dim": cfg.embed_dim,
            "vision_cfg": {"timm_model_name": _timm_vit(v), "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": v.image_size},
            "text_cfg": {"hf_model_name": _FOLDER, "hf_tokenizer_name": _FOLDER, "hf_model_pretrained": False,
                         "hf_proj_type": "mlp", "hf_pooler_type": t.pooler,
                         "context_length": t.context_length},
        },
        "preprocess_cfg": {"mean": list(v.mean), "std": list(v.std)},
    }
    tokenizer = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": t.context_length}
    return _write_folder({
        CONFIG_NAME: json.dumps(config, indent=2) + "\n",
        "config.json": _bert_config(t),
        "vocab.txt": tiny_vocab_text(),
        "tokenizer_config.json": json.dumps(tokenizer, indent=2) + "\n",
    })


def write_clip_folder(dest: str | Path, model: nn.Module, cfg: ClipConfig, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (an open_clip model built for ``cfg``) as an open_clip folder that ``model.clip.checkpoint``
    loads: :func:`preset_folder`'s config, BERT config and tokenizer files, and ``open_clip_pytorch_model.bin``.

    The text config names the folder itself (``"."``) as the text tower and tokenizer: open_clip reads a
    ``local-dir:`` folder's tokenizer from the folder, and :func:`create_open_clip` its ``config.json``.

    Args:
        dest: The folder (created; files of the same names are replaced).
        model: The open_clip ``CustomTextCLIP``.
        cfg: Its config (sizes; ``checkpoint`` is ignored).
        dtype: Storage dtype of floating-point weights (e.g. ``torch.float16``); None keeps theirs.

    Returns:
        ``dest`` as a Path.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    source = preset_folder(dataclasses.replace(cfg, checkpoint=None))
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        (dest / name).write_text((source / name).read_text())
    config = json.loads((source / CONFIG_NAME).read_text())
    config["model_cfg"]["text_cfg"].update(hf_model_name=".", hf_tokenizer_name=".")
    (dest / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().clone()
             for k, v in model.state_dict().items()}
    torch.save(state, dest / "open_clip_pytorch_model.bin")
    return dest


def _validate(cfg: ClipConfig) -> None:
    v, t = cfg.vision, cfg.text
    checks = [
        ("vision.image_size", v.image_size % v.patch_size == 0, f"is not a multiple of patch_size {v.patch_size}"),
        ("vision.width", v.width % v.heads == 0, f"is not divisible by heads {v.heads}"),
        ("vision.lora_last_blocks", 0 <= v.lora_last_blocks <= v.depth, f"is outside [0, depth={v.depth}]"),
        ("vision.unfreeze_last_blocks", 0 <= v.unfreeze_last_blocks <= v.depth, f"is outside [0, depth={v.depth}]"),
        ("vision.std", len(v.mean) == 3 and len(v.std) == 3 and min(v.std) > 0,
         "expected 3 values (and 3 means), > 0"),
        ("text.width", t.width % t.heads == 0, f"is not divisible by heads {t.heads}"),
        ("text.context_length", t.context_length <= t.max_position_embeddings,
         f"exceeds max_position_embeddings {t.max_position_embeddings}"),
        ("text.n_ctx", 0 <= t.n_ctx <= t.context_length - 2,
         f"must be in [0, context_length - 2 = {t.context_length - 2}]"),
        ("text.lora_last_layers", 0 <= t.lora_last_layers <= t.depth, f"is outside [0, depth={t.depth}]"),
        ("text.pooler", t.pooler in POOLERS, f"is not an open_clip text pooler; valid: {sorted(POOLERS)}"),
    ]
    for name, ok, why in checks:
        if not ok:
            part, field = name.split(".")
            raise ConfigError(f"model.clip.{name}: {getattr(getattr(cfg, part), field)!r} {why}")


def _text_cfg(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        text_cfg = json.loads(path.read_text())["model_cfg"]["text_cfg"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not an open_clip config with model_cfg.text_cfg ({err!r})") from None
    if not text_cfg.get("hf_model_name") or not text_cfg.get("hf_tokenizer_name"):
        raise ConfigError(f"{path}: model_cfg.text_cfg: only a Hugging Face BERT text tower and tokenizer are "
                          "supported (hf_model_name, hf_tokenizer_name)")
    return dict(text_cfg)


def _architecture(model: nn.Module) -> dict[str, Any]:
    """The fields of ``model.clip`` that a built open_clip model fixes, keyed by dotted path."""
    trunk, bert = model.visual.trunk, model.text.config
    pre = model.visual.preprocess_cfg
    out = {
        "model.clip.embed_dim": model.text.output_dim,
        "model.clip.vision.image_size": trunk.patch_embed.img_size[0],
        "model.clip.vision.patch_size": trunk.patch_embed.patch_size[0],
        "model.clip.vision.width": trunk.embed_dim,
        "model.clip.vision.depth": len(trunk.blocks),
        "model.clip.vision.heads": trunk.blocks[0].attn.num_heads,
        "model.clip.vision.mlp_ratio": trunk.blocks[0].mlp.fc1.out_features / trunk.embed_dim,
        "model.clip.vision.mean": [float(x) for x in pre["mean"]],
        "model.clip.vision.std": [float(x) for x in pre["std"]],
    }
    pooler = next((name for name, cls in _POOLERS.items() if type(model.text.pooler) is cls), None)
    return out | {f"model.clip.text.{name}": getattr(bert, key) for key, name in _BERT_KEYS.items()} | {
        "model.clip.text.pooler": pooler}


def _check_matches(cfg: ClipConfig, model: nn.Module, path: Path) -> None:
    """Raise ConfigError unless ``model`` is a ViT + BERT CLIP with ``cfg``'s sizes (naming each field)."""
    visual, text = model.visual, model.text
    if not (isinstance(visual, TimmModel) and isinstance(visual.trunk, VisionTransformer)
            and visual.trunk.num_prefix_tokens == 1 and isinstance(text, HFTextEncoder)
            and text.config.model_type == "bert"):
        raise ConfigError(f"{path}: only a timm ViT with one [CLS] token and a BERT text tower are supported")
    have = _architecture(model)
    ours = {k: getattr(cfg.text if ".text." in k else cfg.vision if ".vision." in k else cfg, k.split(".")[-1])
            for k in have}

    def same(a: Any, b: Any) -> bool:
        return len(a) == len(b) and all(map(math.isclose, a, b)) if isinstance(a, list) else a == b

    diff = [f"{k}={ours[k]!r} (folder: {have[k]!r})" for k in have if not same(ours[k], have[k])]
    if diff:
        raise ConfigError(f"{path}: the config does not match the checkpoint: {'; '.join(diff)}")


def create_open_clip(cfg: ClipConfig) -> tuple[nn.Module, HFTokenizer, Path]:
    """open_clip's model and tokenizer for ``cfg`` (the checkpoint folder's, else the preset folder's).

    Returns:
        The open_clip ``CustomTextCLIP`` (checkpoint weights loaded, else random), open_clip's tokenizer with
        ``context_length - n_ctx`` positions, and the folder both came from.

    Raises:
        FileNotFoundError: If the checkpoint folder, its config, weights or tokenizer files are missing.
        ConfigError: If ``cfg`` is invalid or its architecture differs from the checkpoint's.
        CheckpointError: If open_clip cannot load the weights (missing, unexpected or mis-shaped keys).
    """
    _validate(cfg)
    folder = Path(cfg.checkpoint) if cfg.checkpoint else preset_folder(cfg)
    if cfg.checkpoint:
        if not folder.is_dir():
            raise FileNotFoundError(f"model.clip.checkpoint: folder not found: {folder}")
        if not [p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext)]:
            raise FileNotFoundError(f"{folder}: no weights file (open_clip_pytorch_model.bin or *.safetensors)")
        if not (folder / "vocab.txt").is_file() and not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder}: no tokenizer files (vocab.txt or tokenizer.json)")
    else:
        level = logging.WARNING if cfg.text.vocab_size >= BIOMEDBERT_VOCAB_SIZE else logging.INFO
        logger.log(level, "model.clip: no checkpoint, random weights; the tokenizer is the packaged tiny "
                   "vocabulary (%s), not BiomedBERT's, which comes with a BiomedCLIP folder", folder / "vocab.txt")
    _timm_vit(cfg.vision)  # a folder written for a size without a timm name (tiny) names the one registered here
    bert_dir = folder if (folder / "config.json").is_file() else _write_folder({"config.json": _bert_config(cfg.text)})
    text_cfg = _text_cfg(folder) | {"hf_model_name": str(bert_dir), "hf_model_pretrained": False}
    # open_clip's warnings that a preset folder has no weights say what the line above says.
    with _open_clip_logs_from(logging.WARNING if cfg.checkpoint else logging.ERROR):
        try:
            model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False, text_cfg=text_cfg)
        except RuntimeError as err:
            raise CheckpointError(f"{folder}: open_clip cannot load the checkpoint: {err}") from err
        context = cfg.text.context_length - cfg.text.n_ctx
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}", context_length=context)
    _check_matches(cfg, model, folder / CONFIG_NAME)
    return model, tokenizer, folder


def build_clip(cfg: ClipConfig) -> tuple[ClipVision, ClipText, Tokenizer]:
    """Both towers and the tokenizer for ``cfg`` (see :func:`create_open_clip`), with adapters added and frozen."""
    model, tokenizer, folder = create_open_clip(cfg)
    vision, text = ClipVision(model.visual, cfg), ClipText(model.text, cfg)
    vision.add_adapters()
    text.add_adapters()
    return vision, text, Tokenizer(tokenizer, cfg.text.vocab_size, folder)
