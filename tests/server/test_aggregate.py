"""Streaming aggregation of flat deltas (server.aggregate) against Flower's aggregation of full states."""

import io
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.task import TRAIN_METRIC_KEYS
from client.wire import record_into, record_to_state, state_to_record
from server.strategy import GuardedStrategy, build_inner_strategy
from shared_model.config import FederationConfig
from shared_model.exchange import ExchangeError, FlatLayout, check_flat
from server_helpers import FakeGrid

pytestmark = pytest.mark.usefixtures("fixed_task_identity")

SHAPES = OrderedDict([("a", (3, 4)), ("b", (5,)), ("c", (2, 3, 2)), ("d", (1,))])
NODES = tuple(range(21, 28))  # 7 replies: an odd count (one median) ...
EVEN = tuple(range(31, 37))  # ... and an even one (mean of the two middle values)
STRATEGIES = ["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"]


def _state(gen, scale):
    return OrderedDict((k, torch.randn(s, generator=gen) * scale) for k, s in SHAPES.items())


def _metrics(n, pid):
    values = {key: 0.5 for key in TRAIN_METRIC_KEYS}
    values.update({"num-examples": n, "partition-id": pid})
    return MetricRecord(values)


def _round(strategy, nodes, streaming, global_state, deltas, rnd=1, guard=None, **kw):
    """Configure (a new guard unless given) and aggregate one round; returns (guard, new state, metrics)."""
    if guard is None:
        fed = FederationConfig(strategy=strategy, min_nodes=1, **kw)
        guard = GuardedStrategy(build_inner_strategy(fed), SHAPES, "float32", 0.0, fed.server_lr, streaming=streaming)
    msgs = {m.metadata.dst_node_id: m for m in
            guard.configure_train(rnd, state_to_record(global_state), ConfigRecord(), FakeGrid(nodes))}
    replies = [Message(RecordDict({"arrays": state_to_record(d), "metrics": _metrics(3 + i, i)}), reply_to=msgs[n])
               for i, (n, d) in enumerate(zip(nodes, deltas))]
    arrays, metrics = guard.aggregate_train(rnd, replies[::-1])  # arrival order reversed: sorted inside
    return guard, record_to_state(arrays), metrics


