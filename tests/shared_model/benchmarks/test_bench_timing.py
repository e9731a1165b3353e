"""Interleaved timing, paired ratios and their verdict, with fake clocks (deterministic)."""

import pytest
import torch

from shared_model.benchmarks.timing import (
    NO_DIFFERENCE,
    busy_warning,
    interleaved,
    paired_ratio,
    pin_threads,
    ratio_text,
    spread,
    verdict,
)


class FakeMachine:
    """A wall clock and a CPU clock that only the timed functions advance.

    Each function costs a fixed amount of CPU time; the wall time is that times the machine's
    slowdown in the current round (a load that changes between rounds).
    """

    def __init__(self, costs: dict[str, float], slowdown: list[float]) -> None:
        self.costs, self.slowdown = costs, slowdown
        self.wall = self.cpu = 0.0
        self.calls: list[str] = []

    def fn(self, name: str):
        def run() -> None:
            self.calls.append(name)
            round_ = (len(self.calls) - 1) // len(self.costs)
            self.cpu += self.costs[name]
            self.wall += self.costs[name] * self.slowdown[round_]

        return run


def test_interleaved_rotates_the_order_and_skips_the_warmup_rounds():
    m = FakeMachine({"a": 1.0, "b": 3.0}, slowdown=[10.0, 1.0, 2.0, 4.0])
    out = interleaved({"a": m.fn("a"), "b": m.fn("b")}, warmup=1, repeats=3,
                      wall_clock=lambda: m.wall, cpu_clock=lambda: m.cpu)
    assert m.calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert out["a"]["wall"]["all"] == [1.0, 2.0, 4.0]  # the warm-up round (slowdown 10) is not timed
    assert out["b"]["wall"]["all"] == [3.0, 6.0, 12.0]
    assert out["a"]["cpu"]["all"] == [1.0, 1.0, 1.0]
    assert out["b"]["wall"]["median"] == 6.0 and out["b"]["wall"]["repeats"] == 3


def test_paired_ratio_cancels_a_load_that_changes_between_repeats():
    m = FakeMachine({"plain": 2.0, "ours": 1.0}, slowdown=[1.0, 3.0, 1.0, 3.0, 1.0])
    out = interleaved({"plain": m.fn("plain"), "ours": m.fn("ours")}, warmup=0, repeats=5,
                      wall_clock=lambda: m.wall, cpu_clock=lambda: m.cpu)
    ratio = paired_ratio(out["plain"]["wall"]["all"], out["ours"]["wall"]["all"])
    assert ratio["min"] == ratio["max"] == ratio["median"] == 2.0
    assert verdict(ratio) == "faster"
    # Unpaired, the slowest "ours" (3 s) and the fastest "plain" (2 s) would overlap across 1.
    assert out["ours"]["wall"]["max"] > out["plain"]["wall"]["min"]


def test_spread_has_quartiles_and_refuses_no_repeats():
    s = spread([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"]) == (3.0, 1.0, 5.0, 2.0, 4.0)
    assert s["all"] == [5.0, 1.0, 4.0, 2.0, 3.0]
    one = spread([2.0])
    assert one["q1"] == one["q3"] == 2.0
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        spread([])
    with pytest.raises(ValueError, match="equally many repeats"):
        paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="repeats >= 1"):
        interleaved({"a": lambda: None}, warmup=0, repeats=0)


def test_verdict_says_no_measurable_difference_when_the_spread_reaches_across_one():
    assert verdict(spread([1.2, 1.3, 1.5])) == "faster"
    assert verdict(spread([0.7, 0.8, 0.9])) == "slower"
    assert verdict(spread([0.95, 1.2, 1.4])) == NO_DIFFERENCE
    assert verdict(spread([1.0, 1.2, 1.4])) == NO_DIFFERENCE
    assert verdict(spread([1.5, 2.0]), above="slower", below="faster") == "slower"
    assert ratio_text(spread([1.1, 1.2, 1.3, 1.4, 1.5])) == "1.30x (1.10-1.50, IQR 1.20-1.40)"
    assert ratio_text(spread([0.9, 1.3])).endswith(", " + NO_DIFFERENCE)


def test_threads_are_pinned_and_a_busy_machine_is_named():
    before = torch.get_num_threads()
    try:
        assert pin_threads(1) == 1 == torch.get_num_threads()
        assert pin_threads(None) == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--threads"):
        pin_threads(0)
    assert busy_warning([1.0, 1.0, 1.0], threads=1, cores=2) is None
    assert "load average 1.50 on 2 cores" in busy_warning([1.5, 1.0, 1.0], threads=1, cores=2)
    assert busy_warning(None, threads=1, cores=2) is None
