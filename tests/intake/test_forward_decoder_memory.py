"""Memory an unfinished Forward value holds in its connection's decoder, against the bound
the server promises (`intake.forward`: all connections together hold at most
`max_buffered_bytes` of big values).

`_Decoder` keeps an unfinished value's bytes twice (the skipping Unpacker's buffer and its
own copy), so each big-value slot is charged twice `max_buffer_size`. Measured with
tracemalloc on the decoder alone (deterministic, no timing)."""

from __future__ import annotations

import tracemalloc

import msgpack

from traits_agent.intake.forward import DEFAULT_LIMITS, HELD_COPIES, _Decoder

SMALL, LARGE = DEFAULT_LIMITS.small_value_bytes, DEFAULT_LIMITS.max_buffer_size


def held_by_one_unfinished_value() -> tuple[int, int]:
    """(bytes traced while the decoder holds all but the last byte of a LARGE value, its size)."""
    value = msgpack.packb(["level_ups", b"x" * (LARGE - 1024)])
    decoder = _Decoder(SMALL, LARGE)
    decoder.grow()  # it holds a big-value slot
    unfinished = value[: len(value) - 1]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for piece in range(0, len(unfinished), 64 * 1024):
            assert list(decoder.values(unfinished[piece : piece + 64 * 1024])) == []
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert decoder.unfinished == len(unfinished)
    return held, len(unfinished)


def test_an_unfinished_value_is_held_at_most_the_copies_charged_for_it() -> None:
    held, size = held_by_one_unfinished_value()
    # buffers grow by doubling or by an eighth: allow that much over the copies themselves
    assert held <= HELD_COPIES * size * 1.13, f"{held / 2**20:.1f} MiB for {size / 2**20:.0f}"


def test_the_slots_together_stay_within_the_budget() -> None:
    """Before, two slots of one copy each were granted: 2 x ~68 MiB against 64 MiB."""
    assert DEFAULT_LIMITS.big_value_slots * HELD_COPIES * LARGE <= DEFAULT_LIMITS.max_buffered_bytes
