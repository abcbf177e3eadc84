"""The Forward-protocol stream source over real Unix and TCP sockets, into real DiskQueues
through a real Ingest; acks checked against the queues' fsync state."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import stat
import struct
from collections.abc import Callable
from functools import partial
from pathlib import Path

import msgpack
import pytest
import trio
from structlog.testing import capture_logs
from trio.testing import wait_all_tasks_blocked

from traits_agent.intake.durability import AckGate
from traits_agent.intake.forward import (
    ForwardLimits,
    ForwardServer,
    bind_forward_tcp,
    bind_forward_unix,
)
from traits_agent.intake.ingest import Ingest
from traits_agent.observe.metrics import Counters
from traits_agent.queue import DiskQueue
from traits_agent.schema import RESOURCES

T0 = 1546355045  # 2019-01-01 15:04:05 UTC
#: a missing answer fails a test after this long instead of hanging it
GUARD_S = 10


def level_up(user: int, level: int = 10) -> dict:
    return {"timestamp": "2019-01-01 15:04:05", "user_id": str(user), "level": level}


def event_time(seconds: int, nanoseconds: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack(">II", seconds, nanoseconds))


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


class StubLane:
    """What Ingest needs of a lane: the queue, and a wake-up call (counted)."""

    def __init__(self, queue: DiskQueue) -> None:
        self.queue = queue
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1


class Rig:
    """Real queues (one per resource), a real Ingest, and a AckGate the test syncs by hand
    (`sync`) or lets `autosync` sync whenever asked, as the agent's Syncer does."""

    def __init__(self, directory: Path, fsync: str = "interval") -> None:
        self.queues = {
            name: DiskQueue.open(directory / "queue" / name, fsync=fsync) for name in RESOURCES
        }
        self.lanes = {name: StubLane(q) for name, q in self.queues.items()}
        self.counters = Counters()
        self.ingest = Ingest(self.lanes, self.counters)
        self.sync_requests = 0
        self.prompts = 0
        self.wanted = trio.Event()
        self.durability = AckGate(
            self.queues, fsync=fsync, request_sync=self._request, request_prompt_sync=self._prompt
        )

    def _request(self) -> None:
        self.sync_requests += 1
        self.wanted.set()

    def _prompt(self) -> None:
        self.prompts += 1
        self.wanted.set()

    def sync(self) -> None:
        for queue in self.queues.values():
            queue.sync()
        self.durability.synced()

    async def autosync(self) -> None:
        while True:
            await self.wanted.wait()
            self.wanted = trio.Event()
            self.sync()

    def items(self, resource: str) -> list[dict]:
        batch = self.queues[resource].read_batch(1000, 1 << 24)
        return [json.loads(p) for p in batch.payloads] if batch else []

    def closed(self, reason: str) -> int:
        return self.counters.total("forward_connections_closed", reason=reason)

    def close(self) -> None:
        for queue in self.queues.values():
            queue.close()


@pytest.fixture
def rig(tmp_path: Path):
    r = Rig(tmp_path)
    yield r
    r.close()


async def start_server(
    nursery: trio.Nursery, rig: Rig, transport: str, tmp_path: Path, **limits
) -> tuple[ForwardServer, Callable]:
    """Serve on a fresh socket of `transport`; returns the server and a `connect()`."""
    server = ForwardServer(rig.ingest, rig.durability, limits=ForwardLimits(**limits))
    if transport == "unix":
        path = tmp_path / "run" / "forward.sock"
        sock = bind_forward_unix(path, 0o660)
        await nursery.start(partial(server.serve, sock, name="forward_unix"))

        async def connect():
            return await trio.open_unix_socket(str(path))

    else:
        sock = bind_forward_tcp("127.0.0.1", 0)
        host, port = await nursery.start(partial(server.serve, sock, name="forward"))

        async def connect():
            return await trio.open_tcp_stream(host, port)

    return server, connect


