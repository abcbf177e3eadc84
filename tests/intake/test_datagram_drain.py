"""The datagram source drains first and handles second (real sockets, real Ingest and queues):
what the kernel held is taken whole, reading goes on while slices are handled, the backlog
is bounded, bad datagrams in a batch are rejected and counted next to kept ones, and a stop
handles the backlog."""

from __future__ import annotations

import contextlib
import os
import socket
from functools import partial

import msgpack
import pytest
import trio
from structlog.testing import capture_logs

from tests.intake.test_forward import T0, Rig, level_up
from traits_agent.intake import datagram as datagram_module
from traits_agent.intake.datagram import (
    _BYTES_OBJECT,
    _PER_CHUNK,
    _PER_DATAGRAM,
    Backlog,
    bind_udp,
    bind_unix_datagram,
    serve_datagrams,
    set_receive_buffer,
)
from traits_agent.intake.mmsg import BATCH, MAX_DATAGRAM


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def event(i: int) -> bytes:
    return msgpack.packb(["level_ups", T0, level_up(i)])


def udp_drops(sock: socket.socket) -> int:
    """The kernel's drop count for this UDP socket (/proc/net/udp, matched by inode)."""
    inode = os.fstat(sock.fileno()).st_ino
    with open("/proc/net/udp") as f:
        lines = f.read().splitlines()[1:]
    for line in lines:
        fields = line.split()
        if int(fields[9]) == inode:
            return int(fields[12])
    raise AssertionError("socket not in /proc/net/udp")


def small_udp() -> socket.socket:
    """A loopback UDP socket with a small receive buffer (allowed unprivileged)."""
    sock = bind_udp("127.0.0.1", 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    return sock


async def serve_until(sock, sink, done, *, on_error=print, at_end=None, **kw) -> None:
    """Serve `sock` into `sink` until `done()` holds (checked as the source yields); then
    `at_end()` while the socket is still open, and stop."""
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(serve_datagrams, sock, sink, name="udp", on_error=on_error, **kw)
        )
        with trio.fail_after(60):  # a hang guard
            while not done():  # noqa: ASYNC110 (the condition is the source's progress)
                await trio.sleep(0.001)
        if at_end is not None:
            at_end()
        nursery.cancel_scope.cancel()


needs_proc_udp = pytest.mark.skipif(
    not os.path.exists("/proc/net/udp"), reason="needs Linux's /proc/net/udp drop counts"
)


@needs_proc_udp
async def test_a_burst_at_the_receive_buffer_limit_is_taken_whole(rig) -> None:
    """3,000 datagrams sent at a 64 KiB buffer before the source runs: the kernel keeps what
    fits (and drops the rest: the buffer was at its limit); every datagram it kept is stored."""
    sock = small_udp()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for i in range(3000):
            sender.sendto(event(i), sock.getsockname())
    held = 3000 - udp_drops(sock)
    assert 0 < held < 3000
    accepted = partial(rig.counters.get, "accepted_events", resource="level_ups")
    await serve_until(sock, rig.ingest.handle, lambda: accepted() >= held)
    assert accepted() == held
    assert rig.counters.get("received_datagrams") == held


async def test_a_burst_at_the_unix_queue_limit_is_taken_whole(rig, tmp_path) -> None:
    """A non-blocking sender sends until the socket's queue is full (max_dgram_qlen):
    everything it could send is stored."""
    path = tmp_path / "events.sock"
    sock = bind_unix_datagram(path, 0o600)
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.connect(str(path))
        sender.setblocking(False)
        try:
            while sent < 100_000:
                sender.send(event(sent))
                sent += 1
        except BlockingIOError:
            pass
    assert sent < 100_000
    accepted = partial(rig.counters.get, "accepted_events", resource="level_ups")
    await serve_until(sock, rig.ingest.handle, lambda: accepted() >= sent)
    assert accepted() == sent


