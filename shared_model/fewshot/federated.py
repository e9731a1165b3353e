"""The model of a federated run: the usual one, or a frozen base carrying a task adapter.

With ``adapter.enabled`` (the run config's ``adapter-config``), every site and the server build the
base model (its config, plus the state of ``adapter.base_checkpoint`` when given), freeze it and
attach the task adapter (:func:`~shared_model.fewshot.adapter.attach_adapter`). Because the
exchanged state is every parameter with ``requires_grad`` (:mod:`shared_model.exchange`), the run
then sends, aggregates, checkpoints and reports only the adapter, through the same wire format.
"""

from __future__ import annotations

from typing import Any

from shared_model.config import ConfigError, RunSettings


def build_run_model(settings: RunSettings):
    """The PromptSAM a run trains and evaluates (see the module docstring).

    Adapter runs carry ``model.base_record`` (fingerprint, base checkpoint, preset: what an adapter
    file records), ``model.base_state`` (the base's own exchanged state, from which
    :func:`~shared_model.checkpoint.load_model_checkpoint` rebuilds the base) and ``model.task_name`` (``adapter.name``, else the data's class name).

    Raises:
        ConfigError: ``adapter-config.base_checkpoint`` is unusable or made for another model config.
    """
    from shared_model.modeling.prompt_sam import build_model

    adapter = settings.adapter
    if not adapter.enabled:
        return build_model(settings.model)
    from shared_model.checkpoint import CheckpointError, checkpoint_config, config_differences, read_checkpoint
    from shared_model.exchange import ExchangeError, set_exchanged_state
    from shared_model.fewshot.adapter import attach_adapter, base_record

    model = build_model(settings.model)
    if adapter.base_checkpoint:
        try:
            payload = read_checkpoint(adapter.base_checkpoint)
            diffs = config_differences(checkpoint_config(payload, adapter.base_checkpoint), settings.model)
            if diffs:
                raise CheckpointError(f"{adapter.base_checkpoint}: its model config differs from model-config: "
                                      + "; ".join(diffs[:5]))
            set_exchanged_state(model, payload["state"])
        except (CheckpointError, ExchangeError) as err:
            raise ConfigError(f"adapter-config.base_checkpoint: {err}") from None
    from shared_model.exchange import get_exchanged_state

    record: dict[str, Any] = base_record(model, adapter.base_checkpoint or None)
    base_state = get_exchanged_state(model)
    attach_adapter(model, adapter)
    model.base_record, model.base_state = record, base_state
    model.task_name = adapter.name or settings.data.class_name or "polyp"
    return model
