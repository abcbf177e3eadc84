"""Fuzz: any request on the control socket gets an answer or a closed connection, never a
stopped listener; `status` still works after it."""

from __future__ import annotations

import socket
import tempfile
from functools import partial
from pathlib import Path

import trio
from hypothesis import given
from hypothesis import strategies as st

from traits_agent.observe.control import request_status, serve_control

GUARD_S = 30

requests = st.one_of(
    st.binary(max_size=3000),
    st.sampled_from([b"status", b"upload", b"upload events x", b"upload csv "]).flatmap(
        lambda head: st.binary(max_size=64).map(lambda tail: head + tail + b"\n")
    ),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass") + b"\n"),
)


def uploads(kind: str, fd: int, name: str) -> dict:
    return {"ok": True, "kind": kind, "name": name}


@given(requests, st.booleans(), st.booleans())
def test_any_request_leaves_the_control_socket_serving(request, half_close, with_fd) -> None:
    trio.run(_one, request, half_close, with_fd)


async def _one(request: bytes, half_close: bool, with_fd: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="ta-fz-", dir="/tmp") as tmp:
        path = Path(tmp) / "control.sock"
        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    partial(serve_control, path, lambda: {"state": "ok"}, upload=uploads)
                )
                await trio.to_thread.run_sync(_send, path, request, half_close, with_fd)
                status = await trio.to_thread.run_sync(request_status, path)
                assert status == {"state": "ok"}
                nursery.cancel_scope.cancel()


def _send(path: Path, request: bytes, half_close: bool, with_fd: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(GUARD_S)
        sock.connect(str(path))
        try:
            if with_fd:
                with open("/dev/null", "rb") as f:
                    socket.send_fds(sock, [request or b"\n"], [f.fileno()])
            else:
                sock.sendall(request)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
        except OSError:
            pass  # the agent closed first: allowed
