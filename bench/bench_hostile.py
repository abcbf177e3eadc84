"""What hostile peers cost the running agent (issue 7): RSS and stalls, with figures.

Starts the real daemon (`python -m traits_agent run`, Forward on loopback TCP, UDP) against
a local sink that answers 201, then:

1. Forward memory: CONNS connections each send all but the last byte of a 32 MiB value; prints the
   agent's RSS before and after (VmRSS from /proc).
2. /metrics: 40 connections each POST a 16 MiB body; RSS before and after.
3. amplification: one 16 KB gzip datagram that inflates to 5.59M events; prints how long
   the agent's loop was blocked, as seen by a UDP heartbeat it has to answer — the `status`
   control request, timed from here.

Prints figures only. Run: `.venv/bin/python bench/bench_hostile.py [CONNS]` (default 64).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import msgpack

CONNS = int(sys.argv[1]) if len(sys.argv) > 1 else 64
MiB = 1024 * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def status(control: Path) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(str(control))
        s.sendall(b"status\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data)


def start(directory: Path) -> tuple[subprocess.Popen, Path]:
    control = directory / "control.sock"
    config = directory / "agent.toml"
    config.write_text(
        '[api]\nendpoint = "http://127.0.0.1:9"\n'
        f'[listen]\nunix = "{directory / "events.sock"}"\nudp = "127.0.0.1:0"\n'
        'forward = "127.0.0.1:0"\nforward_unix = ""\n'
        f'[queue]\ndir = "{directory / "queue"}"\n'
        f'[control]\nsocket = "{control}"\n[log]\nlevel = "warning"\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    env = dict(os.environ, TRAITS_API_KEY="bench")
    proc = subprocess.Popen(
        [sys.executable, "-m", "traits_agent", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        if control.exists():
            try:
                status(control)
                return proc, control
            except OSError:
                pass
        time.sleep(0.1)
    raise RuntimeError("agent did not start")


def address(listening: str) -> tuple[str, int]:
    host, _, port = listening.rpartition(":")
    return host, int(port)


def send_from_many(
    host: str, port: int, payload: bytes, conns: int, timeout: float
) -> list[socket.socket]:
    """Open `conns` connections and send `payload` on each from its own thread (at once, as
    many hostile peers would); return them, still open, once every send is done or gave up."""
    socks = []

    def send(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(payload)

    threads = []
    for _ in range(conns):
        s = socket.create_connection((host, port))
        s.settimeout(timeout)
        socks.append(s)
        t = threading.Thread(target=send, args=(s,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return socks


def memory(proc: subprocess.Popen, control: Path) -> None:
    host, port = address(status(control)["listening"]["forward"])
    before = rss_mib(proc.pid)
    size = 32 * MiB - 16
    value = b"\x93\xa9level_ups\xc6" + size.to_bytes(4, "big")  # [tag, bin32 of `size`...
    payload = value + b"x" * (size - 1)  # ... one byte short: never finished
    # the agent stops reading past its budget: give up after 20 s
    socks = send_from_many(host, port, payload, CONNS, timeout=20)
    time.sleep(1)
    after = rss_mib(proc.pid)
    print(
        f"memory: {CONNS} connections x unfinished 32 MiB value: "
        f"RSS {before:.0f} MiB -> {after:.0f} MiB"
    )
    for s in socks:
        s.close()


def amplification(proc: subprocess.Popen, control: Path) -> None:
    host, port = address(status(control)["listening"]["udp"])
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = deflate.compress(b"\x92\xc0\x80" * (16 * MiB // 3)) + deflate.flush()
    datagram = msgpack.packb(["level_ups", bomb, {"compressed": "gzip"}])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(datagram, (host, port))
    start = time.perf_counter()
    time.sleep(0.05)  # let the agent take it
    status(control)
    blocked = time.perf_counter() - start - 0.05
    print(
        f"amplification: {len(datagram)} B datagram (5.59M events inflated): "
        f"status answered after {blocked:.2f} s"
    )
    print(f"  rejected so far: {status(control)['rejected']}")


def metrics(proc: subprocess.Popen, control: Path) -> None:
    host, port = address(status(control)["listening"]["metrics"])
    before = rss_mib(proc.pid)
    size = 16 * MiB
    head = f"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
    body = b"x" * size
    socks = send_from_many(host, port, head + body, 40, timeout=60)
    time.sleep(1)
    after = rss_mib(proc.pid)
    print(f"metrics: 40 connections x 16 MiB POST body: RSS {before:.0f} MiB -> {after:.0f} MiB")
    for s in socks:
        s.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ta-bench-", dir="/tmp") as tmp:
        proc, control = start(Path(tmp))
        try:
            amplification(proc, control)
            metrics(proc, control)
            memory(proc, control)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
