"""Benchmark: events/s from datagram to delivered at the fake API, and the agent's peak RSS.

Runs three processes on this machine: the fake API (`traits-agent fake-api`), the agent
(`traits-agent run`, fsync=interval) and this script as the sender (a blocking Unix datagram
sender, so the kernel's max_dgram_qlen cannot drop anything and we measure the agent, not the
socket). Prints figures; asserts nothing.

    python bench/bench_pipeline.py [--events 200000] [--per-datagram 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from traits_agent.intake.wire import encode_event, encode_forward
from traits_agent.observe.control import request_status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=900.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError


def fake_count(url: str) -> int:
    with urllib.request.urlopen(f"{url}/_fake/received?items=0", timeout=10) as r:
        data = json.loads(r.read())
    return data.get("total", sum(data.get("counts", {}).values()))


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def fake_admin(url: str, method: str, path: str, body: bytes | None = None) -> None:
    req = urllib.request.Request(f"{url}{path}", data=body, method=method)
    req.add_header("Content-Type", "application/json")
    urllib.request.urlopen(req, timeout=10).read()


def start_fake_api(port: int) -> subprocess.Popen:
    """`traits-agent fake-api` on loopback `port`, key "bench-key", quiet."""
    api = ["fake-api", "--listen", f"127.0.0.1:{port}", "--api-key", "bench-key"]
    return subprocess.Popen(
        [sys.executable, "-m", "traits_agent", *api],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_agent(
    work: Path, url: str, listen: str, *, queue: str = "", extra: str = ""
) -> subprocess.Popen:
    """`traits-agent run` with the benches' config in `work/agent.toml`: API `url`, the
    `[listen]` lines given, the queue in `work/queue` (plus `queue` lines), 200 ms linger,
    the control socket `work/control.sock`, warnings only; `extra` adds whole sections."""
    config = work / "agent.toml"
    config.write_text(
        f'[api]\nendpoint = "{url}"\n'
        f"[listen]\n{listen}"
        f'[queue]\ndir = "{work}/queue"\nmax_bytes = 8589934592\n{queue}'
        f"[batch]\nlinger_ms = 200\n"
        f"{extra}"
        f'[control]\nsocket = "{work}/control.sock"\n'
        f'[log]\nlevel = "warning"\n'
    )
    return subprocess.Popen(
        [sys.executable, "-m", "traits_agent", "run", "--config", str(config)],
        env=dict(os.environ, TRAITS_API_KEY="bench-key"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run(events: int, per_datagram: int, fsync: str, outage: bool = False) -> None:
    work = Path(tempfile.mkdtemp(prefix="ta-bench-", dir="/tmp"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = start_fake_api(port)
    agent = start_agent(
        work,
        url,
        f'unix = "{work}/events.sock"\nudp = ""\nforward_unix = ""\n',
        queue=f'fsync = "{fsync}"\n',
    )
    try:
        wait_for(lambda: _ok(lambda: fake_count(url) >= 0))
        wait_for(lambda: _ok(lambda: request_status(work / "control.sock")))
        rss_idle = peak_rss_kib(agent.pid)
        if per_datagram == 1:
            datagrams = [
                encode_event("level_ups", {"user_id": str(i), "level": 1 + i % 99}, 1.7e9)
                for i in range(events)
            ]
        else:
            datagrams = [
                encode_forward(
                    "level_ups",
                    [
                        (1.7e9, {"user_id": str(i), "level": 1 + i % 99})
                        for i in range(s, min(events, s + per_datagram))
                    ],
                )
                for s in range(0, events, per_datagram)
            ]
        if outage:  # the API answers 503 until the whole backlog is on disk
            fake_admin(url, "POST", "/_fake/faults", b'{"status": 503, "times": null}')
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.connect(str(work / "events.sock"))
        t0 = time.perf_counter()
        for d in datagrams:
            sender.send(d)
        t_sent = time.perf_counter()
        wait_for(
            lambda: request_status(work / "control.sock")["received"]["events"] >= events,
            interval=0.005,
        )
        t_ingested = time.perf_counter()
        rss_backlog = peak_rss_kib(agent.pid)
        disk = None
        if outage:
            payloads = payload_size(
                [
                    ("level_ups", {"user_id": str(i), "level": 1 + i % 99}, 1.7e9)
                    for i in range(events)
                ]
            )
            disk = disk_usage(work / "queue", events, payloads)
        first = 0
        if outage:
            fake_admin(url, "DELETE", "/_fake/faults")
            t_back = time.perf_counter()
            # the agent's next retry comes at the end of its current back-off: the drain
            # rate is timed from the first batch accepted, the wait printed apart
            first = wait_for(lambda: fake_count(url), interval=0.005)
            t0 = time.perf_counter()  # from here: draining the backlog
        wait_for(lambda: fake_count(url) >= events, interval=0.01)
        t_delivered = time.perf_counter()
        status = request_status(work / "control.sock")
        rss_peak = peak_rss_kib(agent.pid)
        if outage:
            print(
                f"events={events} per_datagram={per_datagram} fsync={fsync} (API down while "
                f"sending)\n"
                f"  backlog drain: {(events - first) / (t_delivered - t0):>10,.0f} events/s from "
                f"the first batch accepted ({t_delivered - t0:.2f} s; the agent's next retry "
                f"came {t0 - t_back:.2f} s after the API was back)\n"
                f"  agent RSS: idle peak {rss_idle / 1024:.1f} MiB, with the whole backlog queued "
                f"{rss_backlog / 1024:.1f} MiB, after draining {rss_peak / 1024:.1f} MiB\n"
                f"  on disk:   {disk}"
            )
            return
        print(
            f"events={events} per_datagram={per_datagram} fsync={fsync}\n"
            f"  send:      {events / (t_sent - t0):>10,.0f} events/s (sender, blocking)\n"
            f"  ingested:  {events / (t_ingested - t0):>10,.0f} events/s "
            f"(datagram → validated → on disk)\n"
            f"  delivered: {events / (t_delivered - t0):>10,.0f} events/s "
            f"(datagram → fake API 201), {t_delivered - t0:.2f} s total\n"
            f"  batches:   {status['resources']['level_ups']['delivered']} items delivered, "
            f"rejected={sum(status['rejected'].values())}\n"
            f"  agent RSS: idle peak {rss_idle / 1024:.1f} MiB, run peak {rss_peak / 1024:.1f} MiB"
        )
    finally:
        for p in (agent, api):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def disk_usage(queue_dir: Path, events: int, payload_bytes: int | None = None) -> str:
    """The queue's files with the whole backlog queued: bytes per event (apparent size and
    allocated blocks) and, given the payloads' total, how many of them are framing (headers,
    CRCs, seals) rather than payload."""
    files = [f for f in queue_dir.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    blocks = sum(f.stat().st_blocks * 512 for f in files)
    text = (
        f"{size / events:.1f} B/event ({blocks / events:.1f} B/event allocated, {len(files)} files)"
    )
    if payload_bytes is not None:
        framing = (size - payload_bytes) / events
        text += (
            f"; payload {payload_bytes / events:.1f} B/event, framing and metadata "
            f"{framing:.1f} B/event ({framing / (size / events):.0%})"
        )
    return text


def payload_size(records: list[tuple[str, dict, float]]) -> int:
    """The bytes the agent stores for these events: their JSON payloads, as Ingest makes them."""
    from traits_agent.schema import RESOURCES, encode_record

    return sum(len(encode_record(RESOURCES[r], rec, t).item) for r, rec, t in records)


def _ok(fn):
    try:
        return fn() is not None
    except Exception:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--per-datagram", type=int, nargs="*", default=[50, 1])
    parser.add_argument("--fsync", default="interval")
    parser.add_argument(
        "--outage-events",
        type=int,
        default=1_000_000,
        help="backlog size for the outage scenario (0 skips it)",
    )
    args = parser.parse_args()
    for n in args.per_datagram:
        run(args.events, n, args.fsync)
    if args.outage_events:
        run(args.outage_events, 50, args.fsync, outage=True)


if __name__ == "__main__":
    main()