async def acks(stream: trio.SocketStream, n: int) -> list[object]:
    """The next `n` values the server sends."""
    unpacker = msgpack.Unpacker()
    got: list[object] = []
    with trio.fail_after(GUARD_S):
        while len(got) < n:
            data = await stream.receive_some(4096)
            assert data, f"connection closed after {got}"
            unpacker.feed(data)
            got.extend(unpacker)
    return got


async def closed_by_server(stream: trio.SocketStream) -> bool:
    """True when the server closed the connection (EOF or reset), draining anything first."""
    try:
        with trio.fail_after(GUARD_S):
            while True:
                if not await stream.receive_some(4096):
                    return True
    except trio.BrokenResourceError:
        return True


# --------------------------------------------------------------------------- the four forms


def forms(chunk: str) -> dict[str, tuple[bytes, list[dict]]]:
    """Each entry form, carrying `option.chunk`, and the records it holds."""
    one = level_up(1)
    two = [level_up(2), level_up(3, 11)]
    packed = b"".join(pack([T0, r]) for r in two)
    return {
        "message": (pack(["level_ups", T0, one, {"chunk": chunk}]), [one]),
        "forward": (pack(["game.level_ups", [[T0, r] for r in two], {"chunk": chunk}]), two),
        "packed": (pack(["level-ups", packed, {"chunk": chunk, "size": 2}]), two),
        "gzip": (
            pack(["level_ups", gzip.compress(packed), {"chunk": chunk, "compressed": "gzip"}]),
            two,
        ),
    }


@pytest.mark.parametrize("form", ["message", "forward", "packed", "gzip"])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_each_form_lands_in_the_queue_and_is_acked(
    nursery, rig, tmp_path, transport, form
) -> None:
    """Message, Forward, PackedForward and gzip CompressedPackedForward, over Unix and TCP,
    are stored and then acked with the chunk they carried."""
    nursery.start_soon(rig.autosync)
    _, connect = await start_server(nursery, rig, transport, tmp_path)
    data, records = forms("Y2h1bmstMQ==")[form]
    async with await connect() as stream:
        await stream.send_all(data)
        assert await acks(stream, 1) == [{"ack": "Y2h1bmstMQ=="}]
    assert rig.items("level_ups") == records
    assert rig.queues["level_ups"].durable_seq == len(records)
    assert rig.lanes["level_ups"].notified >= 1
    assert rig.counters.get("accepted_events", resource="level_ups") == len(records)


async def test_a_message_written_byte_by_byte_decodes(nursery, rig, tmp_path) -> None:
    """A stream cut into one-byte writes (plus heartbeats) decodes; the EventTime becomes the
    record's timestamp when the record has none."""
    nursery.start_soon(rig.autosync)
    _, connect = await start_server(nursery, rig, "tcp", tmp_path)
    record = {"user_id": "7", "level": 3}
    data = (
        pack(None)
        + pack(["12traits.level_ups", event_time(T0, 250_000_000), record])
        + pack(None)
        + pack(["level_ups", [[T0 + 1, level_up(8)]], {"chunk": "c"}])
    )
    async with await connect() as stream:
        for i in range(len(data)):
            await stream.send_all(data[i : i + 1])
            await wait_all_tasks_blocked()  # the server takes each byte on its own
        assert await acks(stream, 1) == [{"ack": "c"}]
    assert rig.items("level_ups") == [
        {"timestamp": "2019-01-01 15:04:05", "user_id": "7", "level": 3},
        level_up(8),
    ]


# --------------------------------------------------------------------------- acks


