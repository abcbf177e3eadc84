"""The HTTP/1.1 transport under the agent's httpx client: h11 on trio streams, and little else.

Why not httpx's default transport (httpcore): a POST of a 1000-item batch cost the agent
1.2-1.5 ms of CPU through httpx, of which httpcore's per-request machinery (its pool's request
queue, connection wrappers, trace hooks, per-operation exception maps, a cancel scope per
socket call) was 0.6 ms; h11 itself, which both use, is 0.2 ms (`bench/bench_upload.py`). At
300 batches a second that is a fifth of the core that also stores and reads the queue. The
agent needs one thing from a transport: HTTP/1.1 POSTs over keep-alive connections to one
upstream, so this is that, on the state machine httpcore uses (h11), behind httpx's transport
interface — the client API, the policy (`policy.py`) and the exceptions stay httpx's. It
speaks to no proxy: with one in the environment `make_client` keeps httpx's transport.

What it does:

- *Keep-alive*: a connection whose exchange ended cleanly (both sides DONE in h11, and not a
  byte past the answer's end: it would be read as the next request's answer) goes back to
  an idle list per origin; it is dropped instead when idle for KEEPALIVE_EXPIRY_S, when the
  server has hung up or sent anything while idle (the socket is readable, or, over TLS, a
  record already read waits inside the TLS layer), or when the list already holds
  `max_keepalive` connections.
- *Bounded*: at most `max_connections` in use (a caller past it waits, up to the pool
  timeout) and `max_keepalive` idle per origin; an answer's head is bounded by h11 (16 KiB)
  and by MAX_INFORMATIONAL interim answers, its body read only as the caller asks.
- *Timeouts* from the request (`httpx.Timeout`): connect (TCP and TLS handshake), write (each
  send), read (each receive), pool (waiting for a connection slot) — raised as httpx's.
- *TLS*: `trio.SSLStream` with httpx's default context (certifi, the environment's
  `SSL_CERT_FILE`/`SSL_CERT_DIR`), SNI and ALPN `http/1.1`.
- *An early answer*: a server that answers (413, 401...) and hangs up before reading the whole
  body breaks our send; the answer is still read and returned, as httpcore does, because it is
  the one that says what to do.
- *Cancellation* (the policy's deadline) anywhere in an exchange closes that connection: a
  half-sent request or half-read answer is never reused.

Errors, translated here and nowhere else: connect failures → `httpx.ConnectError`, send →
`WriteError`, receive → `ReadError`, a malformed answer or a hang-up before one →
`RemoteProtocolError`, and the four timeouts.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx
import trio

#: an idle keep-alive connection older than this is closed, not reused (httpx's default)
KEEPALIVE_EXPIRY_S = 5.0
#: how much one receive asks for
READ_SIZE = 64 * 1024
DEFAULT_MAX_CONNECTIONS = 8
#: interim (1xx) answers taken before the answer; past this the server is broken or hostile
MAX_INFORMATIONAL = 8

_NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)


def _describe(error: BaseException) -> str:
    """What went wrong, for the log: trio wraps what broke a stream (a failed certificate
    check, a reset) in BrokenResourceError; the cause is the part an operator needs."""
    if isinstance(error, trio.BrokenResourceError) and error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _limit(timeouts: dict[str, float | None], name: str) -> float:
    value = timeouts.get(name)
    return float("inf") if value is None else value


class _Connection:
    """One HTTP/1.1 connection: its stream, its h11 state, and its slot in the transport."""

    __slots__ = ("_slot", "h11", "idle_since", "origin", "stream")

    def __init__(
        self, origin: tuple[bytes, str, int], stream: trio.abc.Stream, slot: trio.Semaphore
    ) -> None:
        self.origin = origin
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self._slot: trio.Semaphore | None = slot

    def release(self) -> None:
        """Give back the connection slot (once: a connection is released when it goes idle or
        is closed, whichever comes first)."""
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    def retake(self, slot: trio.Semaphore) -> None:
        self._slot = slot

    def readable(self) -> bool:
        """Anything waiting on an idle connection: the server hung up, or sent what we did not
        ask for. Either way it cannot carry a new request."""
        stream: Any = self.stream
        if isinstance(stream, trio.SSLStream):
            # What the server sent can have left the socket already and wait inside the TLS
            # layer: a record read with the answer's but not decrypted yet (trio's incoming
            # buffer: no public name, so its absence counts as "something waits"), or
            # decrypted bytes not read yet (`pending`). The socket shows neither.
            incoming = getattr(stream, "_incoming", None)
            if incoming is None or incoming.pending or stream.pending():
                return True
            stream = stream.transport_stream
        sock = getattr(stream, "socket", None)
        return sock is None or sock.is_readable()

    async def close(self) -> None:
        self.release()
        await trio.aclose_forcefully(self.stream)


class _AnswerBody(httpx.AsyncByteStream):
    """The body of one answer, read from its connection as the caller iterates; closing it
    returns the connection to the idle list if the exchange ended cleanly, else closes it."""

    def __init__(self, transport: LeanTransport, conn: _Connection, read_s: float) -> None:
        self._transport = transport
        self._conn = conn
        self._read_s = read_s
        self._ended = False
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        try:
            while not self._ended:
                event = await _next_event(conn, self._read_s)
                if type(event) is h11.Data:
                    yield bytes(event.data)
                elif type(event) is h11.EndOfMessage:
                    self._ended = True
        except GeneratorExit:  # the caller stopped iterating; its `aclose` follows
            raise
        except BaseException:  # an error or a cancel mid-answer: this connection is done
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        h = conn.h11
        # bytes past the answer's end (a second answer, a body longer than its length) would
        # be read as the next request's answer: such a connection is not reused
        if self._ended and h.our_state is h.their_state is h11.DONE and not h.trailing_data[0]:
            h.start_next_cycle()
            await self._transport._keep(conn)
        else:
            await conn.close()


async def _next_event(conn: _Connection, read_s: float) -> Any:
    """The next h11 event of `conn`'s answer, receiving as needed (read timeout per receive)."""
    while True:
        try:
            event = conn.h11.next_event()
        except h11.RemoteProtocolError as e:
            raise httpx.RemoteProtocolError(str(e)) from e
        if event is not h11.NEED_DATA:
            return event
        # a bare CancelScope, not fail_after: this runs once or twice per request, and the
        # context-manager wrapper alone cost more than the receive
        with trio.CancelScope(deadline=trio.current_time() + read_s) as scope:
            try:
                data = await conn.stream.receive_some(READ_SIZE)
            except _NETWORK_ERRORS as e:
                raise httpx.ReadError(_describe(e)) from e
        if scope.cancelled_caught:
            raise httpx.ReadTimeout("no answer within the read timeout")
        try:
            # b"": the server hung up (h11 knows whether that ends the answer or breaks it)
            conn.h11.receive_data(bytes(data))
        except h11.RemoteProtocolError as e:
            raise httpx.RemoteProtocolError(str(e)) from e


