"""Audit of what leaves a hospital: every reply of a simulated run, as serialised on the wire.

A train reply must hold exactly the exchanged tensors (every trainable parameter, no frozen one)
in the wire dtype with their exact byte sizes, plus the metric contract; an evaluate reply only
metrics. Nothing else may travel: the serialised message is the payload plus a small framing
overhead, and no training-image name or path, no frozen parameter name appears in its bytes.
"""

from __future__ import annotations

import math

import pytest
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from client.app import app as client_app
from client.task import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS, LOCAL_DP_METRIC_KEYS
from server.loop import FederatedServer
from shared_model.config import from_run_config
from shared_model.data.folder import list_samples
from shared_model.modeling.prompt_sam import build_model
from simulation.experiment import prepare_run
from simulation.experiment import PROJECT_ROOT
from simulation.inprocess import InProcessGrid

DEMO = PROJECT_ROOT / "simulation" / "configs" / "demo.yaml"
NPY_HEADER = 128  # numpy's .npy header of one float array (Flower's Array serialisation)
BYTES = {"float32": 4, "bfloat16": 2}



@pytest.mark.parametrize("variant", ["plain", "local-dp"])
def test_replies_hold_only_the_exchanged_tensors_and_metrics(tmp_path, one_thread, variant):
    wire = "float32" if variant == "plain" else "bfloat16"
    overrides = {
        "federation.num_server_rounds": 1,
        "federation.local_steps": 1,
        "federation.wire_dtype": wire,
        "federation.global_eval": "none",
        "train.batch_size": 2,
        "synthetic.per_centre": 8,
        "synthetic.image_size": 64,
        "model.loss": {"nce": 0.0},
    }
    if variant == "local-dp":
        overrides["privacy"] = {"local_dp": True, "delta": 1e-3}
    exp, run_dir = prepare_run(DEMO, overrides, tmp_path)
    run_config = exp.run_config()
    sent: list[bytes] = []  # snapshots: the server later reuses reply objects for its aggregation
    grid = InProcessGrid(client_app, run_config, 3,
                         reply_hook=lambda r: sent.append(message_to_proto(r).SerializeToString()) or r)
    settings = from_run_config(run_config)
    FederatedServer(settings, run_config).run(grid)

    model = build_model(settings.model)
    exchanged = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    samples, _ = list_samples(exp.data.root)
    secrets = [s.stem for s in samples] + [str(s.image_path) for s in samples] + [str(s.mask_path) for s in samples]
    secrets += [exp.data.root, "images/", "masks/", ".png"]
    train_keys = set(TRAIN_METRIC_KEYS) | (set(LOCAL_DP_METRIC_KEYS) if variant == "local-dp" else set())

    kinds = {"train": 0, "evaluate": 0}
    for wire_bytes in sent:
        reply = message_from_proto(ProtoMessage.FromString(wire_bytes))
        assert not reply.has_error(), reply.error.reason
        content = reply.content
        assert not content.config_records
        (metrics,) = content.metric_records.values()
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
        if content.array_records:
            kinds["train"] += 1
            (arrays,) = content.array_records.values()
            assert set(metrics.keys()) == train_keys
            # Statistics of the private data (and a timing side channel) stay home under local DP.
            withheld = [k for k in ("train-loss", "val-dice", "train-seconds") if math.isnan(metrics[k])]
            assert withheld == ([] if variant == "plain" else ["train-loss", "val-dice", "train-seconds"])
            assert set(arrays.keys()) == set(exchanged)  # no frozen weight, no image, no mask
            payload = 0
            for name, array in arrays.items():
                assert tuple(array.shape) == exchanged[name] and array.dtype == wire
                exact = math.prod(exchanged[name]) * BYTES[wire]
                assert exact <= len(array.data) <= exact + NPY_HEADER  # the tensor and nothing more
                payload += len(array.data)
            # Framing: per array its key and ~44 bytes (dtype, shape, stype, protobuf tags), then
            # metric names and message metadata; no room for a hidden 64 x 64 mask (4 KB).
            overhead = len(wire_bytes) - payload
            assert 0 < overhead <= sum(len(n) + 48 for n in arrays.keys()) + 1024 + 32 * len(train_keys)
        else:
            kinds["evaluate"] += 1
            assert set(metrics.keys()) == set(EVAL_METRIC_KEYS)
            assert len(wire_bytes) < 1024
        for secret in secrets + frozen:
            assert secret.encode() not in wire_bytes, f"{secret!r} leaves the hospital"
    assert kinds == {"train": 3, "evaluate": 3}