async def test_ack_is_sent_only_after_the_fsync(nursery, rig, tmp_path) -> None:
    """The records are written to the OS at once, but the ack waits for the sync hook."""
    _, connect = await start_server(nursery, rig, "unix", tmp_path)
    queue = rig.queues["level_ups"]
    got: list[object] = []
    async with await connect() as stream:

        async def read_ack() -> None:
            got.extend(await acks(stream, 1))

        nursery.start_soon(read_ack)
        await stream.send_all(pack(["level_ups", [[T0, level_up(1)]], {"chunk": "k1"}]))
        await wait_all_tasks_blocked()
        assert got == []
        assert (queue.written_seq, queue.durable_seq) == (1, 0)  # flushed, not fsynced
        assert rig.sync_requests == 1  # and an fsync was asked for
        assert rig.prompts == 1  # now: an ack waits for it
        rig.durability.synced()  # a sync round that did not cover it changes nothing
        await wait_all_tasks_blocked()
        assert got == []

        rig.sync()
        await wait_all_tasks_blocked()
        assert got == [{"ack": "k1"}]
        assert queue.durable_seq == 1


async def test_acks_come_in_order_while_reading_goes_on(nursery, rig, tmp_path) -> None:
    """Pipelined chunks are read and stored before the first fsync and acked in order; with
    a pending-ack limit of one, reading pauses while two acks wait (back-pressure)."""
    _, connect = await start_server(nursery, rig, "tcp", tmp_path, max_pending_acks=1)
    async with await connect() as stream:
        for i in range(5):
            await stream.send_all(pack(["level_ups", T0, level_up(i), {"chunk": f"c{i}"}]))
            await wait_all_tasks_blocked()
        # one ack waits in the ack task, one in the channel, the reader holds the third
        assert rig.queues["level_ups"].written_seq == 3
        nursery.start_soon(rig.autosync)
        rig.wanted.set()
        assert await acks(stream, 5) == [{"ack": f"c{i}"} for i in range(5)]
    assert [r["user_id"] for r in rig.items("level_ups")] == ["0", "1", "2", "3", "4"]


async def test_durability_waits_for_every_queue_touched(rig) -> None:
    """A mark over two queues is reached only when both have been fsynced past it."""
    durability = rig.durability
    for name in ("level_ups", "logins"):
        assert rig.queues[name].append(b"{}")
        rig.queues[name].flush()
    mark = durability.mark(["level_ups", "logins"])
    done = trio.Event()

    async def waiter() -> None:
        await durability.wait(mark)
        done.set()

    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            rig.queues["level_ups"].sync()
            durability.synced()
            await wait_all_tasks_blocked()
            assert not done.is_set()
            rig.queues["logins"].sync()
            durability.synced()
    assert done.is_set()


async def test_events_failing_the_schema_are_counted_each_and_acked(nursery, rig, tmp_path) -> None:
    """Resending cannot fix an event that parses but fails the schema: each is counted, the
    chunk acked (at once when nothing of it was stored), and the connection stays usable."""
    _, connect = await start_server(nursery, rig, "unix", tmp_path)
    bad = [
        pack(["level_ups", [[T0, {"level": 1}], [T0, {"level": 2}]], {"chunk": "b1"}]),
        pack(["nonsense", T0, level_up(1), {"chunk": "b2"}]),  # no such resource
    ]
    async with await connect() as stream:
        await stream.send_all(b"".join(bad))
        assert await acks(stream, 2) == [{"ack": "b1"}, {"ack": "b2"}]
        await stream.send_all(pack(["level_ups", T0, level_up(1)]))
        await wait_all_tasks_blocked()
    rejected = rig.counters.by_label("rejected_events", "reason")
    assert rejected.pop("unknown_resource") == 1
    assert sum(rejected.values()) == 2  # the two records without a user_id
    assert rig.counters.total("received_events") == 4
    assert rig.counters.total("protocol_errors") == 0
    assert rig.items("level_ups") == [level_up(1)]


