"""Central differential privacy on the server: Flower's DP strategy wrappers with cumulative accounting.

``privacy-central-dp = "fixed"`` wraps the inner FedAvg / FedProx in Flower's
``DifferentialPrivacyServerSideFixedClipping``: each hospital's delta is clipped to L2 norm ``C``,
the deltas are averaged with equal weights, and ``N(0, (z C / n)^2)`` noise is added to the
average (hospital-level DP: neighbouring runs differ by one hospital's whole contribution).
Flower's wrapper takes a ``PrivacyAccountant``; its own ``RdpAccountant`` needs the
``dp-accounting`` package (``flwr[dp]``), which is not installed here, so
:class:`OpacusRdpAccountant` implements Flower's accountant protocol on Opacus' RDP accountant
(the same arithmetic). Every round is a full-participation Gaussian release (no sampling
amplification: Flower samples nodes with ``random.sample``, not Poisson), and the wrapper stops
the run with ``PrivacyBudgetExhausted`` before a round would exceed ``privacy-central-epsilon``
(adaptive clipping: after aggregating, before releasing, as its cost depends on the bound update).

``"adaptive"`` wraps in ``DifferentialPrivacyServerSideAdaptiveClipping`` (Andrew et al. 2019):
the bound follows a target quantile of the deltas' norms, learned from a noisy count of clipped
hospitals. Flower does not account it; :class:`CentralDPAdaptive` composes per round what the
code actually releases: the average with noise ``z_update * C_new / n`` against sensitivity
``C_old / n`` (Flower updates the bound before adding the noise), and the clipped count with
noise ``sigma_b`` against sensitivity 1.

Both wrappers weight hospitals equally (FedAvg by ``num-examples`` would give a large hospital a
sensitivity above ``C / n``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig as FlowerPrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)

from shared_model.config import ConfigError, FederationConfig, PartitionConfig, PrivacyConfig, RunSettings
from shared_model.training.accounting import accountant_from_state, extend_history, new_accountant_state, spent_epsilon

ACCOUNTING_METHOD = "rdp (opacus)"
log = logging.getLogger("flwr.promptsam." + __name__)  # shown by Flower's console handler


class OpacusRdpAccountant:
    """Flower's ``PrivacyAccountant`` protocol backed by Opacus' RDP accountant.

    Each composed event is a Gaussian mechanism with noise multiplier ``z`` and sampling rate
    ``sample_size / population_size`` (Poisson) or 1 (no amplification).

    Args:
        config: Flower's accounting configuration (delta, population, sampling, budget).
    """

    def __init__(self, config: FlowerPrivacyConfig) -> None:
        self._config = config
        self._state = new_accountant_state("rdp")
        self._releases = 0

    @property
    def config(self) -> FlowerPrivacyConfig:
        return self._config

    @property
    def num_releases(self) -> int:
        return self._releases

    def _rate(self, event: GaussianPrivacyEvent) -> float:
        if self._config.sampling_method is SamplingMethod.POISSON:
            return event.sample_size / event.population_size
        if self._config.sampling_method is SamplingMethod.NO_AMPLIFICATION:
            return 1.0
        raise ValueError("OpacusRdpAccountant supports Poisson or no-amplification sampling")

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        """Add ``count`` releases of ``event``."""
        self.compose_gaussian(event.noise_multiplier, self._rate(event), count)

    def compose_gaussian(self, noise_multiplier: float, sample_rate: float = 1.0, count: int = 1) -> None:
        """Add ``count`` Gaussian releases (noise std / sensitivity = ``noise_multiplier``)."""
        if not noise_multiplier > 0 or count < 1:
            raise ValueError("a release needs a positive noise multiplier and count >= 1")
        self._state = extend_history(self._state, noise_multiplier, sample_rate, count)
        self._releases += count

    def get_epsilon(self, delta: float) -> float:
        return spent_epsilon(self._state, delta, "rdp")

    def get_delta(self, epsilon: float) -> float:
        """Smallest delta (bisection on log delta) at which the spent epsilon is at most ``epsilon``."""
        if not self._state["steps"]:
            return 0.0
        lo, hi = -60.0, 0.0  # log10 delta
        if self.get_epsilon(10**lo) <= epsilon:
            return 10**lo
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.get_epsilon(10**mid) <= epsilon else (mid, hi)
        return 10**hi

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        delta = self._config.target_delta if delta is None else delta
        return PrivacySpent(self.get_epsilon(delta), delta, self._releases, ACCOUNTING_METHOD)

    def would_exceed(self, event: GaussianPrivacyEvent, max_epsilon: float | None = None, count: int = 1) -> bool:
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            return False
        state = extend_history(self._state, event.noise_multiplier, self._rate(event), count)
        return spent_epsilon(state, self._config.target_delta, "rdp") > limit

    def state_dict(self) -> dict[str, object]:
        return {"history": dict(self._state), "releases": self._releases}

    def load_state_dict(self, state: dict[str, object]) -> None:
        history = state["history"]
        accountant_from_state(history, "rdp")  # validates, naming the bad key
        self._state = {k: list(v) if isinstance(v, list) else v for k, v in dict(history).items()}
        self._releases = int(state["releases"])


def _prepare(replies: Iterable[Message], current: ArrayRecord, key: str) -> list[Message]:
    """Equal weights (the noise is calibrated to ``C / n``), and no all-zero update: Flower's
    clipping divides by the update's norm. Such a reply is dropped with a warning; with the
    accountant on, the round then has too few replies and releases nothing."""
    kept = []
    reference = current.to_numpy_ndarrays()
    for reply in replies:
        if reply.has_content():
            arrays = [a for rec in reply.content.array_records.values() for a in rec.to_numpy_ndarrays()]
            if arrays and all(np.array_equal(a, b) for a, b in zip(arrays, reference)):
                log.warning("central DP: dropped an all-zero update from node %d", reply.metadata.src_node_id)
                continue
            for record in reply.content.metric_records.values():
                if key in record:
                    record[key] = 1.0
        kept.append(reply)
    return kept


class _Delegating:
    """Expose the wrapped strategy's public attributes (record keys, ``min_train_nodes``, ...), as
    the project's GuardedStrategy reads them from its inner strategy."""

    def __getattr__(self, name: str) -> Any:
        wrapped = self.__dict__.get("strategy")
        if wrapped is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(wrapped, name)

    def privacy_spent(self) -> PrivacySpent:
        return self.accountant.get_privacy_spent()

    def privacy_state_dict(self) -> dict[str, object]:
        return self.accountant.state_dict()

    def load_privacy_state_dict(self, state: dict[str, object]) -> None:
        self.accountant.load_state_dict(state)


