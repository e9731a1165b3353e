"""Helpers for the deployment tests: a throwaway minimal Flower app (Message API)."""

from __future__ import annotations

import textwrap
from pathlib import Path

MINI_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "miniapp"
version = "1.0.0"
dependencies = ["flwr==1.42.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "promptsamtest"

[tool.flwr.app.components]
serverapp = "miniapp.server:app"
clientapp = "miniapp.client:app"

[tool.flwr.app.config]
num-server-rounds = 2
min-nodes = 2
"""

# Each client adds its node's ``delta`` to every value and reports ``n`` examples, so FedAvg's
# result after R rounds is R * sum(n_i * delta_i) / sum(n_i): checkable by hand.
MINI_CLIENT = """\
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    delta = float(context.node_config["delta"])
    n = int(context.node_config["n"])
    content = RecordDict({"arrays": ArrayRecord([a + delta for a in arrays]),
                          "metrics": MetricRecord({"num-examples": n})})
    return Message(content=content, reply_to=msg)
"""

MINI_SERVER = """\
import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    k = int(context.run_config["min-nodes"])
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=k, min_available_nodes=k)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(3)]), num_rounds=rounds)
    print("FINAL", [round(float(v), 6) for v in result.arrays.to_numpy_ndarrays()[0]], flush=True)
"""


def write_miniapp(folder: Path) -> Path:
    """A two-file Flower app (Message API) in ``folder``; returns the app folder."""
    pkg = folder / "miniapp"
    pkg.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(MINI_PYPROJECT)
    (pkg / "__init__.py").write_text("")
    (pkg / "client.py").write_text(textwrap.dedent(MINI_CLIENT))
    (pkg / "server.py").write_text(textwrap.dedent(MINI_SERVER))
    return folder
