"""The Opacus names this project uses, imported without the root log handler Opacus installs.

``opacus.utils.module_utils`` calls ``logging.basicConfig`` when it is imported (and any Opacus
import imports it). That gives the root logger a stderr handler, so every record of a logger that
propagates, Flower's included, is printed a second time with a timestamp. This module imports
Opacus and removes the handlers that the import added; import Opacus names from here.
"""

from __future__ import annotations

import logging

_root = logging.getLogger()
_handlers_before = list(_root.handlers)

from opacus.accountants import IAccountant, create_accountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: E402

for _handler in [h for h in _root.handlers if h not in _handlers_before]:
    _root.removeHandler(_handler)

__all__ = ["DPOptimizer", "IAccountant", "UniformWithReplacementSampler", "create_accountant",
           "get_noise_multiplier"]
