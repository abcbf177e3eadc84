"""The game-server client against real sockets: what arrives, and that trouble never raises."""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import traits_agent_client
from traits_agent_client import where

from traits_agent import paths, schema
from traits_agent.client import (
    DEFAULT_UDP_DATAGRAM,
    DEFAULT_UNIX_DATAGRAM,
    Client,
    pack_time,
    resolve_resource,
)
from traits_agent.intake import wire
from traits_agent.intake.wire import Entry, decode_datagram
from traits_agent.schema import normalize, resolve_tag

#: a hang guard for blocking receives, never a speed assertion
GUARD_S = 30.0
CLIENT_SRC = Path(__file__).resolve().parent.parent / "clients" / "python"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory: a Unix socket path must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ta-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def unix_receiver(sock_dir: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_dir / "events.sock"))
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.fixture
def udp_receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(GUARD_S)
    yield sock
    sock.close()


@pytest.fixture
def make_client() -> Iterator[Any]:
    """Client(...), closed (without waiting) after the test."""
    made: list[Client] = []

    def make(*args: Any, **kw: Any) -> Client:
        made.append(Client(*args, **kw))
        return made[-1]

    yield make
    for client in made:
        client.close(timeout=0)


@pytest.fixture
def unix_client(make_client: Any, unix_receiver: socket.socket) -> Any:
    """A client of the test's Unix receiver: unix_client(**options). The flusher thread is
    kept out of the way (flush_interval 1 h) unless a test asks for it."""

    def make(**kw: Any) -> Client:
        kw.setdefault("flush_interval", 3600)
        return make_client(unix_receiver.getsockname(), **kw)

    return make


def drain(receiver: socket.socket) -> list[bytes]:
    """Every datagram queued on a non-blocking receiver."""
    out = []
    while True:
        try:
            out.append(receiver.recv(70_000))
        except BlockingIOError:
            return out


def receive_events(receiver: socket.socket, count: int) -> list[Entry]:
    """Block (hang guard GUARD_S per datagram) until `count` events have arrived."""
    entries: list[Entry] = []
    receiver.settimeout(GUARD_S)
    try:
        while len(entries) < count:
            entries += entries_of(without_fillers([receiver.recv(70_000)]))
    finally:
        receiver.setblocking(False)
    return entries


def entries_of(datagrams: list[bytes]) -> list[Entry]:
    out = []
    for data in datagrams:
        result = decode_datagram(data)
        assert result.errors == []
        out.extend(result.entries)
    return out


FILLER = b"\xc0"  # nil: a datagram the agent would skip


def fill_queue(receiver_path: str) -> list[socket.socket]:
    """Senders that have filled the receiver's kernel queue: a new sender's first datagram
    gets EAGAIN. (Several: one sender's own buffer may fill first, and the host's
    net.unix.max_dgram_qlen may be 10 or 512.)"""
    fillers: list[socket.socket] = []
    for _ in range(1000):  # a bound, never reached
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        filler.connect(receiver_path)
        filler.setblocking(False)
        fillers.append(filler)
        sent = 0
        try:
            while True:
                filler.send(FILLER)
                sent += 1
        except BlockingIOError:
            if sent == 0:
                return fillers
    raise AssertionError("the receiver's queue never filled")


def close_all(sockets: list[socket.socket]) -> None:
    for s in sockets:
        s.close()


def without_fillers(datagrams: list[bytes]) -> list[bytes]:
    return [d for d in datagrams if d != FILLER]


# --------------------------------------------------------------------------- what arrives


def test_default_packs_events_into_forward_entries(
    unix_receiver: socket.socket, unix_client: Any
) -> None:
    """By default events wait in one datagram, one Forward entry per resource, order kept."""
    client = unix_client()
    for i in range(10):
        assert client.level_up("u", i, time=1000 + i)
        assert client.action("u", str(i), "x", time=2000)
    assert drain(unix_receiver) == []
    assert client.flush() is True
    (datagram,) = drain(unix_receiver)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(datagram)
    forms = list(unpacker)
    assert [(f[0], len(f[1])) for f in forms] == [("level_ups", 10), ("actions", 10)]
    entries = entries_of([datagram])
    assert [e.record["level"] for e in entries[:10]] == list(range(10))
    assert [e.time for e in entries[:10]] == [1000.0 + i for i in range(10)]
    assert (client.sent, client.dropped, client.pending) == (20, 0, 0)


