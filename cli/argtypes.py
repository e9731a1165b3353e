"""argparse helpers: ``type=`` functions that refuse values making no sense, and :func:`add_command`.

argparse prints ``promptsam train: error: argument --steps: must be an integer >= 1, got -5`` and
exits with status 2 when one of these raises :class:`argparse.ArgumentTypeError`.
"""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, batch sizes, rounds, counts)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (warm-up steps, worker processes, optional counts where 0 = none)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def port(text: str) -> int:
    """A TCP port number in [1, 65535]."""
    value = _number(text, int)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [1, 65535], got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, durations)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value:g}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1] (thresholds)."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {value:g}")
    return value


def image_size(text: str) -> int:
    """An image side length in pixels (>= 8)."""
    value = _number(text, int)
    if value < 8:
        raise argparse.ArgumentTypeError(f"must be an image size >= 8 pixels, got {value}")
    return value


def parse_set(items: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` items -> ``{KEY: VALUE}`` (values are parsed later, as YAML scalars)."""
    from shared_model.config import ConfigError

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. federation.num_server_rounds=2)")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def add_command(sub: argparse._SubParsersAction, name: str, help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand with a one-line ``help`` and a ``--help`` description (``help`` as a sentence if none)."""
    return sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".")
