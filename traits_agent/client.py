"""The Python client game servers import to hand events to the local traits-agent.

    from traits_agent.client import Client

    analytics = Client()                      # the agent's default Unix socket
    analytics.action("1001", "2002", "buy_item", {"item_id": "3003"})
    analytics.level_up("1001", 10)

It is made for a game server's hot loop:

* It never blocks: the socket is non-blocking and every send uses `MSG_DONTWAIT`.
* It never raises on transport trouble. Agent down, socket file missing, connection refused,
  `ENOBUFS`, a datagram too large: the events are counted in `dropped` (by reason in
  `dropped_by_reason`) and the call returns False. Delivered events are counted in `sent`.
  When the agent is unreachable it tries to reconnect at most once per `reconnect_interval`
  seconds; a Unix socket whose agent restarted is reconnected at once.
* It packs events where that helps. A Unix datagram queue holds only
  `net.unix.max_dgram_qlen` datagrams (10 by default), so a burst fills it quickly (`EAGAIN`).
  The event is then held and the events that follow are packed onto it into one datagram,
  which each emit tries to send again: it leaves as soon as the agent has room, and the client
  goes back to one datagram per event. Full datagrams wait in order, at most `max_held` of
  them (8: 60 KiB on Unix); beyond that the oldest is dropped (`queue_full`) and counted. So a
  stall of the agent of a few milliseconds costs nothing, and a longer one costs memory that
  is bounded. Held events wait for the next emit, `flush()` or `close()`.
* It does not validate: the agent does, and counts what it rejects (`traits-agent status`).
  Programming errors still raise: a record that is not a dict is `TypeError`, a value msgpack
  cannot encode raises msgpack's `TypeError`/`OverflowError`. `datetime` and `date` values are
  sent as the API's `YYYY-MM-DD HH:MM:SS` (UTC; naive means UTC) and `YYYY-MM-DD`.
* An unknown resource name is not an exception (a rarely taken code path with a typo must not
  take a game server down): it is counted as dropped, reason `unknown_resource`, logged once
  per name through the standard `logging` module, and `emit` returns False.
* The event time is stamped when you emit (whole seconds; pass `time=` for your own), so an
  event keeps its real time however long it waits in a buffer or in the agent's queue.

Buffered mode (`buffered=True`) packs always, not only under pressure: events are packed into
datagrams of at most `max_datagram` bytes (7.5 KiB on Unix, see `DEFAULT_UNIX_DATAGRAM`; 1432
on UDP, as DogStatsD): the events of one resource go into one Forward-form entry, the entries
of several resources into one datagram. A datagram is sent when the next event would not fit,
when `flush_interval` has passed since its first event (checked on each emit: there is no
background thread), on `flush()` and on `close()` (also by the context manager). Call
`flush()` once per server tick.

`emit` returns True when the event left or is held; held events are counted in `sent` or
`dropped` when their datagram leaves or is dropped. `close()` makes a last attempt and drops
what cannot leave. Nothing else is retried: durability is the agent's job.

UDP cannot see loss: a datagram to a closed port is only reported (as connection refused) on a
later send, and one the agent had no room for vanishes. Prefer the Unix socket.

Threads: a Client belongs to one thread at a time (the buffer and the counters are not
locked). Give each thread its own Client: it is one socket.
"""

from __future__ import annotations

import datetime as _dt
import errno
import logging
import math
import os
import socket
from collections import deque
from pathlib import Path
from time import monotonic as _monotonic
from time import time as _now
from types import TracebackType
from typing import Any

import msgpack

from traits_agent.intake.wire import pack_time
from traits_agent.schema import resolve_tag