def test_unbuffered_emit_arrives_as_a_message(
    unix_receiver: socket.socket, unix_client: Any
) -> None:
    """buffered=False: one emit is one datagram holding one Message entry."""
    client = unix_client(buffered=False)
    assert client.emit("level_ups", {"user_id": "1001", "level": 10}, time=1546355045.5)
    (datagram,) = drain(unix_receiver)
    assert msgpack.unpackb(datagram, raw=False)[0] == "level_ups"
    assert decode_datagram(datagram).entries == [
        Entry("level_ups", 1546355045.5, {"user_id": "1001", "level": 10})
    ]
    assert (client.sent, client.dropped) == (1, 0)


def test_event_time_defaults_to_now(unix_receiver: socket.socket, unix_client: Any) -> None:
    """Without time=, the event carries the emit time in whole seconds."""
    before = int(time.time())
    client = unix_client()
    client.emit("actions", {"user_id": "1"})
    client.flush()
    (entry,) = entries_of(drain(unix_receiver))
    assert before <= entry.time <= time.time()
    assert entry.time == int(entry.time)


@pytest.mark.parametrize(
    ("name", "tag"),
    [("level-ups", "level_ups"), ("12traits.actions", "actions"), ("Users", "logins")],
)
def test_emit_resolves_resource_names(
    unix_receiver: socket.socket, name: str, tag: str, unix_client: Any
) -> None:
    """emit takes any name the agent resolves, and sends the canonical one."""
    client = unix_client()
    client.emit(name, {})
    client.flush()
    assert entries_of(drain(unix_receiver))[0].tag == tag


def test_resource_names_match_the_agent() -> None:
    """The client's inlined resource table and alias rule are the agent's."""
    assert set(schema.RESOURCES) == traits_agent_client.RESOURCES
    names = [*schema.RESOURCES, "users", "Users", "level-ups", "game.Level-Ups", "x.y.items"]
    for name in [*names, "levelups", "", "12traits.", "user", "actions.x"]:
        found = resolve_tag(name)
        assert resolve_resource(name) == (found.name if found else None), name


@pytest.mark.parametrize(
    "t", [None, 0, 5, 1546355045.5, 1546355045.0, 1.9999999999, -1.5, 2.0**32 + 0.5, math.nan]
)
def test_pack_time_matches_the_agent(t: float | None) -> None:
    """The client's inlined EventTime packing is the agent's (wire.pack_time)."""
    ours, agents = pack_time(t), wire.pack_time(t)
    if isinstance(t, float) and math.isnan(t):
        assert math.isnan(ours) and math.isnan(agents)  # type: ignore[arg-type]
    else:
        assert ours == agents


TYPED = [
    (
        lambda c: c.action("1001", "2002", "buy_item", [{"key": "item_id", "value": "3003"}]),
        "actions",
        {
            "user_id": "1001",
            "action_id": "2002",
            "action_name": "buy_item",
            "action_params": [{"key": "item_id", "value": "3003"}],
        },
    ),
    (
        lambda c: c.action(1001, 2002, "buy_item", {"item_id": 3003}, "2019-01-01 15:04:05"),
        "actions",
        {
            "user_id": 1001,
            "action_id": 2002,
            "action_name": "buy_item",
            "action_params": {"item_id": 3003},
            "timestamp": "2019-01-01 15:04:05",
        },
    ),
    (
        lambda c: c.login("1001", level=10, country="US", register_date=dt.date(2018, 11, 14)),
        "logins",
        {"user_id": "1001", "level": 10, "country": "US", "register_date": "2018-11-14"},
    ),
    (
        lambda c: c.purchase("1001", "2002", 1, 25.5, platform="Steam"),
        "purchases",
        {"user_id": "1001", "item_id": "2002", "count": 1, "price": 25.5, "platform": "Steam"},
    ),
    (
        lambda c: c.virtual_purchase("1001", "2002", 1, 25.5, "gold"),
        "virtual_purchases",
        {
            "user_id": "1001",
            "item_id": "2002",
            "count": 1,
            "virtual_price": 25.5,
            "currency": "gold",
        },
    ),
    (
        lambda c: c.level_up(
            "1001",
            10,
            timestamp=dt.datetime(2019, 1, 1, 16, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1))),
        ),
        "level_ups",
        {"user_id": "1001", "level": 10, "timestamp": "2019-01-01 15:04:05"},
    ),
    (
        lambda c: c.item("1001", 25.5, "USD", "Axe", type="weapon"),
        "items",
        {"item_id": "1001", "price": 25.5, "currency": "USD", "name": "Axe", "type": "weapon"},
    ),
    (
        lambda c: c.social_dynamic("1001", "1002", "linked", "friend", clan="x"),
        "social_dynamics",
        {
            "user_id": "1001",
            "target_user_id": "1002",
            "connection": "linked",
            "interaction": "friend",
            "clan": "x",
        },
    ),
]


