"""The Python client game servers import to hand events to the local traits-agent.

    from traits_agent_client import Client     # or: from traits_agent.client import Client

    analytics = Client()                       # finds the agent, see `where`
    analytics.action("1001", "2002", "buy_item", {"item_id": "3003"})
    analytics.level_up("1001", 10)

Standard library and msgpack only. Made for a game server's hot loop:

* **It packs.** Events are packed into datagrams of at most `max_datagram` bytes (32 KiB on a
  Unix socket, under the agent's 64 KiB limit), one Forward-form entry `[tag, [[time, record],
  ...]]` per resource. A datagram leaves when the next event would not fit, when
  `flush_interval` (0.1 s) has passed since its first event, on `flush()`, on `close()` (also
  by the context manager) and at interpreter exit. A background daemon thread sends what waits,
  so a game loop that never calls `flush()` still gets its events out within the interval.
  `buffered=False` sends each event at once as its own datagram (packing only while the agent
  is behind); it costs a system call per event.
* **It never blocks and never raises on transport trouble.** When the agent's queue is full
  (`EAGAIN`), sealed datagrams are held, in order, up to `max_buffer` bytes (8 MiB), and sent as
  soon as the socket is writable again; past that bound the oldest are dropped (`queue_full`).
  Agent down or socket missing (`agent_down`), an event too large for any datagram
  (`too_large`), other errors (`send_error`): the events are dropped and counted in `dropped`
  and `dropped_by_reason`. Events that left are counted in `sent`; once the client is closed,
  `sent + dropped` equals the number of events emitted. When the agent is unreachable the
  client reconnects at most once per `reconnect_interval`; a Unix socket whose agent restarted
  is reconnected at once.
* `close()` (and the exit hook) waits at most `close_timeout` (1 s) for held datagrams while
  the agent is taking them, then drops what is left. Nothing else ever waits.
* **Fork-safe.** A child process gets a fresh socket, an empty buffer and zeroed counters; the
  parent's buffered events stay the parent's to send.
* **Threads.** One client may be shared by threads (a lock guards the buffer).
* It does not validate: the agent does, and counts what it rejects (`traits-agent status`).
  Programming errors still raise: a record that is not a dict is `TypeError`, a value msgpack
  cannot encode raises msgpack's `TypeError`/`OverflowError`. `datetime` and `date` values are
  sent as the API's `YYYY-MM-DD HH:MM:SS` (UTC; naive means UTC) and `YYYY-MM-DD`.
* An unknown resource name is not an exception (a rarely taken code path with a typo must not
  take a game server down): it is dropped (`unknown_resource`), logged once per name through
  the standard `logging` module, and `emit` returns False.
* The event time is stamped when you emit (whole seconds; pass `time=` for your own), so an
  event keeps its real time however long it waits in a buffer or in the agent's queue.

UDP cannot see loss: a datagram to a closed port is only reported (as connection refused) on a
later send, and one the agent had no room for vanishes. Prefer the Unix socket.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import errno
import logging
import math
import os
import select
import socket
import struct
import threading
import weakref
from collections import deque
from time import monotonic as _monotonic
from time import time as _now
from types import TracebackType
from typing import Any

import msgpack

from traits_agent_client.where import ENV_VAR, SYSTEM_SOCKET, agent_socket

__all__ = [
    "AGENT_MAX_DATAGRAM",
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_MAX_BUFFER",
    "DEFAULT_UDP_DATAGRAM",
    "DEFAULT_UNIX_DATAGRAM",
    "ENV_VAR",
    "RESOURCES",
    "SYSTEM_SOCKET",
    "Client",
    "agent_socket",
    "pack_time",
    "resolve_resource",
]

DEFAULT_UNIX_DATAGRAM = 32 * 1024
"""Bytes per datagram on a Unix socket: half the agent's 64 KiB limit.

