"""The game-server client against real sockets: what arrives, and that trouble never raises."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from traits_agent.client import DEFAULT_UDP_DATAGRAM, DEFAULT_UNIX_DATAGRAM, Client
from traits_agent.intake.wire import Entry, decode_datagram
from traits_agent.schema import normalize, resolve_tag


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
    sock.settimeout(2)
    yield sock
    sock.close()


@pytest.fixture
def make_client() -> Iterator[Any]:
    """Client(...), closed after the test."""
    made: list[Client] = []

    def make(*args: Any, **kw: Any) -> Client:
        made.append(Client(*args, **kw))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.fixture
def unix_client(make_client: Any, unix_receiver: socket.socket) -> Any:
    """A client of the test's Unix receiver: unix_client(**options)."""
    return lambda **kw: make_client(unix_receiver.getsockname(), **kw)


def drain(receiver: socket.socket) -> list[bytes]:
    """Every datagram queued on a non-blocking receiver."""
    out = []
    while True:
        try:
            out.append(receiver.recv(70_000))
        except BlockingIOError:
            return out


def entries_of(datagrams: list[bytes]) -> list[Entry]:
    out = []
    for data in datagrams:
        result = decode_datagram(data)
        assert result.errors == []
        out.extend(result.entries)
    return out


# --------------------------------------------------------------------------- what arrives


def test_emit_arrives_as_a_message(unix_receiver: socket.socket, unix_client: Any) -> None:
    """One emit is one datagram holding one Message entry with the record."""
    client = unix_client()
    assert client.emit("level_ups", {"user_id": "1001", "level": 10}, time=1546355045.5)
    (datagram,) = drain(unix_receiver)
    assert decode_datagram(datagram).entries == [
        Entry("level_ups", 1546355045.5, {"user_id": "1001", "level": 10})
    ]
    assert (client.sent, client.dropped) == (1, 0)


def test_event_time_defaults_to_now(unix_receiver: socket.socket, unix_client: Any) -> None:
    """Without time=, the event carries the emit time in whole seconds."""
    before = int(time.time())
    unix_client().emit("actions", {"user_id": "1"})
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
    unix_client().emit(name, {})
    assert entries_of(drain(unix_receiver))[0].tag == tag


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
def test_typed_methods(
    unix_receiver: socket.socket, call: Any, tag: str, record: dict[str, Any], unix_client: Any
) -> None:
    """Each typed method sends its resource's fields, None left out, and the agent accepts it."""
    assert call(unix_client()) is True
    (entry,) = entries_of(drain(unix_receiver))
    assert (entry.tag, entry.record) == (tag, record)
    resource = resolve_tag(entry.tag)
    assert resource is not None
    normalize(resource, entry.record, entry.time)


def test_udp(udp_receiver: socket.socket, make_client: Any) -> None:
    """A UDP client, addressed as "host:port" or (host, port), delivers the same entries."""
    host, port = udp_receiver.getsockname()
    for address in (f"{host}:{port}", (host, port)):
        client = make_client(udp=address)
        assert client.level_up("1", 2, time=5)
        assert decode_datagram(udp_receiver.recv(70_000)).entries == [
            Entry("level_ups", 5.0, {"user_id": "1", "level": 2})
        ]
        assert client.max_datagram == DEFAULT_UDP_DATAGRAM


def test_playfab_list_record(unix_receiver: socket.socket, unix_client: Any) -> None:
    """playfab events may be a list of maps."""
    unix_client().emit("playfab", [{"EventName": "a"}])
    assert entries_of(drain(unix_receiver))[0].record == [{"EventName": "a"}]


@pytest.mark.skipif(sys.platform != "linux", reason="abstract sockets are Linux-only")
def test_abstract_socket(make_client: Any) -> None:
    """ "@name" addresses a socket in the abstract namespace."""
    name = f"traits-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.setblocking(False)
    try:
        assert make_client("@" + name).emit("actions", {})
        assert len(drain(receiver)) == 1
    finally:
        receiver.close()


