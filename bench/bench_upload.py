"""Benchmark: the CPU one POST of a 1000-item batch costs the agent, against a bare httpx post.

The agent's delivery cost per event is almost all the per-POST cost of its batches, so this
measures that one thing, in this process, against the real fake API (`traits-agent fake-api`,
another process: its CPU is not counted):

(r) bare: `httpx.AsyncClient.post(path, content=body, headers=...)` on a default client, the
    answer read with `.content`: what the chosen HTTP client costs at the least.
(u) uploader: the agent's `Uploader.deliver` of the same 1000 items (body assembly, idempotency
    key, the policy's deadline, capped read and answer parsing, counters, logs at `warning` as
    the packaged config runs), on the agent's own client (`policy.make_client`, whose
    transport is `delivery/transport.py`, not httpx's default: a ratio under 1 is what that
    transport saves, net of everything the uploader adds).

Rounds of each alternate (so that whatever else the machine does hits both alike); each row
shows the median over rounds of user and system CPU per POST, and the ratio of (u) to (r).

`--burst N` then sends N events (50 per datagram, the C sender of `bench_intake.py`) to the
agent as a subprocess (`traits-agent run`, as `bench_intake.py` row (c) runs it) and prints,
from the fake API's record of each request's arrival: the time from the first datagram sent to
the first POST, the gaps between POSTs while the sender was still sending and after it was
done. While a burst lasts intake comes first: the datagram source hands one slice to the sink
per scheduler round and a POST needs several rounds (each socket operation of httpx on trio is
a checkpoint), so POSTs are spaced by several slices.

    python bench/bench_upload.py [--posts 100] [--rounds 7] [--items 1000] [--log-level warning]
    python bench/bench_upload.py --rounds 0 --burst 1000000

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import _ok, fake_count, free_port, wait_for

from traits_agent import malloc
from traits_agent.delivery.backoff import Backoff
from traits_agent.delivery.deadletter import DeadLetters
from traits_agent.delivery.policy import USER_AGENT, make_client
from traits_agent.delivery.uploader import Uploader, build_body
from traits_agent.observe import log as agent_log
from traits_agent.observe.metrics import Counters
from traits_agent.schema import RESOURCES

KEY = "bench-key"
AUTH = ["--api-key", KEY]
ACTIONS = RESOURCES["actions"]


def item(i: int) -> bytes:
    return json.dumps(
        {
            "user_id": f"player-{i % 100}",
            "action_id": str(i),
            "action_name": "open_chest",
            "action_params": [{"key": "chest", "value": "gold"}],
            "timestamp": "2023-11-14 22:13:20",
        },
        separators=(",", ":"),
    ).encode()


def cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def reset(url: str) -> None:
    """Forget what the fake API received (it keeps every item in memory)."""
    urllib.request.urlopen(urllib.request.Request(f"{url}/_fake/reset", method="POST")).read()


async def bare(client: httpx.AsyncClient, body: bytes, posts: int) -> None:
    headers = {
        "Authorization": f"Bearer {KEY}",
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    for _ in range(posts):
        r = await client.post(ACTIONS.path, content=body, headers=headers)
        if r.status_code != 201:
            raise RuntimeError(f"bare: {r.status_code} {r.content[:200]!r}")


async def uploader(up: Uploader, payloads: list[bytes], posts: int, first: int) -> None:
    for n in range(posts):
        await up.deliver(ACTIONS, payloads, first + n * len(payloads))
    st = up.state(ACTIONS.name)
    if st.state != "ok" or st.dead_lettered:
        raise RuntimeError(f"uploader: {st}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--posts", type=int, default=100, help="POSTs per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--items", type=int, default=1000, help="items per POST")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--burst", type=int, default=0, help="events sent to the agent")
    args = parser.parse_args()
    if args.rounds:
        per_post(args)
    if args.burst:
        burst(args.burst, 50)


def per_post(args: argparse.Namespace) -> None:
    """Rows (r) and (u)."""
    malloc.tune()  # as `traits-agent run` does: the (u) row is the agent's own delivery
    agent_log.setup(level=args.log_level, fmt="json", stream=open("/dev/null", "w"))  # noqa: SIM115

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = subprocess.Popen(
        [sys.executable, "-m", "traits_agent", "fake-api", "--listen", f"127.0.0.1:{port}", *AUTH],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    payloads = [item(i) for i in range(args.items)]
    body = build_body(ACTIONS, payloads)
    results: dict[str, list[tuple[float, float]]] = {"(r) bare httpx post": [], "(u) uploader": []}
    try:
        wait_for(lambda: _ok(lambda: fake_count(url) >= 0), timeout=60)

        async def run(tmp: Path) -> None:
            plain = httpx.AsyncClient(base_url=url)
            agents = make_client(url, connect_timeout=5.0, timeout=30.0, max_in_flight=4)
            up = Uploader(
                agents,
                api_key=KEY,
                counters=Counters(),
                dead_letters=DeadLetters(tmp / "dead-letters"),
                backoff=Backoff(),
                agent_id="bench",
            )
            first = 0
            async with plain, agents:
                await bare(plain, body, 5)  # connect, warm up
                await uploader(up, payloads, 5, first)
                first += 5 * len(payloads)
                for _ in range(args.rounds):
                    for label in results:
                        reset(url)
                        u0, s0 = cpu()
                        if label.startswith("(r)"):
                            await bare(plain, body, args.posts)
                        else:
                            await uploader(up, payloads, args.posts, first)
                            first += args.posts * len(payloads)
                        u1, s1 = cpu()
                        results[label].append(
                            ((u1 - u0) / args.posts * 1e3, (s1 - s0) / args.posts * 1e3)
                        )

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ta-bench-upload-") as tmp:  # dead letters
            trio.run(run, Path(tmp))
        wall = time.perf_counter() - t0
    finally:
        api.terminate()
        api.wait(timeout=20)

    print(
        f"{args.rounds} rounds x {args.posts} POSTs of {args.items} items ({len(body):,} B) "
        f"each, {wall:.1f} s; CPU ms per POST (median over rounds; min..max of user)"
    )
    print(f"{'':24}{'user':>8}{'sys':>8}{'total':>8}{'ratio':>8}   user range")
    ref = None
    for label, rows in results.items():
        user = statistics.median(u for u, _ in rows)
        sys_ = statistics.median(s for _, s in rows)
        total = statistics.median(u + s for u, s in rows)
        ref = ref if ref is not None else total
        lo, hi = min(u for u, _ in rows), max(u for u, _ in rows)
        print(
            f"  {label:22}{user:8.3f}{sys_:8.3f}{total:8.3f}{total / ref:8.2f}   {lo:.3f}..{hi:.3f}"
        )


def burst(events: int, per: int) -> None:
    """Time to the first POST and the gaps between POSTs while a datagram burst is taken."""
    import bench_intake

    work = Path(tempfile.mkdtemp(prefix="ta-bench-upload-"))
    try:
        datagrams = bench_intake.make_datagrams(events, per)
        sender = bench_intake.Sender(work, False)
        path = str(work / "events.sock")
        agent = bench_intake.AgentProcess(work, unix=path, receive_buffer=0)
        try:
            t0 = time.time()
            sender.start(datagrams, "unix", path).wait()
            sent = time.time()
            wait_for(lambda: fake_count(agent.url) >= events, interval=0.01)
            done = time.time()
            with urllib.request.urlopen(f"{agent.url}/_fake/requests") as r:
                requests = json.loads(r.read())["requests"]
        finally:
            agent.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    arrivals = sorted(r["wall_time"] for r in requests if r["resource"])
    pairs = list(itertools.pairwise(arrivals))
    during = sorted((b - a) * 1e3 for a, b in pairs if b <= sent)
    after = sorted((b - a) * 1e3 for a, b in pairs if a >= sent)
    print(
        f"burst of {events:,} events, {per} per datagram ({sender.kind} sender): sent in "
        f"{(sent - t0) * 1e3:.0f} ms, all delivered at {(done - t0) * 1e3:.0f} ms; "
        f"first POST at {(arrivals[0] - t0) * 1e3:.0f} ms; {len(arrivals)} POSTs, "
        f"{sum(1 for a in arrivals if a <= sent)} while sending"
    )
    for label, gaps in (("while sending", during), ("after", after)):
        if gaps:
            print(
                f"  gap between POSTs {label}: median {statistics.median(gaps):.1f} ms, "
                f"p90 {gaps[int(len(gaps) * 0.9)]:.1f} ms, max {gaps[-1]:.1f} ms"
            )


if __name__ == "__main__":
    main()