DEFAULT_UNIX_DATAGRAM = 7680
"""Bytes per datagram when packing for a Unix socket.

Not 8192: the kernel charges a queued datagram's buffer (payload plus ~320 bytes of overhead,
rounded up to a power of two) to the sender's 208 KiB send buffer. Measured on Linux 6.x: up to
7872 bytes, 26 datagrams fit in flight; at 8192, 13. 7.5 KiB keeps a margin.
"""
DEFAULT_UDP_DATAGRAM = 1432
"""Bytes per datagram when packing for UDP (fits a 1500-byte MTU path)."""
DEFAULT_FLUSH_INTERVAL = 0.1
DEFAULT_RECONNECT_INTERVAL = 1.0
DEFAULT_MAX_HELD = 8
"""Full datagrams kept while the agent's queue is full (60 KiB on Unix), oldest dropped first."""
SOCKET_NAME = "events.sock"

log = logging.getLogger(__name__)

_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_PEER_GONE = {errno.ECONNREFUSED, errno.ENOTCONN, errno.EPIPE, errno.ENOENT, errno.ECONNRESET}
_DROP_REASONS = {
    errno.EAGAIN: "queue_full",
    errno.ENOBUFS: "no_buffer_space",
    errno.EMSGSIZE: "too_large",
    errno.ECONNREFUSED: "agent_down",
    errno.ENOENT: "agent_down",
}
_TRANSIENT = frozenset({"queue_full", "no_buffer_space"})
"""Failures worth holding the datagram for: the agent is there, just behind."""
_MAX_WARNED_NAMES = 64


def default_unix_path() -> Path:
    """The agent's default socket: `traits_agent.paths` if present, else the same rule inline."""
    try:
        from traits_agent.paths import default_socket_path
    except ImportError:
        first = os.environ.get("RUNTIME_DIRECTORY", "").split(":", 1)[0]
        if first:
            return Path(first) / SOCKET_NAME
        import platformdirs

        return Path(platformdirs.user_runtime_dir("traits-agent")) / SOCKET_NAME
    return Path(default_socket_path())


def _msgpack_default(value: Any) -> Any:
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(_dt.UTC)
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, _dt.date):
        return value.isoformat()
    raise TypeError(f"cannot send a {type(value).__name__} in an event")


