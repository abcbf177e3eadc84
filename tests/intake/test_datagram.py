"""The datagram source over a real Unix datagram socket into real queues: a burst of
compressed datagrams is handled in slices, and nothing a sink raises stops the source."""

from __future__ import annotations

import gzip
import socket
from functools import partial

import msgpack
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from tests.intake.test_forward import T0, Rig, level_up
from traits_agent.intake import ingest as ingest_module
from traits_agent.intake.datagram import bind_udp, bind_unix_datagram, serve_datagrams


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def compressed(start: int, n: int) -> bytes:
    packed = b"".join(msgpack.packb([T0, level_up(i)]) for i in range(start, start + n))
    return msgpack.packb(["level_ups", gzip.compress(packed), {"compressed": "gzip"}])


async def test_a_burst_of_compressed_datagrams_is_handled_in_slices(
    rig, tmp_path, monkeypatch
) -> None:
    """40 compressed datagrams of 100 events arrive in one burst, handled in slices of
    BURST_ENTRIES (100 here, so every datagram is one): other tasks run between the slices (a
    watcher sees a count strictly between 0 and 4,000), and every event is stored. (Before:
    the whole burst was one synchronous step.) Trio runs a batch of tasks in either order, so
    a watcher misses one boundary half the time and all 39 once in 2**39 runs."""
    monkeypatch.setattr(ingest_module, "BURST_ENTRIES", 100)
    sock = bind_udp("127.0.0.1", 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for k in range(40):
            sender.sendto(compressed(100 * k, 100), sock.getsockname())
    seen: set[int] = set()
    accepted = partial(rig.counters.get, "accepted_events", resource="level_ups")
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.fail_after(60):  # a hang guard
                while accepted() < 4000:
                    seen.add(accepted())
                    await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await nursery.start(
            partial(serve_datagrams, sock, rig.ingest.handle, name="udp", on_error=print)
        )
    assert any(0 < n < 4000 for n in seen), sorted(seen)
    assert rig.counters.get("received_datagrams") == 40


async def test_a_sink_that_raises_does_not_stop_the_source(tmp_path) -> None:
    """The source's last line of defence: the burst is counted (internal_error) and the next
    datagram is served."""
    path = tmp_path / "events.sock"
    sock = bind_unix_datagram(path, 0o660)
    errors: list[str] = []
    got: list[bytes] = []

    def sink(burst: list[bytes]) -> int:
        if b"poison" in burst[0]:
            raise RuntimeError("a bug")
        got.extend(burst)
        return len(burst)

    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(serve_datagrams, sock, sink, name="unix", on_error=errors.append)
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(str(path))
            sender.send(b"poison")
            await wait_all_tasks_blocked()
            sender.send(b"fine")
            await wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert errors == ["internal_error"] and got == [b"fine"]
