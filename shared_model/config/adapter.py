"""Task adapters (few-shot new tasks): which small parts of a frozen base model an adapter trains.

An adapter is what a hospital trains for a structure the base model was never trained on, from a
handful of labelled images: everything of the base is frozen (image encoders, text towers, the base's
own adapters), and only the parts below train (see :func:`shared_model.fewshot.adapter.attach_adapter`).
The same settings make a federated run exchange only the adapter (``adapter.enabled``: the run
config's ``adapter-*`` keys), since the exchanged state is every parameter with ``requires_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared_model.config.parse import ConfigError


@dataclass
class AdapterConfig:
    """What a task adapter trains, and (federated) whether a run exchanges only an adapter."""

    # Federated runs: exchange only a task adapter (the base frozen at every site).
    enabled: bool = False
    # The new task's name (its text prompt, e.g. "skin lesion"); federated: "" = the data's class name.
    name: str = ""
    # peft LoRA on the mask decoder (and on the text/saliency prompt projections).
    rank: int = 4
    alpha: float = 8.0
    # Linear layers of the mask decoder's two-way transformer (last name component).
    decoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj",
                                                                 "lin1", "lin2"])
    # LoRA also on the output heads in use (the mask token's hypernetwork MLP, the IoU head).
    decoder_heads: bool = True
    # LoRA on the text -> sparse-token and saliency -> dense projections (when the base uses them).
    prompt_projections: bool = True
    # The task embedding: the text tower's context vectors (CoOp) and the text tokens' learned offsets
    # (when the base has a text path), SAM's no-mask dense embedding and its box-corner embeddings.
    task_embedding: bool = True
    # Federated: a promptsam checkpoint giving the base model's state at every site ("" = the model
    # config's own initial state, e.g. the foundation with fresh adapters).
    base_checkpoint: str = ""


def check_adapter(cfg: AdapterConfig, prefix: str = "adapter.") -> None:
    """Ranges of an AdapterConfig, raising ConfigError naming the field (``prefix`` + name)."""
    if cfg.rank < 1:
        raise ConfigError(f"{prefix}rank: must be >= 1, got {cfg.rank}")
    if cfg.alpha <= 0:
        raise ConfigError(f"{prefix}alpha: must be > 0, got {cfg.alpha}")
    if not isinstance(cfg.name, str):
        raise ConfigError(f"{prefix}name: expected a string, got {cfg.name!r}")
