"""The server's per-round checkpoint: written atomically, read back strictly for ``resume``.

``<run_dir>/checkpoint.pt`` holds everything needed to continue a run exactly: the round number,
the global exchanged state, the server-optimiser state of the strategy (FedAdam's moments), the
metrics history, the best round (by global validation Dice) with its state, the model config, and
the run config. It is written to a temporary file in the same folder and renamed over the old one
(``os.replace``), so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared_model.checkpoint import atomic_torch_save
from shared_model.config import ModelConfig, to_dict

FORMAT = "promptsam-fl-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"


class ResumeError(ValueError):
    """A checkpoint cannot be used to continue this run; the message says why."""


@dataclass
class ServerCheckpoint:
    """State of a federated run after ``round`` rounds.

    Attributes:
        round: Rounds completed (0 = only the initial state was evaluated).
        state: Global exchanged state, name -> float32 tensor.
        strategy: ``GuardedStrategy.state_dict()``.
        history: Metrics rows logged so far (the content of ``metrics.jsonl``).
        best_round / best_dice / best_state: The round with the highest global validation Dice.
        model_config: ``to_dict(ModelConfig)`` that built the model.
        run_config: The Flower run config of the run that wrote the checkpoint.
    """

    round: int
    state: dict[str, torch.Tensor]
    strategy: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_round: int = -1
    best_dice: float = float("-inf")
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | Path, ckpt: ServerCheckpoint) -> Path:
    """Write ``ckpt`` atomically (temporary file + ``os.replace``)."""
    payload = {"format": FORMAT, **dataclasses.asdict(ckpt)}
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | Path) -> ServerCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        ResumeError: If the file is missing, unreadable, or not a server checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"{path}: no checkpoint to resume from")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ResumeError(f"{path}: cannot read checkpoint: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ResumeError(f"{path}: not a {FORMAT} file")
    names = {f.name for f in dataclasses.fields(ServerCheckpoint)}
    missing = sorted(names - set(payload))
    if missing:
        raise ResumeError(f"{path}: checkpoint lacks {missing}")
    return ServerCheckpoint(**{k: payload[k] for k in names})


def check_resumable(ckpt: ServerCheckpoint, model_cfg: ModelConfig, path: str | Path) -> None:
    """The checkpoint must come from the same model config.

    Raises:
        ResumeError: Naming the first differing config field.
    """
    current = to_dict(model_cfg)
    diff = _first_difference(ckpt.model_config, current)
    if diff is not None:
        raise ResumeError(f"{path}: the checkpoint's model config differs at {diff}; "
                          "resume needs the same model")


def _first_difference(a: Any, b: Any, path: str = "model") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}.{key}"
            sub = _first_difference(a[key], b[key], f"{path}.{key}")
            if sub is not None:
                return sub
        return None
    return None if a == b else f"{path} ({a!r} != {b!r})"
