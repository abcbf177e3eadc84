"""A stop takes what the kernel held when it began, and no more: a sender that keeps sending
cannot hold the agent's stop open (seen: SIGTERM not honoured for 20 s under a client flood)."""

from __future__ import annotations

import socket

import trio

from traits_agent.intake.datagram import serve_datagrams


async def test_stop_drain_is_bounded_by_the_receive_buffer(tmp_path):
    """Each burst the sink takes puts as many datagrams back into the socket (a sender that
    refills whatever is read): the stop still ends, having read about one receive buffer."""
    path = str(tmp_path / "events.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel's minimum, about
    budget = server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.connect(path)
    sender.setblocking(False)
    datagram = b"\x93\xa7actions\xc0\x80" + b"\x00" * 1000
    stopping = False
    read = 0

    def refill(n: int) -> None:
        for _ in range(n):
            try:
                sender.send(datagram)
            except BlockingIOError:
                return

    def sink(burst: list[bytes]) -> int:
        nonlocal read
        read += sum(len(d) for d in burst)
        if stopping:
            refill(len(burst))
        return len(burst)

    refill(64)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_datagrams(
                server, sink, name="unix", on_error=lambda reason: None, task_status=task_status
            )
        )
        await trio.testing.wait_all_tasks_blocked()
        before = read
        stopping = True
        refill(64)
        nursery.cancel_scope.cancel()
    sender.close()
    # the budget, plus the last round that crossed it (itself at most what the buffer holds)
    assert read - before <= 2 * budget
    assert read - before > 0  # what was held at the stop was taken