@pytest.mark.parametrize(
    ("call", "tag", "record"), TYPED, ids=[f"{t}-{i}" for i, (_, t, _) in enumerate(TYPED)]
)
@pytest.mark.parametrize("buffered", [True, False])
def test_typed_methods(
    unix_receiver: socket.socket,
    call: Any,
    tag: str,
    record: dict[str, Any],
    buffered: bool,
    unix_client: Any,
) -> None:
    """Each typed method sends its resource's fields, None left out, and the agent accepts it."""
    client = unix_client(buffered=buffered)
    assert call(client) is True
    client.flush()
    (entry,) = entries_of(drain(unix_receiver))
    assert (entry.tag, entry.record) == (tag, record)
    resource = resolve_tag(entry.tag)
    assert resource is not None
    normalize(resource, entry.record, entry.time)


def test_udp(udp_receiver: socket.socket, make_client: Any) -> None:
    """A UDP client, addressed as "host:port" or (host, port), delivers the same entries;
    loopback takes large datagrams, a remote address the MTU-sized ones."""
    host, port = udp_receiver.getsockname()
    for address in (f"{host}:{port}", (host, port)):
        client = make_client(udp=address, flush_interval=3600)
        assert client.level_up("1", 2, time=5)
        client.flush()
        assert decode_datagram(udp_receiver.recv(70_000)).entries == [
            Entry("level_ups", 5.0, {"user_id": "1", "level": 2})
        ]
        assert client.max_datagram == DEFAULT_UNIX_DATAGRAM
    assert make_client(udp="192.0.2.1:24225").max_datagram == DEFAULT_UDP_DATAGRAM


def test_playfab_list_record(unix_receiver: socket.socket, unix_client: Any) -> None:
    """playfab events may be a list of maps."""
    client = unix_client()
    client.emit("playfab", [{"EventName": "a"}])
    client.flush()
    assert entries_of(drain(unix_receiver))[0].record == [{"EventName": "a"}]


@pytest.mark.skipif(sys.platform != "linux", reason="abstract sockets are Linux-only")
def test_abstract_socket(make_client: Any) -> None:
    """ "@name" addresses a socket in the abstract namespace."""
    name = f"traits-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.setblocking(False)
    try:
        client = make_client("@" + name)
        assert client.emit("actions", {})
        client.flush()
        assert len(drain(receiver)) == 1
    finally:
        receiver.close()


# --------------------------------------------------------------------------- when events leave


def test_events_leave_without_flush(unix_receiver: socket.socket, unix_client: Any) -> None:
    """A game loop that never calls flush() still gets its events out: the flusher thread
    sends them once flush_interval has passed."""
    client = unix_client(flush_interval=0.05)
    client.level_up("1", 1)
    client.level_up("1", 2)
    assert [e.record["level"] for e in receive_events(unix_receiver, 2)] == [1, 2]
    assert client.sent == 2
    client.level_up("1", 3)  # and again after the buffer went empty
    assert [e.record["level"] for e in receive_events(unix_receiver, 1)] == [3]


def test_full_datagram_leaves_at_once(unix_receiver: socket.socket, unix_client: Any) -> None:
    """Without flush(), a datagram leaves as soon as it is full; none exceeds max_datagram."""
    client = unix_client(max_datagram=4096)
    for i in range(1000):
        client.level_up(str(i), i)
    datagrams = drain(unix_receiver)
    assert len(datagrams) >= 5 and all(len(d) <= 4096 for d in datagrams)
    assert len(entries_of(datagrams)) == client.sent == 1000 - client.pending
    client.flush()
    levels = [e.record["level"] for e in entries_of(datagrams + drain(unix_receiver))]
    assert levels == list(range(1000))