async def _answer_head(conn: _Connection, read_s: float) -> h11.Response:
    """The answer's head, past at most MAX_INFORMATIONAL interim (1xx) answers."""
    event = await _next_event(conn, read_s)
    informational = 0
    while type(event) is h11.InformationalResponse:  # 100 Continue and the like
        informational += 1
        if informational > MAX_INFORMATIONAL:  # a server that never gets to the answer
            raise httpx.RemoteProtocolError(f"over {MAX_INFORMATIONAL} 1xx answers")
        event = await _next_event(conn, read_s)
    if type(event) is not h11.Response:  # h11 raises for anything else; never here
        raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} before an answer")
    return event


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over keep-alive connections (see the module docstring)."""

    def __init__(
        self,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_keepalive: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._slots = trio.Semaphore(max_connections)
        self._max_keepalive = max_connections if max_keepalive is None else max_keepalive
        self._ssl_context = ssl_context
        self._idle: dict[tuple[bytes, str, int], list[_Connection]] = {}
        self._closed = False

    def _context(self) -> ssl.SSLContext:
        """httpx's default verification (made at the first HTTPS connection: loading the CA
        bundle costs ~50 ms an http-only agent need not pay)."""
        if self._ssl_context is None:
            context = httpx.create_ssl_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme!r}")
        port = url.port or (443 if scheme == b"https" else 80)
        origin = (scheme, url.raw_host.decode("ascii"), port)  # IDNA, as httpcore connects
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        conn = await self._connection(origin, timeouts)
        try:
            return await self._exchange(conn, request, timeouts)
        except BaseException:
            await conn.close()
            raise

    async def _connection(
        self, origin: tuple[bytes, str, int], timeouts: dict[str, float | None]
    ) -> _Connection:
        """An idle connection to `origin` that is still good, or a new one (within the slots)."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(_limit(timeouts, "pool")) as waited:
                await self._slots.acquire()
            if waited.cancelled_caught:
                raise httpx.PoolTimeout("no connection slot free within the pool timeout") from None
        try:
            idle = self._idle.get(origin)
            now = trio.current_time()
            while idle:
                conn = idle.pop()
                if now - conn.idle_since < KEEPALIVE_EXPIRY_S and not conn.readable():
                    conn.retake(self._slots)
                    return conn
                await trio.aclose_forcefully(conn.stream)
            return _Connection(origin, await self._connect(origin, timeouts), self._slots)
        except BaseException:
            self._slots.release()
            raise

    async def _connect(
        self, origin: tuple[bytes, str, int], timeouts: dict[str, float | None]
    ) -> trio.abc.Stream:
        scheme, host, port = origin
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(_limit(timeouts, "connect")):
                stream = await trio.open_tcp_stream(host, port)
                if scheme == b"https":
                    tls = trio.SSLStream(
                        stream, self._context(), server_hostname=host, https_compatible=True
                    )
                    stream = tls
                    await tls.do_handshake()
            return stream
        except BaseException as e:
            # whatever ends it (the policy's deadline during a stalled handshake included),
            # the socket is closed here, not left to the garbage collector
            if stream is not None:
                await trio.aclose_forcefully(stream)
            if isinstance(e, trio.TooSlowError):
                raise httpx.ConnectTimeout(
                    f"no connection to {host}:{port} within the timeout"
                ) from e
            if isinstance(e, (*_NETWORK_ERRORS, ssl.CertificateError)):
                raise httpx.ConnectError(_describe(e)) from e
            raise

    async def _exchange(
        self, conn: _Connection, request: httpx.Request, timeouts: dict[str, float | None]
    ) -> httpx.Response:
        """Send `request` on `conn` and read the answer's head; the body is left to read."""
        read_s = _limit(timeouts, "read")
        try:
            head = conn.h11.send(
                h11.Request(
                    method=request.method, target=request.url.raw_path, headers=request.headers.raw
                )
            )
        except h11.LocalProtocolError as e:
            raise httpx.LocalProtocolError(str(e)) from e
        try:
            await self._send_request(conn, request, head, _limit(timeouts, "write"))
        except httpx.WriteError:
            # a server may answer before reading the whole body (a 413, a 401) and hang up:
            # that answer is the one that matters. If none came, the write error stands.
            try:
                event = await _answer_head(conn, read_s)
            except httpx.HTTPError:
                event = None
            if event is None:
                raise
        else:
            event = await _answer_head(conn, read_s)
        return httpx.Response(
            event.status_code,
            headers=event.headers.raw_items(),
            stream=_AnswerBody(self, conn, read_s),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": bytes(event.reason)},
        )

    async def _send_request(
        self, conn: _Connection, request: httpx.Request, head: bytes, write_s: float
    ) -> None:
        """Head and body: a body already in memory (every request the agent makes) goes out
        with the head in one send; a streamed one chunk by chunk."""
        h = conn.h11
        try:
            if isinstance(request.stream, httpx.ByteStream):
                body = request.read()
                pieces = [head]
                if body:  # passthrough: h11 frames the body without copying it
                    pieces += h.send_with_data_passthrough(h11.Data(data=body)) or ()
                pieces.append(h.send(h11.EndOfMessage()) or b"")
                await self._write(conn, b"".join(pieces), write_s)
                return
            await self._write(conn, head, write_s)
            async for chunk in request.stream:  # type: ignore[union-attr]
                if chunk:
                    await self._write(conn, h.send(h11.Data(data=chunk)), write_s)
            await self._write(conn, h.send(h11.EndOfMessage()), write_s)
        except h11.LocalProtocolError as e:  # a body longer or shorter than Content-Length
            raise httpx.LocalProtocolError(str(e)) from e

    @staticmethod
    async def _write(conn: _Connection, data: bytes, write_s: float) -> None:
        with trio.CancelScope(deadline=trio.current_time() + write_s) as scope:
            try:
                await conn.stream.send_all(data)
            except _NETWORK_ERRORS as e:
                raise httpx.WriteError(_describe(e)) from e
        if scope.cancelled_caught:
            raise httpx.WriteTimeout("the request was not taken within the write timeout")

    async def _keep(self, conn: _Connection) -> None:
        """An exchange ended cleanly: the connection waits for the next request (or is
        closed, if enough already wait)."""
        conn.release()
        idle = self._idle.setdefault(conn.origin, [])
        now = trio.current_time()
        while idle and now - idle[0].idle_since >= KEEPALIVE_EXPIRY_S:  # oldest first
            await trio.aclose_forcefully(idle.pop(0).stream)
        if self._closed or len(idle) >= self._max_keepalive:
            await trio.aclose_forcefully(conn.stream)
            return
        conn.idle_since = now
        idle.append(conn)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await trio.aclose_forcefully(conn.stream)