@pytest.mark.parametrize(
    ("entry", "reason", "events"),
    [
        (["level_ups", {"when": "now"}, level_up(1), {"chunk": "x"}], "bad_time", 1),
        (
            ["level_ups", [[T0, level_up(1)], [[T0, "meta"], level_up(2)]], {"chunk": "x"}],
            "bad_time",
            2,
        ),
        (["", [[T0, level_up(1)]] * 3, {"chunk": "x"}], "bad_tag", 3),
        (["level_ups", "packed?", level_up(1), {"chunk": "x"}], "not_an_entry", 0),
        (
            ["level_ups", gzip.compress(b"\xc1"), {"chunk": "x", "compressed": "gzip"}],
            "bad_packed",
            1,
        ),
    ],
)
async def test_an_entry_that_does_not_parse_is_never_acked(
    nursery, rig, tmp_path, entry, reason, events
) -> None:
    """An entry the agent cannot parse as the protocol (a newer client's shape, say) is not
    acked: the chunks before it are stored and acked, then the connection closes, so a client
    with acks keeps the chunk and sends it again. Counted once as a protocol error, per event
    as rejected and received, and logged as an error naming the likely cause."""
    nursery.start_soon(rig.autosync)
    _, connect = await start_server(nursery, rig, "tcp", tmp_path)
    with capture_logs() as logs:
        async with await connect() as stream:
            await stream.send_all(
                pack(["level_ups", T0, level_up(7), {"chunk": "good"}])
                + pack(entry)
                + pack(["level_ups", T0, level_up(8), {"chunk": "after"}])
            )
            assert await acks(stream, 1) == [{"ack": "good"}]
            assert await closed_by_server(stream)
    assert rig.items("level_ups") == [level_up(7)]
    assert rig.counters.get("protocol_errors", reason=reason) == 1
    assert rig.counters.get("rejected_events", reason=reason) == events
    assert rig.counters.total("received_events") == 1 + events
    assert rig.counters.total("forward_acks") == 1
    assert rig.closed(reason) == 1
    [line] = [e for e in logs if e["event"] == "message_rejected"]
    assert line["log_level"] == "error"
    assert line["reason"] == reason and line["events"] == events
    assert "hint" in line and line["peer"].startswith("127.0.0.1:")


async def test_with_fsync_never_the_ack_follows_the_write(nursery, tmp_path) -> None:
    """fsync="never": no durability promise, the ack is sent once the OS has the records."""
    rig = Rig(tmp_path, fsync="never")
    try:
        _, connect = await start_server(nursery, rig, "unix", tmp_path)
        async with await connect() as stream:
            await stream.send_all(pack(["level_ups", T0, level_up(1), {"chunk": "n"}]))
            assert await acks(stream, 1) == [{"ack": "n"}]
        assert rig.queues["level_ups"].written_seq == 1
        assert rig.queues["level_ups"].durable_seq == 0
    finally:
        rig.close()


async def test_messages_without_chunk_get_no_answer(nursery, rig, tmp_path) -> None:
    """Without option.chunk nothing is sent back; heartbeats (nil) are ignored."""
    _, connect = await start_server(nursery, rig, "unix", tmp_path)
    async with await connect() as stream:
        await stream.send_all(pack(None) + pack(["level_ups", T0, level_up(1)]) + pack(None))
        await wait_all_tasks_blocked()
        with trio.move_on_after(0.05):
            assert await stream.receive_some(100) == b"never"
    assert rig.items("level_ups") == [level_up(1)]
    assert rig.counters.total("rejected_events") == 0


# --------------------------------------------------------------------------- misbehaving peers


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"\xc1\x00\x00", "not_msgpack"),  # 0xc1 is never valid msgpack
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not_an_entry"),  # valid msgpack ints
        (pack({"ack": "x"}), "not_an_entry"),
        (b'["level_ups", nope]', "not_json"),  # a JSON connection (first byte [)
        (b'{"tag": "level_ups"}', "not_an_entry"),  # JSON, but not an entry
    ],
)
async def test_garbage_closes_only_that_connection(nursery, rig, tmp_path, garbage, reason) -> None:
    """A peer that does not speak the protocol is cut off and counted; a connection opened
    before it and one opened after it both keep working."""
    nursery.start_soon(rig.autosync)
    _, connect = await start_server(nursery, rig, "unix", tmp_path)
    async with await connect() as before, await connect() as bad:
        await bad.send_all(garbage)
        assert await closed_by_server(bad)
        await before.send_all(pack(["level_ups", T0, level_up(1), {"chunk": "a"}]))
        assert await acks(before, 1) == [{"ack": "a"}]
    async with await connect() as after:
        await after.send_all(pack(["level_ups", T0, level_up(2), {"chunk": "b"}]))
        assert await acks(after, 1) == [{"ack": "b"}]
    assert rig.counters.get("protocol_errors", reason=reason) == 1
    assert rig.counters.total("rejected_events") == 0  # no event could be told apart
    assert rig.closed(reason) == 1
    assert len(rig.items("level_ups")) == 2