def test_default_datagram_sizes_fit_the_agent() -> None:
    """Datagrams stay under the agent's 64 KiB limit on both transports."""
    from traits_agent.intake.datagram import MAX_DATAGRAM

    assert DEFAULT_UDP_DATAGRAM < DEFAULT_UNIX_DATAGRAM < traits_agent_client.AGENT_MAX_DATAGRAM
    assert traits_agent_client.AGENT_MAX_DATAGRAM <= MAX_DATAGRAM


def test_small_udp_datagrams(udp_receiver: socket.socket, make_client: Any) -> None:
    """max_datagram bounds every datagram (UDP to a remote host: 1432)."""
    client = make_client(udp=udp_receiver.getsockname(), max_datagram=DEFAULT_UDP_DATAGRAM)
    for i in range(200):
        client.action(str(i), "2002", "buy_item")
    client.close()
    total = 0
    while total < 200:
        data = udp_receiver.recv(70_000)
        assert len(data) <= DEFAULT_UDP_DATAGRAM
        total += len(decode_datagram(data).entries)
    assert total == client.sent == 200


def test_oversize_event_goes_alone(unix_receiver: socket.socket, unix_client: Any) -> None:
    """An event bigger than max_datagram (but within the agent's limit) goes in a datagram
    of its own; one past the agent's limit is dropped at once as too_large."""
    client = unix_client(max_datagram=1024)
    client.action("1", "2", "small")
    client.action("1", "2", "big" * 1000)
    client.flush()
    datagrams = drain(unix_receiver)
    assert [len(entries_of([d])) for d in datagrams] == [1, 1]
    for buffered in (True, False):
        other = unix_client(buffered=buffered)
        assert other.emit("actions", {"blob": b"x" * 70_000}) is False
        assert other.dropped_by_reason == {"too_large": 1}
    assert drain(unix_receiver) == []


def test_context_manager_flushes(unix_receiver: socket.socket, unix_client: Any) -> None:
    """Leaving the with block flushes the buffer and closes the socket."""
    with unix_client() as client:
        client.action("1", "2", "x")
        assert drain(unix_receiver) == []
    assert len(entries_of(drain(unix_receiver))) == 1
    assert client.sent == 1


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=GUARD_S,
    )


