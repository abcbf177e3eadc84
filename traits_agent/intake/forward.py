"""Forward-protocol stream source: Fluentd Forward v1 over a Unix stream socket and over TCP.

Any Fluentd / Fluent Bit client library (fluent-logger-python, -golang, -java, -node, NLog,
Fluent Bit's `out_forward`, Fluentd's `out_forward`) can feed the agent through these
listeners. A connection carries a stream of msgpack values; each is one entry in one of the
forms `wire` decodes (Message, Forward, PackedForward, CompressedPackedForward with gzip, each
also with Fluent Bit's `[[time, metadata], record]` events); a nil value is a heartbeat and is
ignored. Entries go through the same validation and queues as datagrams
(`Ingest.store_entries`).

Speed: the connection's decoder frames values with a skipping Unpacker (no objects) and yields
each as its bytes; a Forward or PackedForward value of a JSON resource whose events all fit the
typed schema is decoded, validated and JSON-encoded by msgspec (`fastpath.StreamFastPath`) and
appended with per-message, not per-event, bookkeeping (`Ingest.store_payloads`). Anything else,
and any slice of events the fast path refuses, is unpacked and takes the general path, which
alone rejects, strips and counts: what is stored, acked and counted is the same either way
(tests/intake/test_fastpath_stream.py).

Where it runs: in the agent's process, or (`listen.forward_process`, the default on two CPUs
or more) in a child process of its own, `forward_worker`, whose `Ingest` sends the validated
payloads to the agent over a socketpair and whose `AckGate` is the agent's word that they are
durable (`forward_process` is the agent's side). This module is the same code either way: it
only sees an `_Ingest` and an `AckGate`, and waits on `Ingest.room()` after each read (the
child's link to the agent may be full: then it stops reading, TCP back-pressure).

JSON: a connection whose first byte is `[` or `{` is read as concatenated JSON entries and
answered in JSON, as Fluentd's in_forward does (fluent-logger-golang's `MarshalAsJSON`). In
msgpack those bytes are small integers, never an entry, so the rule cannot misread a client.

Acknowledgements mean "stored durably"
--------------------------------------
A message whose option map carries `chunk` is answered with `{"ack": chunk}` only once every
record it carried has been fsynced: for each queue it appended to, the queue's `durable_seq`
has reached the last seq assigned to it when the message was stored. The fsync itself is the
Syncer's group commit (`queue.fsync` "interval" or "always"); `AckGate` is the meeting point:
the reader marks what a message needs, the Syncer calls `AckGate.synced()` after each round,
and the ack task of the connection waits for the mark. A client that resends un-acked chunks
(Fluent Bit and Fluentd with `require_ack_response`, fluent-logger-golang with `RequestAck`)
therefore loses nothing to a crash or a power cut: what was acked survives both (the queue's
crash guarantees), and what was not acked is sent again (at-least-once: it may arrive twice).

Why so strict: other receivers answer as soon as the events are in memory or written to the OS,
and lose acknowledged events in a crash: Vector answers its sources' requests before its disk
buffer fsyncs (vectordotdev/vector#22489); Fluent Bit's in_forward acked chunks it had failed to
append (fluent/fluent-bit#9288) and lost acked chunks after a SIGKILL (fluent/fluent-bit#10952).

Other cases:

* `queue.fsync = "never"`: the ack is sent once the records are handed to the OS (they survive
  a crash of the agent, not a power cut). There is no durability promise in that mode.
* Acks by cause. An entry the agent cannot parse as the protocol (`wire.WireError`: not one of
  the entry forms, a time that is not a time, a bad tag, option, packed stream or gzip) is
  never acked: the messages before it on the connection are stored and acked, then the
  connection is closed. It is counted once in `protocol_errors{reason}`, its events (where
  they can be counted) in `rejected_events{reason}` and `received_events`, and logged as the
  error `message_rejected` with a `hint` naming the likely cause, typically an entry shape
  from a client newer than the agent. The client keeps the chunk and retries (its retries show
  in the counters and the log) while an operator sees it: acking would make the client drop
  data the agent could not read, which is how Fluent Bit 5.0.5's metadata form was once lost.
  An event that parses but fails the schema (unknown resource, missing or wrong field) is
  counted per event and the message acked: resending the same bytes cannot fix it, and not
  acking would make the client resend it forever. So is a message whose every event is
  invalid (acked at once) and events dropped because a queue is full (counted as drops).
* Acks are sent in the order of the messages on the connection. The connection is read on
  while acks wait (a client may pipeline chunks), up to `ForwardLimits.max_pending_acks`
  waiting acks; past that reading pauses, which is TCP back-pressure on the client.
* At shutdown (the intake nursery is cancelled) the bytes the kernel already holds for each
  connection are read without waiting and stored, as the datagram sources do (a client without
  acks believes them delivered); acks still pending then are not sent, so a client with acks
  sends those chunks again after the restart (duplicates, not loss).

Shared-key handshake: a listener given a `handshake.Security` (config
`listen.forward_shared_key` / `forward_users`, `forward_unix_*` for the Unix one) sends a HELO
on connect and takes only a PING with the right key (and user) as the first message; anything
else gets a failed PONG, is counted (`auth_failed`, `handshake_expected`) and logged, and the
connection is closed, nothing acked. It is what guards a TCP listener opened beyond loopback
(`listen.allow_remote`). On a keyless listener a PING gets a failed PONG saying so
(`unexpected_handshake`), and a connection that sends nothing for `SILENT_PEER_HINT_S` is
logged once as `forward_peer_silent` (a client with a key waits for a HELO and would otherwise
hang silently on both sides). The listeners are local by default: a Unix socket (file
permissions are the access control) and loopback TCP (the config refuses other addresses
unless `listen.allow_remote`).

Limits (`ForwardLimits`), so that no peer can starve the others (issue 7):

* Connections: at most `max_connections` per listener, so TCP peers (any local user) cannot
  lock out the group members on the Unix socket nor the other way round. When a listener is
  full, the connection that completed a value longest ago (one that never did, first) is
  closed for the newcomer (`evicted`), if it has been quiet for `evict_quiet_s`; otherwise the
  newcomer is closed at once (`too_many_connections`). A connection accepted while its listener
  is at least half full must send its first byte within `first_byte_timeout_s`
  (`first_byte_timeout`); any connection that neither sends nor is acked for `idle_timeout_s`
  is closed (`idle_timeout`).
* Memory: each connection holds at most `small_value_bytes` of an unfinished value on its own.
  A larger value (up to `max_buffer_size`; past it `too_large`) needs one of the server's
  big-value slots (`max_buffered_bytes` / (2 * `max_buffer_size`): the decoder holds an
  unfinished value twice, in its framing Unpacker and in the copy it hands on, so the
  default 64 MiB is one 32 MiB value at a time); without a free slot the
  connection stops reading (TCP back-pressure on the client, `forward_buffer_waits`) until one
  is released. A value holding a slot must be complete within `big_value_timeout_s`
  (`too_slow`). Measured: 64 connections each sending an unfinished 32 MiB value took the
  agent from 40 MiB to 2,013 MiB RSS before; see bench/forward_memory.py for now.
* CPU: a chunk's events are stored in slices of `SLICE_ENTRIES` with a checkpoint between them,
  and `wire.STREAM_BOUNDS` caps a value's events and inflated bytes: a compressed chunk cannot
  block the agent for seconds.

Bytes that are not msgpack (`not_msgpack`) or not JSON (`not_json`), or a value that is not an
array (`not_an_entry`: an HTTP request, say), mean the peer does not speak this protocol and the
stream cannot be resynchronised: that connection is closed at once (acks still owed are not
sent), the reason counted and logged; every other connection goes on.

Telemetry: counters `forward_connections{source}`, `forward_acks{source}`,
`forward_silent_connections{source}` and `forward_connections_closed{source,reason}` (eof,
reset, idle_timeout, first_byte_timeout, evicted (logged as `forward_connection_evicted`),
shutdown; the peer's errors not_msgpack, not_json, not_an_entry, too_large, too_slow, bad_time,
bad_tag, bad_option, bad_packed, bad_compressed, too_many_entries, auth_failed,
handshake_expected, unexpected_handshake, each also counted in `protocol_errors{reason}` with a
rate-limited `message_rejected` error line carrying a sample and a hint; too_many_connections,
counted in `rejected_events`; and internal_error, a bug of ours, logged with its traceback: it
closes only that connection), and `forward_buffer_waits{source}` (a read paused for the memory
budget, logged as `forward_read_paused`).
"""

