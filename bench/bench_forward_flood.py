"""What a gzip flood over Forward costs, with the listeners in the agent and in the Forward
intake process: peak RSS of each process, and how the agent's end goes.

`--conns` connections (default 20) each send, as fast as they can, PackedForward messages
whose gzip payload is ~22 KB on the wire and 5.6 MB inflated (25,000 events of 230 bytes):
the cheapest way for a peer to make the agent work and hold memory. After 5 s the bench
prints the peak RSS (VmHWM) of the agent and of its intake process, then ends the agent
(`--end kill`: SIGKILL, and how long its intake process outlives it; `--end term`: SIGTERM,
and how long the graceful stop takes). The API is down (nothing listens on its port), so
everything stays queued; the queue is deleted afterwards. Prints figures; asserts nothing.

    python bench/bench_forward_flood.py [--conns 20] [--end kill|term] [--modes never,always]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_intake import children_of
from bench_pipeline import _ok, free_port, peak_rss_kib, start_agent, wait_for

from traits_agent.observe.control import request_status


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may stay until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def run(mode: str, conns: int, end: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="ta-bench-flood-", dir="/tmp"))
    port = free_port()
    agent = start_agent(
        work,
        f"http://127.0.0.1:{free_port()}",
        f'unix = ""\nudp = ""\nforward_unix = ""\nforward = "127.0.0.1:{port}"\n'
        f'forward_process = "{mode}"\n',
    )
    kids: list[int] = []
    try:
        wait_for(lambda: _ok(lambda: request_status(work / "control.sock")), timeout=60)
        stream = msgpack.packb([1_700_000_000, {"user_id": "u" * 200, "level": 5}]) * 25_000
        message = msgpack.packb(
            ["level_ups", gzip.compress(stream), {"compressed": "gzip", "size": 25_000}]
        )
        stop = time.monotonic() + 20

        def flood() -> None:
            with socket.create_connection(("127.0.0.1", port)) as s:
                try:
                    while time.monotonic() < stop:
                        s.sendall(message * 4)
                except OSError:
                    pass  # the agent went away

        for _ in range(conns):
            threading.Thread(target=flood, daemon=True).start()
        time.sleep(5)
        kids = children_of(agent.pid)
        rss = f"agent {peak_rss_kib(agent.pid) / 1024:.0f} MiB"
        rss += "".join(f", intake process {peak_rss_kib(k) / 1024:.0f} MiB" for k in kids)
        t0 = time.monotonic()
        agent.send_signal(signal.SIGKILL if end == "kill" else signal.SIGTERM)
        agent.wait(timeout=120)
        took = time.monotonic() - t0
        outlived = []
        for k in kids:
            while running(k) and time.monotonic() - t0 < 30:
                time.sleep(0.02)
            outlived.append(
                f"{time.monotonic() - t0:.2f} s" if not running(k) else "still running at 30 s"
            )
        print(
            f"forward_process = {mode}: {len(message) / 1e3:.0f} KB messages "
            f"({len(stream) / 1e6:.1f} MB inflated), {conns} connections, 5 s: peak RSS {rss}; "
            f"{end}: the agent exited after {took:.2f} s"
            + (f", its intake process after {', '.join(outlived)}" if kids else ""),
            flush=True,
        )
    finally:
        for k in kids:
            if running(k):
                os.kill(k, signal.SIGKILL)
        if agent.poll() is None:
            agent.kill()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--conns", type=int, default=20)
    parser.add_argument("--end", choices=("kill", "term"), default="kill")
    parser.add_argument("--modes", default="never,always")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    for mode in args.modes.split(","):
        run(mode, args.conns, args.end)


if __name__ == "__main__":
    main()
