"""Simulation-only fault injection: hospitals that sleep past the deadline, fail, or send bad updates.

A large simulated federation must show what the server does with hospitals that do not deliver.
:class:`FaultConfig` (the experiment YAML's ``faults:`` section, run-config keys ``fault-*``) makes
a seeded fraction of the sampled hospitals misbehave in each round:

* ``sleep``: the hospital trains, then sleeps ``sleep_seconds`` before replying, past the server's
  ``reply_timeout``: the server records "no reply before the deadline" and goes on without it;
* ``error``: the ClientApp raises before training: Flower turns it into an error reply;
* ``corrupt``: the hospital trains and replies with a non-finite value in its delta: the server's
  validation drops it.

Which hospital misbehaves in which round is a function of ``(seed, round, partition id)`` only
(:func:`choose_fault`), so a run is reproducible and a test can name the faulty hospitals. A
deployed hospital (a node with ``data-path``) refuses to inject faults.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared_model.config.parse import ConfigError, _field

FAULT_KINDS = ("sleep", "error", "corrupt")


@dataclass
class FaultConfig:
    """Fractions of the sampled hospitals that misbehave each round (all 0 = no faults)."""

    sleep_fraction: float = 0.0  # reply only after sleep_seconds (set it above reply_timeout)
    error_fraction: float = 0.0  # raise in the ClientApp: an error reply
    corrupt_fraction: float = 0.0  # reply with a NaN in the delta: dropped by validation
    sleep_seconds: float = 60.0
    seed: int = 0

    @property
    def enabled(self) -> bool:
        """Whether any fault is injected."""
        return self.sleep_fraction + self.error_fraction + self.corrupt_fraction > 0.0


def check_faults(cfg: FaultConfig, prefix: str = "faults.") -> None:
    """Check the fractions and the sleep, raising ConfigError naming the field as its source spells
    it (``faults.sleep_fraction`` in YAML, ``fault-sleep-fraction`` in the run config)."""
    for name in ("sleep_fraction", "error_fraction", "corrupt_fraction"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{prefix}{_field(name, prefix)}: must be a fraction in [0, 1], got {value!r}")
    total = cfg.sleep_fraction + cfg.error_fraction + cfg.corrupt_fraction
    if total > 1.0 + 1e-9:
        raise ConfigError(f"{prefix}{_field('sleep_fraction', prefix)} + {_field('error_fraction', prefix)} + "
                          f"{_field('corrupt_fraction', prefix)}: must sum to at most 1, got {total:g}")
    if cfg.sleep_seconds <= 0.0:
        raise ConfigError(f"{prefix}{_field('sleep_seconds', prefix)}: must be > 0 (seconds)")


def fault_draw(seed: int, server_round: int, partition_id: int) -> float:
    """A uniform number in [0, 1) fixed by ``(seed, round, partition id)``."""
    words = np.random.SeedSequence([seed, server_round, partition_id + 1, 0xFA]).generate_state(2)
    return float((int(words[0]) << 21 ^ int(words[1]) >> 11) % (1 << 53)) / float(1 << 53)


def choose_fault(cfg: FaultConfig, server_round: int, partition_id: int) -> str | None:
    """The fault of one hospital in one round (one of :data:`FAULT_KINDS`) or None.

    The draw is cut into ``[0, sleep) [sleep, sleep + error) [.., .. + corrupt)``: each hospital
    misbehaves with the configured probability, independently per round.
    """
    if not cfg.enabled:
        return None
    u = fault_draw(cfg.seed, server_round, partition_id)
    edge = 0.0
    for kind in FAULT_KINDS:
        edge += getattr(cfg, f"{kind}_fraction")
        if u < edge:
            return kind
    return None