def _udp_address(udp: str | tuple[str, int]) -> tuple[int, tuple[Any, ...]]:
    """(family, sockaddr) for `"host:port"`, `"[v6]:port"` or `(host, port)`; ValueError if bad."""
    if isinstance(udp, str):
        host, sep, port = udp.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"udp address {udp!r} must be HOST:PORT")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        target: tuple[str, int] = (host or "127.0.0.1", int(port))
    else:
        target = (udp[0], int(udp[1]))
    try:
        infos = socket.getaddrinfo(*target, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as e:
        raise ValueError(f"udp address {udp!r} cannot be resolved: {e}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


class Client:
    """Sends events to the agent's datagram socket. See the module docstring for the rules.

    `unix` is the agent's Unix datagram socket path (`@name` for the abstract namespace); `udp`
    is `"host:port"` or `(host, port)`. With neither, the agent's default socket path is used;
    giving both is a `ValueError`.
    """

    def __init__(
        self,
        unix: str | os.PathLike[str] | None = None,
        udp: str | tuple[str, int] | None = None,
        *,
        buffered: bool = False,
        max_datagram: int | None = None,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        reconnect_interval: float = DEFAULT_RECONNECT_INTERVAL,
        max_held: int = DEFAULT_MAX_HELD,
    ) -> None:
        if unix is not None and udp is not None:
            raise ValueError("give unix or udp, not both")
        self.address: str | tuple[Any, ...]
        if udp is not None:
            self._family, self.address = _udp_address(udp)
            default_size = DEFAULT_UDP_DATAGRAM
        else:
            path = os.fspath(unix) if unix is not None else str(default_unix_path())
            self._family = socket.AF_UNIX
            self.address = "\0" + path[1:] if path.startswith("@") else path
            default_size = DEFAULT_UNIX_DATAGRAM
        self.max_datagram = max_datagram or default_size
        self.buffered = buffered
        self.flush_interval = flush_interval
        self.reconnect_interval = reconnect_interval
        self.max_held = max_held
        self.sent = 0
        self.dropped = 0
        self.dropped_by_reason: dict[str, int] = {}
        self._pack = msgpack.Packer(use_bin_type=True, default=_msgpack_default).pack
        self._array_header = msgpack.Packer().pack_array_header
        self._sock: socket.socket | None = None
        self._retry_at = 0.0
        self._closed = False
        self._tags: dict[str, str] = {}
        self._warned: set[str] = set()
        self._tag_bytes: dict[str, bytes] = {}
        self._pending: dict[str, list[bytes]] = {}
        self._pending_bytes = 0
        self._pending_events = 0
        self._flush_at = math.inf
        self._held: deque[tuple[bytes, int]] = deque()  # full datagrams the queue had no room for
        self._connect()

    # ----------------------------------------------------------------- events

    def emit(self, resource: str, record: dict[str, Any], time: float | None = None) -> bool:
        """Send one event of `resource` (`actions`, `logins`, ... `playfab`).

        Returns True when the event left (or, buffered, was buffered); False when it was
        dropped and counted. `time` is the event time in seconds (default: now).
        """
        tag = self._tags.get(resource)
        if tag is None:
            tag = self._resolve(resource)
            if tag is None:
                return False
        if not isinstance(record, dict) and not (tag == "playfab" and isinstance(record, list)):
            raise TypeError(f"an event record must be a dict, not {type(record).__name__}")
        return self._emit(tag, record, time)

    def action(
        self,
        user_id: str | int,
        action_id: str | int,
        action_name: str,
        action_params: list[dict[str, Any]] | dict[str, Any] | None = None,
        timestamp: str | _dt.datetime | None = None,
        *,
        time: float | None = None,
        **extra: Any,
    ) -> bool:
        """A user action. `action_params`: `[{"key": k, "value": v}, ...]` or a plain map."""
        record: dict[str, Any] = {
            "user_id": user_id,
            "action_id": action_id,
            "action_name": action_name,
        }
        if action_params is not None:
            record["action_params"] = action_params
        if timestamp is not None:
            record["timestamp"] = timestamp
        if extra:
            record.update(extra)
        return self._emit("actions", record, time)

    def login(
        self,
        user_id: str | int,
        *,
        clan_id: str | int | None = None,
        level: int | None = None,
        device: str | None = None,
        country: str | None = None,
        platform: str | None = None,
        language: str | None = None,
        register_date: str | _dt.date | None = None,
        last_login_timestamp: str | _dt.datetime | None = None,
        timestamp: str | _dt.datetime | None = None,
        time: float | None = None,
        **extra: Any,
    ) -> bool:
        """A login. `country` is ISO alpha-2, `register_date` `YYYY-MM-DD`."""
        record = _present(
            user_id=user_id,
            clan_id=clan_id,
            level=level,
            device=device,
            country=country,
            platform=platform,
            language=language,
            register_date=register_date,
            last_login_timestamp=last_login_timestamp,
            timestamp=timestamp,
            **extra,
        )
        return self._emit("logins", record, time)

    def purchase(
        self,
        user_id: str | int,
        item_id: str | int,
        count: int,
        price: float,
        *,
        platform: str | None = None,
        timestamp: str | _dt.datetime | None = None,
        time: float | None = None,
        **extra: Any,
    ) -> bool:
        """A real-money purchase: `price` is the total money spent."""
        record: dict[str, Any] = {
            "user_id": user_id,
            "item_id": item_id,
            "count": count,
            "price": price,
        }
        return self._emit(
            "purchases", _add(record, platform=platform, timestamp=timestamp, **extra), time
        )

    def virtual_purchase(
        self,
        user_id: str | int,
        item_id: str | int,
        count: int,
        virtual_price: float,
        currency: str,
        *,
        timestamp: str | _dt.datetime | None = None,
        time: float | None = None,
        **extra: Any,
    ) -> bool:
        """A purchase with in-app currency: `virtual_price` in `currency` ("gold", ...)."""
        record: dict[str, Any] = {
            "user_id": user_id,
            "item_id": item_id,
            "count": count,
            "virtual_price": virtual_price,
            "currency": currency,
        }
        return self._emit("virtual_purchases", _add(record, timestamp=timestamp, **extra), time)

    def level_up(
        self,
        user_id: str | int,
        level: int,
        *,
        timestamp: str | _dt.datetime | None = None,
        time: float | None = None,
        **extra: Any,
    ) -> bool:
        """A level-up: `level` is the new level."""
        record: dict[str, Any] = {"user_id": user_id, "level": level}
        return self._emit("level_ups", _add(record, timestamp=timestamp, **extra), time)

    def item(
        self,
        item_id: str | int,
        price: float,
        currency: str,
        name: str,
        *,
        type: str | None = None,
        **extra: Any,
    ) -> bool:
        """An item's details (items have no timestamp)."""
        record: dict[str, Any] = {
            "item_id": item_id,
            "price": price,
            "currency": currency,
            "name": name,
        }
        return self._emit("items", _add(record, type=type, **extra), None)

    def social_dynamic(
        self,
        user_id: str | int,
        target_user_id: str | int,
        connection: str,
        interaction: str,
        *,
        timestamp: str | _dt.datetime | None = None,
        time: float | None = None,
        **extra: Any,
    ) -> bool:
        """Users linked or unlinked (`connection`) as `friend` or `party` (`interaction`)."""
        record: dict[str, Any] = {
            "user_id": user_id,
            "target_user_id": target_user_id,
            "connection": connection,
            "interaction": interaction,
        }
        return self._emit("social_dynamics", _add(record, timestamp=timestamp, **extra), time)

    # ----------------------------------------------------------------- buffer

    def flush(self) -> bool:
        """Send what is held now; True if all of it left.

        What the agent's full queue refuses stays held for the next emit or flush; any other
        failure drops it (counted).
        """
        return self._flush(keep=True)

    def close(self) -> None:
        """Flush and close the socket. Idempotent; later events are dropped (`closed`)."""
        if self._closed:
            return
        self._flush(keep=False)
        self._closed = True
        self._disconnect()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.address!r}, sent={self.sent}, dropped={self.dropped})"

    # ----------------------------------------------------------------- internals

    def _resolve(self, resource: str) -> str | None:
        found = resolve_tag(resource) if isinstance(resource, str) else None
        if found is None:
            self._drop(1, "unknown_resource")
            if resource not in self._warned and len(self._warned) < _MAX_WARNED_NAMES:
                self._warned.add(resource)
                log.warning("traits-agent client: unknown resource %r; events dropped", resource)
            return None
        self._tags[resource] = found.name
        return found.name

    def _emit(self, tag: str, record: Any, time: float | None) -> bool:
        now = _now()
        t = int(now) if time is None else pack_time(time)
        if not self.buffered and not self._pending_events and not self._held:
            reason = self._transmit(self._pack([tag, t, record]))
            if reason is None:
                self.sent += 1
                return True
            if reason not in _TRANSIENT:
                return self._drop(1, reason)
            # The agent's queue is full: hold the event; the next emits pack onto it.
        self._hold(tag, self._pack([t, record]), now)
        if self._held:
            self._pump()
        if not self.buffered or self._pending_bytes >= self.max_datagram or now >= self._flush_at:
            self._flush(keep=True)
        return True

    def _hold(self, tag: str, entry: bytes, now: float) -> None:
        """Add a packed `[time, record]` to the datagram being built; ship that first if full."""
        entries = self._pending.get(tag)
        cost = len(entry) if entries else len(entry) + self._header_cost(tag)
        if self._pending_events and self._pending_bytes + cost > self.max_datagram:
            self._ship(*self._seal())
            entries = None
            cost = len(entry) + self._header_cost(tag)
        if entries is None:
            entries = self._pending[tag] = []
        entries.append(entry)
        self._pending_bytes += cost
        self._pending_events += 1
        if self._pending_events == 1:
            self._flush_at = now + self.flush_interval

    def _header_cost(self, tag: str) -> int:
        """Bytes a Forward entry for `tag` adds besides its events (array32 as upper bound)."""
        tag_bytes = self._tag_bytes.get(tag)
        if tag_bytes is None:
            tag_bytes = self._tag_bytes[tag] = self._pack(tag)
        return 1 + len(tag_bytes) + 5

    def _build(self) -> bytes:
        """The datagram being built: one Forward entry per resource, concatenated."""
        return b"".join(
            b"\x92" + self._tag_bytes[tag] + self._array_header(len(entries)) + b"".join(entries)
            for tag, entries in self._pending.items()
        )

    def _seal(self) -> tuple[bytes, int]:
        sealed = self._build(), self._pending_events
        self._pending = {}
        self._pending_bytes = 0
        self._pending_events = 0
        self._flush_at = math.inf
        return sealed

    def _ship(self, data: bytes, count: int) -> None:
        """Send a full datagram, or hold it (bounded, in order) while the queue is full."""
        if not self._held:
            reason = self._transmit(data)
            if reason is None:
                self.sent += count
                return
            if reason not in _TRANSIENT:
                self._drop(count, reason)
                return
        self._held.append((data, count))
        if len(self._held) > self.max_held:
            self._drop(self._held.popleft()[1], "queue_full")

    def _pump(self) -> bool:
        """Send held datagrams in order until one will not go; True when none is left."""
        held = self._held
        while held:
            data, count = held[0]
            reason = self._transmit(data)
            if reason in _TRANSIENT:
                return False
            held.popleft()
            if reason is None:
                self.sent += count
            else:
                self._drop(count, reason)
        return True

    def _flush(self, keep: bool) -> bool:
        """Send what is held, then the datagram being built; True if all of it left.

        What a full queue refuses stays held when `keep`, else it is dropped (`queue_full`).
        """
        delivered = self._pump()
        if delivered and self._pending_events:
            reason = self._transmit(self._build())
            if reason is None:
                self.sent += self._seal()[1]
            else:
                delivered = False
                if reason not in _TRANSIENT:
                    self._drop(self._seal()[1], reason)
        if not keep:
            while self._held:
                self._drop(self._held.popleft()[1], "queue_full")
            if self._pending_events:
                self._drop(self._seal()[1], "queue_full")
        return delivered

    def _transmit(self, data: bytes) -> str | None:
        """Send one datagram without blocking: None, or why it did not leave."""
        sock = self._sock
        if sock is None:
            if self._closed:
                return "closed"
            if _monotonic() < self._retry_at or not self._connect():
                return "agent_down"
            sock = self._sock
            assert sock is not None
        try:
            sock.send(data, _DONTWAIT)
        except OSError as e:
            return self._transmit_failed(data, e)
        return None

    def _transmit_failed(self, data: bytes, e: OSError) -> str | None:
        """The slow path: classify; a restarted agent (Unix) is reconnected and retried once."""
        if self._family == socket.AF_UNIX and e.errno in _PEER_GONE:
            self._disconnect()
            if not self._connect():
                return "agent_down"
            try:
                self._sock.send(data, _DONTWAIT)  # type: ignore[union-attr]
            except OSError as again:
                return _DROP_REASONS.get(again.errno or 0, "send_error")
            return None
        return _DROP_REASONS.get(e.errno or 0, "send_error")

    def _drop(self, count: int, reason: str) -> bool:
        self.dropped += count
        self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + count
        return False

    def _connect(self) -> bool:
        """One non-blocking connect attempt; on failure the next waits `reconnect_interval`."""
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(self.address)
        except OSError:
            sock.close()
            self._retry_at = _monotonic() + self.reconnect_interval
            return False
        self._sock = sock
        return True

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _present(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _add(record: dict[str, Any], **optional: Any) -> dict[str, Any]:
    for key, value in optional.items():
        if value is not None:
            record[key] = value
    return record
