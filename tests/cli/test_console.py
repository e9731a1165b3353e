"""The console of an in-process command (`promptsam experiment` runs Flower in this process): each
Flower log record reaches one console handler, not Flower's and the root logger's both."""

import logging

from cli.main import main


def _handlers_reached(name: str) -> list[logging.Handler]:
    """The handlers a record of logger ``name`` is emitted to (logging's own propagation rule)."""
    reached, logger = [], logging.getLogger(name)
    while logger is not None:
        reached += logger.handlers
        logger = logger.parent if logger.propagate else None
    return reached


def test_flower_records_reach_one_console_handler():
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        for handler in saved:  # as in a fresh process, where basicConfig installs the root's handler
            root.removeHandler(handler)
        assert main(["inspect", "--preset", "tiny"]) == 0
        assert root.handlers, "the CLI configures the root logger"
        streams = [h for h in _handlers_reached("flwr")  # pytest's own capture handlers aside
                   if isinstance(h, logging.StreamHandler) and not type(h).__module__.startswith("_pytest")]
        assert len(streams) == 1, streams
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)
        logging.getLogger("flwr").propagate = True