# --------------------------------------------------------------------------- trouble


def test_agent_down_is_counted_not_raised(sock_dir: Path, make_client: Any) -> None:
    """With no socket file, emits return False and are counted; nothing raises."""
    client = make_client(sock_dir / "missing.sock", reconnect_interval=3600)
    for _ in range(100):
        assert client.action("1", "2", "x") is False
    assert (client.sent, client.dropped) == (0, 100)
    assert client.dropped_by_reason == {"agent_down": 100}
    buffered = make_client(sock_dir / "missing.sock", buffered=True)
    assert buffered.action("1", "2", "x") is True
    assert buffered.flush() is False
    assert buffered.dropped == 1


def test_reconnect_waits_for_the_interval(sock_dir: Path, make_client: Any) -> None:
    """An agent that appears later is found on the first attempt after the interval."""
    path = sock_dir / "late.sock"
    waiting = make_client(path, reconnect_interval=3600)
    eager = make_client(path, reconnect_interval=0)
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
    assert client.emit("actions", {}) is False
    assert client.dropped_by_reason == {"agent_down": 1}


def test_agent_restart_loses_nothing(sock_dir: Path, make_client: Any) -> None:
    """When the agent re-creates its socket, the next emit reconnects and is delivered."""
    path = str(sock_dir / "events.sock")
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(path)
    client = make_client(path, reconnect_interval=3600)
    assert client.emit("actions", {"n": 1})
    first.close()
    os.unlink(path)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    second.bind(path)
    second.setblocking(False)
    try:
        assert client.emit("actions", {"n": 2}) is True
        assert [e.record for e in entries_of(drain(second))] == [{"n": 2}]
        assert client.dropped == 0
    finally:
        second.close()


def test_full_queue_never_blocks(unix_receiver: socket.socket, unix_client: Any) -> None:
    """A receiver that does not read fills its queue: emits go on, the excess is counted."""
    client = unix_client()
    started = time.monotonic()
    results = [client.level_up("1", i) for i in range(5000)]
    client.close()
    assert time.monotonic() - started < 1.0
    assert all(results)  # sent, or held to be packed
    assert client.sent + client.dropped == 5000
    assert client.dropped_by_reason["queue_full"] == client.dropped > 0
    assert len(entries_of(drain(unix_receiver))) == client.sent


def test_full_queue_packs_held_events(unix_receiver: socket.socket, unix_client: Any) -> None:
    """Events held while the queue was full leave packed together once there is room."""
    client = unix_client()
    i = 0
    while client.sent == i:  # one datagram per event until the queue is full
        client.level_up("1", i)
        i += 1
    for _ in range(50):
        client.level_up("1", i)
        i += 1
    first = drain(unix_receiver)  # the agent catches up
    client.level_up("1", i)
    i += 1
    late = drain(unix_receiver)
    assert len(late) == 1
    assert [e.record["level"] for e in entries_of(first + late)] == list(range(i))
    assert (client.sent, client.dropped) == (i, 0)


