"""Cumulative privacy accounting of local DP-SGD, as plain data (no Flower, no model imports).

An Opacus RDP (or PRV) accountant's history is a list of ``(noise_multiplier, sample_rate,
steps)`` entries; it is kept between rounds as plain lists (:func:`accountant_to_state`), so a
Flower client can store it in ``context.state``, and rebuilt with :func:`accountant_from_state`.
Epsilon of a history, of a history plus planned steps, and the noise multiplier that spends a
budget exactly over a number of steps are computed with Opacus (results cached: its RDP
conversion at fractional orders takes about 0.3 s).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator, Mapping

from shared_model.config import PrivacyConfig
from shared_model.training.errors import PrivacyBudgetExceeded, PrivacyError  # noqa: F401 - re-exported
from shared_model.training.opacus_compat import IAccountant, create_accountant, get_noise_multiplier

AccountantState = dict[str, Any]
STATE_KEYS = ("mechanism", "noise_multiplier", "sample_rate", "steps")


@contextmanager
def _quiet_orders() -> Iterator[None]:
    """Silence Opacus' "optimal order is the smallest/largest alpha" warning: the bound stays valid
    (only looser), and the noise search visits such extreme noise levels on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        yield


def new_accountant_state(mechanism: str = "rdp") -> AccountantState:
    """An empty history: ``{"mechanism": m, "noise_multiplier": [], "sample_rate": [], "steps": []}``."""
    return {"mechanism": mechanism, "noise_multiplier": [], "sample_rate": [], "steps": []}


def accountant_from_state(state: Mapping[str, Any] | None, mechanism: str = "rdp") -> IAccountant:
    """Rebuild an Opacus accountant from plain data (None = a fresh ``mechanism`` accountant).

    Raises:
        PrivacyError: Missing keys, lists of different lengths, invalid entries, or a mechanism
            different from ``mechanism`` (the key is named).
    """
    if state is None:
        return create_accountant(mechanism)
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise PrivacyError(f"accountant state: missing key(s) {missing}; expected {list(STATE_KEYS)}")
    if state["mechanism"] != mechanism:
        raise PrivacyError(
            f"accountant state: mechanism {state['mechanism']!r} differs from the configured {mechanism!r}"
        )
    sigmas, rates, steps = (list(state[k]) for k in STATE_KEYS[1:])
    if not len(sigmas) == len(rates) == len(steps):
        raise PrivacyError("accountant state: noise_multiplier, sample_rate and steps differ in length")
    for i, (s, q, n) in enumerate(zip(sigmas, rates, steps)):
        if not (float(s) >= 0 and 0 < float(q) <= 1 and int(n) >= 1 and int(n) == n):
            raise PrivacyError(f"accountant state: invalid entry {i}: noise {s}, rate {q}, steps {n}")
    accountant = create_accountant(mechanism)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in zip(sigmas, rates, steps)]
    return accountant


def accountant_to_state(accountant: IAccountant) -> AccountantState:
    """Opacus accountant -> plain lists (JSON / Flower ConfigRecord friendly)."""
    return {
        "mechanism": accountant.mechanism(),
        "noise_multiplier": [float(s) for s, _, _ in accountant.history],
        "sample_rate": [float(q) for _, q, _ in accountant.history],
        "steps": [int(n) for _, _, n in accountant.history],
    }


def extend_history(
    state: Mapping[str, Any] | None, noise_multiplier: float, sample_rate: float, steps: int, mechanism: str = "rdp"
) -> AccountantState:
    """A new history with ``steps`` more releases at (``noise_multiplier``, ``sample_rate``), merged
    into the last entry when it has the same pair, as Opacus' accountant does."""
    state = new_accountant_state(mechanism) if state is None else state
    out = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in state.items()}
    if steps <= 0:
        return out
    if out["noise_multiplier"] and (float(out["noise_multiplier"][-1]), float(out["sample_rate"][-1])) == (
            float(noise_multiplier), float(sample_rate)):
        out["steps"][-1] += int(steps)
    else:
        out["noise_multiplier"].append(float(noise_multiplier))
        out["sample_rate"].append(float(sample_rate))
        out["steps"].append(int(steps))
    return out


def spent_epsilon(state: Mapping[str, Any] | None, delta: float, mechanism: str = "rdp") -> float:
    """Cumulative epsilon at ``delta`` of a history (0 when empty)."""
    accountant = accountant_from_state(state, mechanism)
    return _epsilon(mechanism, tuple(accountant.history), float(delta))


@lru_cache(maxsize=512)
def _epsilon(mechanism: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Cached: Opacus' RDP conversion at fractional orders takes about 0.3 s per history."""
    if not history:
        return 0.0
    accountant = create_accountant(mechanism)
    accountant.history = list(history)
    with _quiet_orders():
        return float(accountant.get_epsilon(delta=delta))


def epsilon_after(
    state: Mapping[str, Any] | None,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    mechanism: str = "rdp",
) -> float:
    """Cumulative epsilon if ``steps`` more DP-SGD steps with (``noise_multiplier``, ``sample_rate``) ran."""
    history = accountant_from_state(extend_history(state, noise_multiplier, sample_rate, steps, mechanism),
                                    mechanism).history
    return _epsilon(mechanism, tuple(history), float(delta))


def calibrate_noise(dp: PrivacyConfig, sample_rate: float, total_steps: int) -> float:
    """``dp.noise_multiplier`` if set, else the smallest sigma (Opacus' search, tolerance 0.01)
    with which ``total_steps`` steps at ``sample_rate`` spend at most ``dp.epsilon`` at ``dp.delta``."""
    if dp.noise_multiplier > 0:
        return float(dp.noise_multiplier)
    if total_steps < 1:
        raise PrivacyError("privacy.planned_steps: at least one step is needed to calibrate the noise")
    try:
        return _calibrate(dp.epsilon, dp.delta, float(sample_rate), int(total_steps), dp.accountant)
    except ValueError as err:
        raise PrivacyError(f"privacy.epsilon: {dp.epsilon} cannot be met over {total_steps} steps: {err}") from None


@lru_cache(maxsize=64)
def _calibrate(epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str) -> float:
    with _quiet_orders():
        return float(get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=mechanism
        ))


def sample_rate_for(batch_size: int, dataset_size: int) -> float:
    """Poisson sampling rate ``q = batch_size / N`` (the expected batch is ``batch_size``)."""
    if dataset_size < 1:
        raise PrivacyError("DP training needs at least one training image")
    if not 1 <= batch_size <= dataset_size:
        raise PrivacyError(f"train.batch_size: {batch_size} must be in [1, number of images = {dataset_size}]")
    return batch_size / dataset_size
