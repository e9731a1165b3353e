"""What crosses the wire: the exchanged state and its deltas.

The exchanged state is, by definition, every parameter of the model with ``requires_grad=True``
and nothing else, keyed by its name in ``model.named_parameters()``. This module is the single
get/set pair used by the client, the server, checkpoints and tests.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from itertools import accumulate
from typing import Mapping, Sequence

import torch
from torch import nn

State = "OrderedDict[str, torch.Tensor]"

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ExchangeError(ValueError):
    """An exchanged state does not match the model (keys, shapes or values)."""


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad``, in ``named_parameters`` order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def get_exchanged_state(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Copy of every trainable parameter as float32 CPU tensors.

    Args:
        model: Any module; its ``requires_grad`` flags define the exchanged set.

    Returns:
        Ordered mapping name -> detached float32 CPU tensor (a copy, safe to mutate).
    """
    return OrderedDict(
        (name, p.detach().to("cpu", torch.float32).clone())
        for name, p in model.named_parameters()
        if p.requires_grad
    )


def set_exchanged_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into the model's trainable parameters, in place.

    Raises:
        ExchangeError: If the keys differ from the trainable parameters or a shape mismatches.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    check_state(state, {k: p.shape for k, p in params.items()})
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def state_shapes(model: nn.Module) -> "OrderedDict[str, torch.Size]":
    """Expected shape of every exchanged tensor."""
    return OrderedDict((n, p.shape) for n, p in model.named_parameters() if p.requires_grad)


def check_state(
    state: Mapping[str, torch.Tensor],
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    max_norm: float | None = None,
) -> None:
    """Validate an exchanged state (or delta) against the expected key set and shapes.

    Args:
        state: name -> tensor.
        shapes: name -> expected shape (from :func:`state_shapes`).
        max_norm: If given, the global L2 norm of ``state`` must not exceed it.

    Raises:
        ExchangeError: Naming the missing/unexpected keys, the mismatched shapes, the non-finite
            tensors, or the norm.
    """
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ExchangeError(
            f"exchanged keys differ from the model's trainable parameters: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    bad_shapes = [
        f"{k}: got {tuple(v.shape)}, expected {tuple(shapes[k])}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(shapes[k])
    ]
    if bad_shapes:
        raise ExchangeError("shape mismatch: " + "; ".join(bad_shapes[:5]))
    non_finite = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if non_finite:
        raise ExchangeError(f"non-finite values (NaN/Inf) in {non_finite[:5]}")
    if max_norm is not None:
        norm = state_norm(state)
        if norm > max_norm:
            raise ExchangeError(f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")


class FlatLayout:
    """An exchanged state laid out as one contiguous float32 vector of D values.

    Tensors follow the key order of ``shapes``, each flattened in C order, so a state is validated
    and aggregated with one vectorised pass instead of one call per tensor.

    Args:
        shapes: name -> shape (from :func:`state_shapes`), in the wire's key order.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]]) -> None:
        self.keys = tuple(shapes)
        self.shapes = tuple(tuple(int(d) for d in shape) for shape in shapes.values())
        self.counts = tuple(math.prod(shape) for shape in self.shapes)
        self.offsets = tuple(accumulate(self.counts, initial=0))[:-1]
        self.numel = sum(self.counts)

    def flatten(self, state: Mapping[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy ``state`` (keys and shapes already checked) into ``out`` (D float32), or a new vector."""
        out = torch.empty(self.numel, dtype=torch.float32) if out is None else out
        for key, offset, count in zip(self.keys, self.offsets, self.counts):
            out[offset:offset + count].copy_(state[key].reshape(-1))
        return out

    def unflatten(self, flat: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """name -> view of ``flat`` (D) with the tensor's shape (no copy)."""
        return OrderedDict(
            (key, flat[offset:offset + count].view(shape))
            for key, shape, offset, count in zip(self.keys, self.shapes, self.offsets, self.counts)
        )


def check_flat(flat: torch.Tensor, layout: FlatLayout, max_norm: float | None = None) -> float:
    """:func:`check_state`'s value checks on a flat state (D float32) whose keys and shapes are known good.

    One pass over the values (their float32 L2 norm, which is NaN / Inf if any value is); the
    per-tensor scan that names the non-finite tensors, and the float64 norm of :func:`state_norm`,
    only run when that norm is not finite or lies within 1e-4 of ``max_norm``, so every decision
    and message is the same as :func:`check_state`'s.

    Returns:
        The L2 norm of the state (float32 accurate, float64 near the bound).

    Raises:
        ExchangeError: Naming the non-finite tensors, or the norm over ``max_norm``.
    """
    norm = float(torch.linalg.vector_norm(flat))
    if not math.isfinite(norm):
        non_finite = [k for k, v in layout.unflatten(flat).items() if not torch.isfinite(v).all()]
        if non_finite:
            raise ExchangeError(f"non-finite values (NaN/Inf) in {non_finite[:5]}")
        norm = math.sqrt(float(flat.double().square().sum()))  # the float32 squares overflowed
    if max_norm is not None and norm > max_norm * (1 - 1e-4):
        norm = math.sqrt(float(flat.double().square().sum()))
        if norm > max_norm:
            raise ExchangeError(f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")
    return norm


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors of a state."""
    total = sum(float(v.double().pow(2).sum()) for v in state.values())
    return math.sqrt(total)


def state_delta(
    new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]
) -> "OrderedDict[str, torch.Tensor]":
    """``new - old`` per key (float32)."""
    return OrderedDict((k, new[k].float() - old[k].float()) for k in old)


def cast_state(
    state: Mapping[str, torch.Tensor], dtype: str | torch.dtype
) -> "OrderedDict[str, torch.Tensor]":
    """Cast every tensor to the wire dtype (``float32``, ``float16`` or ``bfloat16``)."""
    if isinstance(dtype, str):
        if dtype not in WIRE_DTYPES:
            raise ExchangeError(f"wire dtype {dtype!r} not in {sorted(WIRE_DTYPES)}")
        dtype = WIRE_DTYPES[dtype]
    return OrderedDict((k, v.to(dtype)) for k, v in state.items())


def state_numel(state: Mapping[str, torch.Tensor]) -> int:
    """Number of values in a state."""
    return sum(v.numel() for v in state.values())


def state_nbytes(state: Mapping[str, torch.Tensor], dtype: str | torch.dtype | None = None) -> int:
    """Bytes of the tensor payload, in ``dtype`` if given, else in each tensor's own dtype."""
    if dtype is None:
        return sum(v.numel() * v.element_size() for v in state.values())
    if isinstance(dtype, str):
        dtype = WIRE_DTYPES[dtype]
    size = torch.empty((), dtype=dtype).element_size()
    return state_numel(state) * size
