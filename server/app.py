"""Flower ServerApp: parse the run config, then hand over to :class:`server.loop.FederatedServer`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.loop import FederatedServer
from shared_model.config import from_run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federated training configured in ``context.run_config``."""
    run_config = dict(context.run_config)
    server = FederatedServer(from_run_config(run_config), run_config)
    server.run(grid)