async def test_bad_datagrams_in_a_batch_are_counted_and_their_neighbours_kept(
    rig, tmp_path
) -> None:
    """One read round holds good datagrams and, between them, one that is not msgpack, one
    cut short, one whose event fails validation and one over 64 KiB: the four good ones are
    stored, each bad one rejected and counted by its reason, all from one slice."""
    path = tmp_path / "events.sock"
    sock = bind_unix_datagram(path, 0o600)
    invalid = msgpack.packb(["level_ups", T0, {**level_up(9), "level": "high"}])
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sender.connect(str(path))
        for d in (
            event(0),
            b"\xc1not msgpack",
            event(1),
            event(2)[:-5],
            event(3),
            b"\x00" * (MAX_DATAGRAM + 1),
            invalid,
            event(4),
        ):
            sender.send(d)
    slices: list[int] = []

    def sink(burst: list[bytes]) -> int:
        slices.append(len(burst))
        return rig.ingest.handle(burst)

    accepted = partial(rig.counters.get, "accepted_events", resource="level_ups")
    await serve_until(sock, sink, lambda: bool(slices), on_error=rig.ingest.reject)
    assert slices == [7]  # one slice: the oversized one never reached the sink
    assert accepted() == 4
    assert sorted(item["user_id"] for item in rig.items("level_ups")) == ["0", "1", "3", "4"]
    assert rig.counters.get("protocol_errors", reason="not_msgpack") == 1
    assert rig.counters.get("protocol_errors", reason="truncated") == 1
    assert rig.counters.get("rejected_events", reason="too_large") == 1
    assert rig.counters.get("received_datagrams") == 7
    # events counted as rejected: the oversized datagram's and the invalid one's (a datagram
    # cut short holds no countable event: a protocol error only)
    assert rig.counters.by_label("rejected_events", "reason") == {"too_large": 1, "wrong_type": 1}


@needs_proc_udp
async def test_reading_goes_on_while_slices_are_handled(rig, monkeypatch) -> None:
    """Slices of 16 datagrams; each of the first 40 slices handled brings 50 more datagrams
    (a sender faster than the sink). The source reads everything the kernel holds before each
    slice, so the small kernel buffer never overflows: nothing dropped. (Before: a round read
    at most one slice's worth, so 50 in for 16 out filled the buffer and the kernel dropped.)"""
    monkeypatch.setattr(datagram_module, "DRAIN_MAX", 16)
    sock = small_udp()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(sock.getsockname())
    sent = 0

    def send(n: int) -> None:
        nonlocal sent
        for _ in range(n):
            sender.send(event(sent))
            sent += 1

    calls = 0

    def sink(burst: list[bytes]) -> int:
        nonlocal calls
        assert len(burst) <= 16
        calls += 1
        if calls <= 40:
            send(50)
        return rig.ingest.handle(burst)

    send(50)
    accepted = partial(rig.counters.get, "accepted_events", resource="level_ups")
    drops: list[int] = []
    try:
        await serve_until(
            sock,
            sink,
            lambda: calls > 40 and (accepted() >= sent or udp_drops(sock) > 0),
            at_end=lambda: drops.append(udp_drops(sock)),
        )
        assert drops == [0]
        assert accepted() == sent == 50 * 41
    finally:
        sender.close()


async def test_the_backlog_is_bounded(rig, tmp_path, monkeypatch) -> None:
    """A backlog of at most 256 bytes (two datagrams), slices of 2: the source stops reading
    when it is full (the kernel keeps the rest: a Unix sender just waits) and says so; all is
    stored in the end."""
    monkeypatch.setattr(datagram_module, "DRAIN_MAX", 2)
    path = tmp_path / "events.sock"
    sock = bind_unix_datagram(path, 0o600)
    backlog = Backlog(max_bytes=256)
    seen: list[int] = []

    def sink(burst: list[bytes]) -> int:
        seen.append(backlog.bytes + sum(len(d) + _PER_DATAGRAM for d in burst))
        return rig.ingest.handle(burst)

    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.connect(str(path))
    sent = 0
    sender.setblocking(False)
    with contextlib.suppress(BlockingIOError):  # the kernel's queue full: more than 256 bytes
        while sent < 500:
            sender.send(event(sent))
            sent += 1
    sender.setblocking(True)

    def send_rest() -> None:  # blocks while the queue is full
        for i in range(sent, 500):
            sender.send(event(i))

    accepted = partial(rig.counters.get, "accepted_events", resource="level_ups")
    try:
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, send_rest)
                await serve_until(sock, sink, lambda: accepted() >= 500, backlog=backlog)
    finally:
        sender.close()
    assert accepted() == 500
    one_read = BATCH * (len(event(499)) + _PER_DATAGRAM) + _PER_CHUNK  # the longest
    assert max(seen) <= 256 + one_read
    assert 256 <= backlog.peak <= 256 + one_read
    assert any(e["event"] == "datagram_backlog_full" for e in logs)


