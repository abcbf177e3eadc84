"""A hostile upstream answer cannot stop a lane (issue 7 item 1): a real HTTP server on
loopback answers with JSON nested past Python's recursion limit."""

from __future__ import annotations

import contextlib
from functools import partial

import pytest
import trio

from tests.conftest import agent_client
from tests.delivery.test_delivery import Rig, level_ups, read_request, settled


@pytest.mark.parametrize("status", [503, 400])
async def test_deeply_nested_json_answer_is_kept_as_text(autojump_clock, nursery, tmp_path, status):
    """An answer nested 100,000 deep (past Python's recursion limit) used to raise
    RecursionError out of read_answer and stop the lane: it is read as a plain-text message,
    and the next attempt delivers."""
    depth = 100_000
    hostile = b'{"errors":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
    answers = [
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(hostile)}\r\nConnection: close\r\n\r\n".encode()
        + hostile,
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ]
    requests = 0

    async def server(stream: trio.SocketStream) -> None:
        nonlocal requests
        async with stream:
            await read_request(stream)
            answer = answers[min(requests, len(answers) - 1)]
            requests += 1
            with contextlib.suppress(trio.BrokenResourceError):  # it reads 64 KiB and hangs up
                await stream.send_all(answer)

    (listener,) = await nursery.start(partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    async with agent_client(f"http://127.0.0.1:{port}") as client:
        rig = Rig(tmp_path, None, client, "level_ups", linger_s=0.0)
        await nursery.start(rig.lane.run)
        rig.add(level_ups(1))
        await settled(rig)
        if status == 503:  # retried, then delivered
            assert requests == 2
            assert rig.counters.total("delivered_items") == 1
        else:  # a 400 without usable detail: dead-lettered with the text
            assert requests == 1
            assert rig.counters.total("dead_lettered_items") == 1
