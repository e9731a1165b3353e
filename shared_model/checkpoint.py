"""Model checkpoints: the exchanged state stored with the config that built the model.

A checkpoint holds only what was trained (the exchanged state) plus the full :class:`ModelConfig`;
the frozen weights come from the pretrained files named in that config (or the seeded random init
of a preset). Files are written atomically (temporary file + ``os.replace``) so a killed process
never leaves a torn checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ModelConfig, from_dict, to_dict
from .exchange import ExchangeError, get_exchanged_state, set_exchanged_state

FORMAT = "promptsam-checkpoint/1"


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


def save_model_checkpoint(path: str | Path, model, extra: dict[str, Any] | None = None) -> Path:
    """Save ``model``'s exchanged state with its config (and optional JSON-able ``extra``)."""
    payload = {
        "format": FORMAT,
        "config": to_dict(model.cfg),
        "state": dict(get_exchanged_state(model)),
        "extra": extra or {},
    }
    return atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint payload (CPU, ``weights_only``), with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a promptsam checkpoint (expected format {FORMAT!r})")
    return payload


def checkpoint_config(payload: dict[str, Any], path: str | Path = "checkpoint") -> ModelConfig:
    """The ModelConfig stored in a checkpoint payload."""
    try:
        return from_dict(ModelConfig, payload["config"], "model")
    except ConfigError as err:
        raise CheckpointError(f"{path}: stored config is invalid: {err}") from None


def load_model_checkpoint(path: str | Path, expect_preset: str | None = None):
    """Rebuild the model from a checkpoint and load its exchanged state.

    Args:
        path: Checkpoint file.
        expect_preset: If given, the checkpoint must come from this preset.

    Returns:
        (model, payload).

    Raises:
        CheckpointError: Missing/unreadable file, other preset, or a state that does not fit.
    """
    from .model import build_model

    payload = read_checkpoint(path)
    cfg = checkpoint_config(payload, path)
    if expect_preset is not None and cfg.preset != expect_preset:
        raise CheckpointError(
            f"{path}: checkpoint was trained with preset {cfg.preset!r}, not {expect_preset!r}"
        )
    model = build_model(cfg)
    try:
        set_exchanged_state(model, payload["state"])
    except ExchangeError as err:
        raise CheckpointError(f"{path}: state does not fit the model built from its config: {err}") from None
    return model, payload