def test_interpreter_exit_flushes(unix_receiver: socket.socket) -> None:
    """A program that emits and exits without flush() or close() still delivers."""
    done = run_python(
        """
        import sys
        from traits_agent_client import Client
        c = Client(sys.argv_path, flush_interval=3600)
        c.level_up("1", 7)
        """.replace("sys.argv_path", repr(unix_receiver.getsockname()))
    )
    assert done.returncode == 0, done.stderr
    assert [e.record["level"] for e in entries_of(drain(unix_receiver))] == [7]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_child_gets_a_fresh_socket_and_an_empty_buffer(
    unix_receiver: socket.socket, unix_client: Any
) -> None:
    """The parent's buffered events are sent once, by the parent; the child starts empty."""
    client = unix_client()
    client.level_up("parent", 1)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it inherited, send one event, exit
        try:
            before = (client.pending, client.sent, client.dropped)
            client.level_up("child", 2)
            client.close()
            os.write(write, repr((before, client.sent, client.dropped)).encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        report = f.read()
    assert status == 0
    assert report == repr(((0, 0, 0), 1, 0))
    client.flush()
    got = sorted(e.record["user_id"] for e in entries_of(drain(unix_receiver)))
    assert got == ["child", "parent"]
    assert (client.sent, client.dropped) == (1, 0)


def test_threads_share_a_client(unix_receiver: socket.socket, unix_client: Any) -> None:
    """Several threads emitting through one client lose and duplicate nothing."""
    client = unix_client(flush_interval=0.01)
    threads = [
        threading.Thread(target=lambda n=n: [client.level_up(str(n), i) for i in range(2000)])
        for n in range(4)
    ]
    for t in threads:
        t.start()
    received = receive_events(unix_receiver, 8000)
    for t in threads:
        t.join()
    for n in range(4):
        assert [e.record["level"] for e in received if e.record["user_id"] == str(n)] == list(
            range(2000)
        )
    assert (client.sent, client.dropped) == (8000, 0)


# --------------------------------------------------------------------------- trouble


@pytest.mark.parametrize("buffered", [True, False])
def test_agent_down_is_counted_not_raised(sock_dir: Path, make_client: Any, buffered: bool) -> None:
    """With no socket file, events are dropped and counted (agent_down); nothing raises."""
    client = make_client(sock_dir / "missing.sock", reconnect_interval=3600, buffered=buffered)
    for _ in range(100):
        client.action("1", "2", "x")
    client.close()
    assert (client.sent, client.dropped) == (0, 100)
    assert client.dropped_by_reason == {"agent_down": 100}


def test_reconnect_waits_for_the_interval(sock_dir: Path, make_client: Any) -> None:
    """An agent that appears later is found on the first attempt after the interval."""
    path = sock_dir / "late.sock"
    waiting = make_client(path, reconnect_interval=3600, buffered=False)
    eager = make_client(path, reconnect_interval=0, buffered=False)
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setblocking(False)
    try:
        assert waiting.emit("actions", {}) is False
        assert eager.emit("actions", {}) is True
        assert len(drain(receiver)) == 1
    finally:
        receiver.close()


def test_stale_socket_file(sock_dir: Path, make_client: Any) -> None:
    """A socket file nobody listens on (the agent died) is agent_down, not an exception."""
    path = sock_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(path))
    dead.close()
    client = make_client(path, reconnect_interval=0)
    assert client.emit("actions", {}) is True  # buffered
    assert client.flush() is True  # nothing waits any more: it was dropped
    assert client.dropped_by_reason == {"agent_down": 1}


def test_agent_restart_loses_nothing(sock_dir: Path, make_client: Any) -> None:
    """When the agent re-creates its socket, the next datagram reconnects and is delivered."""
    path = str(sock_dir / "events.sock")
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(path)
    client = make_client(path, reconnect_interval=3600, flush_interval=3600)
    client.emit("actions", {"n": 1})
    client.flush()
    first.close()
    os.unlink(path)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    second.bind(path)
    second.setblocking(False)
    try:
        client.emit("actions", {"n": 2})
        assert client.flush() is True
        assert [e.record for e in entries_of(drain(second))] == [{"n": 2}]
        assert client.dropped == 0
    finally:
        second.close()


def test_full_queue_holds_then_delivers_without_flush(
    unix_receiver: socket.socket, unix_client: Any
) -> None:
    """While the agent's queue is full, datagrams are held (not dropped); when the agent
    reads again the flusher thread sends them, in order, with no further emit or flush."""
    filler = fill_queue(unix_receiver.getsockname())
    client = unix_client(max_datagram=2048, flush_interval=0.05)
    try:
        for i in range(3000):
            assert client.level_up("1", i) is True
        assert client.sent == 0 and client.dropped == 0
        client.flush()  # still held: the queue is full
        assert client.pending == 3000
        # the agent catches up; the client's own datagrams may follow at once
        received = entries_of(without_fillers(drain(unix_receiver)))
        received += receive_events(unix_receiver, 3000 - len(received))
    finally:
        close_all(filler)
    assert [e.record["level"] for e in received] == list(range(3000))
    assert (client.sent, client.dropped) == (3000, 0)


def test_full_queue_bounds_memory_and_drops_oldest(
    unix_receiver: socket.socket, unix_client: Any
) -> None:
    """Past max_buffer bytes the oldest held datagrams go (queue_full); the newest stay, in
    order; once closed, sent + dropped is every event emitted."""
    filler = fill_queue(unix_receiver.getsockname())
    client = unix_client(max_datagram=2048, max_buffer=16 * 1024, flush_interval=0.05)
    try:
        for i in range(5000):
            client.level_up("1", i)
        assert client._held_bytes <= 16 * 1024
        assert client.dropped_by_reason == {"queue_full": client.dropped}
        assert client.dropped > 0
        kept = client.pending
        received = entries_of(without_fillers(drain(unix_receiver)))
        received += receive_events(unix_receiver, kept - len(received))
    finally:
        close_all(filler)
    levels = [e.record["level"] for e in received]
    assert levels == list(range(5000 - kept, 5000))
    client.close()
    assert client.sent + client.dropped == 5000


