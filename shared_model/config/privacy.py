"""Privacy settings: local DP-SGD, central DP and secure aggregation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared_model.config.parse import ConfigError, _field


DP_ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("microbatch", "batched", "vmap", "auto")
# The modes `bench dp` times ("auto" runs one of the others).
DP_BENCH_MODES = ("microbatch", "batched", "vmap")
CENTRAL_DP_MODES = ("off", "fixed", "adaptive")


@dataclass
class PrivacyConfig:
    """Local differential privacy at one hospital: DP-SGD (Opacus) on the exchanged parameters.

    The budget ``(epsilon, delta)`` covers every round the hospital takes part in; accounting is
    cumulative (see :mod:`shared_model.training.privacy`).
    """

    local_dp: bool = False
    epsilon: float = 8.0  # the hospital's total budget over all its rounds
    delta: float = 1e-5  # must be < 1 / (number of local training images)
    max_grad_norm: float = 1.0  # per-example L2 clipping bound C
    # Gaussian noise std / C; 0 = calibrate so that planned_steps steps spend exactly epsilon.
    noise_multiplier: float = 0.0
    # DP-SGD steps the budget must last (0 = the steps of the call; federated: rounds x local steps).
    planned_steps: int = 0
    accountant: str = "rdp"  # one of DP_ACCOUNTANTS
    # How per-example gradients are computed (one of GRAD_SAMPLE_MODES): "microbatch" runs each
    # example alone; "batched" runs one forward pass and one backward pass per example; "vmap" one
    # vectorised pass (torch.func); "auto" vmap, else microbatch with a log line saying why.
    grad_sample_mode: str = "auto"
    # Seed of the noise and of Poisson sampling; -1 = OS entropy. A fixed seed lets anyone who
    # knows it remove the noise: for tests only.
    noise_seed: int = -1
    # Under local DP, train replies carry NaN for train-loss / val-dice / train-seconds (statistics
    # of the private data outside the DP guarantee; the time follows the sampled batch sizes) unless
    # this is true.
    release_metrics: bool = False

    # Central DP on the server: Flower's DP wrappers around FedAvg / FedProx; hospital-level.
    central_dp: str = "off"  # one of CENTRAL_DP_MODES
    central_noise_multiplier: float = 1.0  # noise std / clipping norm, on the sum of the deltas
    central_clipping_norm: float = 0.1  # L2 bound on each hospital's delta (adaptive: initial bound)
    central_clients: int = 0  # hospitals per round (0 = partition hospitals, else min-nodes)
    central_delta: float = 1e-5
    central_epsilon: float = 0.0  # stop before the server-side epsilon exceeds this (0 = report only)
    adaptive_target_quantile: float = 0.5  # fraction of hospitals whose delta should go unclipped
    adaptive_clip_lr: float = 0.2
    adaptive_count_stddev: float = 0.0  # noise on the clipped count (0 = Flower's hospitals / 20)

    # Secure aggregation (Flower SecAgg+): the server only sees the sum of the hospitals' deltas.
    secagg: bool = False
    secagg_shares: float = 1.0  # key shares per hospital, as a fraction of the round's hospitals
    secagg_threshold: float = 0.67  # fraction of the shares needed to reconstruct a key (>= 2 shares)
    secagg_clipping_range: float = 1.0  # every delta value is clipped to +-this before quantisation
    secagg_quantization_range: int = 4194304  # 2**22 integer levels
    # Weights (num-examples) are divided by this before quantisation: set it to the largest
    # hospital's num-examples. Larger loses precision (the step of one averaged value is
    # 2 clipping_range / quantization_range x max_weight / sum of num-examples); smaller overflows.
    secagg_max_weight: float = 1000.0


def check_rehearsal_privacy(data: Any, cfg: PrivacyConfig, prefix: str = "data.") -> None:
    """Local DP accounts for the hospital's own images only; rehearsal scenes in its batches would
    change the sampling rate the accountant assumes, so the two are refused together."""
    if cfg.local_dp and data.rehearsal_scenes:
        raise ConfigError(f"{prefix}rehearsal_scenes: not with privacy local_dp (the DP accountant's sampling "
                          "rate counts the hospital's own images only); set it to 0")


def check_privacy(cfg: PrivacyConfig, prefix: str = "privacy.") -> None:
    """Check ranges and choices of a :class:`PrivacyConfig`, raising ConfigError naming the field
    (``privacy.max_grad_norm`` in YAML, ``privacy-max-grad-norm`` in the run config)."""
    choices = [("accountant", DP_ACCOUNTANTS), ("grad_sample_mode", GRAD_SAMPLE_MODES),
               ("central_dp", CENTRAL_DP_MODES)]
    for name, valid in choices:
        if getattr(cfg, name) not in valid:
            raise ConfigError(f"{prefix}{_field(name, prefix)}: {getattr(cfg, name)!r} not in {list(valid)}")
    checks = [
        ("epsilon", cfg.epsilon > 0.0, "must be > 0"),
        ("delta", 0.0 < cfg.delta < 1.0, "must be in (0, 1)"),
        ("max_grad_norm", cfg.max_grad_norm > 0.0, "must be > 0"),
        ("noise_multiplier", cfg.noise_multiplier >= 0.0, "must be >= 0 (0 = calibrate from epsilon)"),
        ("planned_steps", cfg.planned_steps >= 0, "must be >= 0"),
        ("central_noise_multiplier", cfg.central_noise_multiplier > 0.0, "must be > 0"),
        ("central_clipping_norm", cfg.central_clipping_norm > 0.0, "must be > 0"),
        ("central_clients", cfg.central_clients >= 0, "must be >= 0 (0 = the number of hospitals)"),
        ("central_delta", 0.0 < cfg.central_delta < 1.0, "must be in (0, 1)"),
        ("central_epsilon", cfg.central_epsilon >= 0.0, "must be >= 0 (0 = report only)"),
        ("adaptive_target_quantile", 0.0 <= cfg.adaptive_target_quantile <= 1.0, "must be in [0, 1]"),
        ("adaptive_clip_lr", cfg.adaptive_clip_lr >= 0.0, "must be >= 0"),
        ("adaptive_count_stddev", cfg.adaptive_count_stddev >= 0.0, "must be >= 0 (0 = hospitals / 20)"),
        ("secagg_shares", 0.0 < cfg.secagg_shares <= 1.0, "must be a fraction in (0, 1]"),
        ("secagg_threshold", 0.0 < cfg.secagg_threshold <= 1.0, "must be a fraction in (0, 1]"),
        ("secagg_clipping_range", cfg.secagg_clipping_range > 0.0, "must be > 0"),
        ("secagg_quantization_range", 2 <= cfg.secagg_quantization_range < 2**32, "must be in [2, 2**32)"),
        ("secagg_max_weight", cfg.secagg_max_weight > 0.0, "must be > 0"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(f"{prefix}{_field(name, prefix)}: {why}")
    if cfg.secagg and cfg.central_dp != "off":
        raise ConfigError(
            f"{prefix}secagg: central DP clips each hospital's delta on the server, which SecAgg+ hides; "
            "use local DP with secure aggregation, or central DP without it"
        )
