"""/metrics is bounded against any local user (issue 7 item 9): connections, methods, bodies,
time. Before, 40 connections sending bodies held 678 MiB."""

from __future__ import annotations

from functools import partial

import httpx
import trio
from trio.testing import wait_all_tasks_blocked

from tests.observe.test_prometheus import Source, stand_in
from traits_agent.observe.metrics import Counters
from traits_agent.observe.prometheus import METRICS_MAX_CONNECTIONS, serve_metrics

GUARD_S = 10


async def answer(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes (a hang guard bounds it)."""
    data = b""
    with trio.fail_after(GUARD_S):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


async def test_40_connections_with_large_bodies_are_bounded(nursery):
    """40 connections each start a 16 MiB POST: the first 16 get 405 before their body is
    read, the other 24 are closed unread; each refusal is counted; a scrape still works."""
    agent = Source(stand_in())
    agent.counters = Counters()
    host, port = await nursery.start(
        partial(serve_metrics, counters=agent.counters), agent, "127.0.0.1", 0
    )
    head = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 16777216\r\n\r\n" + b"x" * 65536
    streams = [await trio.open_tcp_stream(host, port) for _ in range(40)]
    for stream in streams:
        await stream.send_all(head)
    answers = [await answer(stream) for stream in streams]
    for stream in streams:
        await stream.aclose()
    refused = agent.counters.get("metrics_requests_rejected", reason="too_many_connections")
    not_allowed = agent.counters.get("metrics_requests_rejected", reason="method_not_allowed")
    assert refused + not_allowed == 40
    assert not_allowed >= METRICS_MAX_CONNECTIONS
    assert sum(a.startswith(b"HTTP/1.1 405 ") for a in answers) == not_allowed
    assert all(a == b"" for a in answers if not a.startswith(b"HTTP/1.1 405 "))
    await wait_all_tasks_blocked()
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
        assert (await http.get("/metrics")).status_code == 200


async def test_connections_past_the_limit_are_closed_unread(nursery):
    """With 16 connections open and silent, the 17th is closed at once; when one of the 16
    goes, a scrape gets in."""
    agent = Source(stand_in())
    agent.counters = Counters()
    host, port = await nursery.start(
        partial(serve_metrics, counters=agent.counters), agent, "127.0.0.1", 0
    )
    held = [await trio.open_tcp_stream(host, port) for _ in range(METRICS_MAX_CONNECTIONS)]
    await wait_all_tasks_blocked()
    extra = await trio.open_tcp_stream(host, port)
    assert await answer(extra) == b""
    assert agent.counters.get("metrics_requests_rejected", reason="too_many_connections") == 1
    await held.pop().aclose()
    await wait_all_tasks_blocked()
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
        assert (await http.get("/healthz")).status_code == 200
    for stream in held:
        await stream.aclose()


async def test_a_get_with_a_body_is_refused_unread(nursery):
    """No request body is read: a GET declaring one gets 413 at once."""
    agent = Source(stand_in())
    agent.counters = Counters()
    host, port = await nursery.start(
        partial(serve_metrics, counters=agent.counters), agent, "127.0.0.1", 0
    )
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
        )
        assert (await answer(stream)).startswith(b"HTTP/1.1 413 ")
    assert agent.counters.get("metrics_requests_rejected", reason="too_large") == 1


async def test_a_slow_request_is_cut_after_10_s(nursery, autojump_clock):
    """A request that is not complete 10 s after the connection opened is closed, counted."""
    agent = Source(stand_in())
    agent.counters = Counters()
    host, port = await nursery.start(
        partial(serve_metrics, counters=agent.counters), agent, "127.0.0.1", 0
    )
    async with await trio.open_tcp_stream(host, port) as stream:
        start = trio.current_time()
        await stream.send_all(b"GET /metrics HTTP/1.1\r\n")
        with trio.fail_after(3600):
            assert await stream.receive_some(100) == b""
        assert trio.current_time() - start == 10.0
    assert agent.counters.get("metrics_requests_rejected", reason="timeout") == 1