def test_close_drops_what_cannot_leave(unix_receiver: socket.socket, unix_client: Any) -> None:
    """close() on a full queue waits at most its timeout, then counts the rest as dropped."""
    filler = fill_queue(unix_receiver.getsockname())
    try:
        client = unix_client()
        for i in range(100):
            client.level_up("1", i)
        client.close(timeout=0)
    finally:
        close_all(filler)
    assert (client.sent, client.dropped, client.pending) == (0, 100, 0)
    assert client.dropped_by_reason == {"queue_full": 100}


def test_udp_closed_port_is_counted(make_client: Any) -> None:
    """UDP to a port with no listener: the refusals that come back are counted, not raised."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    client = make_client(udp=("127.0.0.1", port), buffered=False)
    for _ in range(10):
        client.action("1", "2", "x")
    client.close()
    assert client.sent + client.dropped == 10
    assert client.dropped_by_reason.get("agent_down", 0) >= 1


def test_closed_client_drops(unix_receiver: socket.socket, unix_client: Any) -> None:
    """After close(), events are dropped as closed; close is idempotent."""
    client = unix_client()
    client.close()
    client.close()
    assert client.emit("actions", {}) is False
    assert client.dropped_by_reason == {"closed": 1}


# --------------------------------------------------------------------------- programming errors


def test_unknown_resource_is_dropped_and_logged_once(
    unix_receiver: socket.socket, caplog: pytest.LogCaptureFixture, unix_client: Any
) -> None:
    """A misspelt resource returns False, is counted and logged once per name."""
    client = unix_client()
    with caplog.at_level(logging.WARNING, logger="traits_agent_client"):
        assert client.emit("levelups", {}) is False
        assert client.emit("levelups", {}) is False
    client.flush()
    assert client.dropped_by_reason == {"unknown_resource": 2}
    assert len(caplog.records) == 1 and "levelups" in caplog.records[0].getMessage()
    assert drain(unix_receiver) == []


@pytest.mark.parametrize("record", [None, "x", ["a"], 5])
def test_record_must_be_a_dict(unix_receiver: socket.socket, record: Any, unix_client: Any) -> None:
    """A non-dict record is a TypeError: a bug, not transport trouble."""
    with pytest.raises(TypeError):
        unix_client().emit("actions", record)


@pytest.mark.parametrize("buffered", [True, False])
def test_unencodable_value_raises_and_client_recovers(
    unix_receiver: socket.socket, unix_client: Any, buffered: bool
) -> None:
    """A value msgpack cannot encode raises TypeError; the next event is unharmed."""
    client = unix_client(buffered=buffered)
    client.emit("actions", {"n": 0})
    with pytest.raises(TypeError):
        client.emit("actions", {"x": object()})
    client.emit("actions", {"n": 1})
    client.flush()
    assert [e.record for e in entries_of(drain(unix_receiver))] == [{"n": 0}, {"n": 1}]


def test_bad_arguments(make_client: Any) -> None:
    """Both transports, or a malformed UDP address, are ValueErrors at construction."""
    with pytest.raises(ValueError):
        make_client("/tmp/x.sock", udp="127.0.0.1:1")
    with pytest.raises(ValueError):
        make_client(udp="127.0.0.1")
    with pytest.raises(ValueError):
        make_client(udp="no.such.host.invalid:24225")


# --------------------------------------------------------------------------- where the agent is


def test_where_env_then_system_then_user(
    monkeypatch: pytest.MonkeyPatch, sock_dir: Path, make_client: Any
) -> None:
    """$TRAITS_AGENT_SOCKET first, then the service's socket when it exists, then the
    per-user default; $RUNTIME_DIRECTORY (the caller's own systemd unit) is not read."""
    system = sock_dir / "system.sock"
    monkeypatch.setattr(where, "SYSTEM_SOCKET", str(system))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(sock_dir))
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/some-game-server")
    monkeypatch.delenv("TRAITS_AGENT_SOCKET", raising=False)
    user = str(sock_dir / "traits-agent" / "events.sock")
    assert make_client().address == user
    system.touch()
    assert make_client().address == str(system)
    monkeypatch.setenv("TRAITS_AGENT_SOCKET", "/elsewhere/events.sock")
    assert make_client().address == "/elsewhere/events.sock"
    monkeypatch.setenv("TRAITS_AGENT_SOCKET", "@agent")
    assert make_client().address == "\0agent"


