"""The control socket: `traits-agent status` asks the running agent over a Unix stream socket.

Protocol: the client sends one line (`status`), the agent answers one JSON document and closes.
The socket lives in the runtime directory with mode 0660, so only the agent's user and group
can read the agent's state.
"""

from __future__ import annotations

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


class AgentNotRunning(Exception):
    """No agent answers on the control socket."""


async def serve_control(
    path: Path,
    snapshot: Callable[[], dict[str, Any]],
    *,
    mode: int = 0o660,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer `status` requests on a Unix stream socket until cancelled."""
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
        async with stream:
            with trio.move_on_after(5):
                request = b""
                while b"\n" not in request and len(request) < MAX_REQUEST:
                    chunk = await stream.receive_some(MAX_REQUEST)
                    if not chunk:
                        break
                    request += chunk
                command = request.strip().decode("utf-8", "replace")
                if command == "status":
                    answer: dict[str, Any] = snapshot()
                else:
                    answer = {"error": f"unknown command {command[:40]!r}"}
                await stream.send_all(json.dumps(answer).encode() + b"\n")

    try:
        await trio.serve_listeners(handle, [listener])
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


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
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    return json.loads(b"".join(chunks))
