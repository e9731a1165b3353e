"""Flower ServerApp: parse the run config, then hand over to :class:`server.loop.FederatedServer`."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.loop import FederatedServer
from shared_model.config import from_run_config

app = ServerApp()
log = logging.getLogger("flwr.promptsam." + __name__)  # shown by Flower's console handler


def default_run_dir(run_id: int) -> Path:
    """The run folder of a run whose config leaves ``run-dir`` empty: ``runs/flwr-<run id>``
    under the working directory (a plain ``flwr run .``: the folder the local SuperLink started in)."""
    return Path.cwd() / "runs" / f"flwr-{run_id}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federated training configured in ``context.run_config``."""
    run_config = dict(context.run_config)
    if not run_config.get("run-dir"):
        run_config["run-dir"] = str(default_run_dir(context.run_id))
        log.info("run-dir not set: writing to %s", run_config["run-dir"])
    server = FederatedServer(from_run_config(run_config), run_config)
    server.run(grid)
