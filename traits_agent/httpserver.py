"""A tiny HTTP/1.1 server on trio + h11, for the fake API and the metrics endpoint.

It is deliberately small: one request at a time per connection (keep-alive, no pipelining
concurrency), bodies read whole into memory up to a bound, no TLS, no streaming responses.
That is all a loopback test double and a Prometheus scrape target need.

Guarantees:

- The listener never dies because of a client. Malformed requests get ``400`` (or the status
  h11 suggests, e.g. ``431`` for huge headers) and their connection is closed; a handler that
  raises gets ``500`` and one ``http_handler_failed`` log line; a peer that vanishes only ends
  its own connection.
- A connection that sends nothing for ``idle_timeout`` seconds (between requests, or while a
  request is still arriving) is closed. The timeout does not run while the handler works.
- A body over ``max_body_size`` bytes gets ``413`` and the connection is closed.
- With ``methods`` given, any other method gets ``405`` before its body is read.
- With ``max_connections`` given, a connection past it is closed at once, unread.
- ``on_reject(reason)`` hears of each refusal (``too_many_connections``, ``too_large``,
  ``method_not_allowed``, ``bad_request``, ``timeout``) so a caller can count them.
- Cancelling the surrounding nursery stops the listener and every connection.

Usage::

    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_http, handler)

A handler that wants the connection torn down without any answer (to simulate a crashing
server) raises :class:`DropConnection`.
"""

from __future__ import annotations

import http
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11
import structlog
import trio

log = structlog.get_logger(__name__)

DEFAULT_MAX_BODY_SIZE = 16 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 60.0
RECEIVE_SIZE = 64 * 1024
# After an error answer, how long to keep reading (and discarding) what the client still sends,
# so that closing with unread data does not reset the connection before it reads the answer.
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 4 * DEFAULT_MAX_BODY_SIZE
SERVER_HEADER = b"traits-agent"


@dataclass(frozen=True)
class Request:
    """One complete HTTP request.

    ``path`` is the target without its query string; ``query`` maps each parameter to its
    last value; ``headers`` has lower-cased names (repeated headers joined with ``", "``).
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    target: str = ""


@dataclass(frozen=True)
class Response:
    """What a handler answers. ``Content-Length`` is added by the server.

    ``stream``, when set, produces the body instead of ``body`` (the fake API's huge and
    trickling answers); the handler then sets ``content-length`` itself.
    """

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    stream: Callable[[], AsyncIterator[bytes]] | None = None


def json_response(status: int, obj: Any, headers: Mapping[str, str] | None = None) -> Response:
    """A ``Response`` carrying ``obj`` as compact JSON with ``Content-Type: application/json``."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    return Response(status, body, {"content-type": "application/json", **(headers or {})})


class DropConnection(Exception):
    """Raised by a handler: close the connection at once, without answering."""


Handler = Callable[[Request], Awaitable[Response]]


async def serve_http(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    max_connections: int | None = None,
    methods: frozenset[str] | None = None,
    on_reject: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``host:port`` until cancelled.

    Binds before reporting: ``nursery.start(serve_http, ...)`` returns the bound
    ``(host, port)`` (port 0 lets the OS pick). If ``host`` resolves to several addresses,
    all are bound and the first one is reported. Raises ``OSError`` if binding fails.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_host, bound_port = listeners[0].socket.getsockname()[:2]

    limits = _Limits(max_body_size, idle_timeout, methods, on_reject or (lambda _reason: None))
    active = 0

    async def on_connection(stream: trio.SocketStream) -> None:
        nonlocal active
        if max_connections is not None and active >= max_connections:
            limits.on_reject("too_many_connections")
            log.debug("http_connection_refused", reason="too_many_connections")
            await trio.aclose_forcefully(stream)
            return
        active += 1
        try:
            await _serve_connection(stream, handler, limits)
        finally:
            active -= 1

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, on_connection, listeners)
        task_status.started((bound_host, bound_port))


class _BodyTooLarge(Exception):
    pass


class _MethodNotAllowed(Exception):
    pass


@dataclass(frozen=True)
class _Limits:
    max_body_size: int
    idle_timeout: float
    methods: frozenset[str] | None
    on_reject: Callable[[str], None]


