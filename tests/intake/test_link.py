"""The agent ↔ Forward intake process link: framed msgpack over a real socketpair, bounded,
in order, and a reader that can be cancelled mid-message and go on."""

from __future__ import annotations

import socket
import struct

import msgpack
import pytest
import trio

from traits_agent.intake import link
from traits_agent.intake.link import LinkClosed, LinkWriter, MessageReader, frame


def pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)


async def test_messages_arrive_whole_and_in_order() -> None:
    """Thousands of messages, written by the buffering writer, are read back in order."""
    a, b = pair()
    writer, reader = LinkWriter(a), MessageReader(b)
    sent = [["store", i, b"x" * (i % 3000)] for i in range(3000)]
    got = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        for message in sent:
            writer.send(message)
        writer.close()
        while len(got) < len(sent):
            got.append(await reader.next())
    assert got == sent
    a.close()
    assert await reader.next() is None  # the writer closed: the end of the link


async def test_a_reader_cancelled_mid_message_loses_nothing() -> None:
    """Half a message, a cancelled read, then the rest: the message comes out whole."""
    a, b = pair()
    reader = MessageReader(b)
    data = frame(["store", 1, b"payload"])
    await a.send(data[:7])
    with trio.move_on_after(0.05) as scope:
        await reader.next()
    assert scope.cancelled_caught
    await a.send(data[7:])
    assert await reader.next() == ["store", 1, b"payload"]


async def test_a_length_over_the_bound_closes_the_link() -> None:
    """A length past MAX_MESSAGE_BYTES is refused before a byte of it is buffered."""
    a, b = pair()
    await a.send(struct.pack(">I", link.MAX_MESSAGE_BYTES + 1))
    with pytest.raises(LinkClosed, match="over"):
        await MessageReader(b).next()


async def test_a_message_cut_by_the_end_of_the_link_is_an_error() -> None:
    a, b = pair()
    await a.send(frame(["store", 1])[:-1])
    a.close()
    with pytest.raises(LinkClosed, match="inside a message"):
        await MessageReader(b).next()


async def test_bytes_that_are_not_msgpack_are_an_error() -> None:
    a, b = pair()
    await a.send(struct.pack(">I", 1) + b"\xc1")  # 0xc1: never used in msgpack
    with pytest.raises(LinkClosed, match="not msgpack"):
        await MessageReader(b).next()


async def test_room_waits_while_the_peer_reads_nothing() -> None:
    """Over BUFFER_BYTES queued and a peer that does not read: `room` waits; once the peer
    reads, it returns."""
    a, b = pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    writer = LinkWriter(a)
    blob = b"y" * (1024 * 1024)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        for _ in range(link.BUFFER_BYTES // len(blob) + 8):
            writer.send(blob)
        await trio.sleep(0.1)  # let the writer fill the socket
        with trio.move_on_after(0.2) as scope:
            await writer.room()
        assert scope.cancelled_caught, "room() returned while the peer read nothing"
        reader = MessageReader(b)

        async def read_all() -> None:
            while True:
                await reader.next()

        nursery.start_soon(read_all)
        with trio.fail_after(10):
            await writer.room()
        nursery.cancel_scope.cancel()


def test_a_frame_is_a_length_and_msgpack() -> None:
    data = frame(["ready", 42])
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert msgpack.unpackb(data[4:]) == ["ready", 42]


def test_a_run_larger_than_a_message_is_cut_between_payloads() -> None:
    """The intake process's store messages stay near `MESSAGE_BYTES` whatever one append
    brings (a slice of 4096 events of up to 1 MiB each), so none reaches the agent's
    `MAX_MESSAGE_BYTES`; the payloads come out whole, in order, and the events are counted
    once."""
    from traits_agent.intake.forward_worker import MESSAGE_BYTES, LinkCounters, LinkIngest
    from traits_agent.queue import MAX_PAYLOAD
    from traits_agent.schema import RESOURCES

    a, _ = pair()
    writer = LinkWriter(a)
    ingest = LinkIngest(writer, LinkCounters())
    resource = RESOURCES["level_ups"]
    payloads = [bytes([65 + i % 26]) * (1000 + 997 * i % 300_000) for i in range(300)]
    payloads.append(b"z" * MAX_PAYLOAD)
    assert sum(map(len, payloads)) > 2 * link.MAX_MESSAGE_BYTES
    assert ingest.store_payloads(resource, payloads) == {"level_ups"}
    ingest.send()
    got, events = [], 0
    for data in writer._out:
        assert len(data) <= MESSAGE_BYTES + MAX_PAYLOAD + 64 * 1024, len(data)
        _, _, _, n, runs, _ = msgpack.unpackb(data[4:])
        events += n
        for name, joined, count, _crcs in runs:
            assert name == "level_ups"
            got += joined.split(b"\n")
            assert count == len(joined.split(b"\n"))
    assert got == payloads
    assert events == len(payloads)


async def test_the_writer_does_not_copy_its_whole_buffer_at_once() -> None:
    """64 MiB queued (a large Forward message while the agent was busy): the writer writes
    it out in pieces, holding at most a few MiB more than what is queued, not a second copy
    of all of it (the intake process's peak memory was the queue twice over)."""
    import tracemalloc

    a, b = pair()
    writer, reader = LinkWriter(a), MessageReader(b)
    blob = b"q" * (1024 * 1024 - 64)
    for i in range(64):
        writer.send(["store", i, blob])
    got = 0
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            writer.close()
            while got < 64:
                assert (await reader.next())[1] == got
                got += 1
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, f"{peak / 2**20:.1f} MiB over what was queued"


async def test_a_closed_writer_drops_what_is_sent_after() -> None:
    """Once the other end is gone (a write failed), `send` keeps nothing: a process on its way
    out must not buffer its peers' events for nobody."""
    a, b = pair()
    writer = LinkWriter(a)
    b.close()
    writer.send(["store", 1, b"x" * 100])
    with pytest.raises(LinkClosed):
        await writer.run()
    for _ in range(100):
        writer.send(["store", 2, b"y" * 100_000])
    assert writer.buffered <= len(frame(["store", 1, b"x" * 100]))
    await writer.room()  # returns at once: nothing will drain it
