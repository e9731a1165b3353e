"""GuardedStrategy: validation of replies, aggregation of deltas, server lr, FedAdam state."""

import logging
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from client.task import TRAIN_METRIC_KEYS
from client.wire import record_to_state, state_to_record
from server.strategy import GuardedStrategy, build_inner_strategy
from shared_model.config import FederationConfig
from server_helpers import FakeGrid

SHAPES = OrderedDict([("w", (2,)), ("b", (1,))])
GLOBAL = OrderedDict([("w", torch.tensor([1.0, 1.0])), ("b", torch.tensor([0.0]))])


pytestmark = pytest.mark.usefixtures("fixed_task_identity")


@pytest.fixture
def records(caplog):
    logger = logging.getLogger("flwr.promptsam.server.strategy")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


def _metrics(n: float, pid: int, **extra) -> MetricRecord:
    values = {"num-examples": n, "partition-id": pid, "train-loss": 0.5, "train-steps": 2,
              "train-seconds": 0.1, "val-dice": 0.3}
    values.update(extra)
    return MetricRecord(values)


def _strategy(strategy="fedavg", nodes=(11, 12), **kw):
    fed = FederationConfig(strategy=strategy, min_nodes=1, **{k: v for k, v in kw.items() if k != "wire"})
    guard = GuardedStrategy(build_inner_strategy(fed), SHAPES, kw.get("wire", "float32"),
                            fed.max_update_norm, fed.server_lr)
    messages = list(guard.configure_train(1, state_to_record(GLOBAL), ConfigRecord(), FakeGrid(nodes)))
    return guard, {m.metadata.dst_node_id: m for m in messages}


def _reply(msg, delta, metrics, dtype="float32"):
    return Message(RecordDict({"arrays": state_to_record(delta, dtype), "metrics": metrics}), reply_to=msg)


def _delta(w, b):
    return OrderedDict([("w", torch.tensor(w, dtype=torch.float32)), ("b", torch.tensor(b, dtype=torch.float32))])


def test_configure_train_sends_global_in_wire_dtype_to_every_node():
    guard, msgs = _strategy(nodes=(11, 12, 13), wire="float16")
    assert sorted(msgs) == [11, 12, 13]
    for m in msgs.values():
        arrays = m.content["arrays"]
        assert {a.dtype for a in arrays.values()} == {"float16"}
        assert m.content["config"]["server-round"] == 1
    assert guard.bytes_down == sum(len(a.data) for a in msgs[11].content["arrays"].values())


def test_fedavg_weights_deltas_by_examples():
    guard, msgs = _strategy()
    replies = [_reply(msgs[11], _delta([1, 0], [2]), _metrics(1, 0)),
               _reply(msgs[12], _delta([0, 2], [-1]), _metrics(3, 1))]
    arrays, metrics = guard.aggregate_train(1, replies)
    new = record_to_state(arrays)
    torch.testing.assert_close(new["w"], torch.tensor([1.25, 2.5]))
    torch.testing.assert_close(new["b"], torch.tensor([-0.25]))
    assert metrics["val-dice"] == pytest.approx(0.3)
    assert [r["accepted"] for r in guard.train_records] == [True, True]
    assert guard.train_records[0]["bytes-up"] > 0


def test_server_lr_scales_the_aggregated_delta():
    guard, msgs = _strategy(server_lr=0.5)
    replies = [_reply(msgs[11], _delta([1, 0], [2]), _metrics(1, 0)),
               _reply(msgs[12], _delta([0, 2], [-1]), _metrics(3, 1))]
    new = record_to_state(guard.aggregate_train(1, replies)[0])
    torch.testing.assert_close(new["w"], torch.tensor([1.125, 1.75]))
    torch.testing.assert_close(new["b"], torch.tensor([-0.125]))


