"""Fuzz: the datagram decoder and Ingest never raise, stay within their bounds, and lose
nothing valid next to anything else in a burst."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import CORPUS, Lane
from tests.fuzz.strategies import entries, mutated, pack, values
from traits_agent.intake.ingest import Ingest
from traits_agent.intake.wire import DATAGRAM_BOUNDS, decode_datagram, encode_event
from traits_agent.observe.metrics import Counters

REASONS = {
    "not_msgpack",
    "truncated",
    "not_an_entry",
    "bad_tag",
    "bad_time",
    "bad_option",
    "bad_packed",
    "bad_compressed",
    "too_many_entries",
}
SENTINEL = {"user_id": "fuzz-sentinel", "level": 1}
CAPTURES = sorted(p.read_bytes() for p in CORPUS.glob("*.bin"))

datagrams = st.one_of(
    st.binary(max_size=2048),
    st.lists(entries(), min_size=1, max_size=4).map(lambda es: b"".join(map(pack, es))),
    values.map(pack),
    st.sampled_from(CAPTURES).flatmap(mutated),
    st.lists(entries(), min_size=1, max_size=3)
    .map(lambda es: b"".join(map(pack, es)))
    .flatmap(mutated),
)


@given(datagrams)
def test_decode_datagram_never_raises_and_stays_bounded(data: bytes) -> None:
    """Any bytes: entries within the datagram bounds, every error a known reason."""
    result = decode_datagram(data)
    assert len(result.entries) <= DATAGRAM_BOUNDS.max_entries
    assert set(result.errors) <= REASONS


@given(st.lists(datagrams, max_size=5))
def test_ingest_keeps_the_valid_datagrams_around_hostile_ones(queues, burst) -> None:
    """A valid event before and after any burst is stored; nothing raises, no internal
    error is counted."""
    counters = Counters()
    ingest = Ingest({name: Lane(q) for name, q in queues.items()}, counters)
    queue = queues["level_ups"]
    before = queue.next_seq
    valid = encode_event("level_ups", SENTINEL, 1546355045)
    taken = 0
    full = [valid, *burst, valid]
    while taken < len(full):
        taken += ingest.handle(full[taken:])
    assert counters.get("rejected_events", reason="internal_error") == 0
    stored = queue.next_seq - before
    assert stored >= 2
    assert counters.get("accepted_events", resource="level_ups") == stored
