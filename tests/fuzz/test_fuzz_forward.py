"""Fuzz: a Forward connection sending any bytes, in any pieces, closes with a known reason
(never a bug of ours), and the listener goes on serving the next client."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import msgpack
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

from tests.fuzz.conftest import CORPUS, Lane
from tests.fuzz.strategies import entries, mutated, pack, values
from traits_agent.intake.durability import AckGate
from traits_agent.intake.forward import ForwardLimits, ForwardServer, bind_forward_unix
from traits_agent.intake.ingest import Ingest
from traits_agent.observe.metrics import Counters

CAPTURES = sorted(p.read_bytes() for p in CORPUS.glob("*.bin"))
GUARD_S = 30
#: how a fuzzed connection may end; internal_error (a bug of ours) is not among them
REASONS = {
    "eof",
    "reset",
    "not_msgpack",
    "not_an_entry",
    "too_large",
    "too_slow",
    "idle_timeout",
    "first_byte_timeout",
    "evicted",
    # issue 11: a connection whose first byte is [ or { is JSON; an entry that does not parse
    # is refused unacked and ends its connection; a PING to a keyless listener
    "not_json",
    "bad_time",
    "bad_tag",
    "bad_option",
    "bad_packed",
    "bad_compressed",
    "too_many_entries",
    "unexpected_handshake",
}

streams = st.one_of(
    st.sampled_from(CAPTURES),
    st.sampled_from(CAPTURES).flatmap(mutated),
    st.lists(entries(), min_size=1, max_size=4).map(lambda es: b"".join(map(pack, es))),
    st.lists(entries(), min_size=1, max_size=4)
    .map(lambda es: b"".join(map(pack, es)))
    .flatmap(mutated),
    values.map(pack),
    st.binary(max_size=512),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return [p for p in pieces if p]


@given(streams, st.lists(st.integers(0, 10**6), max_size=6))
def test_any_stream_closes_cleanly_and_the_next_client_is_served(queues, data, cuts) -> None:
    trio.run(_one, queues, data, cuts)


async def _one(queues, data: bytes, cuts: list[int]) -> None:
    counters = Counters()
    ingest = Ingest({name: Lane(q) for name, q in queues.items()}, counters)
    durability = AckGate(queues, fsync="never")
    limits = ForwardLimits(max_buffer_size=64 * 1024, small_value_bytes=4096)
    server = ForwardServer(ingest, durability, limits=limits)
    with tempfile.TemporaryDirectory(prefix="ta-fz-", dir="/tmp") as tmp:
        path = Path(tmp) / "f.sock"
        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(server.serve, bind_forward_unix(path, 0o600), name="f"))
                async with await trio.open_unix_socket(str(path)) as stream:
                    try:
                        for piece in split(data, cuts):
                            await stream.send_all(piece)
                        await stream.send_eof()
                        while await stream.receive_some(65536):
                            pass
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                await wait_all_tasks_blocked()
                assert server.connections == 0
                ended = counters.by_label("forward_connections_closed", "reason")
                assert set(ended) <= REASONS, ended
                assert sum(ended.values()) == 1
                # the listener is still there and serves a well-formed chunk
                async with await trio.open_unix_socket(str(path)) as stream:
                    good = ["level_ups", 1546355045, {"user_id": "u", "level": 1}, {"chunk": "ok"}]
                    await stream.send_all(pack(good))
                    unpacker = msgpack.Unpacker()
                    while not (answers := list(unpacker)):
                        unpacker.feed(await stream.receive_some(4096))
                    assert answers == [{"ack": "ok"}]
                nursery.cancel_scope.cancel()
