"""The privacy errors, apart from the accounting so that catching them imports no Opacus.

A ClientApp catches :class:`PrivacyBudgetExceeded` in every round; importing it from
:mod:`shared_model.training.accounting` would load Opacus (about 2.4 s of a fresh process's
start-up here) in rounds without local DP, which never need it.
"""

from __future__ import annotations


class PrivacyError(ValueError):
    """The model, data or accountant state cannot be used for DP training (the message says why)."""


class PrivacyBudgetExceeded(PrivacyError):
    """Training would push the hospital's cumulative epsilon past its budget."""
