"""Benchmark: events/s into the queues through the Forward-protocol stream source.

The agent side runs in this process: a `ForwardServer` on a Unix stream socket or loopback TCP,
a real `Ingest`, real `DiskQueue`s in a temporary directory, the agent's own `Syncer` and
`AckGate` wired as `agent.py` wires them (fsync "interval", 100 ms) and stub lanes (nothing
is delivered). Every queue holds one record before the run, as in an agent that has received
every resource (each sync round then visits 8 open segment files). The client is a second
process with a blocking socket, so the two do not share a GIL. Each run ends when the last ack
has arrived (so everything is fsynced).

    python bench/bench_forward.py [--events 200000] [--per-message 100] [--window 8]
                                  [--ack-events 5000] [--modes ...] [--transports ...]

Modes: `message` (one Message per event, no ack: what fluent-logger-python sends; one final
acked chunk marks the end), `forward` (Forward arrays of --per-message events, each with
option.chunk, up to --window unacked chunks in flight, like Fluentd's out_forward: the bulk
acked figure), `packed-gzip` (the same as CompressedPackedForward, like Fluent Bit),
`message-ack` (--ack-events Messages, each with option.chunk, the next sent only when the
previous one is acked: npm fluent-logger with requireAckResponse, fluent-logger-golang with
RequestAck). `message-ack` is also run with fsync "always" as the reference: the ratio says how
close the default "interval" comes to one fsync per ack. Prints figures; asserts nothing.

The script also runs against the code before the group-commit change (no `Syncer.prompt`), to
measure "before" in the same way.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import msgpack
import trio

from traits_agent.intake.durability import AckGate, Syncer
from traits_agent.intake.forward import (
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
    if mode == "message-ack":
        for i in range(events):
            out.append((msgpack.packb(["level_ups", T0, record(i), {"chunk": f"m{i}"}]), f"m{i}"))
        return out
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


async def serve_and_measure(
    args: argparse.Namespace, transport: str, mode: str, fsync: str = "interval"
) -> float:
    events = args.ack_events if mode == "message-ack" else args.events
    window = 1 if mode == "message-ack" else args.window
    work = Path(tempfile.mkdtemp(prefix="ta-bench-fwd-", dir="/tmp"))
    queues = {n: DiskQueue.open(work / n, fsync=fsync) for n in RESOURCES}
    for queue in queues.values():  # as in an agent that has received every resource: each
        queue.append(b"{}")  # queue has a segment file open, which each sync round visits
        queue.flush()
        queue.sync()
    counters = Counters()
    ingest = Ingest({n: Lane(q) for n, q in queues.items()}, counters)
    syncer = Syncer(queues, counters, policy=fsync, interval_s=0.1)
    prompt = getattr(syncer, "prompt", None)  # None: the code before group commit's prompt
    extra = {"request_prompt_sync": prompt} if prompt else {}
    durability = AckGate(queues, fsync=fsync, request_sync=syncer.dirty, **extra)
    rounds = 0

    def synced() -> None:
        nonlocal rounds
        rounds += 1
        durability.synced()

    syncer.on_synced = synced
    server = ForwardServer(ingest, durability)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(syncer.run)
            if transport == "unix":
                path = work / "forward.sock"
                sock = bind_forward_unix(path, 0o600)
                address = f"unix:{path}"
            else:
                sock = bind_forward_tcp("127.0.0.1", 0)
                address = f"127.0.0.1:{sock.getsockname()[1]}"
            await nursery.start(partial(server.serve, sock, name=transport))
            cmd = [sys.executable, __file__, "--client", address, "--mode", mode]
            cmd += ["--events", str(events), "--per-message", str(args.per_message)]
            cmd += ["--window", str(window)]
            result = await trio.run_process(cmd, capture_stdout=True)
            elapsed = float(result.stdout.decode().strip())
            nursery.cancel_scope.cancel()
    finally:
        for q in queues.values():
            q.close()
        shutil.rmtree(work, ignore_errors=True)  # a run leaves nothing behind in /tmp
    accepted = counters.total("accepted_events")
    rate = events / elapsed
    print(
        f"{transport:4} {mode:11} fsync={fsync:8} {events} events in {elapsed:.2f}s: "
        f"{rate:,.0f} acked events/s  (accepted {accepted}, fsync rounds {rounds})",
        flush=True,
    )
    return rate


def raw_sync_rate(rounds: int = 300) -> float:
    """The disk's own rate of (append 100 bytes, fdatasync) in the bench's directory: the
    ceiling of acks that each wait for their own sync."""
    fd, name = tempfile.mkstemp(prefix="ta-bench-sync-", dir="/tmp")
    try:
        started = time.perf_counter()
        for _ in range(rounds):
            os.write(fd, b"x" * 100)
            os.fdatasync(fd)
        return rounds / (time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--ack-events", type=int, default=5000)
    parser.add_argument("--per-message", type=int, default=100)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--modes", default="message,forward,packed-gzip,message-ack")
    parser.add_argument("--transports", default="unix,tcp")
    parser.add_argument("--client")
    parser.add_argument("--mode", default="forward")
    args = parser.parse_args()
    if args.client:
        client(args.client, args.mode, args.events, args.per_message, args.window)
        return
    for transport in args.transports.split(","):
        for mode in args.modes.split(","):
            if mode == "message-ack":
                disk = raw_sync_rate()
                ceiling = trio.run(serve_and_measure, args, transport, mode, "never")
            rate = trio.run(serve_and_measure, args, transport, mode)
            if mode == "message-ack":
                reference = trio.run(serve_and_measure, args, transport, mode, "always")
                print(
                    f"     disk: {disk:,.0f} raw appends+fdatasync/s; per-event ack with "
                    f"fsync=interval: {rate / reference:.2f}x fsync=always, "
                    f"{rate / disk:.2f}x the raw disk rate, {rate / ceiling:.2f}x no fsync",
                    flush=True,
                )


if __name__ == "__main__":
    main()
