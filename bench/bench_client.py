"""What a game server pays per event: µs per emit, a receiver process draining the socket.

Python client in its default (packing) mode and unbuffered, the C client, and as the
reference, in the same run, raw `msgpack.packb` + `send` of one Message per event on the same
Unix socket (no buffer, nothing counted: the floor for "one datagram per event"). Prints
figures and ratios only (no asserts). Run: `.venv/bin/python bench/bench_client.py [N]`.

Prior art on this machine class (µs/event, 20k events): raw msgpack+UDP sendto 6.3,
DogStatsD unbuffered 11.5, DogStatsD buffered 3.8, fluent-logger (TCP) 94.9.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import subprocess
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
ROUNDS = 3  # the best of three: the machine is shared
C_SOURCE = Path(__file__).resolve().parent / "bench_client.c"


class Receiver:
    """Drains a datagram socket in another process (as the agent would), decoding each one.

    A thread in this process would share the GIL with the sender and slow it down.
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


def unix_socket(directory: Path) -> tuple[socket.socket, str]:
    path = str(directory / f"bench-{time.monotonic_ns()}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return sock, path


def timed(emit: Callable[[int], object], close: Callable[[], object]) -> tuple[float, float, float]:
    """Microseconds per event for EVENTS calls of `emit` (what the game loop pays): wall
    clock, and this thread's CPU time (what is left when a shared machine preempts us); then
    wall clock with the final close (which may wait for the receiver to take a backlog)."""
    started, cpu = time.perf_counter(), time.thread_time()
    for i in range(EVENTS):
        emit(i)
    looped, cpu = time.perf_counter(), time.thread_time() - cpu
    close()
    closed = time.perf_counter()
    per = 1e6 / EVENTS
    return (looped - started) * per, cpu * per, (closed - started) * per


def best(run: Callable[[], tuple[float, str]]) -> tuple[float, str]:
    return min((run() for _ in range(ROUNDS)), key=lambda r: r[0])


def python_client(directory: Path, **options: Any) -> tuple[float, str]:
    sock, path = unix_socket(directory)
    receiver = Receiver(sock)
    receiver.start()
    client = Client(path, **options)
    us, cpu, total = timed(
        lambda i: client.action("1001", "2002", "buy_item", {"item_id": i}), client.close
    )
    receiver.stop()
    sock.close()
    return us, (
        f"cpu {cpu:5.2f}   {total:6.2f} with close   "
        f"sent {client.sent:>6} dropped {client.dropped:>6} "
        f"received {receiver.entries:>6} in {receiver.datagrams:>5} datagrams"
    )


def raw_send(directory: Path) -> tuple[float, str]:
    sock, path = unix_socket(directory)
    receiver = Receiver(sock)
    receiver.start()
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.connect(path)
    sender.setblocking(False)
    refused = 0

    def emit(i: int) -> None:
        nonlocal refused
        record = {"user_id": "1001", "action_id": "2002", "action_name": "buy_item"}
        record["action_params"] = {"item_id": i}
        try:
            sender.send(msgpack.packb(["actions", int(time.time()), record]))
        except BlockingIOError:
            refused += 1

    us, cpu, _ = timed(emit, lambda: None)
    sender.close()
    receiver.stop()
    sock.close()
    note = f"refused {refused:>6} (EAGAIN, lost)   received {receiver.entries:>6}"
    return us, f"cpu {cpu:5.2f}   {note}"


def c_client(directory: Path) -> tuple[float, str] | None:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    program = directory / "bench_client_c"
    subprocess.run([cc, "-std=c99", "-O2", "-o", str(program), str(C_SOURCE)], check=True)

    def run() -> tuple[float, str]:
        sock, path = unix_socket(directory)
        receiver = Receiver(sock)
        receiver.start()
        out = subprocess.run(
            [str(program), str(EVENTS)],
            env={**os.environ, "TRAITS_AGENT_SOCKET": path},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        receiver.stop()
        sock.close()
        return float(out[0]), (
            f"cpu {float(out[1]):5.2f}   {float(out[2]):6.2f} with close   "
            f"sent {out[3]:>6} dropped {out[4]:>6} "
            f"received {receiver.entries:>6} in {receiver.datagrams:>5} datagrams"
        )

    return best(run)


def main() -> None:
    qlen = Path("/proc/sys/net/unix/max_dgram_qlen")
    print(
        f"{EVENTS} events (an action with one parameter), best of {ROUNDS}, a receiver process "
        f"draining; net.unix.max_dgram_qlen = {qlen.read_text().strip() if qlen.exists() else '?'}"
    )
    with tempfile.TemporaryDirectory(prefix="ta-bench-") as tmp:
        directory = Path(tmp)
        ref, ref_note = best(lambda: raw_send(directory))
        rows = [
            ("python default (packing)", *best(lambda: python_client(directory))),
            ("python buffered=False", *best(lambda: python_client(directory, buffered=False))),
        ]
        c = c_client(directory)
        if c is not None:
            rows.append(("c (traits_agent.h, -O2)", *c))
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; µs per event:")
        print(f"{'reference: packb + send':<26} {ref:6.2f} wall   {ref_note}")
        for label, us, note in rows:
            print(f"{label:<26} {us:6.2f} wall   {us / ref:5.2f}x reference   {note}")


if __name__ == "__main__":
    main()
