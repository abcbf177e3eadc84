"""Backoff policy: full jitter within a capped exponential; Retry-After parsed and clamped."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from traits_agent.delivery.backoff import Backoff, parse_retry_after


def test_ceiling_doubles_then_caps():
    """The draw's ceiling is initial·2^attempt, never above max."""
    b = Backoff(initial_s=0.5, max_s=300)
    assert [b.ceiling(n) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert b.ceiling(20) == 300
    assert b.ceiling(10_000) == 300


def test_full_jitter_spans_zero_to_ceiling():
    """Delays are uniform over [0, ceiling]: spread, never above the cap."""
    b = Backoff(initial_s=1, max_s=8, rng=random.Random(7))
    draws = [b.delay(5) for _ in range(2000)]
    assert max(draws) <= 8
    assert min(draws) >= 0
    assert min(draws) < 1 and max(draws) > 7  # full range is used


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("garbage", None),
        ("30", 30.0),
        ("0", 1.0),  # clamped up: never hammer
        ("999999", 900.0),  # clamped down: never park for days
        ("Wed, 21 Oct 2026 07:28:30 GMT", 30.0),
    ],
)
def test_retry_after(value, expected):
    """Delta-seconds and HTTP-date forms, clamped to [1 s, 15 min]."""
    now = datetime(2026, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after(value, now=now) == expected
