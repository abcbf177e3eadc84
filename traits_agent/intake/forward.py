"""Forward-protocol stream source: Fluentd Forward v1 over a Unix stream socket and over TCP.

Any Fluentd / Fluent Bit client library (fluent-logger-python, -golang, -java, -node, NLog,
Fluent Bit's `out_forward`, Fluentd's `out_forward`) can feed the agent through these
listeners. A connection carries a stream of msgpack values; each is one entry in one of the
forms `wire` decodes (Message, Forward, PackedForward, CompressedPackedForward with gzip, each
also with Fluent Bit's `[[time, metadata], record]` events); a nil value is a heartbeat and is
ignored. Entries go through the same validation and queues as datagrams
(`Ingest.store_entries`).

JSON: a connection whose first byte is `[` or `{` is read as concatenated JSON entries and
answered in JSON, as Fluentd's in_forward does (fluent-logger-golang's `MarshalAsJSON`). In
msgpack those bytes are small integers, never an entry, so the rule cannot misread a client.

Acknowledgements mean "stored durably"
--------------------------------------
A message whose option map carries `chunk` is answered with `{"ack": chunk}` only once every
record it carried has been fsynced: for each queue it appended to, the queue's `durable_seq`
has reached the last seq assigned to it when the message was stored. The fsync itself is the
Syncer's group commit (`queue.fsync` "interval" or "always"); `Durability` is the meeting point:
the reader marks what a message needs, the Syncer calls `Durability.synced()` after each round,
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

Limits (`ForwardLimits`): at most `max_connections` concurrent connections across the
listeners of one `ForwardServer` (more are accepted and closed at once, counted); a value
larger than `max_buffer_size` closes its connection (`too_large`); a connection that neither
sends anything nor gets an ack for `idle_timeout_s` is closed. Bytes that are not msgpack
(`not_msgpack`) or not JSON (`not_json`), or a value that is not an array (`not_an_entry`: an
HTTP request, say), mean the peer does not speak this protocol and the stream cannot be
resynchronised: that connection is closed at once (acks still owed are not sent), the reason
counted and logged; every other connection goes on.

Telemetry: counters `forward_connections{source}`, `forward_acks{source}`,
`forward_silent_connections{source}` and `forward_connections_closed{source,reason}` (eof,
reset, idle_timeout, shutdown; the peer's errors not_msgpack, not_json, not_an_entry,
too_large, bad_time, bad_tag, bad_option, bad_packed, bad_compressed, auth_failed,
handshake_expected, unexpected_handshake, each also counted in `protocol_errors{reason}` with a
rate-limited `message_rejected` error line carrying a sample and a hint; too_many_connections;
and internal_error, a bug of ours, logged with its traceback: it closes only that connection).
"""

from __future__ import annotations

import errno
import json
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
import structlog
import trio

from traits_agent.intake.durability import Durability, Mark
from traits_agent.intake.handshake import Security, Session, is_ping
from traits_agent.intake.jsonstream import JsonStream, JsonStreamError, starts_json
from traits_agent.intake.unixsock import bind_unix
from traits_agent.intake.wire import WireError, decode_value, event_count, stream_unpacker

log = structlog.get_logger(__name__)

#: bytes asked of the kernel per receive
RECEIVE_BYTES = 256 * 1024
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
    """What one peer may cost the agent."""

    max_connections: int = 256
    #: close a connection that neither sent anything nor was acked for this long (a quiet
    #: client is not an error: fluent-logger-python notices a closed socket only on its next
    #: emit and sends that event after the one following it, so keep this generous)
    idle_timeout_s: float = 3600.0
    #: the largest msgpack value (one message) a connection may send
    max_buffer_size: int = 32 * 1024 * 1024
    #: acks waiting for an fsync per connection before reading pauses (back-pressure)
    max_pending_acks: int = 64


DEFAULT_LIMITS = ForwardLimits()


# --------------------------------------------------------------------------- binding


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
    def flush(self, names: set[str]) -> None: ...
    def reject(
        self, reason: str, sample: object = None, events: int = 1, **context: object
    ) -> None: ...
    def protocol_error(
        self, reason: str, sample: object = None, events: int = 0, **context: object
    ) -> None: ...


