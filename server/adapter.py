"""What an adapter-only federated run writes instead of model checkpoints.

``best_model.pt`` / ``final_model.pt`` of an ordinary run become ``best_adapter.pt`` /
``final_adapter.pt`` (task adapter files, :mod:`shared_model.fewshot.adapter`), next to
``base_model.pt``: the frozen base as a promptsam checkpoint, so that
``promptsam evaluate --checkpoint RUN/base_model.pt --adapter RUN/final_adapter.pt`` scores the result
and the adapter's base fingerprint check passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared_model.checkpoint import atomic_torch_save, checkpoint_payload
from shared_model.config import RunSettings, to_dict

BASE_NAME = "base_model.pt"


def describe_adapter(model, wire_dtype: str) -> str:
    """One log line: the adapter's tensors, values and bytes per client and direction each round."""
    from client.wire import record_nbytes, state_to_record
    from shared_model.exchange import get_exchanged_state, state_nbytes

    state = get_exchanged_state(model)
    wire = record_nbytes(state_to_record(state, wire_dtype))
    return (f"exchanging only the task adapter {model.task_name!r}: {len(state)} tensors, "
            f"{sum(v.numel() for v in state.values()):,} values, {state_nbytes(state):,} B raw (float32), "
            f"{wire:,} B on the wire ({wire_dtype}) per client and direction each round; the base model "
            f"(fingerprint {model.base_record['fingerprint']}) stays frozen at every site")


def adapter_file_name(model_file: str) -> str:
    """``best_model.pt`` -> ``best_adapter.pt`` (any ``*_model.pt``; other names get ``_adapter``)."""
    stem = Path(model_file).stem
    return (stem[: -len("_model")] if stem.endswith("_model") else stem) + "_adapter.pt"


def save_run_adapter(run_dir: str | Path, model_file: str, model, settings: RunSettings,
                     extra: dict[str, Any]) -> Path:
    """Write the run's base (once) and the adapter state of ``model`` as :func:`adapter_file_name`.

    Args:
        run_dir: The run folder.
        model_file: The model checkpoint name an ordinary run would write.
        model: The server's model (from :func:`~shared_model.fewshot.federated.build_run_model`),
            its state already set.
        settings: The run's settings.
        extra: Round, Dice, ... (stored in the adapter's ``extra``).

    Returns:
        The adapter file's path.
    """
    from shared_model.fewshot.adapter import save_adapter

    run_dir = Path(run_dir)
    base_path = run_dir / BASE_NAME
    if not base_path.is_file():
        atomic_torch_save(checkpoint_payload(model, model.base_state, {"base_of": "adapter-only federated run",
                                                                       "adapter": to_dict(settings.adapter)}),
                          base_path)
    base = {**model.base_record, "checkpoint": str(base_path)}
    return save_adapter(run_dir / adapter_file_name(model_file), model, model.task_name, base,
                        {**extra, "federated": True})
