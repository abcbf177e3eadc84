"""Memory an unfinished Forward value holds in its connection's decoder.

The module docstring of `intake.forward` promises that all connections together hold at most
`max_buffered_bytes` of big values (in slots of `max_buffer_size`). The stream fast path's
`_Decoder` keeps an unfinished value's bytes twice: in the skipping Unpacker's buffer and in
its own `_held` copy, so the bound holds only at half the slots. Measured with tracemalloc on
the decoder alone (deterministic, no timing)."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest

from traits_agent.intake.forward import _Decoder

SMALL, LARGE = 256 * 1024, 32 * 1024 * 1024


@pytest.mark.xfail(
    strict=True,
    reason="review finding: an unfinished value is held twice (skipper buffer + _held); not fixed",
)
def test_an_unfinished_big_value_is_held_about_once() -> None:
    value = msgpack.packb(["level_ups", b"x" * (LARGE - 1024)])
    decoder = _Decoder(SMALL, LARGE)
    decoder.grow()  # it holds a big-value slot
    unfinished = value[: len(value) - 1]  # all but its last byte
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for piece in range(0, len(unfinished), 64 * 1024):
            assert list(decoder.values(unfinished[piece : piece + 64 * 1024])) == []
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert decoder.unfinished == len(unfinished)
    assert held < 1.25 * len(unfinished), f"{held / 2**20:.1f} MiB held for 32 MiB"
