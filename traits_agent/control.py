"""The control socket: `traits-agent status` asks the running agent over a Unix stream socket.

Protocol: the client sends one line (`status`), the agent answers one JSON document and closes.
The socket lives in the runtime directory with mode 0660, so only the agent's user and group
can read the agent's state.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import trio

log = structlog.get_logger(__name__)

MAX_REQUEST = 1024
MAX_FDS = 4


class AgentNotRunning(Exception):
    """No agent answers on the control socket."""


async def serve_control(
    path: Path,
    snapshot: Callable[[], dict[str, Any]],
    *,
    upload: Callable[[str, int, str], dict[str, Any]] | None = None,
    mode: int = 0o660,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on a Unix stream socket until cancelled.

    `status` → the snapshot. `upload KIND NAME` with an open file descriptor attached
    (SCM_RIGHTS) → `upload(kind, fd, name)` in a worker thread (it copies the file into the
    spool): the CLI opens the file with the user's rights, the sandboxed agent reads it
    through the descriptor and never needs to see the user's paths.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if _is_live(path):
            raise OSError(f"another agent answers on {path}")
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, mode)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started(path)

    async def handle(stream: trio.SocketStream) -> None:
        fds: list[int] = []
        async with stream:
            try:
                with trio.move_on_after(5):
                    request, fds = await _receive_request(stream.socket)
                command, _, rest = request.strip().decode("utf-8", "replace").partition(" ")
                if command == "status":
                    answer: dict[str, Any] = snapshot()
                elif command == "upload" and upload is not None and len(fds) == 1:
                    kind, _, name = rest.partition(" ")
                    fd = fds.pop()
                    try:
                        answer = await trio.to_thread.run_sync(upload, kind, fd, name)
                    finally:
                        os.close(fd)
                else:
                    answer = {"error": f"unknown command {command[:40]!r}"}
                await stream.send_all(json.dumps(answer).encode() + b"\n")
            finally:
                for fd in fds:
                    os.close(fd)

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
        data, ancillary, _flags, _addr = await sock.recvmsg(
            MAX_REQUEST, socket.CMSG_SPACE(4 * MAX_FDS)
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(array.array("i", payload[:usable]))
        if not data:
            break
        request += data
    return request, fds


def send_upload(path: Path, kind: str, fd: int, name: str, timeout: float = 600.0) -> dict:
    """Blocking client: hand an open file to the agent's spool. Raises AgentNotRunning."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise AgentNotRunning(f"no agent is running (nothing answers on {path})") from e
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


def _is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def request_status(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Blocking client for the CLI. Raises AgentNotRunning when nobody answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise AgentNotRunning(f"no agent is running (nothing answers on {path})") from e
        sock.sendall(b"status\n")
        return json.loads(_read_all(sock))
    finally:
        sock.close()
