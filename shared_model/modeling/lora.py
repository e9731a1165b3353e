"""LoRA adapters through peft, and the freezing rules built on them.

``add_lora`` injects peft LoRA layers into named ``nn.Linear`` modules of any module (SAM's image
encoder, the timm ViT, BERT, the mask decoder) without wrapping it in a PeftModel, so parameter
names stay those of the original module plus ``.lora_A.default.weight`` / ``.lora_B.default.weight``.
"""

from __future__ import annotations

from typing import Iterable

from peft import LoraConfig, inject_adapter_in_model
from torch import nn


def linear_names(module: nn.Module, suffixes: Iterable[str], prefixes: Iterable[str] = ("",)) -> list[str]:
    """Full names of ``nn.Linear`` submodules whose name ends with one of ``suffixes``.

    Args:
        module: The module to search.
        suffixes: Last name components to match, e.g. ``["qkv"]`` or ``["query", "value"]``.
        prefixes: Only names starting with one of these (e.g. ``"blocks.10."``) are kept.
    """
    suffixes = tuple(suffixes)
    prefixes = tuple(prefixes)
    return [
        name
        for name, sub in module.named_modules()
        if isinstance(sub, nn.Linear)
        and name.split(".")[-1] in suffixes
        and name.startswith(prefixes)
    ]


def add_lora(
    module: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0
) -> nn.Module:
    """Inject LoRA (rank ``rank``, scale ``alpha / rank``) into the listed Linear modules in place.

    LoRA's B matrices start at zero, so the module computes exactly what it did before.

    Args:
        module: The module to adapt.
        targets: Full module names (from :func:`linear_names`); empty = nothing to do.
        rank: LoRA rank r (> 0).
        alpha: LoRA alpha.
        dropout: Dropout on the LoRA input.

    Returns:
        The same module, adapted.
    """
    if not targets or rank <= 0:
        return module
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=[f"^{t.replace('.', '[.]')}$" for t in targets][0] if len(targets) == 1
        else "^(" + "|".join(t.replace(".", "[.]") for t in targets) + ")$",
        bias="none",
    )
    inject_adapter_in_model(cfg, module)
    return module


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def unfreeze_lora(module: nn.Module) -> None:
    """Set ``requires_grad=True`` on every LoRA parameter inside ``module``."""
    for name, p in module.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.requires_grad_(True)
