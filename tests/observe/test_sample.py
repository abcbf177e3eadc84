"""`describe`: log samples of peer values are bounded and never raise."""

from __future__ import annotations

import msgpack
import pytest

from traits_agent.observe.sample import describe


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deep_nesting_is_cut_not_raised(depth):
    """repr() of a list nested 1,000 deep raises RecursionError; describe cuts it."""
    with pytest.raises(RecursionError):
        repr(nested(1000))
    assert describe(nested(depth)) == "[[[[[[[[[...]]]]]]]]]"


def test_long_and_wide_values_are_bounded():
    """A 10 MB string, a million-element list and a huge int stay short."""
    assert len(describe("x" * 10_000_000)) < 100
    wide = describe(list(range(1_000_000)))
    assert wide == "[0, 1, 2, 3, 4, 5, 6, 7, ...(1000000 elements)]"
    assert describe(10**5000) == "<int of 16610 bits>"
    many_maps = [{"k" * 50: "v" * 50, "b": b"x"}] * 100
    assert len(describe(many_maps)) <= 303


def test_small_values_read_like_python():
    """Plain values look like their repr, so a sample is easy to read."""
    value = ["actions", 1.5, {"user_id": "u1", 3: None, "b": b"\x00"}, True]
    assert describe(value) == repr(value)
    assert describe(msgpack.ExtType(5, b"")) == "<ExtType>"
    assert describe([]) == "[]" and describe({}) == "{}"