class CentralDPFixed(_Delegating, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping with equal weights and the Opacus-backed accountant."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Any, MetricRecord | None]:
        replies = _prepare(replies, self.current_arrays, self.strategy.weighted_by_key)
        return super().aggregate_train(server_round, replies)


class CentralDPAdaptive(_Delegating, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, equal weights, with what it releases accounted."""

    def __init__(self, *args: Any, accountant: OpacusRdpAccountant, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accountant = accountant

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Any, MetricRecord | None]:
        replies = _prepare(replies, self.current_arrays, self.strategy.weighted_by_key)
        before = self.clipping_norm
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        # The round's cost depends on the bound update, known only now: check before releasing.
        limit = self.accountant.config.max_epsilon
        if limit is not None:
            projected = OpacusRdpAccountant(self.accountant.config)
            projected.load_state_dict(self.accountant.state_dict())
            self._compose(projected, before, self.clipping_norm)
            if projected.get_epsilon(projected.config.target_delta) > limit:
                self.clipping_norm = before  # nothing of this round is released
                raise PrivacyBudgetExhausted(f"central DP: this round would exceed privacy-central-epsilon {limit}")
        self._compose(self.accountant, before, self.clipping_norm)
        return arrays, metrics

    def _compose(self, accountant: OpacusRdpAccountant, clip_before: float, clip_after: float) -> None:
        accountant.compose_gaussian(self.noise_multiplier * clip_after / clip_before)
        accountant.compose_gaussian(self.clipped_count_stddev)


def central_clients(privacy: PrivacyConfig, fed: FederationConfig, partition: PartitionConfig) -> int:
    """Hospitals per round the noise is calibrated for (``privacy-central-clients`` or inferred)."""
    if privacy.central_clients > 0:
        return privacy.central_clients
    return partition.hospitals if partition.hospitals > 0 else fed.min_nodes


def wrap_central_dp(
    inner: FedAvg, privacy: PrivacyConfig, fed: FederationConfig, partition: PartitionConfig
) -> FedAvg | CentralDPFixed | CentralDPAdaptive:
    """``inner`` itself when central DP is off, else wrapped in Flower's fixed or adaptive clipping.

    Raises:
        ConfigError: If the strategy is not FedAvg / FedProx or the sampling cannot be accounted.
    """
    if privacy.central_dp == "off":
        return inner
    if fed.strategy not in ("fedavg", "fedprox"):
        raise ConfigError(f"privacy-central-dp: needs strategy fedavg or fedprox (an average), got {fed.strategy!r}")
    if fed.fraction_train < 1.0:
        raise ConfigError("privacy-central-dp: needs fraction-train = 1 (rounds are accounted without "
                          "sampling amplification, with a fixed number of hospitals)")
    n = central_clients(privacy, fed, partition)
    accountant = OpacusRdpAccountant(FlowerPrivacyConfig(
        target_delta=privacy.central_delta,
        population_size=n,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=privacy.central_epsilon or None,
    ))
    if privacy.central_dp == "fixed":
        return CentralDPFixed(inner, privacy.central_noise_multiplier, privacy.central_clipping_norm, n,
                              accountant=accountant)
    try:
        return CentralDPAdaptive(
            inner, privacy.central_noise_multiplier, n,
            initial_clipping_norm=privacy.central_clipping_norm,
            target_clipped_quantile=privacy.adaptive_target_quantile,
            clip_norm_lr=privacy.adaptive_clip_lr,
            clipped_count_stddev=privacy.adaptive_count_stddev or None,
            accountant=accountant,
        )
    except ValueError as err:
        raise ConfigError(f"privacy-adaptive-count-stddev: {err}") from None


def central_epsilon(strategy: Any) -> float | None:
    """Cumulative server-side epsilon of a wrapped strategy, or None without central DP."""
    spent = getattr(strategy, "privacy_spent", None)
    if spent is None:
        return None
    value = spent()
    return None if value is None else float(value.epsilon) if math.isfinite(value.epsilon) else math.inf


def check_privacy_strategy(settings: RunSettings) -> None:
    """Cross-checks between the privacy settings, the strategy and the model.

    Raises:
        ConfigError: SecAgg+ with a strategy that is not an average of deltas, or local DP with
            DHN-NCE (which couples the images of a batch).
    """
    privacy, fed = settings.privacy, settings.federation
    if privacy.secagg and fed.strategy not in ("fedavg", "fedprox"):
        raise ConfigError(f"privacy-secagg: secure aggregation only yields a (weighted) sum, so the strategy "
                          f"must be fedavg or fedprox, got {fed.strategy!r}")
    if privacy.local_dp and settings.model.loss.nce != 0.0:
        raise ConfigError("model-config: loss.nce must be 0 with privacy-local-dp (DHN-NCE uses the other "
                          "images of a batch, so per-example clipping would not bound one image's influence)")


def declined(row: dict[str, Any]) -> bool:
    """A train row of a hospital that declined because of its local-DP budget."""
    return not row.get("accepted", True) and "declined: privacy budget" in str(row.get("reason", ""))


def round_privacy(strategy: Any, train_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Privacy columns of a round row: server-side epsilon, largest hospital epsilon, declines."""
    local = [r["epsilon"] for r in train_rows if r.get("accepted") and "epsilon" in r]
    return {
        "epsilon-central": central_epsilon(strategy),
        "epsilon-local-max": max(local) if local else None,
        "declined": sum(declined(r) for r in train_rows),
    }


def privacy_summary(settings: RunSettings, history: list[dict[str, Any]], strategy: Any) -> dict[str, Any]:
    """The report's privacy section: settings, final epsilons (server-side, per hospital)."""
    privacy = settings.privacy
    last_local: dict[str, float] = {}
    for row in history:
        if row.get("kind") == "train" and row.get("accepted") and "epsilon" in row:
            last_local[str(row.get("hospital"))] = float(row["epsilon"])
    return {
        "local_dp": privacy.local_dp,
        "local_epsilon_budget": privacy.epsilon if privacy.local_dp else None,
        "local_delta": privacy.delta if privacy.local_dp else None,
        "local_epsilon_by_hospital": last_local,
        "central_dp": privacy.central_dp,
        "central_epsilon": central_epsilon(strategy),
        "central_delta": privacy.central_delta if privacy.central_dp != "off" else None,
        "secagg": privacy.secagg,
    }
