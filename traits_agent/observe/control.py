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
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from traits_agent.errors import AgentNotRunning
from traits_agent.intake.unixsock import bind_unix

log = structlog.get_logger(__name__)

#: a request line: `status`, `upload ...` are short; `send` carries up to a chunk of events
MAX_REQUEST = 1024 * 1024
MAX_FDS = 4


async def serve_control(
    path: Path,
    snapshot: Callable[[], dict[str, Any]],
    *,
    upload: Callable[[str, int, str], dict[str, Any]] | None = None,
    send: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
    outcome: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    mode: int = 0o660,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on a Unix stream socket until cancelled.

    `status` → the snapshot. `upload KIND NAME` with an open file descriptor attached
    (SCM_RIGHTS) → `upload(kind, fd, name)` in a worker thread (it copies the file into the
    spool): the CLI opens the file with the user's rights, the sandboxed agent reads it
    through the descriptor and never needs to see the user's paths.
    """
    std = bind_unix(path, socket.SOCK_STREAM, mode)
    std.listen(16)
    sock = trio.socket.from_stdlib_socket(std)
    listener = trio.SocketListener(sock)
    task_status.started(path)

    async def handle(stream: trio.SocketStream) -> None:
        """One request. Whatever a client does (hangs up, stays silent, sends junk) ends its
        connection only: an exception here would otherwise end the whole agent."""
        fds: list[int] = []
        try:
            async with stream:
                request = b""
                with trio.move_on_after(5):
                    request, fds = await _receive_request(stream.socket)
                answer = await _answer(request, fds)
                await stream.send_all(json.dumps(answer).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception as e:
            log.exception("control_request_failed", error=repr(e))
        finally:
            for fd in fds:
                os.close(fd)

    async def _answer(request: bytes, fds: list[int]) -> dict[str, Any]:
        command, _, rest = request.strip().decode("utf-8", "replace").partition(" ")
        if command == "status":
            return snapshot()
        if command in ("send", "outcome"):
            handler = send if command == "send" else outcome
            try:
                body = json.loads(rest)
            except ValueError:
                body = None
            if handler is None or not isinstance(body, dict):
                return {"error": f"{command}: expected a JSON object"}
            if command == "send":
                return await send(body)  # type: ignore[misc]
            return outcome(body)  # type: ignore[misc]
        if command == "upload" and upload is not None and len(fds) == 1:
            kind, _, name = rest.partition(" ")
            fd = fds.pop()
            try:
                return await trio.to_thread.run_sync(upload, kind, fd, name)
            finally:
                os.close(fd)
        return {"error": f"unknown command {command[:40]!r}"}

    try:
        await trio.serve_listeners(handle, [listener])
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


async def _receive_request(sock: Any) -> tuple[bytes, list[int]]:
    """One request line, and any file descriptors that came with it."""
    request = b""
    fds: list[int] = []
    while b"\n" not in request and len(request) < MAX_REQUEST:
        data, ancillary, _flags, _addr = await sock.recvmsg(65536, socket.CMSG_SPACE(4 * MAX_FDS))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(array.array("i", payload[:usable]))
        if not data:
            break
        request += data
    return request, fds


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise AgentNotRunning(f"no agent is running (nothing answers on {path})") from e
    return sock


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
