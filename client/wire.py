"""Exchanged states <-> Flower ``ArrayRecord``s, in the configured wire dtype (both directions).

float32 and float16 travel as NumPy arrays (Flower's own ``numpy.ndarray`` serialisation).
NumPy has no bfloat16, so bfloat16 tensors travel as their raw 2-byte words under
``stype = "torch.bfloat16.raw"`` (little-endian, C order). Decoding always returns float32 CPU
tensors and rejects anything else (other dtypes, a byte count that does not match the shape)
with :class:`~shared_model.exchange.ExchangeError`, so a malformed reply is dropped, not crashing
the server. Used by the client (global state in, delta out) and the server (the reverse).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from shared_model.exchange import WIRE_DTYPES, ExchangeError, cast_state

BF16_STYPE = "torch.bfloat16.raw"
_NUMPY_DTYPES = {"float32", "float16"}


def state_to_record(state: Mapping[str, torch.Tensor], wire_dtype: str = "float32") -> ArrayRecord:
    """Encode a state (name -> tensor of any shape) as an ArrayRecord in ``wire_dtype``.

    Args:
        state: Ordered mapping name -> tensor; keys are kept as the record's keys.
        wire_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    Returns:
        One ``Array`` per tensor, in the order of ``state``.
    """
    record = ArrayRecord()
    for name, tensor in cast_state(state, wire_dtype).items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            raw = tensor.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
            record[name] = Array(dtype="bfloat16", shape=tuple(tensor.shape), stype=BF16_STYPE, data=raw)
        else:
            record[name] = Array(tensor.numpy())
    return record


def _decode(name: str, array: Array) -> torch.Tensor:
    shape = tuple(int(s) for s in array.shape)
    if array.stype == BF16_STYPE:
        if array.dtype != "bfloat16":
            raise ExchangeError(f"{name}: stype {BF16_STYPE} with dtype {array.dtype!r}")
        count = int(np.prod(shape)) if shape else 1
        if len(array.data) != 2 * count:
            raise ExchangeError(f"{name}: {len(array.data)} bytes for bfloat16 shape {shape}")
        words = np.frombuffer(array.data, dtype="<i2").copy()
        return torch.from_numpy(words).view(torch.bfloat16).reshape(shape).float()
    if array.dtype not in _NUMPY_DTYPES:
        raise ExchangeError(f"{name}: wire dtype {array.dtype!r} not in {sorted(WIRE_DTYPES)}")
    try:
        values = array.numpy()
    except (TypeError, ValueError, OSError) as err:
        raise ExchangeError(f"{name}: cannot decode array: {err}") from None
    if str(values.dtype) != array.dtype or tuple(values.shape) != shape:
        raise ExchangeError(f"{name}: payload {values.dtype}{values.shape} != header {array.dtype}{shape}")
    return torch.from_numpy(np.array(values, dtype=np.float32))


def record_to_state(record: ArrayRecord) -> "OrderedDict[str, torch.Tensor]":
    """Decode an ArrayRecord produced by :func:`state_to_record` into float32 CPU tensors.

    Raises:
        ExchangeError: On an unsupported dtype or serialisation, or a payload not matching its
            declared shape.
    """
    return OrderedDict((name, _decode(name, array)) for name, array in record.items())


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of the arrays' serialised payloads (what the transport carries, headers included)."""
    return sum(len(array.data) for array in record.values())
