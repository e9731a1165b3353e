"""Task adapters: a frozen base model plus the few small parts one new task trains.

:func:`attach_adapter` freezes every parameter of a built (and loaded) :class:`PromptSAM` and adds
or unfreezes only:

* peft LoRA (adapter name ``"task"``) on the mask decoder: the Linear layers of its two-way
  transformer named in ``decoder_targets`` and, with ``decoder_heads``, the hypernetwork MLP of the
  mask token in use and the IoU head. A base whose decoder already has LoRA keeps its own
  (``"default"``, frozen) active beside the task's;
* peft LoRA on the prompt projections the base uses (text -> sparse tokens, saliency -> dense);
* the task embedding: the text tower's CoOp context vectors and the text tokens' learned offsets
  (when the base runs its text path), SAM's no-mask dense embedding and, when the base uses boxes,
  its two box-corner embeddings. SAM's prompt encoder reads these embeddings as ``.weight`` tables
  rather than through a layer's forward, so a LoRA wrapped around them would never run; they are
  trained directly (64 values each for the tiny preset, fewer than any LoRA of them).

The adapter's parameters are then exactly those with ``requires_grad``, so the adapter IS the
exchanged state (:mod:`shared_model.exchange`): an adapter file stores
:func:`~shared_model.exchange.get_exchanged_state`, and a federated run that exchanges only the
adapter needs no other wire format. An adapter records the fingerprint of its base model
(:func:`base_fingerprint`: every tensor of the base, frozen or not) and is refused on any other.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from shared_model.checkpoint import atomic_torch_save, config_fingerprint
from shared_model.config import AdapterConfig, ConfigError, from_dict, to_dict
from shared_model.exchange import ExchangeError, get_exchanged_state, set_exchanged_state, state_nbytes

FORMAT = "promptsam-adapter/1"
PEFT_NAME = "task"  # peft adapter name of a task adapter's LoRA (the base's own LoRA is "default")


class AdapterError(ValueError):
    """An adapter file is unreadable, not an adapter, or made for another base model."""


def base_fingerprint(model: nn.Module) -> str:
    """sha256 (hex, 16 characters) of every tensor of ``model.state_dict()`` (names, shapes, float32 values).

    Computed on the base before an adapter is attached: two bases differing in any weight (another
    checkpoint, other pretrained files, another random initialisation) differ here.
    """
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        tensor = value.detach().to("cpu")
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _linear_targets(module: nn.Module, suffixes: list[str], prefix: str) -> list[str]:
    """Names (inside ``module``) of Linear layers, plain or already LoRA-wrapped, under ``prefix``
    whose last name component is in ``suffixes``."""
    out = []
    for name, sub in module.named_modules():
        if not name.startswith(prefix) or name.split(".")[-1] not in suffixes:
            continue
        if isinstance(sub, nn.Linear) or (isinstance(sub, LoraLayer) and isinstance(sub.get_base_layer(), nn.Linear)):
            out.append(name)
    return out


def _inject(module: nn.Module, targets: list[str], cfg: AdapterConfig) -> None:
    """peft LoRA named :data:`PEFT_NAME` on ``targets`` (names inside ``module``), keeping any
    adapter those layers already had active."""
    if not targets:
        return
    before = {name: list(sub.active_adapters) for name, sub in module.named_modules() if isinstance(sub, LoraLayer)}
    pattern = "^(" + "|".join(t.replace(".", "[.]") for t in targets) + ")$"
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=pattern, bias="none")
    with warnings.catch_warnings():  # "Already found a peft_config attribute": several adapters, on purpose
        warnings.simplefilter("ignore", UserWarning)
        inject_adapter_in_model(lora, module, adapter_name=PEFT_NAME)
    for name, sub in module.named_modules():
        if isinstance(sub, LoraLayer) and PEFT_NAME in sub.lora_A:
            sub.set_adapter([*[a for a in before.get(name, []) if a != PEFT_NAME], PEFT_NAME])


def attach_adapter(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Freeze ``model`` (a PromptSAM) and add the task adapter's trainable parts in place.

    Args:
        model: The base model, its state already loaded (compute :func:`base_fingerprint` first).
        cfg: What the adapter trains (:class:`~shared_model.config.AdapterConfig`).

    Returns:
        Names of the adapter's parameters (= the model's trainable parameters, in order).

    Raises:
        ConfigError: The settings select nothing to train, or the model already has an adapter.
    """
    if getattr(model, "task_adapter", None) is not None:
        raise ConfigError("the model already carries a task adapter")
    model.requires_grad_(False)
    sam, p = model.sam, model.cfg.prompts
    decoder = sam.mask_decoder
    targets = _linear_targets(decoder, list(cfg.decoder_targets), "transformer.")
    if cfg.decoder_targets and not targets:
        raise ConfigError(f"adapter.decoder_targets: no Linear layer named {list(cfg.decoder_targets)} in the "
                          "mask decoder's transformer")
    if cfg.decoder_heads:
        heads = range(1, 1 + sam.cfg.num_multimask_outputs) if sam.cfg.multimask else range(1)
        for i in heads:
            targets += _linear_targets(decoder, [str(j) for j in range(8)], f"output_hypernetworks_mlps.{i}.layers")
        targets += _linear_targets(decoder, [str(j) for j in range(8)], "iou_prediction_head.layers")
    _inject(decoder, targets, cfg)
    if cfg.prompt_projections:
        if model.prompts.sparse is not None and model.uses_text:
            _inject(model.prompts.sparse, ["proj"], cfg)
        if p.dense_saliency:
            _inject(model.prompts.dense, ["saliency_net.0", "saliency_net.2"], cfg)
    model.requires_grad_(False)  # set_adapter may have unfrozen the base's own LoRA
    for name, param in model.named_parameters():
        if f".lora_A.{PEFT_NAME}." in name or f".lora_B.{PEFT_NAME}." in name:
            param.requires_grad_(True)
    if cfg.task_embedding:
        pe = sam.prompt_encoder
        pe.no_mask_embed.weight.requires_grad_(True)
        if p.use_boxes:
            for corner in pe.point_embeddings[2:4]:
                corner.weight.requires_grad_(True)
        if model.uses_text:
            if model.clip_text.ctx is not None:
                model.clip_text.ctx.requires_grad_(True)
            if model.prompts.sparse is not None:
                model.prompts.sparse.offset.requires_grad_(True)
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    if not names:
        raise ConfigError("adapter: the settings select no parameter to train (decoder_targets, decoder_heads, "
                          "prompt_projections and task_embedding are all off)")
    model.task_adapter = cfg
    return names


