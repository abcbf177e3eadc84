"""The control socket: whatever a client does with descriptors, the agent keeps none of them.

Clients are real Unix stream sockets sending real descriptors (SCM_RIGHTS); time is trio's
MockClock, so the request timeout passes instantly. Descriptors are counted in /proc/self/fd.
"""

from __future__ import annotations

import contextlib
import os
import socket

import trio

from traits_agent.observe.control import MAX_CONNECTIONS, serve_control
from traits_agent.observe.metrics import Counters


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def start(nursery, tmp_path, counters, **kwargs):
    path = tmp_path / "control.sock"
    await nursery.start(
        lambda task_status: serve_control(
            path, lambda: {"ok": True}, counters=counters, task_status=task_status, **kwargs
        )
    )
    return path


async def silent_client_with_fds(path, n_fds: int) -> trio.socket.SocketType:
    """Connect, send a partial line carrying `n_fds` descriptors, then say nothing."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        # a refused connection may be closed before this send
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            socket.send_fds(sock._sock, [b"stat"], [null] * n_fds)
    finally:
        os.close(null)
    return sock


async def test_descriptors_of_a_timed_out_request_are_closed(autojump_clock, nursery, tmp_path):
    """Before the fix, a request cancelled by the 5 s timeout kept every descriptor it carried:
    33 -> 2,033 descriptors for good (issue 7 item 3)."""
    counters = Counters()
    path = await start(nursery, tmp_path, counters)
    before = open_fds()
    for _round in range(5):
        clients = [await silent_client_with_fds(path, 4) for _ in range(MAX_CONNECTIONS)]
        for c in clients:
            assert await c.recv(100) == b""  # the agent hung up on the silent client
            c.close()
    await trio.testing.wait_all_tasks_blocked()
    assert open_fds() == before
    assert counters.get("control_requests", outcome="timed_out") == 5 * MAX_CONNECTIONS


async def test_descriptors_beyond_the_per_request_limit_are_closed_at_once(
    autojump_clock, nursery, tmp_path
):
    """One connection sending 4 descriptors per byte for 1,000 bytes held up to 4,000."""
    counters = Counters()
    path = await start(nursery, tmp_path, counters)
    before = open_fds()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    null = os.open(os.devnull, os.O_RDONLY)
    for _ in range(200):
        socket.send_fds(sock._sock, [b"x"], [null] * 4)
        await trio.sleep(0.001)
        # our socket, our /dev/null, the agent's end of the connection, the 4 it keeps
        assert open_fds() <= before + 3 + 4
    os.close(null)
    assert await sock.recv(100) == b""
    sock.close()
    await trio.testing.wait_all_tasks_blocked()
    assert open_fds() == before
    assert counters.get("control_fds_refused") == 200 * 4 - 4


async def test_connections_beyond_the_limit_are_refused(autojump_clock, nursery, tmp_path):
    counters = Counters()
    path = await start(nursery, tmp_path, counters, max_connections=2)
    clients = [await silent_client_with_fds(path, 1) for _ in range(3)]
    with contextlib.suppress(ConnectionResetError):
        assert await clients[2].recv(100) == b""  # refused at once, before any timeout
    assert trio.current_time() < 1.0
    assert counters.get("control_requests", outcome="too_many_connections") == 1
    for c in clients:
        c.close()


async def test_status_and_unknown_commands_still_answer(autojump_clock, nursery, tmp_path):
    counters = Counters()
    path = await start(nursery, tmp_path, counters)
    for line, expect in ((b"status\n", b'{"ok": true}\n'), (b"nope\n", b"unknown command")):
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(str(path))
        await sock.send(line)
        answer = b""
        while chunk := await sock.recv(4096):
            answer += chunk
        sock.close()
        assert expect in answer


def test_a_client_waits_for_room_in_a_full_backlog(tmp_path):
    """The control socket's listen backlog is full (an agent busy with a flood of
    connections): `request_status` used to fail at once with EAGAIN (a Unix socket with a
    timeout does not wait for room). It now tries again until its timeout, and gets the
    answer once the agent accepts."""
    import json
    import threading

    from traits_agent.observe.control import request_status

    path = str(tmp_path / "control.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    fillers = []
    while True:  # fill the backlog: further connects get EAGAIN
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
    assert fillers

    server.settimeout(10)  # a client that gave up must not hang the test

    def agent() -> None:  # accepts (and drops) the fillers, then answers the status request
        for _ in fillers:
            server.accept()[0].close()
        try:
            conn, _ = server.accept()
        except TimeoutError:
            return
        with conn:
            assert conn.recv(100) == b"status\n"
            conn.sendall(json.dumps({"ok": True}).encode())

    timer = threading.Timer(0.3, agent)
    timer.start()
    try:
        assert request_status(tmp_path / "control.sock", timeout=30) == {"ok": True}
    finally:
        timer.join()
        for s in fillers:
            s.close()
        server.close()