def test_where_with_a_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A config file's [listen] unix stands in for the system and per-user steps."""
    monkeypatch.delenv("TRAITS_AGENT_SOCKET", raising=False)
    assert where.agent_socket("/cfg/events.sock") == "/cfg/events.sock"
    assert where.agent_socket("") == ""  # turned off in the file
    monkeypatch.setenv("TRAITS_AGENT_SOCKET", "/env.sock")
    assert where.agent_socket("/cfg/events.sock") == "/env.sock"


def test_user_default_agrees_with_the_agent(
    monkeypatch: pytest.MonkeyPatch, sock_dir: Path
) -> None:
    """The stdlib per-user rule gives the path the agent (platformdirs) listens on."""
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    runtime = sock_dir / "xdg"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert where.user_socket() == str(paths.default_socket_path())
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert where.user_socket() == str(paths.default_socket_path())


def test_cli_send_uses_the_same_rule(
    monkeypatch: pytest.MonkeyPatch, unix_receiver: socket.socket, sock_dir: Path
) -> None:
    """`traits-agent send` with no config file finds the agent by $TRAITS_AGENT_SOCKET."""
    empty = sock_dir / "config"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "traits_agent", "send", "level_ups", '{"user_id":"1","level":3}'],
        env={
            **os.environ,
            "TRAITS_AGENT_SOCKET": unix_receiver.getsockname(),
            "XDG_CONFIG_HOME": str(empty),
            "TRAITS_AGENT_CONFIG": "",
        },
        capture_output=True,
        text=True,
        timeout=GUARD_S,
    )
    if done.returncode != 0 and Path(paths.SYSTEM_CONFIG_PATH).exists():
        pytest.skip("this host has a system config, which send reads first")
    assert done.returncode == 0, done.stderr
    assert [e.record["level"] for e in entries_of(drain(unix_receiver))] == [3]


# --------------------------------------------------------------------------- installable alone


def test_client_wheel_needs_only_msgpack(tmp_path: Path, unix_receiver: socket.socket) -> None:
    """Build the traits-agent-client wheel, install it with msgpack (and nothing else) into a
    fresh venv, and send an event from there: the client imports nothing of the agent."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    src = tmp_path / "src"
    shutil.copytree(CLIENT_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg*"))
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, src],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    pinned = "msgpack==" + ".".join(map(str, msgpack.version))
    got = subprocess.run(
        [*pip, "download", "--no-deps", "--only-binary", ":all:", "-d", wheels, pinned],
        capture_output=True,
        text=True,
    )
    if got.returncode != 0:
        pytest.skip(f"no msgpack wheel from the configured index: {got.stderr[-300:]}")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [*pip, "--python", python, "install", "--no-index", "-f", wheels, "traits-agent-client"],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    top = sorted(p.name for p in Path(site).iterdir() if not p.name.endswith(".dist-info"))
    assert [n for n in top if not n.startswith("_")] == ["msgpack", "traits_agent_client"]
    code = f"""
        import sys
        from traits_agent_client import Client
        with Client({unix_receiver.getsockname()!r}) as c:
            c.level_up("1", 9)
        heavy = {{"traits_agent", "trio", "httpx", "structlog", "platformdirs"}}
        print(sorted(heavy & set(m.split(".")[0] for m in sys.modules)))
        """
    ran = subprocess.run(
        [python, "-I", "-c", textwrap.dedent(code)], capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "[]"
    assert [e.record["level"] for e in entries_of(drain(unix_receiver))] == [9]


def test_dropped_client_sends_its_buffer(unix_receiver: socket.socket) -> None:
    """A client garbage-collected without close() sends what it buffered (the flusher thread
    holds no reference that would keep it alive)."""
    import gc

    client = Client(unix_receiver.getsockname(), flush_interval=3600)
    client.level_up("1", 5)
    del client
    gc.collect()
    assert [e.record["level"] for e in entries_of(drain(unix_receiver))] == [5]
