"""`mmsg.Reader` over real sockets: `recvmmsg` gives the same datagrams as `recv`, in order,
several per call, and says which were too large."""

from __future__ import annotations

import socket
import sys

import pytest

from traits_agent.intake import mmsg
from traits_agent.intake.mmsg import BATCH, MAX_DATAGRAM, Reader


@pytest.fixture
def pair(tmp_path):
    """A bound Unix datagram socket (non-blocking) and a sender connected to it."""
    path = str(tmp_path / "r.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sender.connect(path)
    yield receiver, sender
    sender.close()
    receiver.close()


def read_all(reader: Reader) -> tuple[list[bytes], int, int]:
    """Everything the socket holds: (datagrams, too large, calls that returned some)."""
    out: list[bytes] = []
    too_large = calls = 0
    while True:
        got, big = reader.read(BATCH)
        if not got and not big:
            return out, too_large, calls
        out += got
        too_large += big
        calls += 1


def test_recvmmsg_is_used_on_linux() -> None:
    """Not a silent fallback to one `recv` per datagram where the C library has recvmmsg."""
    if not sys.platform.startswith("linux"):
        pytest.skip("recvmmsg is Linux's")
    assert mmsg.AVAILABLE


@pytest.mark.parametrize("batch", [True, False], ids=["recvmmsg", "recv"])
def test_datagrams_come_out_whole_and_in_order(pair, batch) -> None:
    """Sizes from 0 to the largest accepted, an oversized one in the middle: the same answer
    either way, and one `read` call for up to BATCH datagrams (recvmmsg: one system call;
    recv: one per datagram, handed over together)."""
    receiver, sender = pair
    sizes = [0, 1, 109, 4096, MAX_DATAGRAM, 7]
    sent = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    for d in sent[:3]:
        sender.send(d)
    sender.send(b"x" * (MAX_DATAGRAM + 100))  # too large: counted, not returned
    for d in sent[3:]:
        sender.send(d)
    reader = Reader(receiver, batch=batch)
    try:
        got, too_large, calls = read_all(reader)
    finally:
        reader.close()
    assert got == sent
    assert too_large == 1
    assert calls == 1


def test_more_than_one_batch_takes_several_calls(tmp_path) -> None:
    """BATCH + 36 datagrams (UDP, whose buffer holds that many): two calls, nothing lost."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sent = [i.to_bytes(4, "big") * 25 for i in range(BATCH + 36)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for d in sent:
            sender.sendto(d, receiver.getsockname())
    reader = Reader(receiver)
    try:
        first, _ = reader.read(BATCH)
        got, too_large, _ = read_all(reader)
    finally:
        reader.close()
        receiver.close()
    if mmsg.AVAILABLE:
        assert len(first) == BATCH
    assert first + got == sent and too_large == 0


def test_an_empty_socket_reads_nothing(pair) -> None:
    receiver, _ = pair
    reader = Reader(receiver)
    try:
        assert reader.read(BATCH) == ([], 0)
    finally:
        reader.close()


def test_udp_reads_in_batches_and_unix_one_datagram_a_call(tmp_path) -> None:
    """The measured choice (serve_datagrams' docstring): recvmmsg pays where bursts queue
    thousands (UDP), recv where the kernel queue holds a few (Unix, max_dgram_qlen)."""
    from traits_agent.intake.datagram import reads_batched

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert reads_batched(udp)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix:
        assert not reads_batched(unix)


def test_an_error_after_some_datagrams_loses_none_of_them() -> None:
    """recv path: datagrams read before an error in the same call are handed over, and the
    error is raised by the next call. On Linux a pending error (ECONNREFUSED after an ICMP
    port unreachable) is reported before queued data, so only a race puts it behind some;
    a stand-in socket plays that race (the kernel cannot be made to, on demand)."""

    class Racing:
        def __init__(self) -> None:
            self.script: list[bytes | OSError] = [b"a", b"b", ConnectionRefusedError(111, "x")]
            self.script += [b"c"]

        def fileno(self) -> int:
            return -1

        def recv(self, size: int) -> bytes:
            if not self.script:
                raise BlockingIOError
            step = self.script.pop(0)
            if isinstance(step, OSError):
                raise step
            return step

    reader = Reader(Racing(), batch=False)  # type: ignore[arg-type]
    assert reader.read(BATCH) == ([b"a", b"b"], 0)
    with pytest.raises(ConnectionRefusedError):
        reader.read(BATCH)
    assert reader.read(BATCH) == ([b"c"], 0)