class _Decoder:
    """msgpack values out of a byte stream, holding at most `limit` bytes of an unfinished
    value: a value that does not fit is `too_large`, the values before it still come out."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._unpacker = stream_unpacker(limit)
        self._fed = 0

    def values(self, data: bytes) -> Iterator[Any]:
        unpacker = self._unpacker
        view = memoryview(data)
        while view:
            room = self.limit - (self._fed - unpacker.tell())  # tell(): bytes consumed so far
            if room <= 0:
                raise _ProtocolError("too_large", f"a value over {self.limit} bytes")
            piece = view[:room]
            unpacker.feed(piece)
            self._fed += len(piece)
            view = view[len(piece) :]
            try:
                yield from unpacker
            except Exception as e:  # malformed msgpack: the stream cannot be resynchronised
                raise _ProtocolError("not_msgpack", f"{type(e).__name__}: {e}") from None


class _JsonDecoder:
    """JSON values out of a byte stream (a connection whose first byte is `[` or `{`)."""

    def __init__(self, limit: int) -> None:
        self._stream = JsonStream(limit)

    def values(self, data: bytes) -> Iterator[Any]:
        try:
            yield from self._stream.values(data)
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


#: an item for the connection's writer: the bytes to send, what must be durable first, and
#: whether it is an ack (counted) rather than a handshake reply
_Reply = tuple[bytes, Mark, bool]


@dataclass
class _Connection:
    stream: trio.SocketStream
    source: str
    peer: str
    scope: trio.CancelScope
    idle_timeout_s: float
    reason: str = "eof"
    #: the stream's decoder, chosen by its first byte (JSON or msgpack)
    decoder: _Decoder | _JsonDecoder | None = None
    #: how replies are encoded: as the client writes
    encode: Callable[[Any], bytes] = msgpack.packb
    #: the handshake still to do (None: none configured, or done)
    session: Session | None = None
    #: a message stopped the connection: nothing after it is read
    stopped: bool = False

    def progressed(self) -> None:
        self.scope.deadline = trio.current_time() + self.idle_timeout_s


class ForwardServer:
    """Serves the Forward protocol on any number of listening stream sockets.

    One server holds the connection limit for all its listeners. `serve(sock, name=...)` runs
    one listener until cancelled; start it with `await nursery.start(server.serve, sock, ...)`
    so the caller knows the socket is being served (`task_status` gets its address). A
    listener given `security` asks every connection for the shared-key handshake first.
    """

    def __init__(
        self,
        ingest: _Ingest,
        durability: Durability,
        *,
        limits: ForwardLimits = DEFAULT_LIMITS,
    ) -> None:
        self.ingest = ingest
        self.durability = durability
        self.limits = limits
        self.counters = ingest.counters
        #: open connections, all listeners together
        self.connections = 0

    async def serve(
        self,
        sock: socket.socket,
        *,
        name: str,
        security: Security | None = None,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve connections on the bound `sock` (ours or inherited from systemd)
        until cancelled; the socket is closed on return, its file (if any) is left alone."""
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.listen(BACKLOG)  # one that systemd passed listens already, with its Backlog=
        address = sock.getsockname()
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
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
                if self.connections >= self.limits.max_connections:
                    self._closed(name, _peer(stream), "too_many_connections")
                    self.ingest.reject(
                        "too_many_connections", None, source=name, limit=self.limits.max_connections
                    )
                    await trio.aclose_forcefully(stream)
                    continue
                self.connections += 1
                handlers.start_soon(self._connection, stream, name, security)

    async def _connection(
        self, stream: trio.SocketStream, name: str, security: Security | None = None
    ) -> None:
        conn = _Connection(
            stream,
            name,
            _peer(stream),
            trio.CancelScope(),
            self.limits.idle_timeout_s,
        )
        self.counters.inc("forward_connections", source=name)
        log.debug("forward_connected", source=name, peer=conn.peer)
        conn.progressed()
        try:
            with conn.scope:
                if security is not None:
                    conn.session = Session(security)
                    await stream.send_all(msgpack.packb(conn.session.helo()))
                send, receive = trio.open_memory_channel[_Reply](self.limits.max_pending_acks)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_replies, conn, receive, nursery.cancel_scope)
                    async with send:
                        await self._read(conn, send, nursery.cancel_scope)
            if conn.scope.cancelled_caught:
                conn.reason = "idle_timeout"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            conn.reason = "reset"  # while sending the HELO
        except Exception:
            # A bug of ours met by this peer's data. Kill only this connection: a client that
            # resends its chunk on reconnect must not be able to crash-loop the whole agent.
            conn.reason = "internal_error"
            log.exception("forward_connection_failed", source=name, peer=conn.peer)
        finally:
            self.connections -= 1
            self._closed(name, conn.peer, conn.reason)
            await trio.aclose_forcefully(stream)  # raises Cancelled when we are being cancelled

    def _closed(self, source: str, peer: str, reason: str) -> None:
        self.counters.inc("forward_connections_closed", source=source, reason=reason)
        log.debug("forward_connection_closed", source=source, peer=peer, reason=reason)

    async def _read(
        self,
        conn: _Connection,
        replies: trio.MemorySendChannel[_Reply],
        nursery_scope: trio.CancelScope,
    ) -> None:
        """Receive, decode and store until EOF or a protocol error; hand chunks to ack.

        A message the agent cannot use (see the module docstring) ends the reading: the
        replies owed for the messages before it are still sent, then the connection closes.
        """
        try:
            first = True
            while not conn.stopped:
                try:
                    if first and conn.session is None:
                        data = await self._first_receive(conn)
                    else:
                        data = await conn.stream.receive_some(RECEIVE_BYTES)
                except trio.BrokenResourceError:
                    conn.reason = "reset"
                    return
                first = False
                if not data:
                    return  # EOF: acks still owed are sent before the connection closes
                conn.progressed()
                for reply in self._take(conn, data):
                    await replies.send(reply)
        except _ProtocolError as e:
            conn.reason = e.reason
            self.ingest.protocol_error(e.reason, e.sample, source=conn.source, peer=conn.peer)
            nursery_scope.cancel()  # no more acks either: the stream is out of step
        except trio.Cancelled:
            if not (conn.scope.cancel_called or nursery_scope.cancel_called):
                conn.reason = "shutdown"
                self._drain(conn)
            raise

    async def _first_receive(self, conn: _Connection) -> bytes:
        """The first bytes of a connection to a listener without a shared key. A client that
        sends nothing for a while may be waiting for a HELO (it has a shared key configured):
        say so once in the log, then go on waiting (it may also just be quiet)."""
        with trio.move_on_after(SILENT_PEER_HINT_S):
            return await conn.stream.receive_some(RECEIVE_BYTES)
        self.counters.inc("forward_silent_connections", source=conn.source)
        log.warning(
            "forward_peer_silent",
            source=conn.source,
            peer=conn.peer,
            after_s=SILENT_PEER_HINT_S,
            hint="a client configured with a shared key (Fluent Bit Shared_Key, Fluentd "
            "<security>) waits for a HELO this listener does not send: configure the same key "
            "on the listener (listen.forward_shared_key) or remove it from the client",
        )
        return await conn.stream.receive_some(RECEIVE_BYTES)

    def _take(self, conn: _Connection, data: bytes) -> list[_Reply]:
        """Decode `data`, store every whole value, flush once; the replies owed.

        Raises _ProtocolError when the peer is not speaking the protocol at all (after storing
        and flushing what came before the bad bytes). A message that is msgpack (or JSON) but
        not a usable entry sets `conn.stopped` instead: what came before it is still acked.
        """
        ingest = self.ingest
        durability = self.durability
        now = ingest.wall_clock()
        touched: set[str] = set()
        replies: list[_Reply] = []
        if conn.decoder is None:
            if starts_json(data[0]):
                conn.decoder = _JsonDecoder(self.limits.max_buffer_size)
                conn.encode = _pack_json
            else:
                conn.decoder = _Decoder(self.limits.max_buffer_size)
        try:
            for value in conn.decoder.values(data):
                if value is None:  # heartbeat
                    continue
                if conn.session is not None:
                    replies.append(self._handshake(conn, value))
                    if conn.stopped:
                        break
                    continue
                if type(value) is not list:
                    raise _ProtocolError("not_an_entry", _sample(value))
                try:
                    entries, option = decode_value(value)
                except WireError as e:
                    replies.extend(self._refuse(conn, value, e.reason, e.events))
                    break
                names = ingest.store_entries(entries, now)
                touched |= names
                chunk = option.get("chunk") if option else None
                if chunk is not None:
                    reply = conn.encode({"ack": chunk})
                    replies.append((reply, durability.mark(names), True))
        finally:
            if touched:
                ingest.flush(touched)
                durability.written()
        return replies

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

    def _drain(self, conn: _Connection) -> None:
        """At shutdown: store what the kernel already holds for this connection (bounded)."""
        sock = conn.stream.socket
        taken = 0
        try:
            while taken < self.limits.max_buffer_size and not conn.stopped:
                try:
                    data = _recv_nowait(sock)
                except BlockingIOError:
                    break
                if not data:
                    break
                taken += len(data)
                self._take(conn, data)
        except _ProtocolError as e:
            self.ingest.protocol_error(e.reason, e.sample, source=conn.source, peer=conn.peer)
        except OSError:
            pass  # reset by the peer: nothing more to take

    async def _send_replies(
        self,
        conn: _Connection,
        replies: trio.MemoryReceiveChannel[_Reply],
        nursery_scope: trio.CancelScope,
    ) -> None:
        """Write each reply in order: an ack `{"ack": chunk}` once its records are durable."""
        durability = self.durability
        async with replies:
            async for data, mark, is_ack in replies:
                await durability.wait(mark)
                try:
                    await conn.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    conn.reason = "reset"
                    nursery_scope.cancel()
                    return
                conn.progressed()
                if is_ack:
                    self.counters.inc("forward_acks", source=conn.source)


def _recv_nowait(sock: trio.socket.SocketType) -> bytes:
    """One non-blocking read of a trio socket, without a checkpoint (usable when cancelled).
    Raises BlockingIOError when nothing is waiting."""
    view = socket.socket(fileno=sock.fileno())  # borrows the fd: detached, never closed
    try:
        return view.recv(RECEIVE_BYTES, socket.MSG_DONTWAIT)
    finally:
        view.detach()


def _sample(value: object) -> str:
    """A short description of a value for the log, cheap even for a 32 MiB one."""
    if isinstance(value, (list, tuple)):
        head = ", ".join(_sample(v) for v in value[:3])
        more = ", ..." if len(value) > 3 else ""
        return f"[{head}{more}] ({len(value)} elements)"
    if isinstance(value, (str, bytes)):
        return repr(value[:40]) + (f" ({len(value)} long)" if len(value) > 40 else "")
    if isinstance(value, dict):
        return f"<map of {len(value)}>"
    return repr(value)[:80]


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
