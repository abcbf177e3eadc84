"""How much a game server pays per event: µs per `Client` emit, with a receiver process draining.

Prints figures only (no asserts): unbuffered and buffered, Unix datagram and UDP, plus the
raw msgpack + sendto floor for comparison. Run: `.venv/bin/python bench/bench_client.py [N]`.

Prior art on this machine class (µs/event, 20k events): raw msgpack+UDP sendto 6.3,
DogStatsD unbuffered 11.5, DogStatsD buffered 3.8, fluent-logger (TCP) 94.9.
"""

from __future__ import annotations

import multiprocessing
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from traits_agent.client import Client
from traits_agent.intake.wire import decode_datagram

_mp = multiprocessing.get_context("fork")
EVENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000


class Receiver:
    """Drains a datagram socket in another process (as the agent would), decoding each one.

    A thread in this process would share the GIL with the sender: it would slow the sender
    and, starved for milliseconds at a time, let a 10-datagram Unix queue overflow.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.datagrams = 0
        self.entries = 0
        self._stop = _mp.Event()
        self._ready = _mp.Event()
        self._results, child_end = _mp.Pipe(duplex=False)
        self._process = _mp.Process(target=self._drain, args=(child_end,), daemon=True)

    def start(self) -> None:
        self._process.start()
        self._ready.wait()

    def _drain(self, results: Any) -> None:
        self.sock.settimeout(0.2)
        datagrams = entries = 0
        self._ready.set()
        while not self._stop.is_set():
            try:
                data = self.sock.recv(70_000)
            except TimeoutError:
                continue
            datagrams += 1
            entries += len(decode_datagram(data).entries)
        results.send((datagrams, entries))

    def stop(self) -> None:
        time.sleep(0.3)  # let the tail arrive
        self._stop.set()
        self.datagrams, self.entries = self._results.recv()
        self._process.join()
        self.sock.close()


def unix_receiver(directory: Path) -> tuple[Receiver, str]:
    path = str(directory / "bench.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind(path)
    return Receiver(sock), path


def udp_receiver() -> tuple[Receiver, tuple[str, int]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    return Receiver(sock), sock.getsockname()


def timed(emit: Callable[[int], object], flush: Callable[[], object]) -> float:
    """Microseconds per event for EVENTS calls of `emit`, the final flush included."""
    started = time.perf_counter()
    for i in range(EVENTS):
        emit(i)
    flush()
    return (time.perf_counter() - started) / EVENTS * 1e6


def bench_client(label: str, receiver: Receiver, address: object, **options: object) -> None:
    receiver.start()
    if isinstance(address, str):
        client = Client(address, **options)  # type: ignore[arg-type]
    else:
        client = Client(udp=address, **options)  # type: ignore[arg-type]
    us = timed(lambda i: client.action("1001", "2002", "buy_item", {"item_id": i}), client.flush)
    client.close()
    receiver.stop()
    print(
        f"{label:<26} {us:6.2f} µs/emit   sent {client.sent:>6}  dropped {client.dropped:>6}"
        f"   received {receiver.entries:>6} in {receiver.datagrams:>6} datagrams"
    )


def bench_raw_udp() -> None:
    receiver, address = udp_receiver()
    receiver.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)

    def emit(i: int) -> None:
        record = {"user_id": "1001", "action_id": "2002", "action_name": "buy_item"}
        sock.sendto(msgpack.packb(["actions", int(time.time()), record]), address)

    us = timed(emit, lambda: None)
    sock.close()
    receiver.stop()
    print(f"{'raw msgpack+sendto (UDP)':<26} {us:6.2f} µs/emit   received {receiver.entries:>6}")


def main() -> None:
    print(f"{EVENTS} events, action with one param, a receiver process draining\n")
    with tempfile.TemporaryDirectory(prefix="ta-bench-") as tmp:
        directory = Path(tmp)
        for buffered in (False, True):
            mode = "buffered" if buffered else "unbuffered"
            receiver, path = unix_receiver(directory)
            bench_client(f"unix {mode}", receiver, path, buffered=buffered)
            Path(path).unlink()
            receiver, address = udp_receiver()
            bench_client(f"udp {mode}", receiver, address, buffered=buffered)
    bench_raw_udp()


if __name__ == "__main__":
    main()