def adapter_payload(model: nn.Module, name: str, base: dict[str, Any], extra: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """The adapter file's content: format, task name, base record, settings and the trained state."""
    state = dict(get_exchanged_state(model))
    return {"format": FORMAT, "name": name, "base": dict(base), "adapter": to_dict(model.task_adapter),
            "state": state, "nbytes": state_nbytes(state), "extra": dict(extra or {})}


def save_adapter(path: str | Path, model: nn.Module, name: str, base: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter of ``model`` to ``path`` atomically (see :func:`adapter_payload`)."""
    return atomic_torch_save(adapter_payload(model, name, base, extra), path)


def base_record(model: nn.Module, checkpoint: str | Path | None) -> dict[str, Any]:
    """What an adapter records of its base: fingerprint, checkpoint path, preset, config fingerprint."""
    return {"fingerprint": base_fingerprint(model), "checkpoint": str(checkpoint) if checkpoint else None,
            "preset": model.cfg.preset, "config_fingerprint": config_fingerprint(model.cfg)}


def read_adapter(path: str | Path) -> dict[str, Any]:
    """Load and check an adapter file (CPU, ``weights_only``).

    Raises:
        AdapterError: Missing, unreadable, or not an adapter (e.g. a model checkpoint); names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"--adapter {path}: adapter file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise AdapterError(f"--adapter {path}: not a readable adapter file ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise AdapterError(f"--adapter {path}: not a task adapter (format {found!r}, expected {FORMAT!r}); "
                           "adapters are written by `promptsam adapt`")
    for key in ("name", "base", "adapter", "state"):
        if key not in payload:
            raise AdapterError(f"--adapter {path}: adapter file lacks {key!r}")
    return payload


def apply_adapter(model: nn.Module, payload: dict[str, Any], path: str | Path, base_label: str = "the base model"
                  ) -> None:
    """Attach the adapter of ``payload`` (from :func:`read_adapter`) to ``model`` and load its state.

    Raises:
        AdapterError: The adapter was made for another base (fingerprints differ), or its state does
            not fit; the message names the adapter file and the base.
    """
    want = payload["base"].get("fingerprint")
    have = base_fingerprint(model)
    if want != have:
        made = payload["base"].get("checkpoint") or "another model"
        raise AdapterError(f"--adapter {path}: made for another base model ({made}, fingerprint {want}), not "
                           f"for {base_label} (fingerprint {have})")
    try:
        cfg = from_dict(AdapterConfig, payload["adapter"], "adapter")
    except ConfigError as err:
        raise AdapterError(f"--adapter {path}: stored settings are invalid: {err}") from None
    attach_adapter(model, cfg)
    try:
        set_exchanged_state(model, payload["state"])
    except ExchangeError as err:
        raise AdapterError(f"--adapter {path}: state does not fit the base model: {err}") from None
    model.task_name = payload["name"]


def load_adapted_model(checkpoint: str | Path, adapter: str | Path, **expect):
    """Base checkpoint + adapter file -> (model with the adapter, checkpoint payload, adapter payload)."""
    from shared_model.checkpoint import load_model_checkpoint

    payload = read_adapter(adapter)
    model, ckpt = load_model_checkpoint(checkpoint, **expect)
    apply_adapter(model, payload, adapter, base_label=f"--checkpoint {checkpoint}")
    return model, ckpt, payload
