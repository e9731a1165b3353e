"""Exchanged state get/set, validation, deltas and wire dtypes on a small module."""

import pytest
import torch
from torch import nn

from shared_model.exchange import (
    ExchangeError,
    cast_state,
    check_state,
    get_exchanged_state,
    set_exchanged_state,
    state_delta,
    state_nbytes,
    state_norm,
    state_shapes,
    trainable_names,
)


def small() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    m[0].weight.requires_grad_(False)
    return m


def test_state_is_exactly_trainable_params():
    m = small()
    state = get_exchanged_state(m)
    assert list(state) == trainable_names(m) == ["0.bias", "1.weight", "1.bias"]
    assert "0.weight" not in state
    state["1.bias"] += 1  # a copy: the model is untouched
    assert not torch.equal(state["1.bias"], m[1].bias)


def test_set_round_trip_and_errors():
    m = small()
    state = get_exchanged_state(m)
    state["1.weight"].fill_(0.5)
    set_exchanged_state(m, state)
    assert torch.all(m[1].weight == 0.5)
    with pytest.raises(ExchangeError, match="missing.*1.bias"):
        set_exchanged_state(m, {k: v for k, v in state.items() if k != "1.bias"})
    with pytest.raises(ExchangeError, match="unexpected.*0.weight"):
        set_exchanged_state(m, {**state, "0.weight": torch.zeros(4, 3)})
    with pytest.raises(ExchangeError, match=r"1.weight: got \(3, 3\), expected \(2, 4\)"):
        set_exchanged_state(m, {**state, "1.weight": torch.zeros(3, 3)})


def test_check_state_non_finite_and_norm():
    m = small()
    shapes = state_shapes(m)
    zero = {k: torch.zeros(s) for k, s in shapes.items()}
    check_state(zero, shapes, max_norm=1.0)
    nan = dict(zero, **{"1.bias": torch.tensor([float("nan"), 0.0])})
    with pytest.raises(ExchangeError, match="non-finite.*1.bias"):
        check_state(nan, shapes)
    big = dict(zero, **{"1.bias": torch.tensor([3.0, 4.0])})
    assert state_norm(big) == pytest.approx(5.0)
    with pytest.raises(ExchangeError, match="norm 5 exceeds the bound 1"):
        check_state(big, shapes, max_norm=1.0)


def test_delta_inverse_and_bytes():
    m = small()
    old = get_exchanged_state(m)
    new = {k: v + 0.25 for k, v in old.items()}
    delta = state_delta(new, old)
    back = {k: old[k] + delta[k] for k in old}
    for k in old:
        torch.testing.assert_close(back[k], new[k])
    n = sum(v.numel() for v in old.values())  # 4 + 8 + 2
    assert n == 14
    assert state_nbytes(old) == 14 * 4
    assert state_nbytes(old, "float16") == 14 * 2
    half = cast_state(old, "bfloat16")
    assert all(v.dtype == torch.bfloat16 for v in half.values())
    with pytest.raises(ExchangeError, match="wire dtype"):
        cast_state(old, "int8")
