"""The control socket: `traits-agent status` asks the running agent over a Unix stream socket.

Protocol: the client sends one line, the agent answers one JSON document and closes.

    status                          → the status snapshot
    upload KIND NAME  (+ an fd)     → the CSV is copied into the spool
    send {"resource", "records": [...], "time", "sync"}
                                    → the events are validated, appended and fsynced, then
                                      {"resource", "stored", "first_seq", "last_seq",
                                      "rejected": [{"index", "reason", "error"}]}
    outcome {"resource", "first_seq", "last_seq"}
                                    → {"done": bool, "dead_lettered": [...], "upstream", ...}

`send` + `outcome` are what `traits-agent send --wait` is made of: the CLI learns that its
events are on disk, then polls until the queue's delivered position passes them.

The socket lives in the runtime directory with mode 0660, so only the agent's user and group
can read the agent's state (and send events, as they may on the event socket).
"""

from __future__ import annotations

import array
import contextlib
import functools
import json
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from traits_agent.errors import AgentNotRunning
from traits_agent.intake.unixsock import bind_unix
from traits_agent.observe.fdlimit import RETRY_INITIAL_S, is_fd_shortage, note_shortage
from traits_agent.observe.metrics import Counters

log = structlog.get_logger(__name__)

#: a request line: `status`, `upload ...` are short; `send` carries up to a chunk of events
MAX_REQUEST = 1024 * 1024
#: descriptors one request may carry (`upload` sends one); more are closed as they arrive
MAX_FDS = 4
#: a client that has not sent its line by then is cut off (and its descriptors closed)
REQUEST_TIMEOUT_S = 5.0
#: concurrent control connections; more are closed at once. Each may hold MAX_FDS received
#: descriptors and a MAX_REQUEST line, so this bounds what a group member can pin:
#: 32 * (1 + 4) = 160 descriptors and 32 MiB.
MAX_CONNECTIONS = 32


