"""Client plain functions: node config parsing, seeds, optimizer state packing."""

import pytest
import torch

from client.task import client_seed, pack_optimizer_state, parse_node_config, unpack_optimizer_state
from shared_model.config import ConfigError


def test_node_config_deployment_and_simulation():
    node = parse_node_config({"data-path": "/data/a", "val-fraction": 0.2, "split-seed": 3})
    assert node.data_path == "/data/a" and node.val_fraction == 0.2 and node.split_seed == 3
    assert node.partition_id == -1
    sim = parse_node_config({"partition-id": 2, "num-partitions": 3})
    assert (sim.partition_id, sim.num_partitions, sim.data_path) == (2, 3, None)
    assert parse_node_config({"val-fraction": 1}).val_fraction == 1.0


def test_node_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key.*data-pth"):
        parse_node_config({"data-pth": "/x"})
    with pytest.raises(ConfigError, match="partition-id: expected int, got str"):
        parse_node_config({"partition-id": "1"})
    with pytest.raises(ConfigError, match="data-path: expected str"):
        parse_node_config({"data-path": 3})


def test_client_seed_is_deterministic_and_distinct():
    assert client_seed(0, 1, 2) == client_seed(0, 1, 2)
    seeds = {client_seed(s, r, p) for s in (0, 1) for r in (1, 2, 3) for p in (-1, 0, 1, 2)}
    assert len(seeds) == 24
    assert all(0 <= s < 2**31 for s in seeds)


def test_optimizer_state_roundtrip():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    back = unpack_optimizer_state(pack_optimizer_state(opt.state_dict()))
    torch.testing.assert_close(back["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
