"""End to end: what a hostile local peer sends to the running agent (a subprocess).

Issue 7: one datagram used to stop the agent; every test here sends the hostile bytes between
valid events and checks that the agent stays up and the valid events are delivered.
"""

from __future__ import annotations

import json
import socket

import msgpack
import pytest
import trio

from tests.e2e.test_failures import wait_status
from tests.e2e.test_pipeline import EVENT_TIME, send_blocking, start_agent
from traits_agent.intake.wire import encode_event

GUARD_S = 60


def nested_datagram(depth: int = 1000) -> bytes:
    """The datagram of issue 7 item 1: `["actions", t, <a list nested `depth` deep>]`."""
    value: list = []
    for _ in range(depth):
        value = [value]
    return msgpack.packb(["actions", EVENT_TIME, value])


def level_up(user: str) -> bytes:
    return encode_event("level_ups", {"user_id": user, "level": 1}, EVENT_TIME)


def send_udp(address: tuple[str, int], datagrams: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for d in datagrams:
            s.sendto(d, address)


@pytest.mark.parametrize("transport", ["udp", "unix"])
async def test_deeply_nested_datagram_is_rejected_and_the_agent_stays_up(workdir, api, transport):
    """The 1,015-byte nested datagram between valid events: rejected and counted (not_a_map),
    logged with a bounded sample; the events around it are delivered; the agent answers and
    stops cleanly."""
    agent = await start_agent(workdir, api)
    bad = nested_datagram()
    assert len(bad) == 1015
    before = [level_up(f"b{i}") for i in range(3)]
    after = [level_up(f"a{i}") for i in range(3)]
    datagrams = [*before, bad, bad, *after]
    if transport == "udp":
        await trio.to_thread.run_sync(send_udp, agent.udp_address(), datagrams)
    else:
        await trio.to_thread.run_sync(send_blocking, agent.unix_socket, datagrams)
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(6, "level_ups")
    assert [i["user_id"] for i in api.received["level_ups"]] == [
        "b0", "b1", "b2", "a0", "a1", "a2"
    ]  # fmt: skip
    status = await wait_status(agent, lambda s: s["rejected"].get("not_a_map") == 2)
    assert agent.proc is not None and agent.proc.poll() is None
    assert "internal_error" not in status["rejected"]
    lines = [e for e in agent.log_events() if e.get("event") == "event_rejected"]
    assert lines and lines[0]["reason"] == "not_a_map"
    assert len(json.dumps(lines[0]["sample"])) <= 600  # bounded, not the 1,000 levels
    assert await agent.terminate() == 0