async def serve_control(
    path: Path,
    snapshot: Callable[[], dict[str, Any]],
    *,
    upload: Callable[..., dict[str, Any]] | None = None,
    send: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
    outcome: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    mode: int = 0o660,
    counters: Counters | None = None,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on a Unix stream socket until cancelled.

    `status` → the snapshot. `upload KIND NAME` with an open file descriptor attached
    (SCM_RIGHTS) → `upload(kind, fd, name, cancelled=...)` in a worker thread (it copies the
    file into the spool): the CLI opens the file with the user's rights, the sandboxed agent
    reads it through the descriptor and never needs to see the user's paths. `cancelled()`
    turns true when this request is cancelled (the agent stops), and the copy ends within a
    chunk instead of holding up the shutdown.

    Every descriptor a client sends is closed when its request ends, however it ends (answered,
    timed out, hung up, failed, cancelled): a group member must not be able to pile up the
    agent's descriptors until `open` fails everywhere (issue 7). Accepting survives EMFILE.
    """
    counters = counters if counters is not None else Counters()
    std = bind_unix(path, socket.SOCK_STREAM, mode)
    std.listen(16)
    sock = trio.socket.from_stdlib_socket(std)
    listener = trio.SocketListener(sock)
    active = 0
    task_status.started(path)

    async def handle(stream: trio.SocketStream) -> None:
        """One request. Whatever a client does (hangs up, stays silent, sends junk) ends its
        connection only: an exception here would otherwise end the whole agent."""
        nonlocal active
        fds: list[int] = []
        try:
            async with stream:
                request = b""
                with trio.move_on_after(request_timeout_s) as waited:
                    request = await _receive_request(stream.socket, fds, counters)
                if waited.cancelled_caught:
                    counters.inc("control_requests", outcome="timed_out")
                    log.info("control_request_timed_out", fds_closed=len(fds))
                    return
                answer = await _answer(request, fds)
                await stream.send_all(json.dumps(answer).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            counters.inc("control_requests", outcome="client_gone")
        except Exception as e:
            counters.inc("control_requests", outcome="failed")
            log.exception("control_request_failed", error=repr(e))
        finally:
            active -= 1
            _close_all(fds)

    async def _answer(request: bytes, fds: list[int]) -> dict[str, Any]:
        command, _, rest = request.strip().decode("utf-8", "replace").partition(" ")
        if command == "status":
            counters.inc("control_requests", outcome="status")
            return snapshot()
        if command in ("send", "outcome"):
            handler = send if command == "send" else outcome
            try:
                body = json.loads(rest)
            except ValueError:
                body = None
            counters.inc("control_requests", outcome=command)
            if handler is None or not isinstance(body, dict):
                return {"error": f"{command}: expected a JSON object"}
            if command == "send":
                return await send(body)  # type: ignore[misc]
            return outcome(body)  # type: ignore[misc]
        if command == "upload" and upload is not None and len(fds) == 1:
            counters.inc("control_requests", outcome="upload")
            kind, _, name = rest.partition(" ")
            fd = fds.pop()
            try:
                return await _in_thread_until_cancelled(upload, kind, fd, name)
            finally:
                os.close(fd)
        counters.inc("control_requests", outcome="unknown")
        return {"error": f"unknown command {command[:40]!r}"}

    try:
        async with listener, trio.open_nursery() as handlers:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as e:
                    if not is_fd_shortage(e):
                        raise
                    note_shortage("control_accept", e, counters)
                    await trio.sleep(RETRY_INITIAL_S)
                    continue
                if active >= max_connections:
                    counters.inc("control_requests", outcome="too_many_connections")
                    # rate-limited with suppressed=N (observe.log.RATE_LIMITS)
                    log.warning("control_connection_refused", limit=max_connections)
                    await trio.aclose_forcefully(stream)
                    continue
                active += 1
                handlers.start_soon(handle, stream)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


async def _in_thread_until_cancelled(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args, cancelled=flag.is_set)` in a worker thread. A worker thread cannot be
    interrupted, so cancelling this sets the flag and waits for `fn` to notice it."""
    flag = threading.Event()

    async def raise_flag_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            flag.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(raise_flag_when_cancelled)
        try:
            call = functools.partial(fn, *args, cancelled=flag.is_set)
            return await trio.to_thread.run_sync(call)
        finally:
            nursery.cancel_scope.cancel()


def _close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


async def _receive_request(sock: Any, fds: list[int], counters: Counters) -> bytes:
    """One request line. Descriptors that come with it are appended to `fds` as soon as they
    are received (so the caller closes them even if this is cancelled mid-way); past MAX_FDS
    they are closed at once."""
    request = b""
    while b"\n" not in request and len(request) < MAX_REQUEST:
        data, ancillary, _flags, _addr = await sock.recvmsg(65536, socket.CMSG_SPACE(4 * MAX_FDS))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                for fd in array.array("i", payload[:usable]):
                    if len(fds) < MAX_FDS:
                        fds.append(fd)
                    else:
                        os.close(fd)
                        counters.inc("control_fds_refused")
        if not data:
            break
        request += data
    return request


#: between two tries to connect while the control socket's backlog is full
CONNECT_RETRY_S = 0.02


def _connect(path: Path, timeout: float) -> socket.socket:
    """A connection to the control socket. A Unix socket with a timeout does not wait for
    room in a full listen backlog (a busy agent, or a flood of other connections): connect
    fails at once with EAGAIN. That is retried until `timeout`, as a blocking connect
    would wait, so `status` during a flood answers late instead of failing."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise AgentNotRunning(f"no agent is running (nothing answers on {path})") from e
        except BlockingIOError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(CONNECT_RETRY_S)


def send_upload(path: Path, kind: str, fd: int, name: str, timeout: float = 600.0) -> dict:
    """Blocking client: hand an open file to the agent's spool. Raises AgentNotRunning."""
    sock = _connect(path, timeout)
    try:
        line = f"upload {kind} {name}\n".encode()
        socket.send_fds(sock, [line], [fd])
        return json.loads(_read_all(sock))
    finally:
        sock.close()


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def request_status(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Blocking client for the CLI. Raises AgentNotRunning when nobody answers."""
    return request(path, "status", timeout=timeout)


def request(
    path: Path, command: str, body: dict[str, Any] | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """Blocking client: one request (a command, and a JSON body for `send`/`outcome`), one
    answer. Raises AgentNotRunning when nobody answers, OSError/ValueError on a broken one."""
    sock = _connect(path, timeout)
    try:
        line = command if body is None else f"{command} {json.dumps(body, ensure_ascii=False)}"
        sock.sendall(line.encode() + b"\n")
        return json.loads(_read_all(sock))
    finally:
        sock.close()
