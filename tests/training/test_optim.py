"""training.optim: the one warmup-cosine schedule."""

import math

import pytest

from training.optim import warmup_cosine


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    fn = warmup_cosine(warmup=4, steps=14, min_ratio=0.1)
    assert [fn(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert fn(4) == 1.0 and fn(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert fn(14) == pytest.approx(0.1) and fn(100) == pytest.approx(0.1)  # stays at the floor
    values = [fn(s) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_warmup_starts_at_full_rate_and_decays_to_zero():
    fn = warmup_cosine(warmup=0, steps=10)
    assert fn(0) == 1.0 and fn(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2))) and fn(10) == pytest.approx(0.0)