def test_aggregate_does_not_depend_on_reply_order():
    guard, msgs = _strategy(nodes=(11, 12, 13))
    deltas = {11: _delta([0.1, 0.7], [0.3]), 12: _delta([0.2, -0.3], [0.11]), 13: _delta([1e-3, 5], [7])}
    out = []
    for order in ([11, 12, 13], [13, 11, 12]):
        guard, msgs = _strategy(nodes=(11, 12, 13))
        replies = [_reply(msgs[n], deltas[n], _metrics(3 + n, n - 11)) for n in order]
        out.append(record_to_state(guard.aggregate_train(1, replies)[0]))
    for k in SHAPES:
        assert torch.equal(out[0][k], out[1][k])


def test_fedmedian_and_trimmed_mean_on_deltas():
    nodes = (11, 12, 13, 14, 15)
    ws = {11: [1, 0], 12: [0, 2], 13: [3, 3], 14: [100, -100], 15: [2, 1]}
    guard, msgs = _strategy("fedmedian", nodes=nodes)
    replies = [_reply(msgs[n], _delta(ws[n], [0]), _metrics(1, n)) for n in nodes]
    torch.testing.assert_close(record_to_state(guard.aggregate_train(1, replies)[0])["w"], torch.tensor([3.0, 2.0]))
    guard, msgs = _strategy("fedtrimmedavg", nodes=nodes, trimmed_beta=0.2)
    replies = [_reply(msgs[n], _delta(ws[n], [0]), _metrics(1, n)) for n in nodes]
    # Per coordinate, drop the smallest and largest of 5 and average the middle 3: w0 (1+2+3)/3, w1 (0+1+2)/3.
    torch.testing.assert_close(record_to_state(guard.aggregate_train(1, replies)[0])["w"],
                               torch.tensor([1 + 2.0, 1 + 1.0]))