async def test_garbage_after_good_messages_keeps_them(nursery, rig, tmp_path) -> None:
    """What came before the bad bytes in the same write is stored."""
    _, connect = await start_server(nursery, rig, "tcp", tmp_path)
    async with await connect() as stream:
        await stream.send_all(pack(["level_ups", T0, level_up(1)]) + b"\xc1")
        assert await closed_by_server(stream)
    assert rig.items("level_ups") == [level_up(1)]
    assert rig.closed("not_msgpack") == 1


async def test_a_value_over_the_buffer_limit_closes_the_connection(nursery, rig, tmp_path) -> None:
    """max_buffer_size bounds one message; a bigger one is refused and counted."""
    _, connect = await start_server(nursery, rig, "tcp", tmp_path, max_buffer_size=4096)
    async with await connect() as stream:
        small = pack(["level_ups", T0, level_up(1)])  # in the same write as the big one
        with contextlib.suppress(trio.BrokenResourceError):  # a reset mid-write is fine
            await stream.send_all(small + pack(["level_ups", b"x" * 20000]))
        assert await closed_by_server(stream)
    assert rig.counters.get("protocol_errors", reason="too_large") == 1
    assert rig.closed("too_large") == 1
    assert rig.items("level_ups") == [level_up(1)]


async def test_a_bug_met_by_one_connection_closes_only_that_one(
    nursery, rig, tmp_path, monkeypatch
) -> None:
    """An exception of ours while storing is logged and closes that connection; the listener
    and the other connections go on (a resent poison chunk cannot crash-loop the agent)."""
    nursery.start_soon(rig.autosync)
    _, connect = await start_server(nursery, rig, "unix", tmp_path)
    store = rig.ingest.store_entries

    def store_or_fail(entries, now):
        if any(e.tag == "poison.level_ups" for e in entries):
            raise RuntimeError("a bug")
        return store(entries, now)

    monkeypatch.setattr(rig.ingest, "store_entries", store_or_fail)
    async with await connect() as good, await connect() as bad:
        await bad.send_all(pack(["poison.level_ups", T0, level_up(1), {"chunk": "p"}]))
        assert await closed_by_server(bad)
        await good.send_all(pack(["level_ups", T0, level_up(2), {"chunk": "g"}]))
        assert await acks(good, 1) == [{"ack": "g"}]
    assert rig.closed("internal_error") == 1
    assert rig.items("level_ups") == [level_up(2)]


async def test_connections_over_the_limit_are_closed(nursery, rig, tmp_path) -> None:
    """With max_connections=1 a second concurrent connection is closed at once; once the
    first is gone a new one is served."""
    server, connect = await start_server(nursery, rig, "unix", tmp_path, max_connections=1)
    async with await connect():
        await wait_all_tasks_blocked()
        assert server.connections == 1
        async with await connect() as second:
            assert await closed_by_server(second)
        assert rig.closed("too_many_connections") == 1
    await wait_all_tasks_blocked()
    assert server.connections == 0
    nursery.start_soon(rig.autosync)
    async with await connect() as third:
        await third.send_all(pack(["level_ups", T0, level_up(1), {"chunk": "3"}]))
        assert await acks(third, 1) == [{"ack": "3"}]


