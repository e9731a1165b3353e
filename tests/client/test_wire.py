"""Exchanged state <-> ArrayRecord codec in every wire dtype."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from client.wire import BF16_STYPE, record_nbytes, record_to_state, state_to_record
from shared_model.exchange import ExchangeError


def _state() -> "OrderedDict[str, torch.Tensor]":
    g = torch.Generator().manual_seed(0)
    return OrderedDict([("a.weight", torch.randn(4, 3, generator=g)), ("b", torch.randn(5, generator=g)),
                        ("c", torch.tensor(2.5))])


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 1e-2)])
def test_roundtrip_keeps_keys_shapes_and_values(dtype, tol):
    state = _state()
    back = record_to_state(state_to_record(state, dtype))
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == torch.float32 and back[k].shape == state[k].shape
        torch.testing.assert_close(back[k], state[k], rtol=tol, atol=tol)


def test_bfloat16_is_exact_for_representable_values():
    state = OrderedDict([("x", torch.tensor([1.0, -2.0, 0.5, 3072.0]))])
    record = state_to_record(state, "bfloat16")
    assert record["x"].stype == BF16_STYPE and record["x"].dtype == "bfloat16"
    assert len(record["x"].data) == 4 * 2
    assert torch.equal(record_to_state(record)["x"], state["x"])


def test_half_precision_halves_the_payload():
    state = OrderedDict([("w", torch.zeros(1000))])
    full = record_nbytes(state_to_record(state, "float32"))
    half = record_nbytes(state_to_record(state, "float16"))
    bf = record_nbytes(state_to_record(state, "bfloat16"))
    assert full >= 4000 and half >= 2000 and bf == 2000
    assert full - 4000 == half - 2000  # the same .npy header


def test_rejects_foreign_dtypes_and_torn_payloads():
    with pytest.raises(ExchangeError, match="x: wire dtype 'int64'"):
        record_to_state(ArrayRecord({"x": Array(np.arange(3))}))
    torn = Array(dtype="bfloat16", shape=(4,), stype=BF16_STYPE, data=b"\x00" * 6)
    with pytest.raises(ExchangeError, match="y: 6 bytes for bfloat16 shape"):
        record_to_state(ArrayRecord({"y": torn}))
    lying = Array(np.zeros(3, dtype=np.float32))
    lying.shape = (4,)
    with pytest.raises(ExchangeError, match="z: payload"):
        record_to_state(ArrayRecord({"z": lying}))