def test_fedadam_step_and_state_roundtrip():
    guard, msgs = _strategy("fedadam", adam_eta=0.1, adam_beta_1=0.9, adam_beta_2=0.99, adam_tau=1e-3)
    replies = [_reply(msgs[11], _delta([1, 0], [2]), _metrics(1, 0)),
               _reply(msgs[12], _delta([0, 2], [-1]), _metrics(3, 1))]
    new = record_to_state(guard.aggregate_train(1, replies)[0])
    d = np.array([0.25, 1.5])
    m, v = 0.1 * d, 0.01 * d**2
    eta = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    np.testing.assert_allclose(new["w"].numpy(), 1 + eta * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    state = guard.state_dict()
    assert set(state) == {"m_t", "v_t"}
    np.testing.assert_allclose(state["m_t"]["w"].numpy(), m, rtol=1e-5)
    other, _ = _strategy("fedadam")
    other.load_state_dict(state)
    np.testing.assert_allclose(other.inner.v_t["w"], v, rtol=1e-5)
    with pytest.raises(ValueError, match="lacks the FedAdam state 'v_t'"):
        other.load_state_dict({"m_t": None})
    with pytest.raises(ValueError, match="FedAvg has none"):
        _strategy()[0].load_state_dict(state)


BAD = {
    "unexpected key": (lambda: OrderedDict([*_delta([0, 0], [0]).items(), ("evil", torch.zeros(1))]),
                       "unexpected \\['evil'\\]"),
    "missing key": (lambda: OrderedDict([("w", torch.zeros(2))]), "missing \\['b'\\]"),
    "wrong shape": (lambda: OrderedDict([("w", torch.zeros(3)), ("b", torch.zeros(1))]), "w: got \\(3,\\)"),
    "nan": (lambda: _delta([float("nan"), 0], [0]), "non-finite"),
    "inf": (lambda: _delta([0, 0], [float("inf")]), "non-finite"),
    "norm": (lambda: _delta([3, 4], [0]), "norm 5 exceeds the bound 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_reply_is_dropped_and_logged_with_node_id(case, records):
    make, reason = BAD[case]
    guard, msgs = _strategy(nodes=(11, 12, 13), max_update_norm=1.0)
    replies = [_reply(msgs[11], _delta([0.5, 0], [0]), _metrics(1, 0)),
               _reply(msgs[12], make(), _metrics(1, 1)),
               _reply(msgs[13], _delta([0, 0.5], [0]), _metrics(1, 2))]
    new = record_to_state(guard.aggregate_train(1, replies)[0])
    torch.testing.assert_close(new["w"], torch.tensor([1.25, 1.25]))  # mean of the two good deltas
    dropped = [r for r in guard.train_records if not r["accepted"]]
    assert [r["node-id"] for r in dropped] == [12]
    assert any("dropped reply from node 12" in m for m in records.messages)
    import re

    assert re.search(reason, dropped[0]["reason"]), dropped[0]["reason"]


def test_contract_violations_and_client_errors_are_dropped(records):
    guard, msgs = _strategy(nodes=(11, 12, 13, 14, 15))
    good = _delta([0.5, 0], [0])
    replies = [
        _reply(msgs[11], good, _metrics(2, 0)),
        _reply(msgs[12], good, _metrics(1, 1, secret=1.0)),
        _reply(msgs[13], good, _metrics(0, 2)),
        Message(Error(code=1, reason="out of memory"), reply_to=msgs[14]),
        Message(RecordDict({"a": state_to_record(good), "b": state_to_record(good), "metrics": _metrics(1, 4)}),
                reply_to=msgs[15]),
    ]
    new = record_to_state(guard.aggregate_train(1, replies)[0])
    torch.testing.assert_close(new["w"], torch.tensor([1.5, 1.0]))
    reasons = {r["node-id"]: r["reason"] for r in guard.train_records if not r["accepted"]}
    assert "secret" in reasons[12] and "num-examples" in reasons[13]
    assert "out of memory" in reasons[14] and "one ArrayRecord" in reasons[15]
    assert sorted(TRAIN_METRIC_KEYS) == sorted(_metrics(1, 0).keys())
    assert {a["node-id"] for a in guard.audit} == {11, 12, 13, 14, 15}


def test_no_valid_reply_keeps_the_global_state(records):
    guard, msgs = _strategy()
    replies = [_reply(msgs[11], _delta([float("nan"), 0], [0]), _metrics(1, 0))]
    assert guard.aggregate_train(1, replies) == (None, None)
    assert "no valid reply" in records.text


def test_fewer_valid_replies_than_min_nodes_fail_the_round(records):
    fed = FederationConfig(strategy="fedavg", min_nodes=2)
    guard = GuardedStrategy(build_inner_strategy(fed), SHAPES)
    msgs = {m.metadata.dst_node_id: m
            for m in guard.configure_train(1, state_to_record(GLOBAL), ConfigRecord(), FakeGrid((11, 12)))}
    # Node 12 died mid-round: the SuperLink answers for it with an error reply.
    replies = [_reply(msgs[11], _delta([1, 0], [2]), _metrics(1, 0)),
               Message(Error(code=3, reason="Node Unavailable"), reply_to=msgs[12])]
    assert guard.aggregate_train(1, replies) == (None, None)
    assert "round 1 failed: 1 valid train reply, fewer than min-nodes=2" in records.text
    assert [r["accepted"] for r in guard.train_records] == [True, False]
    assert "Node Unavailable" in guard.train_records[1]["reason"]
    # With both replies valid the same round aggregates.
    guard.configure_train(1, state_to_record(GLOBAL), ConfigRecord(), FakeGrid((11, 12)))
    replies = [_reply(msgs[11], _delta([1, 0], [2]), _metrics(1, 0)),
               _reply(msgs[12], _delta([1, 0], [2]), _metrics(1, 1))]
    torch.testing.assert_close(record_to_state(guard.aggregate_train(1, replies)[0])["w"], torch.tensor([2.0, 1.0]))
