"""Keep third-party code from giving the root logger a handler.

Opacus calls ``logging.basicConfig`` when imported, and open_clip logs through the module-level
``logging.info`` & co., which call ``logging.basicConfig`` when the root logger has no handler.
Either leaves a stderr handler on the root logger, after which every record of a logger that
propagates, Flower's included, is printed a second time in another format.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def no_new_root_handlers() -> Iterator[None]:
    """Remove, on leaving the block, the root-logger handlers that were added inside it."""
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