async def test_a_stop_handles_the_backlog(rig, tmp_path, monkeypatch) -> None:
    """Cancelled after its first slice of 16, with 484 datagrams in the backlog and the
    kernel: the stop stores them all before the source returns."""
    monkeypatch.setattr(datagram_module, "DRAIN_MAX", 16)
    sock = small_udp()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for i in range(100):
            sender.sendto(event(i), sock.getsockname())
    accepted = partial(rig.counters.get, "accepted_events", resource="level_ups")
    async with trio.open_nursery() as nursery:

        def sink(burst: list[bytes]) -> int:
            nursery.cancel_scope.cancel()
            return rig.ingest.handle(burst)

        await nursery.start(partial(serve_datagrams, sock, sink, name="udp", on_error=print))
    assert accepted() == 100


def test_the_backlog_hands_out_slices_in_order(monkeypatch) -> None:
    """Reads of 1, 5 and 3 datagrams come out in order, in slices of at most 4 datagrams and
    at most 10 bytes (one larger datagram alone); what the sink puts back comes first; an
    emptied backlog counts 0 bytes. The first read, into an empty backlog, is handed over as
    it was read (the same list); the two behind it are compacted, and counted so."""
    monkeypatch.setattr(datagram_module, "DRAIN_MAX", 4)
    monkeypatch.setattr(datagram_module, "DRAIN_MAX_BYTES", 10)
    backlog = Backlog(max_bytes=1 << 20)
    reads = [[b"a"], [b"bb", b"c", b"", b"dddddddddddd", b"e"], [b"f", b"g", b"h"]]
    for read in reads:
        backlog.add(read)
    assert backlog.bytes == 1 + _BYTES_OBJECT + 19 + 8 * _PER_DATAGRAM + 2 * _PER_CHUNK
    first = backlog.take()
    assert first is reads[0]
    second = backlog.take()
    assert second == [b"bb", b"c", b""]
    backlog.put_back(second[1:])
    slices = [first, second[:1]]
    while backlog:
        slices.append(backlog.take())
    assert slices == [[b"a"], [b"bb"], [b"c", b""], [b"dddddddddddd"], [b"e", b"f", b"g", b"h"]]
    assert backlog.bytes == 0 and not backlog.take()


def test_a_read_into_an_empty_backlog_is_compacted_only_if_it_is_over_a_slice(
    monkeypatch,
) -> None:
    """A read of more than a slice's datagrams or bytes into an empty backlog is compacted
    and cut into slices, as every read behind others is."""
    monkeypatch.setattr(datagram_module, "DRAIN_MAX", 4)
    monkeypatch.setattr(datagram_module, "DRAIN_MAX_BYTES", 10)
    for read, slices in [
        ([b"a", b"b", b"c", b"d", b"e"], [[b"a", b"b", b"c", b"d"], [b"e"]]),
        ([b"aaaaaa", b"bbbbbb"], [[b"aaaaaa"], [b"bbbbbb"]]),
    ]:
        backlog = Backlog(max_bytes=1 << 20)
        assert backlog.add(read) == sum(map(len, read)) + len(read) * _PER_DATAGRAM + _PER_CHUNK
        got = []
        while backlog:
            got.append(backlog.take())
        assert got == slices
        assert backlog.bytes == 0


def test_a_privileged_agent_gets_the_receive_buffer_past_rmem_max() -> None:
    """With CAP_NET_ADMIN, SO_RCVBUFFORCE gives what listen.receive_buffer asks even above
    net.core.rmem_max (as systemd's ReceiveBuffer= does). Before: Python's socket module has
    no SO_RCVBUFFORCE, so the agent silently got rmem_max."""
    if os.geteuid() != 0:
        pytest.skip("needs CAP_NET_ADMIN")
    with open("/proc/sys/net/core/rmem_max") as f:
        rmem_max = int(f.read())
    wanted = 2 * rmem_max
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert set_receive_buffer(sock, wanted, "udp") == wanted
