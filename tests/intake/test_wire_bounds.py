"""Compressed values cannot amplify without bound (issue 7 item 7): bytes and events are
capped per datagram and per stream value, and found without inflating or unpacking it all."""

from __future__ import annotations

import zlib

import msgpack
import pytest

from traits_agent.intake.wire import (
    DATAGRAM_BOUNDS,
    STREAM_BOUNDS,
    Bounds,
    WireError,
    decode_datagram,
    decode_value,
)

T0 = 1546355045
#: the smallest event there is: [nil, {}], 3 bytes
TINY = b"\x92\xc0\x80"


def gzip_best(data: bytes) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    return deflate.compress(data) + deflate.flush()


def compressed(payload: bytes, tag: str = "level_ups") -> bytes:
    return msgpack.packb([tag, gzip_best(payload), {"compressed": "gzip"}])


def test_the_16_kb_datagram_of_5_million_events_is_refused():
    """The issue's datagram: 16 KB of gzip that inflated to 5.59M events (20 s blocked) is
    bad_compressed: it stops inflating at the datagram's 1 MiB."""
    bomb = compressed(TINY * (16 * 1024 * 1024 // 3))
    assert len(bomb) < 17_000
    result = decode_datagram(bomb)
    assert result.entries == [] and result.errors == ["bad_compressed"]


def test_a_datagram_of_too_many_tiny_events_is_refused():
    """Under the byte cap but over 16,384 events: too_many_entries, before unpacking it all."""
    n = DATAGRAM_BOUNDS.max_entries + 1
    assert 3 * n < DATAGRAM_BOUNDS.max_inflated
    result = decode_datagram(compressed(TINY * n))
    assert result.errors == ["too_many_entries"] and result.entries == []
    ok = decode_datagram(compressed(TINY * DATAGRAM_BOUNDS.max_entries))
    assert ok.errors == [] and len(ok.entries) == DATAGRAM_BOUNDS.max_entries


def test_bounds_hold_for_the_datagram_as_a_whole():
    """Two compressed values of 600 KiB each in one datagram: the second goes past the
    datagram's 1 MiB and is refused; the first is kept."""
    half = msgpack.packb([T0, {"user_id": "u", "level": 1, "pad": "x" * 600 * 1024}])
    one = compressed(half)
    result = decode_datagram(one + one)
    assert len(result.entries) == 1 and result.errors == ["bad_compressed"]


def test_a_stream_value_is_bounded_in_events_in_every_form():
    """A Forward array, or a packed payload, past 262,144 events is too_many_entries."""
    n = STREAM_BOUNDS.max_entries + 1
    with pytest.raises(WireError) as caught:
        decode_value(["level_ups", [[None, {}]] * n])
    assert caught.value.reason == "too_many_entries"
    with pytest.raises(WireError) as caught:
        decode_value(["level_ups", TINY * n])
    assert caught.value.reason == "too_many_entries"
    entries, _ = decode_value(["level_ups", gzip_best(TINY * (n - 1)), {"compressed": "gzip"}])
    assert len(entries) == n - 1


def test_bounds_can_be_set_per_call():
    """decode_value takes the bounds of its caller."""
    small = Bounds(max_inflated=100, max_entries=2)
    with pytest.raises(WireError) as caught:
        decode_value(["t", gzip_best(b"\xc0" * 101), {"compressed": "gzip"}], small)
    assert caught.value.reason == "bad_compressed"
    with pytest.raises(WireError):
        decode_value(["t", [[None, {}]] * 3], small)
