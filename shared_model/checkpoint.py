"""Model checkpoints: the exchanged state stored with the config that built the model.

A checkpoint holds only what was trained (the exchanged state) plus the full :class:`ModelConfig`;
the frozen weights come from the pretrained files named in that config (or the seeded random init
of a preset). Files are written atomically (temporary file + ``os.replace``) so a killed process
never leaves a torn checkpoint.

Loading checks, each failing with a :class:`CheckpointError` that names the file: that it is a
promptsam checkpoint at all (not a text file, a raw SAM ``.pth`` or a server ``checkpoint.pt``),
optionally the preset (``expect_preset``) and the whole config (``expect_config``, differences as
dotted fields), that a model adapted from a foundation finds the same foundation (its digest), and
that the stored state fits the model its config builds (keys and shapes).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from shared_model.config import (
    PRESETS,
    ConfigError,
    ModelConfig,
    from_dict,
    get_preset,
    load_yaml,
    model_config_from_dict,
    to_dict,
)
from shared_model.exchange import ExchangeError, get_exchanged_state, set_exchanged_state

FORMAT = "promptsam-checkpoint/1"
SERVER_FORMAT = "promptsam-fl-checkpoint/1"  # server/checkpoint.py's resume file, recognised for errors


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match the requested model."""


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def checkpoint_payload(model, state: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """What a checkpoint file holds: ``state`` (default: the exchanged state), the config that built
    ``model``, the digest of its foundation and the JSON-able ``extra``."""
    return {
        "format": FORMAT,
        "config": to_dict(model.cfg),
        "state": dict(get_exchanged_state(model) if state is None else state),
        "foundation": getattr(model, "foundation_digest", None),
        "extra": extra or {},
    }


def save_model_checkpoint(path: str | Path, model, extra: dict[str, Any] | None = None) -> Path:
    """Save ``model``'s exchanged state with its config (and optional JSON-able ``extra``)."""
    return atomic_torch_save(checkpoint_payload(model, extra=extra), path)


def _not_a_checkpoint(path: Path, payload: Any) -> str:
    """Why ``payload`` (a readable torch file) is not a promptsam checkpoint, for the error."""
    hint = ("promptsam checkpoints are written by `promptsam train` (model.pt) and by federated runs "
            "(best_model.pt, final_model.pt)")
    if isinstance(payload, dict) and payload.get("format") == SERVER_FORMAT:
        return (f"{path}: this is a federated server checkpoint (for --resume), not a model checkpoint; "
                f"use best_model.pt or final_model.pt from the same run folder")
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        first = next(iter(payload))
        return (f"{path}: not a promptsam checkpoint: it is a plain state dict of {len(payload)} tensors "
                f"(e.g. {first!r}), such as official SAM or BiomedCLIP weights; pretrained weights are "
                f"named in a model config (model.sam.checkpoint, model.clip.checkpoint), and {hint}")
    found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    return f"{path}: not a promptsam checkpoint (expected format {FORMAT!r}, found {found!r}); {hint}"


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a legacy pickle (protocol >= 2)


def _file_kind(path: Path) -> str | None:
    """What a file that cannot be a torch checkpoint is (``"a text file ..."``); None if it may be one."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_TORCH_MAGIC):
        return None
    if not head:
        return "an empty file"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # tolerates a cut last character
    except UnicodeDecodeError:
        return f"a binary file starting with {head[:8]!r}"
    if "\x00" in text:
        return f"a binary file starting with {head[:8]!r}"
    first = (text.splitlines() or [""])[0][:40]
    return f"a text file (it starts with {first!r})"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint payload (CPU, ``weights_only``), with errors naming the file.

    Raises:
        CheckpointError: The file is missing, a folder, unreadable by ``torch.load`` (e.g. a text
            file), not a promptsam checkpoint (e.g. a raw SAM ``.pth`` state dict or a server
            ``checkpoint.pt``), or lacks the ``config``/``state`` entries.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    kind = _file_kind(path)
    if kind is not None:
        raise CheckpointError(f"{path}: not a readable checkpoint: {kind}, not a PyTorch file; expected a "
                              "promptsam checkpoint written by `promptsam train` or a federated run")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        reason = (str(err).splitlines() or [""])[0]
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {reason}); expected a "
            "promptsam checkpoint written by `promptsam train` or a federated run"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(_not_a_checkpoint(path, payload))
    missing = [key for key in ("config", "state") if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing} (truncated or hand-made file?)")
    if not isinstance(payload["config"], dict):
        raise CheckpointError(f"{path}: stored config is not a mapping but {type(payload['config']).__name__}")
    if not isinstance(payload["state"], dict):
        raise CheckpointError(f"{path}: stored state is not a mapping but {type(payload['state']).__name__}")
    bad = [k for k, v in payload["state"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: stored state entry {bad[0]!r} is not a tensor "
                              f"({type(payload['state'][bad[0]]).__name__})")
    return payload


def checkpoint_config(payload: dict[str, Any], path: str | Path = "checkpoint") -> ModelConfig:
    """The ModelConfig stored in a checkpoint payload."""
    if "config" not in payload:
        raise CheckpointError(f"{path}: checkpoint has no stored config")
    try:
        return from_dict(ModelConfig, payload["config"], "model")
    except ConfigError as err:
        raise CheckpointError(f"{path}: stored config is invalid: {err}") from None


def config_fingerprint(cfg: ModelConfig) -> str:
    """Short hex digest (16 characters) of a ModelConfig: equal configs give equal fingerprints."""
    text = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


_FIRST_FIELDS = ("preset", "sam.image_size")  # listed before the other differences


_WEIGHT_PATHS = ("sam.checkpoint", "clip.checkpoint")


def config_differences(checkpoint_cfg: ModelConfig, expected: ModelConfig) -> list[str]:
    """Dotted fields where two ModelConfigs differ, e.g. ``"sam.image_size: checkpoint 128, expected 1024"``.

    The preset and the input size come first, the other fields follow in alphabetical order.
    Paths of pretrained weights (``sam.checkpoint``, ``clip.checkpoint``) are not compared: they
    name files on the machine that trained, not a property of the model.
    """
    have, want = _flatten(to_dict(checkpoint_cfg)), _flatten(to_dict(expected))
    for key in _WEIGHT_PATHS:
        have.pop(key, None)
        want.pop(key, None)
    keys = sorted(set(have) | set(want), key=lambda k: (k not in _FIRST_FIELDS, _FIRST_FIELDS.index(k)
                                                           if k in _FIRST_FIELDS else 0, k))
    return [
        f"{key}: checkpoint {have.get(key)!r}, expected {want.get(key)!r}"
        for key in keys
        if have.get(key) != want.get(key)
    ]


def expected_model_config(spec: str | Path) -> ModelConfig:
    """The ModelConfig a user expects: a preset name, or a YAML file.

    The YAML file is either an experiment (``train``/``simulate`` style) with a ``model`` section
    or a model section itself (``preset`` plus overrides, as in ``model:`` of an experiment).

    Raises:
        ConfigError: Unknown preset, missing file, or an invalid model section (naming the field).
    """
    path = Path(spec)
    if not path.is_file():
        if str(spec) in PRESETS:
            return get_preset(str(spec))
        raise ConfigError(f"{spec}: config file not found (and not a preset; presets: {sorted(PRESETS)})")
    data = load_yaml(path)
    section = data["model"] if "model" in data else data
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: model: expected a mapping, got {type(section).__name__}")
    try:
        return model_config_from_dict(section)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def load_model_checkpoint(
    path: str | Path, expect_preset: str | None = None, expect_config: ModelConfig | None = None
):
    """Rebuild the model from a checkpoint and load its exchanged state.

    Args:
        path: Checkpoint file.
        expect_preset: If given, the checkpoint must come from this preset.
        expect_config: If given, the checkpoint's ModelConfig must equal it field by field (see
            :func:`expected_model_config`).

    Returns:
        (model, payload).

    Raises:
        CheckpointError: Missing/unreadable file or not a promptsam checkpoint, other preset,
            other config (listing the differing dotted fields), or a stored state that does not
            fit the model built from its config (naming the missing/unexpected/misshapen keys).
    """
    from shared_model.modeling.prompt_sam import build_model

    payload = read_checkpoint(path)
    cfg = checkpoint_config(payload, path)
    if expect_preset is not None and cfg.preset != expect_preset:
        raise CheckpointError(
            f"{path}: checkpoint was trained with preset {cfg.preset!r}, not {expect_preset!r}; "
            f"drop --preset or pass --preset {cfg.preset}"
        )
    if expect_config is not None:
        diffs = config_differences(cfg, expect_config)
        if diffs:
            shown = "; ".join(diffs[:10]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 10 else "")
            raise CheckpointError(f"{path}: checkpoint's model config differs from the expected one in "
                                  f"{len(diffs)} field(s): {shown}")
    try:
        model = build_model(cfg)
    except ConfigError as err:
        raise CheckpointError(f"{path}: cannot rebuild its model: {err}") from None
    stored = payload.get("foundation")
    if stored != model.foundation_digest and cfg.foundation:
        raise CheckpointError(
            f"{path}: trained on another version of foundation {cfg.foundation!r} (digest {str(stored)[:12]}..., "
            f"this one {str(model.foundation_digest)[:12]}...): its frozen weights are not the ones it adapted")
    try:
        set_exchanged_state(model, payload["state"])
    except ExchangeError as err:
        raise CheckpointError(f"{path}: state does not fit the model built from its config: {err}") from None
    return model, payload