async def _serve_connection(stream: trio.SocketStream, handler: Handler, limits: _Limits) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        async with stream:
            while True:
                request = None
                try:
                    with trio.move_on_after(limits.idle_timeout) as idle:
                        request = await _read_request(conn, stream, limits)
                except h11.RemoteProtocolError as exc:
                    log.debug("http_bad_request", error=str(exc))
                    limits.on_reject("bad_request")
                    status = exc.error_status_hint
                    await _send_error(conn, stream, status, str(exc))
                    return
                except _BodyTooLarge:
                    limits.on_reject("too_large")
                    await _send_error(conn, stream, 413, "request body too large")
                    return
                except _MethodNotAllowed:
                    limits.on_reject("method_not_allowed")
                    allow = ", ".join(sorted(limits.methods or ()))
                    await _send_error(conn, stream, 405, "method not allowed", {"allow": allow})
                    return
                if idle.cancelled_caught:
                    if conn.their_state is not h11.IDLE or conn.trailing_data[0]:
                        limits.on_reject("timeout")  # a request begun and not finished
                    return
                if request is None:
                    return
                try:
                    response = await handler(request)
                except DropConnection:
                    return
                except Exception:
                    log.exception("http_handler_failed", method=request.method, path=request.path)
                    response = json_response(500, {"code": 500, "message": "internal error"})
                await _send_response(conn, stream, response, head=request.method == "HEAD")
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("http_connection_lost", error=str(exc))
    except Exception:
        # Never let one connection take the listener down.
        log.exception("http_connection_failed")


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream, limits: _Limits
) -> Request | None:
    """Read one whole request; ``None`` when the peer closed cleanly between requests."""
    max_body_size = limits.max_body_size
    event = await _next_event(conn, stream)
    if isinstance(event, h11.ConnectionClosed):
        return None
    assert isinstance(event, h11.Request), event
    if limits.methods is not None and event.method.decode("ascii") not in limits.methods:
        raise _MethodNotAllowed
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_size:
        raise _BodyTooLarge
    if conn.they_are_waiting_for_100_continue:
        await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
    body = bytearray()
    while True:
        part = await _next_event(conn, stream)
        if isinstance(part, h11.EndOfMessage):
            break
        if isinstance(part, h11.Data):
            body += part.data
            if len(body) > max_body_size:
                raise _BodyTooLarge
    target = event.target.decode("latin-1")
    split = urlsplit(target)
    return Request(
        method=event.method.decode("ascii"),
        path=split.path or "/",
        query=dict(parse_qsl(split.query, keep_blank_values=True)),
        headers=headers,
        body=bytes(body),
        target=target,
    )


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        # b"" at EOF tells h11 the peer closed; it then yields ConnectionClosed or raises.
        conn.receive_data(await stream.receive_some(RECEIVE_SIZE))


async def _send_response(
    conn: h11.Connection, stream: trio.SocketStream, response: Response, *, head: bool = False
) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
    names = {k.lower() for k, _ in headers}
    if b"content-length" not in names:
        headers.append((b"content-length", str(len(response.body)).encode()))
    if b"server" not in names:
        headers.append((b"server", SERVER_HEADER))
    try:
        reason = http.HTTPStatus(response.status).phrase.encode()
    except ValueError:
        reason = b""
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    if response.stream is not None and not head:
        await stream.send_all(data)
        async for chunk in response.stream():
            await stream.send_all(conn.send(h11.Data(data=chunk)))
        data = b""
    elif response.body and not head:
        data += conn.send(h11.Data(data=response.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _send_error(
    conn: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer an unreadable request (if h11 still lets us) and half-close; the caller closes."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    response = json_response(status, {"code": status, "message": message})
    response = Response(
        response.status,
        response.body,
        {**response.headers, **(headers or {}), "connection": "close"},
    )
    try:
        await _send_response(conn, stream, response)
    except h11.LocalProtocolError:
        return
    await stream.send_eof()
    drained = 0
    with trio.move_on_after(LINGER_SECONDS):
        while drained < LINGER_MAX_BYTES:
            chunk = await stream.receive_some(RECEIVE_SIZE)
            if not chunk:
                break
            drained += len(chunk)
