"""The Opacus names this project uses, imported without the root log handler Opacus installs.

``opacus.utils.module_utils`` calls ``logging.basicConfig`` when it is imported (and any Opacus
import imports it); see :mod:`shared_model.logging_guard`. Import Opacus names from here.
"""

from __future__ import annotations

from shared_model.logging_guard import no_new_root_handlers

with no_new_root_handlers():
    from opacus.accountants import IAccountant, create_accountant
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

__all__ = ["DPOptimizer", "IAccountant", "UniformWithReplacementSampler", "create_accountant",
           "get_noise_multiplier"]
