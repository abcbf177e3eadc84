"""Benchmark: events/s into the queues through the Forward-protocol stream source.

The agent side runs in this process: a `ForwardServer` on a Unix stream socket or loopback TCP,
a real `Ingest`, real `DiskQueue`s in a temporary directory (fsync "interval", 100 ms, synced in
a worker thread as the agent's Syncer does) and stub lanes (nothing is delivered). The client is
a second process with a blocking socket, so the two do not share a GIL. Each run sends
`--events` level_up events and ends when the last ack has arrived (so everything is fsynced).

    python bench/bench_forward.py [--events 200000] [--per-message 100] [--window 8]

Modes: `message` (one Message per event, no ack: what fluent-logger-python sends; one final
acked chunk marks the end), `forward` (Forward arrays of --per-message events, each with
option.chunk, up to --window unacked chunks in flight, like Fluentd's out_forward),
`packed-gzip` (the same as CompressedPackedForward, like Fluent Bit). Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import gzip
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import msgpack
import trio

from traits_agent.intake.forward import (
    Durability,
    ForwardServer,
    bind_forward_tcp,
    bind_forward_unix,
)
from traits_agent.intake.ingest import Ingest
from traits_agent.observe.metrics import Counters
from traits_agent.queue import DiskQueue
from traits_agent.schema import RESOURCES

T0 = 1546355045


class Lane:
    def __init__(self, queue: DiskQueue) -> None:
        self.queue = queue

    def notify(self) -> None:
        pass


# --------------------------------------------------------------------------- client process


def record(i: int) -> dict:
    return {"timestamp": "2019-01-01 15:04:05", "user_id": str(i), "level": i % 100}


def messages(mode: str, events: int, per_message: int) -> list[tuple[bytes, str | None]]:
    """The whole stream, prepared before the clock starts: (bytes, chunk or None)."""
    out: list[tuple[bytes, str | None]] = []
    if mode == "message":
        for i in range(events):
            out.append((msgpack.packb(["level_ups", T0, record(i)]), None))
        out.append((msgpack.packb(["level_ups", [[T0, record(0)]], {"chunk": "end"}]), "end"))
        return out
    for start in range(0, events, per_message):
        chunk = f"c{start}"
        pairs = [[T0, record(i)] for i in range(start, min(events, start + per_message))]
        if mode == "forward":
            value = ["level_ups", pairs, {"chunk": chunk}]
        else:
            packed = gzip.compress(b"".join(msgpack.packb(p) for p in pairs), compresslevel=1)
            value = ["level_ups", packed, {"chunk": chunk, "compressed": "gzip"}]
        out.append((msgpack.packb(value), chunk))
    return out


def client(address: str, mode: str, events: int, per_message: int, window: int) -> None:
    stream = messages(mode, events, per_message)
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address[5:])
    else:
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    unpacker = msgpack.Unpacker()
    outstanding: list[str] = []
    started = time.perf_counter()

    def read_ack() -> None:
        while True:
            for ack in unpacker:
                assert ack == {"ack": outstanding.pop(0)}, ack
                return
            data = sock.recv(65536)
            if not data:
                raise SystemExit("closed by the agent")
            unpacker.feed(data)

    if mode == "message":
        sock.sendall(b"".join(data for data, _ in stream[:-1]))  # as a tight emit loop would
        stream = stream[-1:]
    for data, chunk in stream:
        while len(outstanding) >= window:
            read_ack()
        sock.sendall(data)
        if chunk is not None:
            outstanding.append(chunk)
    while outstanding:
        read_ack()
    elapsed = time.perf_counter() - started
    sock.close()
    print(f"{elapsed:.6f}")


# --------------------------------------------------------------------------- agent side


async def serve_and_measure(args: argparse.Namespace, transport: str, mode: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="ta-bench-fwd-", dir="/tmp"))
    queues = {n: DiskQueue.open(work / n, fsync="interval") for n in RESOURCES}
    counters = Counters()
    ingest = Ingest({n: Lane(q) for n, q in queues.items()}, counters)
    dirty = trio.Event()
    syncs = 0

    def request() -> None:
        dirty.set()

    durability = Durability(queues, fsync="interval", request_sync=request)

    async def syncer() -> None:  # the agent's Syncer, "interval" policy
        nonlocal dirty, syncs
        while True:
            await dirty.wait()
            dirty = trio.Event()
            for q in queues.values():
                await trio.to_thread.run_sync(q.sync)
            syncs += 1
            durability.synced()
            await trio.sleep(0.1)

    server = ForwardServer(ingest, durability)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(syncer)
            if transport == "unix":
                path = work / "forward.sock"
                sock = bind_forward_unix(path, 0o600)
                address = f"unix:{path}"
            else:
                sock = bind_forward_tcp("127.0.0.1", 0)
                address = f"127.0.0.1:{sock.getsockname()[1]}"
            await nursery.start(partial(server.serve, sock, name=transport))
            cmd = [sys.executable, __file__, "--client", address, "--mode", mode]
            cmd += ["--events", str(args.events), "--per-message", str(args.per_message)]
            cmd += ["--window", str(args.window)]
            result = await trio.run_process(cmd, capture_stdout=True)
            elapsed = float(result.stdout.decode().strip())
            nursery.cancel_scope.cancel()
    finally:
        for q in queues.values():
            q.close()
    accepted = counters.total("accepted_events")
    print(
        f"{transport:4} {mode:11} {args.events} events in {elapsed:.2f}s: "
        f"{args.events / elapsed:,.0f} events/s  (accepted {accepted}, fsync rounds {syncs})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--per-message", type=int, default=100)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--client")
    parser.add_argument("--mode", default="forward")
    args = parser.parse_args()
    if args.client:
        client(args.client, args.mode, args.events, args.per_message, args.window)
        return
    for transport in ("unix", "tcp"):
        for mode in ("message", "forward", "packed-gzip"):
            trio.run(serve_and_measure, args, transport, mode)


if __name__ == "__main__":
    main()