def test_udp_closed_port_is_counted(make_client: Any) -> None:
    """UDP to a port with no listener: the refusals that come back are counted, not raised."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    client = make_client(udp=("127.0.0.1", port))
    for _ in range(10):
        client.action("1", "2", "x")
    assert client.sent + client.dropped == 10
    assert client.dropped_by_reason.get("agent_down", 0) >= 1


def test_datagram_too_large_is_counted(unix_receiver: socket.socket, unix_client: Any) -> None:
    """An event larger than the socket can carry is dropped as too_large."""
    client = unix_client()
    assert client.emit("actions", {"blob": b"x" * 1_000_000}) is False
    assert client.dropped_by_reason == {"too_large": 1}


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
    with caplog.at_level(logging.WARNING, logger="traits_agent.client"):
        assert client.emit("levelups", {}) is False
        assert client.emit("levelups", {}) is False
    assert client.dropped_by_reason == {"unknown_resource": 2}
    assert len(caplog.records) == 1 and "levelups" in caplog.records[0].getMessage()
    assert drain(unix_receiver) == []


@pytest.mark.parametrize("record", [None, "x", ["a"], 5])
def test_record_must_be_a_dict(unix_receiver: socket.socket, record: Any, unix_client: Any) -> None:
    """A non-dict record is a TypeError: a bug, not transport trouble."""
    with pytest.raises(TypeError):
        unix_client().emit("actions", record)


def test_unencodable_value_raises_and_client_recovers(
    unix_receiver: socket.socket, unix_client: Any
) -> None:
    """A value msgpack cannot encode raises TypeError; the next event is unharmed."""
    client = unix_client()
    with pytest.raises(TypeError):
        client.emit("actions", {"x": object()})
    client.emit("actions", {"n": 1})
    assert [e.record for e in entries_of(drain(unix_receiver))] == [{"n": 1}]


def test_bad_arguments(make_client: Any) -> None:
    """Both transports, or a malformed UDP address, are ValueErrors at construction."""
    with pytest.raises(ValueError):
        make_client("/tmp/x.sock", udp="127.0.0.1:1")
    with pytest.raises(ValueError):
        make_client(udp="127.0.0.1")
    with pytest.raises(ValueError):
        make_client(udp="no.such.host.invalid:24225")


# --------------------------------------------------------------------------- buffering


def test_buffered_packs_many_events_into_few_datagrams(
    unix_receiver: socket.socket, unix_client: Any
) -> None:
    """Buffered events of one resource ride in Forward entries of at most 8 KiB."""
    client = unix_client(buffered=True, flush_interval=3600)
    for i in range(500):
        assert client.level_up(str(i), i, time=1000 + i)
    client.flush()
    datagrams = drain(unix_receiver)
    assert all(len(d) <= DEFAULT_UNIX_DATAGRAM for d in datagrams)
    assert len(datagrams) <= 500 * 40 // DEFAULT_UNIX_DATAGRAM + 2
    entries = entries_of(datagrams)
    assert [e.record["level"] for e in entries] == list(range(500))
    assert [e.time for e in entries] == [1000.0 + i for i in range(500)]
    assert (client.sent, client.dropped) == (500, 0)


def test_buffered_auto_flushes_when_full(unix_receiver: socket.socket, unix_client: Any) -> None:
    """Without flush(), a datagram leaves as soon as the next event would not fit."""
    client = unix_client(buffered=True, flush_interval=3600)
    for i in range(1000):
        client.level_up(str(i), i)
    datagrams = drain(unix_receiver)
    assert len(datagrams) >= 1 and all(len(d) <= DEFAULT_UNIX_DATAGRAM for d in datagrams)
    assert len(entries_of(datagrams)) == client.sent < 1000


def test_buffered_mixes_resources_in_one_datagram(
    unix_receiver: socket.socket, unix_client: Any
) -> None:
    """Interleaved resources share a datagram, one Forward entry per resource, order kept."""
    client = unix_client(buffered=True, flush_interval=3600)
    for i in range(10):
        client.level_up("u", i)
        client.action("u", str(i), "x")
    client.flush()
    (datagram,) = drain(unix_receiver)
    entries = entries_of([datagram])
    assert [e.tag for e in entries] == ["level_ups"] * 10 + ["actions"] * 10
    assert [e.record["level"] for e in entries[:10]] == list(range(10))


def test_buffered_udp_respects_its_smaller_datagram(
    udp_receiver: socket.socket, make_client: Any
) -> None:
    """Buffered UDP datagrams stay within 1432 bytes."""
    client = make_client(udp=udp_receiver.getsockname(), buffered=True, flush_interval=3600)
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
    """An event bigger than max_datagram is still sent, in a datagram of its own."""
    client = unix_client(buffered=True, flush_interval=3600)
    client.action("1", "2", "small")
    client.action("1", "2", "big" * 5000)
    client.flush()
    datagrams = drain(unix_receiver)
    assert [len(entries_of([d])) for d in datagrams] == [1, 1]


def test_held_datagrams_leave_in_order(unix_receiver: socket.socket, unix_client: Any) -> None:
    """Full datagrams the queue refused are held (bounded) and sent in order when it drains."""
    client = unix_client(buffered=True, flush_interval=3600, max_held=1000)
    total = 3000  # about 30 datagrams: three times what the queue takes
    for i in range(total):
        client.level_up("1", i)
    assert client.dropped == 0
    received = []
    for _ in range(100):  # the agent catches up while the game goes on emitting
        received += drain(unix_receiver)
        client.level_up("1", total)
        total += 1
        if not client._held:
            break
    client.flush()
    received += drain(unix_receiver)
    assert [e.record["level"] for e in entries_of(received)] == list(range(total))
    assert (client.sent, client.dropped) == (total, 0)


def test_held_datagrams_are_bounded(unix_receiver: socket.socket, unix_client: Any) -> None:
    """Past max_held datagrams the oldest held are dropped; what arrives keeps its order."""
    client = unix_client(buffered=True, flush_interval=3600, max_held=2)
    for i in range(50_000):
        client.level_up("1", i)
    assert client.dropped_by_reason["queue_full"] == client.dropped > 0
    received = drain(unix_receiver)
    client.close()
    levels = [e.record["level"] for e in entries_of(received + drain(unix_receiver))]
    assert levels == sorted(levels)
    assert len(levels) == client.sent and client.sent + client.dropped == 50_000


def test_flush_interval(unix_receiver: socket.socket, unix_client: Any) -> None:
    """With flush_interval=0 each buffered event leaves at once."""
    client = unix_client(buffered=True, flush_interval=0)
    client.action("1", "2", "x")
    assert len(drain(unix_receiver)) == 1


def test_context_manager_flushes(unix_receiver: socket.socket, unix_client: Any) -> None:
    """Leaving the with block flushes the buffer and closes the socket."""
    with unix_client(buffered=True, flush_interval=3600) as client:
        client.action("1", "2", "x")
        assert drain(unix_receiver) == []
    assert len(entries_of(drain(unix_receiver))) == 1
    assert client.sent == 1


def test_buffered_full_queue_counts_events(unix_receiver: socket.socket, unix_client: Any) -> None:
    """A buffered datagram the agent has no room for counts all its events as dropped."""
    client = unix_client(buffered=True, flush_interval=3600)
    for i in range(20_000):
        client.level_up("1", i)
    assert client.flush() is False  # still held: the queue is full
    client.close()
    assert client.sent + client.dropped == 20_000
    assert client.dropped_by_reason["queue_full"] == client.dropped > 0
    assert len(entries_of(drain(unix_receiver))) == client.sent


# --------------------------------------------------------------------------- default path


def test_default_path_from_paths_module(
    monkeypatch: pytest.MonkeyPatch, sock_dir: Path, make_client: Any
) -> None:
    """With no address, the agent's default socket under $RUNTIME_DIRECTORY is used."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(sock_dir))
    assert make_client().address == str(sock_dir / "events.sock")


def test_default_path_without_paths_module(
    monkeypatch: pytest.MonkeyPatch, sock_dir: Path, make_client: Any
) -> None:
    """If traits_agent.paths cannot be imported, the same rule applies inline."""
    monkeypatch.setitem(sys.modules, "traits_agent.paths", None)
    monkeypatch.setenv("RUNTIME_DIRECTORY", f"{sock_dir}:/elsewhere")
    assert make_client().address == str(sock_dir / "events.sock")
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(sock_dir))
    assert make_client().address == str(sock_dir / "traits-agent" / "events.sock")