async def test_an_idle_connection_is_closed_after_the_timeout(
    autojump_clock, nursery, rig, tmp_path
) -> None:
    """No bytes and no acks for idle_timeout_s: closed, counted; activity resets the clock."""
    _, connect = await start_server(nursery, rig, "unix", tmp_path, idle_timeout_s=30.0)
    start = trio.current_time()
    async with await connect() as stream:
        await trio.sleep(20)
        await stream.send_all(pack(None))  # a heartbeat counts as activity
        with trio.fail_after(3600):
            assert await stream.receive_some(100) == b""  # closed by the server
    assert trio.current_time() - start == pytest.approx(50.0)
    assert rig.closed("idle_timeout") == 1


async def test_shutdown_stores_what_the_kernel_already_holds(rig, tmp_path) -> None:
    """Bytes a client wrote before the listener was cancelled are read and stored."""
    path = tmp_path / "forward.sock"
    server = ForwardServer(rig.ingest, rig.durability)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(server.serve, bind_forward_unix(path, 0o600), name="u"))
            client.connect(str(path))
            await wait_all_tasks_blocked()  # accepted, and its reader waits for data
            client.sendall(pack(["level_ups", [[T0, level_up(i)] for i in range(100)]]))
            nursery.cancel_scope.cancel()  # no checkpoint in between: not read yet
    finally:
        client.close()
    assert len(rig.items("level_ups")) == 100
    assert rig.closed("shutdown") == 1


# --------------------------------------------------------------------------- binding


def test_unix_socket_gets_its_mode_and_replaces_a_stale_file(tmp_path) -> None:
    path = tmp_path / "sub" / "forward.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.parent.mkdir()
    stale.bind(str(path))
    stale.close()  # the file stays: a crashed run
    sock = bind_forward_unix(path, 0o640)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(path))  # it listens
    finally:
        sock.close()


def test_a_live_unix_socket_or_a_regular_file_is_left_alone(tmp_path) -> None:
    path = tmp_path / "forward.sock"
    live = bind_forward_unix(path, 0o600)
    try:
        with pytest.raises(OSError, match="another process"):
            bind_forward_unix(path, 0o600)
        assert path.exists()
    finally:
        live.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        bind_forward_unix(path, 0o600)
    assert path.read_text() == "not a socket"


def test_tcp_helper_binds_loopback_and_listens() -> None:
    sock = bind_forward_tcp("127.0.0.1", 0)
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        sock.close()


# --------------------------------------------------------------------------- a real client


@pytest.mark.parametrize("module", ["fluent.sender", "fluent.asyncsender"])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_fluent_logger_python_feeds_the_agent(
    nursery, rig, tmp_path, transport, module
) -> None:
    """fluent-logger's FluentSender (blocking, in a thread) and its asyncsender (a background
    thread and queue, flushed at close) with nanosecond EventTimes."""
    sender_module = pytest.importorskip(module)
    server = ForwardServer(rig.ingest, rig.durability)
    if transport == "unix":
        path = tmp_path / "forward.sock"
        await nursery.start(partial(server.serve, bind_forward_unix(path, 0o600), name="u"))
        where = {"host": f"unix://{path}"}
    else:
        host, port = await nursery.start(
            partial(server.serve, bind_forward_tcp("127.0.0.1", 0), name="t")
        )
        where = {"host": host, "port": port}

    def emit() -> list[bool]:
        sender = sender_module.FluentSender("game", nanosecond_precision=True, **where)
        try:
            sent = [sender.emit("level_ups", {"user_id": str(i), "level": i}) for i in range(50)]
            sent.append(sender.emit_with_time("logins", T0, {"user_id": "1", "level": 2}))
            return sent
        finally:
            sender.close()

    assert all(await trio.to_thread.run_sync(emit))
    await wait_all_tasks_blocked()
    items = rig.items("level_ups")
    assert [(r["user_id"], r["level"]) for r in items] == [(str(i), i) for i in range(50)]
    assert all(len(r["timestamp"]) == 19 for r in items)
    assert rig.items("logins") == [{"timestamp": "2019-01-01 15:04:05", "user_id": "1", "level": 2}]
    assert rig.counters.total("rejected_events") == 0
