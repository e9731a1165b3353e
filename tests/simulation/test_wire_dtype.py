"""Aggregating float16 / bfloat16 deltas stays within the derived rounding bound of the float32 aggregate.

The path is the real one: ``client.wire.state_to_record`` (client) -> train reply Message ->
``GuardedStrategy.aggregate_train`` (decode, validate, ``global + delta``, FedAvg) -> float32 record.

Bound: rounding a delta value d to the wire dtype errs by at most u|d| (+ half the smallest
subnormal spacing, 2^-25, for float16 below 2^-14), with unit roundoff u = 2^-11 for float16
(10 stored mantissa bits) and u = 2^-8 for bfloat16 (7 bits). FedAvg's weights w_i sum to 1, so
the aggregate errs by at most u * sum_i w_i |d_i| + 2^-25, plus float32 rounding of ``g + d_i`` and
of the weighted sum (a few 2^-24 |g + d|), which both paths share. With |d| ~ scale this is
~5e-4 (float16) and ~4e-3 (bfloat16) of the delta scale, below the 1e-3 / 1e-2 budgets.
"""

from collections import OrderedDict

import pytest
import torch

from client.wire import record_nbytes, record_to_state, state_to_record
from simulation.bench import guarded_round

SHAPES = OrderedDict([("enc.lora_A", (8, 64)), ("enc.lora_B", (64, 8)), ("dec.conv", (3, 4, 5)), ("dec.bias", (17,))])
K = 5
SCALE = 1e-2
NUM_EXAMPLES = [10, 30, 5, 25, 30]
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
BUDGET = {"float16": 1e-3, "bfloat16": 1e-2}


def _states():
    gen = torch.Generator().manual_seed(0)
    global_state = OrderedDict((k, torch.randn(s, generator=gen) * 0.1) for k, s in SHAPES.items())
    deltas = [OrderedDict((k, torch.randn(s, generator=gen) * SCALE) for k, s in SHAPES.items()) for _ in range(K)]
    return global_state, deltas


def _aggregate(wire_dtype: str):
    global_state, deltas = _states()
    strategy, replies = guarded_round(SHAPES, global_state, deltas, wire_dtype, NUM_EXAMPLES)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and all(r["accepted"] for r in strategy.train_records)
    return record_to_state(arrays), global_state, deltas


def test_float32_aggregate_is_the_weighted_mean_of_the_deltas():
    agg, global_state, deltas = _aggregate("float32")
    weights = torch.tensor(NUM_EXAMPLES, dtype=torch.float64) / sum(NUM_EXAMPLES)
    for k in SHAPES:
        expected = global_state[k].double() + sum(w * d[k].double() for w, d in zip(weights, deltas))
        assert agg[k].dtype == torch.float32
        torch.testing.assert_close(agg[k].double(), expected, rtol=0, atol=4 * 2.0**-24 * 0.5)


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_reduced_wire_dtype_aggregate_within_rounding_bound(wire_dtype):
    reference, global_state, deltas = _aggregate("float32")
    agg, _, _ = _aggregate(wire_dtype)
    weights = torch.tensor(NUM_EXAMPLES, dtype=torch.float64) / sum(NUM_EXAMPLES)
    u = UNIT_ROUNDOFF[wire_dtype]
    worst = 0.0
    for k in SHAPES:
        weighted_abs = sum(w * d[k].double().abs() for w, d in zip(weights, deltas))
        fp32_slack = 8 * 2.0**-24 * (global_state[k].double().abs() + torch.stack([d[k].double().abs() for d in deltas]).amax(0))
        bound = u * weighted_abs + 2.0**-25 + fp32_slack
        err = (agg[k].double() - reference[k].double()).abs()
        assert bool((err <= bound).all()), f"{k}: error {float((err - bound).max()):.3g} above the bound"
        worst = max(worst, float(err.max()))
    assert worst <= BUDGET[wire_dtype] * SCALE
    assert worst > 2.0**-24, "no rounding at all: the deltas did not travel in the reduced dtype"


def test_bfloat16_rounds_more_than_float16():
    reference, _, _ = _aggregate("float32")
    errors = {}
    for dtype in ("float16", "bfloat16"):
        agg, _, _ = _aggregate(dtype)
        errors[dtype] = max(float((agg[k] - reference[k]).abs().max()) for k in SHAPES)
    assert errors["bfloat16"] > 2 * errors["float16"], errors


def test_reply_bytes_per_dtype():
    numel = sum(torch.Size(s).numel() for s in SHAPES.values())
    _, deltas = _states()
    nbytes = {d: record_nbytes(state_to_record(deltas[0], d)) for d in ("float32", "float16", "bfloat16")}
    assert nbytes["bfloat16"] == 2 * numel  # raw 2-byte words, no header
    header = nbytes["float32"] - 4 * numel  # Flower's .npy serialisation: one header per tensor
    assert 0 < header <= 256 * len(SHAPES)
    assert nbytes["float16"] == 2 * numel + header
