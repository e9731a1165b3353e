"""Replies as the server reads them: error reasons in one line, records by kind, the metric contract."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from server.replies import (ReplyError, ReplyParts, describe_message, error_summary, single_metrics,
                            weighted_metrics)

RAY = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
       "(pid=1, ip=192.0.2.2)\n  File \"client_app.py\", line 161, in __call__\n    return self._reg\n"
       "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: "
       "injected fault in round 2: the ClientApp raised'>")


def test_the_ray_traceback_becomes_the_raised_message():
    assert error_summary(RAY) == "injected fault in round 2: the ClientApp raised"


def test_one_line_reasons_are_kept_and_long_ones_cut():
    assert error_summary("InjectedFault: boom") == "InjectedFault: boom"
    assert error_summary("") == ""
    long = error_summary("x" * 1000, limit=50)
    assert len(long) == 50 and long.endswith("...")


def _reply(metrics: dict, arrays: bool = True) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "config": ConfigRecord({"note": "x"})})
    if arrays:
        content["arrays"] = ArrayRecord({"w": Array(np.ones((2, 3), dtype=np.float32))})
    meta = Metadata(run_id=1, message_id="", src_node_id=7, dst_node_id=0, reply_to_message_id="m", group_id="1",
                    created_at=0.0, ttl=60.0, message_type="train")
    return Message(content=content, metadata=meta)


def test_reply_parts_split_the_records_by_kind_once():
    parts = ReplyParts.of(_reply({"num-examples": 3}))
    assert list(parts.arrays) == ["arrays"] and list(parts.metrics) == ["metrics"]
    assert list(parts.configs) == ["config"]
    assert describe_message(_reply({"num-examples": 3}), parts) == describe_message(_reply({"num-examples": 3}))
    assert describe_message(_reply({"num-examples": 3}))["array-records"] == {"arrays": {"w": ["float32", [2, 3]]}}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_metrics_equal_flowers_aggregate_metricrecords(seed):
    rng = np.random.default_rng(seed)
    replies = [_reply({"num-examples": int(rng.integers(1, 50)), "loss": float(rng.normal()),
                       "dice": float(rng.uniform()), "partition-id": i}, arrays=False) for i in range(7)]
    ours = weighted_metrics([next(iter(m.content.metric_records.values())) for m in replies], "num-examples")
    flowers = aggregate_metricrecords([m.content for m in replies], "num-examples")
    assert dict(ours) == dict(flowers)  # same floats, not only close
    assert "num-examples" not in ours


def test_single_metrics_names_what_breaks_the_contract():
    parts = ReplyParts.of(_reply({"num-examples": 0, "loss": 1.0}))
    with pytest.raises(ReplyError, match="metric keys"):
        single_metrics(parts.metrics, ("num-examples",))
    with pytest.raises(ReplyError, match="num-examples must be a positive"):
        single_metrics(parts.metrics, ("num-examples", "loss"))
    with pytest.raises(ReplyError, match="expected one MetricRecord"):
        single_metrics({}, ("num-examples",))
