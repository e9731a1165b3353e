"""Exchanged states <-> Flower ``ArrayRecord``s, in the configured wire dtype (both directions).

float32 and float16 travel as NumPy arrays (Flower's own ``numpy.ndarray`` serialisation).
NumPy has no bfloat16, so bfloat16 tensors travel as their raw 2-byte words under
``stype = "torch.bfloat16.raw"`` (little-endian, C order). Decoding always returns float32 CPU
tensors and rejects anything else (other dtypes, a byte count that does not match the shape)
with :class:`~shared_model.exchange.ExchangeError`, so a malformed reply is dropped, not crashing
the server. Used by the client (global state in, delta out) and the server (the reverse).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from functools import lru_cache
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from shared_model.exchange import WIRE_DTYPES, ExchangeError, FlatLayout, cast_state

BF16_STYPE = "torch.bfloat16.raw"
NUMPY_STYPE = "numpy.ndarray"  # Flower's ``SType.NUMPY``: the bytes of ``np.save``
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


@lru_cache(maxsize=16)
def _wire_plan(dtype: str, shapes: tuple[tuple[int, ...], ...]
               ) -> tuple[tuple[tuple[int, ...], bytes, int, int, int], ...]:
    """Per tensor of a canonical record: ``(shape, header, payload bytes, start, stop)``.

    ``header`` is the ``.npy`` header ``np.save`` writes for a C-order array of this dtype and
    shape (empty for raw bfloat16 words), ``payload bytes`` the length of the Array's data
    (header + values), and ``start:stop`` the values' bytes in the flat vector of ``dtype`` words.
    """
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    plan, start = [], 0
    for shape in shapes:
        header = b""
        if dtype != "bfloat16":
            out = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                      "shape": shape})
            header = out.getvalue()
        stop = start + int(np.prod(shape, dtype=np.int64)) * itemsize
        plan.append((shape, header, len(header) + stop - start, start, stop))
        start = stop
    return tuple(plan)


def record_into(record: ArrayRecord, layout: FlatLayout, out: torch.Tensor) -> bool:
    """Decode a record in the canonical wire layout straight into one flat float32 vector.

    Canonical: the keys of ``layout`` in its order, every array of one wire dtype with the
    expected shape, and its bytes exactly what :func:`state_to_record` writes (the ``.npy``
    header of that dtype and shape followed by the values, or raw bfloat16 words). The values are
    copied once, tensor by tensor, into ``out`` (through a staging vector for 2-byte dtypes).

    Args:
        record: A reply's ArrayRecord.
        layout: Keys, shapes and offsets of the exchanged state.
        out: D float32 values, overwritten.

    Returns:
        False, with ``out`` in an unspecified state, for anything else (wrong keys or shapes,
        mixed dtypes, another valid ``.npy`` encoding, a malformed payload): the caller then
        decodes with :func:`record_to_state`, whose checks name what is wrong.
    """
    if tuple(record.keys()) != layout.keys:
        return False
    arrays = list(record.values())
    dtype, stype = arrays[0].dtype, arrays[0].stype
    if stype == BF16_STYPE and dtype == "bfloat16":
        words = "<i2"
    elif stype == NUMPY_STYPE and dtype in _NUMPY_DTYPES:
        words = dtype
    else:
        return False
    stage = out.numpy() if dtype == "float32" else np.empty(layout.numel, dtype=words)
    raw = memoryview(stage).cast("B")  # byte copies: no array object per tensor
    for array, (shape, header, size, start, stop) in zip(arrays, _wire_plan(dtype, layout.shapes)):
        data = array.data
        if (len(data) != size or array.dtype != dtype or array.stype != stype or tuple(array.shape) != shape
                or not data.startswith(header)):
            return False
        raw[start:stop] = memoryview(data)[len(header):]
    if dtype == "bfloat16":
        out.copy_(torch.from_numpy(stage).view(torch.bfloat16))
    elif dtype == "float16":
        out.copy_(torch.from_numpy(stage))
    return True