Large datagrams mean few of them, so a `net.unix.max_dgram_qlen` of 10 (the kernel default)
still holds 320 KiB in flight, and the agent pays its per-datagram cost once per ~500 events.
"""
DEFAULT_UDP_DATAGRAM = 1432
"""Bytes per datagram on UDP to a remote host (fits a 1500-byte MTU path)."""
DEFAULT_LOOPBACK_UDP_DATAGRAM = 32 * 1024
"""Bytes per datagram on loopback UDP (the loopback MTU is 64 KiB: no fragmentation)."""
AGENT_MAX_DATAGRAM = 65507
"""The largest datagram the agent takes on both transports (64 KiB, less UDP's headers): an
event that cannot fit alone in one is dropped at once (`too_large`)."""
DEFAULT_FLUSH_INTERVAL = 0.1
DEFAULT_RECONNECT_INTERVAL = 1.0
DEFAULT_MAX_BUFFER = 8 * 1024 * 1024
"""Bytes of sealed datagrams held while the agent's queue is full; the oldest go past it."""
DEFAULT_CLOSE_TIMEOUT = 1.0
SEND_BUFFER = 1024 * 1024
"""SO_SNDBUF asked for (the kernel caps it at net.core.wmem_max): on a Unix datagram socket
the sender's buffer bounds the bytes in flight to the agent."""

RESOURCES = frozenset(
    {
        "actions",
        "logins",
        "purchases",
        "virtual_purchases",
        "level_ups",
        "items",
        "social_dynamics",
        "playfab",
    }
)
"""The agent's resources (tags), as in `traits_agent.schema`; a test keeps the two equal."""
_ALIASES = {"users": "logins"}

log = logging.getLogger(__name__)

_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_PEER_GONE = {errno.ECONNREFUSED, errno.ENOTCONN, errno.EPIPE, errno.ENOENT, errno.ECONNRESET}
_DROP_REASONS = {
    errno.EAGAIN: "queue_full",
    errno.ENOBUFS: "queue_full",
    errno.EMSGSIZE: "too_large",
    errno.ECONNREFUSED: "agent_down",
    errno.ENOENT: "agent_down",
    errno.ENOTCONN: "agent_down",
}
_TRANSIENT = "queue_full"
"""The one failure worth holding a datagram for: the agent is there, just behind."""
_MAX_WARNED_NAMES = 64
_EVENT_TIME = struct.Struct(">II")
_POLL_MS = 100
"""Longest wait for the socket to become writable before the flusher looks again."""


def resolve_resource(name: str) -> str | None:
    """The resource a tag names, or None: the agent's rule (`12traits.actions`, `level-ups`,
    any case, `users` for `logins`)."""
    base = name.rpartition(".")[2].replace("-", "_").lower()
    base = _ALIASES.get(base, base)
    return base if base in RESOURCES else None


def pack_time(t: float | None) -> int | float | msgpack.ExtType | None:
    """The wire form of an event time: nil, an int for whole seconds, else an EventTime.

    A fractional time outside EventTime's range (before 1970 or past 2106) stays a float.
    """
    if t is None or type(t) is int:
        return t
    seconds = math.floor(t) if math.isfinite(t) else None
    if seconds is None or not 0 <= seconds < 2**32:
        return t
    nanoseconds = round((t - seconds) * 1e9)
    if nanoseconds == 0:
        return seconds
    if nanoseconds >= 1_000_000_000:
        return seconds + 1
    return msgpack.ExtType(0, _EVENT_TIME.pack(seconds, nanoseconds))


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


def _is_loopback(sockaddr: tuple[Any, ...]) -> bool:
    host = sockaddr[0]
    return host.startswith("127.") or host in ("::1", "localhost")


class Client:
    """Sends events to the agent's datagram socket. See the module docstring for the rules.

    `unix` is the agent's Unix datagram socket path (`@name` for the abstract namespace); `udp`
    is `"host:port"` or `(host, port)`. With neither, `where.agent_socket()` finds the agent;
    giving both is a `ValueError`.
    """

    # attribute access on the hot path is measurably cheaper with slots
    __slots__ = (
        "__weakref__",
        "_array_header",
        "_closed",
        "_family",
        "_flush_at",
        "_flusher",
        "_held",
        "_held_bytes",
        "_kick",
        "_lock",
        "_pack",
        "_pending",
        "_pending_bytes",
        "_pending_events",
        "_retry_at",
        "_sock",
        "_tag_bytes",
        "_tags",
        "_wakeup",
        "_warned",
        "address",
        "buffered",
        "close_timeout",
        "dropped",
        "dropped_by_reason",
        "flush_interval",
        "max_buffer",
        "max_datagram",
        "reconnect_interval",
        "sent",
    )

    def __init__(
        self,
        unix: str | os.PathLike[str] | None = None,
        udp: str | tuple[str, int] | None = None,
        *,
        buffered: bool = True,
        max_datagram: int | None = None,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        reconnect_interval: float = DEFAULT_RECONNECT_INTERVAL,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        if unix is not None and udp is not None:
            raise ValueError("give unix or udp, not both")
        self.address: str | tuple[Any, ...]
        if udp is not None:
            self._family, self.address = _udp_address(udp)
            loopback = _is_loopback(self.address)
            default_size = DEFAULT_LOOPBACK_UDP_DATAGRAM if loopback else DEFAULT_UDP_DATAGRAM
        else:
            path = os.fspath(unix) if unix is not None else agent_socket()
            self._family = socket.AF_UNIX
            self.address = "\0" + path[1:] if path.startswith("@") else path
            default_size = DEFAULT_UNIX_DATAGRAM
        self.max_datagram = min(max_datagram or default_size, AGENT_MAX_DATAGRAM)
        self.buffered = buffered
        self.flush_interval = flush_interval
        self.reconnect_interval = reconnect_interval
        self.max_buffer = max_buffer
        self.close_timeout = close_timeout
        self._pack = msgpack.Packer(use_bin_type=True, default=_msgpack_default).pack
        self._array_header = msgpack.Packer().pack_array_header
        self._tags: dict[str, str] = {}
        self._tag_bytes: dict[str, bytes] = {}
        self._warned: set[str] = set()
        self._sock: socket.socket | None = None
        self._closed = False
        self._reset()
        _LIVE.add(self)

    def _reset(self) -> None:
        """Empty buffer, zero counters, no socket, no flusher thread (construction, fork)."""
        self.sent = 0
        self.dropped = 0
        self.dropped_by_reason: dict[str, int] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Event()  # set while anything waits to be sent
        self._kick = threading.Event()  # set when a datagram is held: wait for writability
        self._flusher: threading.Thread | None = None
        self._pending: dict[str, list[bytes]] = {}
        self._pending_bytes = 0
        self._pending_events = 0
        self._flush_at = math.inf
        self._held: deque[tuple[bytes, int]] = deque()  # sealed datagrams the queue refused
        self._held_bytes = 0
        self._retry_at = 0.0
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if not self._closed:
            self._connect()

    @property
    def pending(self) -> int:
        """Events buffered or held: neither sent nor dropped yet."""
        return self._pending_events + sum(count for _, count in self._held)

    # ----------------------------------------------------------------- events

    def emit(self, resource: str, record: dict[str, Any], time: float | None = None) -> bool:
        """Send one event of `resource` (`actions`, `logins`, ... `playfab`).

        Returns True when the event left or waits in the buffer; False when it was dropped and
        counted. `time` is the event time in seconds (default: now).
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
        return self._emit(
            "actions",
            _record(
                {
                    "user_id": user_id,
                    "action_id": action_id,
                    "action_name": action_name,
                },
                extra,
                action_params=action_params,
                timestamp=timestamp,
            ),
            time,
        )

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
        # every field, user_id and `extra` too, is left out when None (unlike the other methods)
        record = _record(
            {},
            {},
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
        return self._emit(
            "purchases",
            _record(
                {
                    "user_id": user_id,
                    "item_id": item_id,
                    "count": count,
                    "price": price,
                },
                extra,
                platform=platform,
                timestamp=timestamp,
            ),
            time,
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
        return self._emit(
            "virtual_purchases",
            _record(
                {
                    "user_id": user_id,
                    "item_id": item_id,
                    "count": count,
                    "virtual_price": virtual_price,
                    "currency": currency,
                },
                extra,
                timestamp=timestamp,
            ),
            time,
        )

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
        return self._emit(
            "level_ups",
            _record({"user_id": user_id, "level": level}, extra, timestamp=timestamp),
            time,
        )

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
        return self._emit(
            "items",
            _record(
                {
                    "item_id": item_id,
                    "price": price,
                    "currency": currency,
                    "name": name,
                },
                extra,
                type=type,
            ),
            None,
        )

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
        return self._emit(
            "social_dynamics",
            _record(
                {
                    "user_id": user_id,
                    "target_user_id": target_user_id,
                    "connection": connection,
                    "interaction": interaction,
                },
                extra,
                timestamp=timestamp,
            ),
            time,
        )

    # ----------------------------------------------------------------- buffer

    def flush(self) -> bool:
        """Send what waits now; True if all of it left.

        What the agent's full queue refuses stays held (the flusher thread sends it when the
        socket is writable); any other failure drops it (counted).
        """
        with self._lock:
            return self._flush(force=True)

    def close(self, timeout: float | None = None) -> None:
        """Flush, wait at most `timeout` (default `close_timeout`) while the agent takes held
        datagrams, drop what is left (counted), close the socket. Idempotent; events emitted
        afterwards are dropped (`closed`)."""
        if self._closed:
            return
        deadline = _monotonic() + (self.close_timeout if timeout is None else timeout)
        while True:
            with self._lock:
                done = self._flush(force=True)
                sock = self._sock
            remaining = deadline - _monotonic()
            if done or sock is None or remaining <= 0:
                break
            _wait_writable(sock, remaining)
        with self._lock:
            if self._closed:
                return
            self._drop_all()
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self._wakeup.set()  # the flusher sees _closed and ends
        _LIVE.discard(self)

    def __del__(self) -> None:
        """A client dropped without close(): send what can leave now, count the rest."""
        with contextlib.suppress(Exception):
            self.close(timeout=0)

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
        found = resolve_resource(resource) if isinstance(resource, str) else None
        if found is None:
            with self._lock:
                self._drop(1, "unknown_resource")
            if resource not in self._warned and len(self._warned) < _MAX_WARNED_NAMES:
                self._warned.add(resource)
                log.warning("traits-agent client: unknown resource %r; events dropped", resource)
            return None
        self._tags[resource] = found
        return found

    def _emit(self, tag: str, record: Any, time: float | None) -> bool:
        t = int(_now()) if time is None else pack_time(time)
        with self._lock:
            entries = self._pending.get(tag)
            if entries is not None:  # the hot path: this resource's entry is being built
                entry = self._pack([t, record])
                size = self._pending_bytes + len(entry)
                if size < self.max_datagram:
                    entries.append(entry)
                    self._pending_bytes = size
                    self._pending_events += 1
                    return True
                return self._add(tag, entry)
            if self._closed:
                return self._drop(1, "closed")
            if not self.buffered and not self._pending_events and not self._held:
                message = self._pack([tag, t, record])
                if len(message) > AGENT_MAX_DATAGRAM:
                    return self._drop(1, "too_large")
                reason = self._transmit(message)
                if reason is None:
                    self.sent += 1
                    return True
                if reason != _TRANSIENT:
                    return self._drop(1, reason)
                # the agent's queue is full: buffer this event; the flusher sends it
            return self._add(tag, self._pack([t, record]))

    def _add(self, tag: str, entry: bytes) -> bool:
        """Add a packed `[time, record]` to the datagram being built, sealing and shipping
        that first when the entry would not fit. Call with the lock held."""
        if len(entry) + self._header_cost(tag) > AGENT_MAX_DATAGRAM:
            return self._drop(1, "too_large")
        if self._pending_events:
            cost = len(entry) + (0 if tag in self._pending else self._header_cost(tag))
            if self._pending_bytes + cost > self.max_datagram:
                self._seal_and_ship()
        entries = self._pending.get(tag)
        if entries is None:
            self._pending[tag] = [entry]
            self._pending_bytes += len(entry) + self._header_cost(tag)
        else:
            entries.append(entry)
            self._pending_bytes += len(entry)
        self._pending_events += 1
        if self._pending_events == 1:
            self._flush_at = _monotonic() + (self.flush_interval if self.buffered else 0.0)
            self._wakeup.set()
            if self._flusher is None:
                self._start_flusher()
        if self._pending_bytes >= self.max_datagram:
            self._seal_and_ship()
        return True

    def _header_cost(self, tag: str) -> int:
        """Bytes a Forward entry for `tag` adds besides its events (array32 as upper bound)."""
        tag_bytes = self._tag_bytes.get(tag)
        if tag_bytes is None:
            tag_bytes = self._tag_bytes[tag] = self._pack(tag)
        return 1 + len(tag_bytes) + 5

    def _seal(self) -> tuple[bytes, int]:
        """The datagram being built, one Forward entry per resource; the buffer is emptied."""
        data = b"".join(
            b"\x92" + self._tag_bytes[tag] + self._array_header(len(entries)) + b"".join(entries)
            for tag, entries in self._pending.items()
        )
        sealed = data, self._pending_events
        self._pending = {}
        self._pending_bytes = 0
        self._pending_events = 0
        self._flush_at = math.inf
        return sealed

    def _seal_and_ship(self) -> None:
        """Send the full datagram, or hold it (in order, bounded) behind what is held."""
        data, count = self._seal()
        if not self._held:
            reason = self._transmit(data)
            if reason is None:
                self.sent += count
                return
            if reason != _TRANSIENT:
                self._drop(count, reason)
                return
        self._held.append((data, count))
        self._held_bytes += len(data)
        while self._held_bytes > self.max_buffer and len(self._held) > 1:
            old, old_count = self._held.popleft()
            self._held_bytes -= len(old)
            self._drop(old_count, "queue_full")
        self._kick.set()  # the flusher stops sleeping and waits for the socket to be writable

    def _pump(self) -> bool:
        """Send held datagrams in order until one will not go; True when none is left."""
        held = self._held
        while held:
            data, count = held[0]
            reason = self._transmit(data)
            if reason == _TRANSIENT:
                return False
            held.popleft()
            self._held_bytes -= len(data)
            if reason is None:
                self.sent += count
            else:
                self._drop(count, reason)
        return True

    def _flush(self, force: bool) -> bool:
        """Send what is held, then the datagram being built (if `force` or its time is due);
        True if nothing waits any more. Call with the lock held."""
        if not self._pump():
            return False
        if self._pending_events and (force or _monotonic() >= self._flush_at):
            data, count = self._seal()
            reason = self._transmit(data)
            if reason is None:
                self.sent += count
            elif reason == _TRANSIENT:
                self._held.append((data, count))
                self._held_bytes += len(data)
                return False
            else:
                self._drop(count, reason)
        return not self._pending_events

    def _drop_all(self) -> None:
        while self._held:
            self._drop(self._held.popleft()[1], "queue_full")
        self._held_bytes = 0
        if self._pending_events:
            self._drop(self._seal()[1], "queue_full")

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
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
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

    def _start_flusher(self) -> None:
        self._flusher = threading.Thread(
            target=_flusher_loop,
            args=(weakref.ref(self), self._wakeup, self._kick),
            name="traits-agent-client-flush",
            daemon=True,
        )
        self._flusher.start()

    def _flusher_step(self) -> tuple[socket.socket | None, float]:
        """One round of the flusher: send what is due; say what to wait for next.

        Returns (socket to wait on for writability, or None; seconds to wait at most). A wait of
        -1 means nothing waits: sleep until woken.
        """
        with self._lock:
            if self._closed:
                return None, -2
            if not self._held and not self._pending_events:
                self._wakeup.clear()
                return None, -1
            if self._flush(force=False):
                self._wakeup.clear()
                return None, -1
            if self._held and self._sock is not None:
                return self._sock, _POLL_MS / 1000
            return None, max(min(self._flush_at - _monotonic(), self.reconnect_interval), 0.001)


def _flusher_loop(ref: weakref.ref[Client], wakeup: threading.Event, kick: threading.Event) -> None:
    """The background thread: sends buffered events when their time is due and held ones
    when the agent has room. Holds no strong reference to the client while it waits."""
    while True:
        wakeup.wait()
        client = ref()
        if client is None or client._wakeup is not wakeup:  # gone, or forked and reset
            return
        sock, wait = client._flusher_step()
        del client
        if wait == -2:
            return
        if wait == -1:
            continue
        if sock is not None:
            _wait_writable(sock, wait)
        elif wait > 0:
            kick.wait(wait)
        kick.clear()


def _wait_writable(sock: socket.socket, timeout: float) -> bool:
    """Wait at most `timeout` s until `sock` may take a datagram; False on timeout or error.

    A connected Unix datagram socket polls writable only when the peer's queue has room."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        return bool(poller.poll(max(int(timeout * 1000), 0)))
    except (OSError, ValueError):
        return False


#: every open client: flushed at interpreter exit, reset in a forked child
_LIVE: weakref.WeakSet[Client] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for client in list(_LIVE):
        client.close()


def _reset_all_in_child() -> None:
    for client in list(_LIVE):
        client._reset()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_all_in_child)


def _record(fields: dict[str, Any], extra: dict[str, Any], /, **optional: Any) -> dict[str, Any]:
    """The record a typed method sends: `fields` as given (a required field the caller passed
    as None still goes, so the agent answers it rather than the client hiding it), then each
    of `optional` that is not None, then `extra` as given, in that order (the wire order)."""
    for key, value in optional.items():
        if value is not None:
            fields[key] = value
    if extra:
        fields.update(extra)
    return fields