@pytest.mark.parametrize("nodes", [NODES, EVEN], ids=["odd", "even"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_streaming_equals_flower_aggregation_of_full_states(strategy, nodes):
    gen = torch.Generator().manual_seed(0)
    global_state = _state(gen, 1.0)
    extra = {"server_lr": 0.5} if strategy == "fedavg" else {"trimmed_beta": 0.2} if strategy == "fedtrimmedavg" else {}
    out = {}
    for streaming in (True, False):
        state, guard = global_state, None
        for rnd in (1, 2):  # FedAdam: the second round uses the first round's moments
            deltas = [_state(gen, 0.1) for _ in nodes]
            guard, state, metrics = _round(strategy, nodes, streaming, state, deltas, rnd, guard, **extra)
        out[streaming] = (state, metrics, guard.state_dict())
        gen = torch.Generator().manual_seed(0)
        global_state = _state(gen, 1.0)
    (fast, fast_metrics, fast_ckpt), (ref, ref_metrics, ref_ckpt) = out[True], out[False]
    assert list(fast) == list(SHAPES)
    for k in SHAPES:
        assert fast[k].dtype == torch.float32
        torch.testing.assert_close(fast[k], ref[k], rtol=0, atol=1e-6)
        assert not torch.equal(fast[k], global_state[k])
    assert dict(fast_metrics) == pytest.approx(dict(ref_metrics))
    assert set(fast_ckpt) == set(ref_ckpt)
    for name in set(fast_ckpt) & {"m_t", "v_t"}:
        for k in SHAPES:
            torch.testing.assert_close(fast_ckpt[name][k], ref_ckpt[name][k], rtol=1e-5, atol=1e-9)


def test_one_pass_iterator_is_streamed_and_equals_the_list():
    gen = torch.Generator().manual_seed(1)
    global_state = _state(gen, 0.02)
    deltas = [_state(gen, 1e-3) for _ in NODES]
    _, from_list, _ = _round("fedavg", NODES, True, global_state, deltas)
    guard = GuardedStrategy(build_inner_strategy(FederationConfig(min_nodes=1)), SHAPES)
    msgs = {m.metadata.dst_node_id: m for m in
            guard.configure_train(1, state_to_record(global_state), ConfigRecord(), FakeGrid(NODES))}
    seen = []

    def arriving():
        for i, (n, d) in enumerate(zip(NODES, deltas)):
            if seen:  # the previous reply was folded in and its arrays dropped before this one arrives
                assert seen[-1].content.array_records == {}
            seen.append(Message(RecordDict({"arrays": state_to_record(d), "metrics": _metrics(3 + i, i)}),
                                reply_to=msgs[n]))
            yield seen[-1]

    streamed = record_to_state(guard.aggregate_train(1, arriving())[0])
    assert len(seen) == len(NODES) and all(r["accepted"] for r in guard.train_records)
    for k in SHAPES:
        torch.testing.assert_close(streamed[k], from_list[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_record_into_decodes_the_canonical_layout_like_record_to_state(dtype):
    state = _state(torch.Generator().manual_seed(2), 1.0)
    record = state_to_record(state, dtype)
    layout = FlatLayout(SHAPES)
    out = torch.full((layout.numel,), float("nan"))
    assert record_into(record, layout, out)
    assert torch.equal(out, layout.flatten(record_to_state(record)))
    for k, v in layout.unflatten(out).items():
        assert v.shape == SHAPES[k]


def _fortran(array):
    buffer = io.BytesIO()
    np.save(buffer, np.asfortranarray(array))
    return Array(dtype=str(array.dtype), shape=tuple(array.shape), stype="numpy.ndarray", data=buffer.getvalue())


def test_record_into_declines_anything_else():
    state = _state(torch.Generator().manual_seed(3), 1.0)
    layout = FlatLayout(SHAPES)
    out = torch.empty(layout.numel)
    reordered = ArrayRecord({k: state_to_record(state)[k] for k in ["b", "a", "c", "d"]})
    mixed = state_to_record(state)
    mixed["b"] = state_to_record(state, "float16")["b"]
    fortran = state_to_record(state)
    fortran["a"] = _fortran(state["a"].numpy())
    truncated = state_to_record(state)
    truncated["c"] = Array(dtype="float32", shape=(2, 3, 2), stype="numpy.ndarray", data=truncated["c"].data[:-4])
    for record in (reordered, mixed, fortran, truncated):
        assert not record_into(record, layout, out)


def test_a_valid_non_canonical_reply_is_accepted_through_the_per_tensor_path():
    gen = torch.Generator().manual_seed(4)
    global_state, delta = _state(gen, 0.02), _state(gen, 1e-3)
    guard = GuardedStrategy(build_inner_strategy(FederationConfig(min_nodes=1)), SHAPES)
    (msg,) = guard.configure_train(1, state_to_record(global_state), ConfigRecord(), FakeGrid((5,)))
    record = state_to_record(delta)
    record["a"] = _fortran(delta["a"].numpy())  # another valid .npy encoding of the same values
    new = record_to_state(guard.aggregate_train(1, [Message(RecordDict({"arrays": record, "metrics": _metrics(2, 0)}),
                                                                     reply_to=msg)])[0])
    assert guard.train_records[0]["accepted"]
    for k in SHAPES:
        torch.testing.assert_close(new[k], global_state[k] + delta[k], rtol=0, atol=1e-7)


def test_check_flat_matches_check_state_decisions_and_messages():
    layout = FlatLayout(OrderedDict([("w", (2,)), ("b", (1,))]))
    assert check_flat(torch.tensor([3.0, 4.0, 0.0]), layout, 5.0) == 5.0  # on the bound: accepted
    with pytest.raises(ExchangeError, match="update norm 5 exceeds the bound 4.999"):
        check_flat(torch.tensor([3.0, 4.0, 0.0]), layout, 4.999)
    with pytest.raises(ExchangeError, match=r"non-finite values \(NaN/Inf\) in \['b'\]"):
        check_flat(torch.tensor([3.0, 4.0, float("nan")]), layout)
    with pytest.raises(ExchangeError, match=r"in \['w', 'b'\]"):
        check_flat(torch.tensor([float("-inf"), 0.0, float("inf")]), layout)
    # Finite values whose float32 squares overflow: a norm, not "non-finite".
    assert check_flat(torch.tensor([3e30, 4e30, 0.0]), layout) == pytest.approx(5e30)