from __future__ import annotations

import errno
import json
import math
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
import structlog
import trio

from traits_agent.intake.durability import AckGate, Mark
from traits_agent.intake.fastpath import StreamFastPath
from traits_agent.intake.handshake import Security, Session, is_ping
from traits_agent.intake.jsonstream import JsonStream, JsonStreamError, starts_json
from traits_agent.intake.unixsock import bind_unix
from traits_agent.intake.wire import (
    STREAM_BOUNDS,
    WireError,
    decode_value,
    event_count,
    unpack_value,
)
from traits_agent.observe.log import sample as log_sample

log = structlog.get_logger(__name__)

#: bytes asked of the kernel per receive
RECEIVE_BYTES = 256 * 1024
#: events stored between two checkpoints (~20 ms of work): a large chunk never blocks the agent
SLICE_ENTRIES = 4 * 1024
#: the listen(2) backlog of the sockets we bind
BACKLOG = 128
#: accept(2) errors that mean "out of resources, try again soon" (as trio.serve_listeners)
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_S = 0.1
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
#: a connection to a keyless listener that sends nothing this long is logged once (it may be
#: a client waiting for a HELO: see `_first_receive`)
SILENT_PEER_HINT_S = 10.0


@dataclass(frozen=True)
class ForwardLimits:
    """What one peer, and all of them together, may cost the agent."""

    #: concurrent connections per listener (so TCP peers, any local user, cannot lock out the
    #: group members on the Unix socket, nor the other way round)
    max_connections: int = 128
    #: close a connection that neither sent anything nor was acked for this long (a quiet
    #: client is not an error: fluent-logger-python notices a closed socket only on its next
    #: emit and sends that event after the one following it, so keep this generous)
    idle_timeout_s: float = 3600.0
    #: a connection accepted while its listener is at least half full must send its first
    #: byte within this (a quiet one on a roomy listener keeps `idle_timeout_s`)
    first_byte_timeout_s: float = 10.0
    #: when a listener is full, the connection that completed a value longest ago (one that
    #: never did first) is closed for the newcomer, if it has been quiet at least this long
    evict_quiet_s: float = 1.0
    #: the largest msgpack value (one message) a connection may send
    max_buffer_size: int = 32 * 1024 * 1024
    #: bytes of an unfinished value any connection may hold on its own; a larger value needs
    #: one of the shared big-value slots (`max_buffered_bytes`)
    small_value_bytes: int = 256 * 1024
    #: all connections' unfinished values above `small_value_bytes` together: this many
    #: bytes, in slots of `max_buffer_size` (at least one). A connection that needs a slot
    #: while none is free stops reading (TCP back-pressure) until one is
    max_buffered_bytes: int = 64 * 1024 * 1024
    #: a value that holds a big-value slot must be complete within this, or its connection
    #: is closed (`too_slow`): a slowloris cannot keep the slot
    big_value_timeout_s: float = 60.0
    #: acks waiting for an fsync per connection before reading pauses (back-pressure)
    max_pending_acks: int = 64

    @property
    def big_value_slots(self) -> int:
        """Big values at once: each slot is charged `HELD_COPIES` times `max_buffer_size`,
        since `_Decoder` holds an unfinished value twice (the skipping Unpacker's buffer and
        the copy it hands on), so the slots together stay within `max_buffered_bytes`."""
        return max(1, self.max_buffered_bytes // (HELD_COPIES * self.max_buffer_size))


HELD_COPIES = 2
"""How many times `_Decoder` holds an unfinished value's bytes (see `big_value_slots`)."""

DEFAULT_LIMITS = ForwardLimits()


# --------------------------------------------------------------------------- binding


def ensure_listening(sock: socket.socket) -> None:
    """`listen` on a bound stream socket that does not yet (ours and systemd's listen
    already: this keeps a socket's own backlog, systemd's `Backlog=` included)."""
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.listen(BACKLOG)


def bind_forward_unix(path: Path | str, mode: int, *, backlog: int = BACKLOG) -> socket.socket:
    """A listening Unix stream socket at `path` with permissions `mode` (stale socket files
    replaced, live ones and non-sockets refused: see `unixsock.bind_unix`)."""
    sock = bind_unix(path, socket.SOCK_STREAM, mode)
    try:
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_forward_tcp(host: str, port: int, *, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket on `host:port` (port 0: any free port; see getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # a restart must not fail on the previous run's connections in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


# --------------------------------------------------------------------------- serving


class _Ingest(Protocol):
    wall_clock: Callable[[], float]
    counters: Any

    def store_entries(self, entries: Iterable[Any], now: float) -> set[str]: ...
    def store_payloads(self, resource: Any, payloads: list[bytes]) -> set[str]: ...
    def flush(self, names: set[str]) -> None: ...
    async def room(self) -> None: ...
    def full(self) -> bool: ...
    def reject(
        self, reason: str, sample: object = None, events: int = 1, **context: object
    ) -> None: ...
    def protocol_error(
        self, reason: str, sample: object = None, events: int = 0, **context: object
    ) -> None: ...


class _Limited:
    """The memory contract both stream decoders keep: at most `limit` bytes of an unfinished
    value, `limit` going from `small` up to `large` (`grow`, while the caller holds a big-value
    slot) and back (`shrink`); bytes that do not fit wait (`starved`); past `large`, too_large.
    """

    _pending: bytes | memoryview

    def __init__(self, small: int, large: int) -> None:
        self.small = min(small, large)
        self.large = large
        self.limit = self.small
        self._pending = b""

    @property
    def unfinished(self) -> int:
        """Bytes of the value in progress that the decoder holds (or parsed into objects)."""
        raise NotImplementedError

    @property
    def waiting(self) -> int:
        """Bytes received that wait for room (at most one receive)."""
        return len(self._pending)

    @property
    def starved(self) -> bool:
        """Bytes wait that do not fit under the current limit."""
        return bool(self._pending)

    def grow(self) -> None:
        self.limit = self.large

    def shrink(self) -> None:
        self.limit = self.small

    def _room(self) -> int:
        """Bytes the next piece may have; 0 or less: starved (the caller grows the limit or
        refuses, then calls again); `too_large` when the limit is already `large`."""
        room = self.limit - self.unfinished
        if room <= 0 and self.limit >= self.large:
            raise _ProtocolError("too_large", f"a value over {self.large} bytes")
        return room


class _Decoder(_Limited):
    """msgpack values out of a byte stream, each as the bytes it came in: holding at most
    `limit` bytes of an unfinished value (from its first byte).

    The values are framed by an Unpacker that only skips (`Unpacker.skip`: it parses as the
    bytes come, incrementally, and builds no object), while the bytes of the unfinished value
    are kept here; each whole value is yielded as its bytes, for the stream fast path to
    decode with msgspec (`StreamFastPath.take_raw`) or the general path to unpack
    (`_unpack`). Building the Python objects of a 1000-event Forward array cost ~3 µs an
    event; msgspec decodes and validates it in ~0.6 µs.

    `limit` starts at `small`; bytes that do not fit wait in the decoder (`starved`) until the
    caller raises the limit to `large` (`grow`: it holds a big-value slot) — past `large` a
    value is `too_large`, and the values before it still come out. `shrink` goes back to
    `small`, with a fresh buffer and Unpacker as soon as no value is in progress: neither gives
    its memory back, so a connection that once sent a 32 MiB value would otherwise keep it.
    """

    raw = True  # yields bytes, not objects

    def __init__(self, small: int, large: int) -> None:
        super().__init__(small, large)
        self._renew()

    def _renew(self) -> None:
        self._skipper = msgpack.Unpacker(max_buffer_size=self.large, read_size=self.small)
        self._held = bytearray()  # the unfinished value's bytes
        self._base = 0  # the skipper's tell() at the first byte of `_held`
        self._stale = False  # the buffers grew for a big value

    @property
    def unfinished(self) -> int:
        return len(self._held)

    def grow(self) -> None:
        super().grow()
        self._stale = True

    def shrink(self) -> None:
        """Back to `small` (call when `unfinished <= small`); the buffers are renewed as soon
        as no value is in progress."""
        super().shrink()
        if self._stale and not self._held:
            self._renew()

    def values(self, data: bytes) -> Iterator[bytes]:
        if data:
            self._pending = bytes(self._pending) + data if self._pending else data
        while self._pending:
            room = self._room()
            if room <= 0:
                return  # starved: the caller grows the limit (or refuses) and calls again
            view = memoryview(self._pending)
            piece = view[:room]
            self._pending = view[len(piece) :] if len(piece) < len(view) else b""
            skipper, held = self._skipper, self._held
            skipper.feed(piece)
            held += piece
            start = 0
            try:
                while True:
                    skipper.skip()
                    end = skipper.tell() - self._base
                    value = bytes(held[start:end])
                    start = end
                    yield value
            except msgpack.OutOfData:
                pass
            except Exception as e:  # malformed msgpack: the stream cannot be resynchronised
                raise _ProtocolError("not_msgpack", f"{type(e).__name__}: {e}") from None
            finally:
                del held[:start]
                self._base += start
            if self.limit == self.small and self._stale and not held:
                self._renew()


def _unpack(raw: bytes) -> Any:
    """One whole value (as `_Decoder` yields it) as Python objects, read as `wire` reads
    datagrams (EventTime as float seconds, surrogateescape, any map keys); not_msgpack for
    what the skipping Unpacker framed but cannot be built (a map key that is an array)."""
    try:
        return unpack_value(raw)
    except Exception as e:
        raise _ProtocolError("not_msgpack", f"{type(e).__name__}: {e}") from None


class _JsonDecoder(_Limited):
    """JSON values out of a byte stream (a connection whose first byte is `[` or `{`), with
    the same memory contract as `_Decoder`: at most `small` bytes of an unfinished value
    until the caller grows the limit to `large` (a big-value slot); past `large`, too_large."""

    _pending: bytes
    raw = False  # yields objects

    def __init__(self, small: int, large: int) -> None:
        super().__init__(small, large)
        self._stream = JsonStream(large)

    @property
    def unfinished(self) -> int:
        return self._stream.held

    def values(self, data: bytes) -> Iterator[Any]:
        if data:
            self._pending = self._pending + data if self._pending else data
        while self._pending:
            room = self._room()
            if room <= 0:
                return  # starved: the caller grows the limit (or refuses) and calls again
            piece, self._pending = self._pending[:room], self._pending[room:]
            try:
                yield from self._stream.values(piece)
            except JsonStreamError as e:
                raise _ProtocolError(e.reason, e.detail) from None


class _ProtocolError(Exception):
    """The peer does not speak the protocol; its connection is closed."""

    def __init__(self, reason: str, sample: object) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sample = sample


def _pack_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=_json_default).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _pack_msgpack(value: Any) -> bytes:
    # a non-UTF-8 str (a chunk id as the peer sent it) goes back as its bytes
    return msgpack.packb(value, unicode_errors="surrogateescape")


#: an item for the connection's writer: an ack's chunk (is_ack) or the bytes of a handshake
#: reply, and what must be durable before it is sent
_Reply = tuple[Any, Mark, bool]


@dataclass(eq=False)
class _Connection:
    stream: trio.SocketStream
    source: str
    peer: str
    scope: trio.CancelScope
    idle_timeout_s: float
    reason: str = "eof"
    #: when it connected, then when it last completed a value (not a heartbeat)
    last_value: float = 0.0
    values: int = 0
    received: bool = False
    evicted: bool = False
    #: holds a big-value slot until this time (None: holds none)
    slot_deadline: float | None = None
    #: the stream's decoder, chosen by its first byte (JSON or msgpack)
    decoder: _Decoder | _JsonDecoder | None = None
    #: how replies are encoded: as the client writes
    encode: Callable[[Any], bytes] = _pack_msgpack
    #: the handshake still to do (None: none configured, or done)
    session: Session | None = None
    #: a message stopped the connection: nothing after it is read
    stopped: bool = False

    def buffered(self) -> int:
        return 0 if self.decoder is None else self.decoder.unfinished + self.decoder.waiting

    def progressed(self) -> None:
        self.received = True
        self.scope.deadline = trio.current_time() + self.idle_timeout_s

    def completed(self) -> None:
        """A whole value arrived (not just bytes of one)."""
        self.values += 1
        self.last_value = trio.current_time()


class ForwardServer:
    """Serves the Forward protocol on any number of listening stream sockets.

    Each listener has its own connection limit; the big-value memory budget is the server's,
    shared by all its listeners. The accept loop is our own rather than `trio.serve_listeners`
    (which also sleeps on EMFILE): a connection past the limit must be refused or make room
    before a handler starts. `serve(sock, name=...)` runs
    one listener until cancelled; start it with `await nursery.start(server.serve, sock, ...)`
    so the caller knows the socket is being served (`task_status` gets its address).
    """

    def __init__(
        self,
        ingest: _Ingest,
        durability: AckGate,
        *,
        limits: ForwardLimits = DEFAULT_LIMITS,
    ) -> None:
        self.ingest = ingest
        self.durability = durability
        self.limits = limits
        self.counters = ingest.counters
        #: open connections, all listeners together
        self.connections = 0
        #: each listener's open connections, by name
        self.listeners: dict[str, dict[_Connection, None]] = {}
        self._slots = trio.Semaphore(limits.big_value_slots)
        self._fast = StreamFastPath(STREAM_BOUNDS.max_entries, STREAM_BOUNDS.max_inflated)

    async def serve(
        self,
        sock: socket.socket,
        *,
        name: str,
        security: Security | None = None,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve connections on the bound `sock` (ours or inherited from systemd)
        until cancelled; the socket is closed on return, its file (if any) is left alone.

        At most `max_connections` on this listener: when it is full, the connection quiet
        longest is closed for the newcomer (`evicted`), or, when every one completed a value
        in the last `evict_quiet_s`, the newcomer is (`too_many_connections`). With
        `security`, every connection must pass the shared-key handshake first.
        """
        ensure_listening(sock)
        address = sock.getsockname()
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        conns = self.listeners.setdefault(name, {})
        limit = self.limits.max_connections
        async with listener, trio.open_nursery() as handlers:
            task_status.started(address)
            while True:
                try:
                    stream = await listener.accept()
                except OSError as e:
                    if e.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error("forward_accept_failed", source=name, error=str(e))
                    await trio.sleep(_ACCEPT_RETRY_S)
                    continue
                if len(conns) >= limit and not self._evict(name, conns):
                    self._closed(name, _peer(stream), "too_many_connections")
                    self.ingest.reject("too_many_connections", None, source=name, limit=limit)
                    await trio.aclose_forcefully(stream)
                    continue
                now = trio.current_time()
                conn = _Connection(
                    stream,
                    name,
                    _peer(stream),
                    trio.CancelScope(),
                    self.limits.idle_timeout_s,
                    last_value=now,
                    session=None if security is None else Session(security),
                )
                crowded = 2 * len(conns) >= limit
                conns[conn] = None
                self.connections += 1
                handlers.start_soon(self._connection, conn, conns, crowded)

    def _evict(self, name: str, conns: dict[_Connection, None]) -> bool:
        """Close the connection of `conns` quiet longest (one that never completed a value
        first) if it has been quiet `evict_quiet_s`; True if one was."""
        victim = min(conns, key=lambda c: (c.values > 0, c.last_value))
        quiet = trio.current_time() - victim.last_value
        if quiet < self.limits.evict_quiet_s:
            return False
        del conns[victim]
        victim.evicted = True
        victim.scope.cancel()
        log.info(  # rate-limited: observe.log.RATE_LIMITS
            "forward_connection_evicted",
            source=name,
            peer=victim.peer,
            quiet_s=round(quiet, 1),
            values=victim.values,
            limit=self.limits.max_connections,
        )
        return True

    async def _connection(
        self, conn: _Connection, conns: dict[_Connection, None], crowded: bool
    ) -> None:
        name = conn.source
        self.counters.inc("forward_connections", source=name)
        log.debug("forward_connected", source=name, peer=conn.peer)
        if crowded:  # a listener at least half full: the first byte must come soon
            conn.scope.deadline = trio.current_time() + self.limits.first_byte_timeout_s
        else:
            conn.scope.deadline = trio.current_time() + self.limits.idle_timeout_s
        try:
            with conn.scope:
                if conn.session is not None:
                    await conn.stream.send_all(_pack_msgpack(conn.session.helo()))
                send, receive = trio.open_memory_channel[_Reply](self.limits.max_pending_acks)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_replies, conn, receive, nursery.cancel_scope)
                    async with send:
                        await self._read(conn, send, nursery.cancel_scope)
            if conn.evicted:
                conn.reason = "evicted"
            elif conn.scope.cancelled_caught:
                conn.reason = "idle_timeout" if conn.received else "first_byte_timeout"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            conn.reason = "reset"  # while sending the HELO
        except Exception:
            # A bug of ours met by this peer's data. Kill only this connection: a client that
            # resends its chunk on reconnect must not be able to crash-loop the whole agent.
            conn.reason = "internal_error"
            log.exception("forward_connection_failed", source=name, peer=conn.peer)
        finally:
            self._release_slot(conn)
            conns.pop(conn, None)
            self.connections -= 1
            self._closed(name, conn.peer, conn.reason)
            await trio.aclose_forcefully(conn.stream)  # raises Cancelled when we are cancelled

    async def _take_slot(self, conn: _Connection, decoder: _Decoder | _JsonDecoder) -> None:
        """Wait for a big-value slot (not reading meanwhile: back-pressure), then let the
        decoder hold up to `max_buffer_size`."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            self.counters.inc("forward_buffer_waits", source=conn.source)
            log.info(  # rate-limited: observe.log.RATE_LIMITS
                "forward_read_paused",
                source=conn.source,
                peer=conn.peer,
                reason="buffer_budget",
                budget=self.limits.max_buffered_bytes,
            )
            await self._slots.acquire()
        conn.slot_deadline = trio.current_time() + self.limits.big_value_timeout_s
        decoder.grow()

    @property
    def buffered_bytes(self) -> int:
        """Bytes of unfinished values all connections hold now (decoded or waiting)."""
        return sum(c.buffered() for conns in self.listeners.values() for c in conns)

    def _release_slot(self, conn: _Connection) -> None:
        if conn.slot_deadline is not None:
            conn.slot_deadline = None
            self._slots.release()

    def _closed(self, source: str, peer: str, reason: str) -> None:
        self.counters.inc("forward_connections_closed", source=source, reason=reason)
        log.debug("forward_connection_closed", source=source, peer=peer, reason=reason)

    async def _read(
        self,
        conn: _Connection,
        acks: trio.MemorySendChannel[_Reply],
        nursery_scope: trio.CancelScope,
    ) -> None:
        """Receive, decode and store until EOF or a protocol error; hand chunks to ack.

        A value over `small_value_bytes` waits for a big-value slot before more of it is read,
        so all connections together hold at most `max_buffered_bytes` of big values (plus
        `small_value_bytes` each). A message the agent cannot use (see the module docstring)
        ends the reading: the replies owed for the messages before it are still sent, then the
        connection closes."""
        limits = self.limits
        decoder: _Decoder | _JsonDecoder | None = None
        try:
            while not conn.stopped:
                try:
                    with trio.move_on_at(
                        math.inf if conn.slot_deadline is None else conn.slot_deadline
                    ) as slow:
                        if decoder is None and conn.session is None:
                            data = await self._first_receive(conn)
                        else:
                            data = await conn.stream.receive_some(RECEIVE_BYTES)
                except trio.BrokenResourceError:
                    conn.reason = "reset"
                    return
                if slow.cancelled_caught:
                    raise _ProtocolError(
                        "too_slow",
                        f"a value over {limits.small_value_bytes} bytes not complete after "
                        f"{limits.big_value_timeout_s} s ({conn.buffered()} bytes so far)",
                    )
                if not data:
                    return  # EOF: acks still owed are sent before the connection closes
                conn.progressed()
                if decoder is None:
                    decoder = self._decoder_for(conn, data)
                pending = await self._take_async(conn, decoder, data)
                while decoder.starved:
                    if conn.slot_deadline is None:
                        await self._take_slot(conn, decoder)
                    pending += await self._take_async(conn, decoder, b"")
                if conn.slot_deadline is not None and decoder.unfinished <= decoder.small:
                    self._release_slot(conn)
                    decoder.shrink()
                for ack in pending:
                    await acks.send(ack)
                await self.ingest.room()  # the store is behind (a separate intake process)
        except _ProtocolError as e:
            conn.reason = e.reason
            self.ingest.protocol_error(e.reason, e.sample, source=conn.source, peer=conn.peer)
            nursery_scope.cancel()  # no more acks either: the stream is out of step
        except trio.Cancelled:
            # the agent is stopping, unless this connection's own end came first: its idle
            # timeout or eviction (conn.scope), or a reset its reply task met (conn.reason).
            # Not `nursery_scope.cancel_called`: at a stop the reply task may take its
            # Cancelled first, and a nursery cancels itself when a child raises, Cancelled
            # too; this read then skipped the drain and what the kernel held was lost (the
            # connection closed with unread bytes: a reset), about 1 stop in 3 under load.
            if not conn.scope.cancel_called and conn.reason == "eof":
                conn.reason = "shutdown"
                self._drain(conn)
            raise

    def _decoder_for(self, conn: _Connection, data: bytes) -> _Decoder | _JsonDecoder:
        """The decoder for a connection whose first bytes are `data`: JSON when it starts
        with `[` or `{` (as Fluentd's in_forward decides; answered in JSON too), else
        msgpack."""
        limits = self.limits
        if starts_json(data[0]):
            conn.encode = _pack_json
            conn.decoder = _JsonDecoder(limits.small_value_bytes, limits.max_buffer_size)
        else:
            conn.decoder = _Decoder(limits.small_value_bytes, limits.max_buffer_size)
        return conn.decoder

    async def _first_receive(self, conn: _Connection) -> bytes:
        """The first bytes of a connection to a listener without a shared key. A client that
        sends nothing for a while may be waiting for a HELO (it has a shared key configured):
        say so once in the log, then go on waiting (it may also just be quiet)."""
        with trio.move_on_after(SILENT_PEER_HINT_S):
            return await conn.stream.receive_some(RECEIVE_BYTES)
        self.counters.inc("forward_silent_connections", source=conn.source)
        log.warning(  # rate-limited: observe.log.RATE_LIMITS
            "forward_peer_silent",
            source=conn.source,
            peer=conn.peer,
            after_s=SILENT_PEER_HINT_S,
            hint="a client configured with a shared key (Fluent Bit Shared_Key, Fluentd "
            "<security>) waits for a HELO this listener does not send: configure the same key "
            "on the listener (listen.forward_shared_key) or remove it from the client",
        )
        return await conn.stream.receive_some(RECEIVE_BYTES)

    def _take(
        self,
        conn: _Connection,
        decoder: _Decoder | _JsonDecoder,
        data: bytes,
        acks: list[_Reply],
    ) -> Iterator[None]:
        """Decode `data`, store every whole value, flush once; append to `acks` the acks the
        values asked for.

        A generator: it yields after every `SLICE_ENTRIES` events stored, so the caller can
        let the other tasks run (`_take_async`) or not (`_take_now`, at shutdown). A chunk of
        262,144 events is then a few hundred short slices, not seconds of a blocked agent.
        Raises _ProtocolError when the peer is not speaking the protocol at all (after storing
        and flushing what came before the bad bytes). A message that is msgpack (or JSON) but
        not a usable entry sets `conn.stopped` instead: what came before it is still acked.
        """
        ingest = self.ingest
        durability = self.durability
        now = ingest.wall_clock()
        touched: set[str] = set()
        work = 0
        try:
            for item in decoder.values(data):
                fast = None
                if decoder.raw and conn.session is None:
                    fast = self._fast.take_raw(item, now)
                if fast is None:
                    value = _unpack(item) if decoder.raw else item
                    if value is None:  # heartbeat
                        continue
                    if conn.session is not None:
                        acks.append(self._handshake(conn, value))
                        if conn.stopped:
                            break
                        continue
                    if type(value) is not list:
                        raise _ProtocolError("not_an_entry", _sample(value))
                    conn.completed()
                    fast = self._fast.take(value, now)
                    if fast is None:
                        try:
                            entries, option = decode_value(value)
                        except WireError as e:
                            acks.extend(self._refuse(conn, value, e.reason, e.events))
                            break
                else:  # taken from its bytes: unpacked only if a slice needs the general path
                    conn.completed()
                    value = item
                if fast is not None:  # Forward / PackedForward of well-formed events
                    entries, option = fast.events, fast.option
                chunk = option.get("chunk") if option else None
                names: set[str] = set()
                general: list[Any] | None = None
                for start in range(0, len(entries), SLICE_ENTRIES):
                    stop = start + SLICE_ENTRIES
                    got = None if fast is None else self._fast.payloads(fast, start, stop)
                    if fast is not None and got is not None:
                        names |= ingest.store_payloads(fast.resource, got)
                    else:
                        # the general path, for the events of this slice (one the fast path
                        # took whole decodes whole: `take` checked what decode_value checks)
                        if general is None:
                            if fast is None:
                                general = entries
                            else:
                                whole = _unpack(value) if type(value) is bytes else value
                                general = decode_value(whole)[0]
                        names |= ingest.store_entries(general[start:stop], now)
                    work += min(SLICE_ENTRIES, len(entries) - start)
                    if work >= SLICE_ENTRIES:
                        work = 0
                        yield
                touched |= names
                if chunk is not None:
                    acks.append((chunk, durability.mark(names), True))
        finally:
            if touched:
                ingest.flush(touched)
                durability.written()

    def _refuse(
        self, conn: _Connection, value: list[Any], reason: str, events: int
    ) -> list[_Reply]:
        """A message that is not a usable entry: counted (per event and once as a protocol
        error), logged with its likely cause, never acked; the connection stops here. A client
        with acks keeps the chunk and sends it again, so nothing is lost while an operator
        sees the error (acking it would make the client drop it). A PING (a client with a
        shared key, to a listener without one) gets a failed PONG that says so."""
        replies: list[_Reply] = []
        if is_ping(value):
            reason = "unexpected_handshake"
            pong = ["PONG", False, "this listener has no shared key configured", "", ""]
            replies.append((conn.encode(pong), (), False))
        conn.reason = reason
        conn.stopped = True
        self.ingest.protocol_error(
            reason, _sample(value), events, source=conn.source, peer=conn.peer
        )
        return replies

    def _handshake(self, conn: _Connection, value: Any) -> _Reply:
        """The PONG for the first message of a connection to a listener with a shared key."""
        session = conn.session
        assert session is not None
        pong, failure = session.answer(value)
        if failure is None:
            conn.session = None
            log.debug("forward_handshake_passed", source=conn.source, peer=conn.peer)
        else:
            reason = "auth_failed" if is_ping(value) else "handshake_expected"
            conn.reason = reason
            conn.stopped = True
            self.ingest.protocol_error(
                reason,
                _sample(value),
                0 if is_ping(value) else event_count(value),
                source=conn.source,
                peer=conn.peer,
                error=failure,
            )
        return conn.encode(pong), (), False

    async def _take_async(
        self, conn: _Connection, decoder: _Decoder | _JsonDecoder, data: bytes
    ) -> list[_Reply]:
        """`_take`, letting the other tasks run between its slices, and waiting there while
        the store is behind (`Ingest.room`: the intake process's link to the agent is full;
        a read of gzip values can inflate to hundreds of MB, so waiting only between reads
        would not bound it). Not cancellable midway: the values are out of the decoder and
        in memory only, so they are stored whole."""
        acks: list[_Reply] = []
        room = self.ingest.room
        for _ in self._take(conn, decoder, data, acks):
            await trio.lowlevel.cancel_shielded_checkpoint()
            with trio.CancelScope(shield=True):
                await room()
        return acks

    def _take_now(self, conn: _Connection, decoder: _Decoder | _JsonDecoder, data: bytes) -> None:
        """`_take` in one go (at shutdown, when nothing may wait)."""
        for _ in self._take(conn, decoder, data, []):
            pass

    def _drain(self, conn: _Connection) -> None:
        """At shutdown: store what the kernel already holds for this connection (bounded)."""
        sock = conn.stream.socket
        taken = 0
        try:
            while taken < self.limits.max_buffer_size and not conn.stopped:
                if conn.decoder is not None and conn.decoder.starved:
                    break
                if self.ingest.full():  # nothing may wait now: what is left stays unread
                    break
                try:
                    data = _recv_nowait(sock)
                except BlockingIOError:
                    break
                if not data:
                    break
                taken += len(data)
                decoder = conn.decoder or self._decoder_for(conn, data)
                self._take_now(conn, decoder, data)
        except _ProtocolError as e:
            self.ingest.protocol_error(e.reason, e.sample, source=conn.source, peer=conn.peer)
        except OSError:
            pass  # reset by the peer: nothing more to take

    async def _send_replies(
        self,
        conn: _Connection,
        acks: trio.MemoryReceiveChannel[_Reply],
        nursery_scope: trio.CancelScope,
    ) -> None:
        """Write `{"ack": chunk}` for each chunk, in order, once its records are durable (and
        a handshake reply as it comes)."""
        durability = self.durability
        async with acks:
            async for item, mark, is_ack in acks:
                await durability.wait(mark)
                answer = self._ack_bytes(conn, item) if is_ack else item
                if answer is None:
                    continue
                try:
                    await conn.stream.send_all(answer)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    conn.reason = "reset"
                    nursery_scope.cancel()
                    return
                conn.progressed()
                if is_ack:
                    self.counters.inc("forward_acks", source=conn.source)

    def _ack_bytes(self, conn: _Connection, chunk: Any) -> bytes | None:
        """`{"ack": chunk}` as the peer sent `chunk`: a non-UTF-8 str goes back as its bytes
        (surrogateescape: found by the Forward fuzz target, it used to close the connection as
        internal_error, and the client resent the chunk forever). None for a chunk msgpack
        cannot write back: no ack, counted (`forward_acks_unencodable`) and logged; the
        connection goes on."""
        try:
            return conn.encode({"ack": chunk})
        except (ValueError, TypeError, OverflowError) as e:
            self.counters.inc("forward_acks_unencodable", source=conn.source)
            log.warning(  # rate-limited: observe.log.RATE_LIMITS
                "forward_ack_unencodable",
                source=conn.source,
                peer=conn.peer,
                sample=chunk,
                error=str(e),
            )
            return None


def _recv_nowait(sock: trio.socket.SocketType) -> bytes:
    """One non-blocking read of a trio socket, without a checkpoint (usable when cancelled).
    Raises BlockingIOError when nothing is waiting."""
    view = socket.socket(fileno=sock.fileno())  # borrows the fd: detached, never closed
    try:
        return view.recv(RECEIVE_BYTES, socket.MSG_DONTWAIT)
    finally:
        view.detach()


def _sample(value: object) -> object:
    """A short sample of a value for the log: bounded in time and size whatever the value's
    size or nesting (see `observe.log.sample`)."""
    return log_sample(value)


def _peer(stream: trio.SocketStream) -> str:
    """Who is at the other end: the process (Unix socket credentials) or host:port."""
    sock = stream.socket
    try:
        if sock.family == socket.AF_UNIX:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            pid, uid, _gid = _PEERCRED.unpack(raw)
            return f"pid={pid} uid={uid}"
        host, port = sock.getpeername()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except (OSError, AttributeError):  # AttributeError: no SO_PEERCRED on this platform
        return "unknown"
