"""The server's aggregation arithmetic on flat deltas (one float32 vector of D values per reply).

:class:`server.strategy.GuardedStrategy` validates each reply into one flat vector and folds it
into an aggregator as it goes; the reply's arrays are then dropped:

* :class:`WeightedMean` (FedAvg, FedProx, and FedAdam's averaged delta): a running weighted sum,
  so memory stays at one accumulator whatever the number of replies;
* :class:`SortedStack` (FedMedian, FedTrimmedAvg): an order statistic needs every reply, so it
  keeps one copy per reply (N x D float32 in all) and sorts them column block by column block
  (NumPy's vectorised sort over D_block x N), never holding a second N x D copy.

The results equal those of Flower's ``aggregate_arrayrecords``, ``np.median`` and ``trim_mean``
applied to the full states ``global + delta`` up to float32 rounding (tested to 1e-6);
:func:`adam_step` is Flower's ``FedAdam`` server step with its moments kept in the strategy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.serverapp.strategy import FedAdam

from shared_model.exchange import FlatLayout

BLOCK = 8192  # columns (parameters) sorted at a time: D_block x N float32 stays in cache


class WeightedMean:
    """Running ``sum_i w_i delta_i / sum_i w_i``.

    Args:
        numel: D, the values per delta.
    """

    def __init__(self, numel: int) -> None:
        self.total = torch.zeros(numel, dtype=torch.float32)
        self.weight = 0.0

    def add(self, flat: torch.Tensor, weight: float) -> None:
        """Fold in one delta (D); ``flat`` may be reused by the caller afterwards."""
        self.total.add_(flat, alpha=weight)
        self.weight += weight

    def result(self) -> torch.Tensor:
        """The weighted mean (D float32)."""
        return self.total / self.weight


class SortedStack:
    """Coordinate-wise median or trimmed mean (Flower's ``FedMedian`` / ``FedTrimmedAvg``).

    Args:
        beta: Fraction cut from each tail (``int(beta * N)`` values per side, as Flower's
            ``trim_mean``); ``None`` for the median (mean of the two middle values for even N, as
            ``np.median``).
    """

    def __init__(self, beta: float | None = None) -> None:
        self.beta = beta
        self.rows: list[np.ndarray] = []

    def add(self, flat: torch.Tensor, weight: float) -> None:
        """Keep a copy of one delta (D); the weight is not used by order statistics."""
        self.rows.append(flat.numpy().copy())

    def result(self) -> torch.Tensor:
        """The coordinate-wise statistic (D float32)."""
        n, numel = len(self.rows), self.rows[0].size
        out = np.empty(numel, dtype=np.float32)
        if self.beta is None:
            lo, hi = (n - 1) // 2, n // 2 + 1
        else:
            lo = int(self.beta * n)
            hi = n - lo
        for start in range(0, numel, BLOCK):
            block = np.stack([row[start:start + BLOCK] for row in self.rows], axis=1)  # D_block x N
            block.sort(axis=1)
            out[start:start + BLOCK] = block[:, lo:hi].mean(axis=1)
        return torch.from_numpy(out)


def adam_step(strategy: FedAdam, layout: FlatLayout, server_round: int, current: torch.Tensor,
              delta: torch.Tensor) -> torch.Tensor:
    """Flower's FedAdam update of ``current`` (D) by the averaged delta (D), on flat vectors.

    The moments live in ``strategy.m_t`` / ``strategy.v_t`` (name -> array, as Flower keeps them),
    so checkpoints and Flower's own ``aggregate_train`` see the same state.

    Returns:
        ``current + eta_t * m_t / (sqrt(v_t) + tau)`` with Flower's bias-corrected ``eta_t``.
    """
    def moment(name: str) -> torch.Tensor:
        value = getattr(strategy, name)
        if not value:
            return torch.zeros(layout.numel, dtype=torch.float32)
        return layout.flatten({k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in value.items()})

    m_t = moment("m_t").mul_(strategy.beta_1).add_(delta, alpha=1 - strategy.beta_1)
    v_t = moment("v_t").mul_(strategy.beta_2).addcmul_(delta, delta, value=1 - strategy.beta_2)
    eta = strategy.eta * math.sqrt(1 - strategy.beta_2 ** (server_round + 1.0)) / (
        1 - strategy.beta_1 ** (server_round + 1.0))
    strategy.m_t = {k: v.numpy() for k, v in layout.unflatten(m_t).items()}
    strategy.v_t = {k: v.numpy() for k, v in layout.unflatten(v_t).items()}
    return current + eta * m_t / (v_t.sqrt() + strategy.tau)
