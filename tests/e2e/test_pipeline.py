"""End to end: datagrams into the agent process, batches out at the fake API.

The agent runs as a real subprocess (`python -m traits_agent run`), readiness comes from its
sd_notify READY=1, the fake API is a real HTTP server in the test process. Timeouts here are
hang guards, never speed assertions.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import msgpack
import pytest
import trio

from tests.e2e.harness import AgentProcess, run_until_exit, write_config
from tests.reference_examples import EXAMPLES as REFERENCE_EXAMPLES
from traits_agent.client import Client
from traits_agent.fakeapi import Fault
from traits_agent.intake.wire import encode_event, encode_forward

GUARD_S = 60

# the reference's examples without their timestamp: the agent fills it from the event time
EXAMPLES = {
    name: {k: v for k, v in item.items() if k != "timestamp"}
    for name, item in REFERENCE_EXAMPLES.items()
}
EVENT_TIME = 1546355045  # 2019-01-01 15:04:05 UTC


def send_blocking(path: str, datagrams: list[bytes]) -> None:
    """A test sender that waits when the kernel queue is full (max_dgram_qlen may be 10)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        for d in datagrams:
            s.send(d)


async def start_agent(workdir, api, **sections) -> AgentProcess:
    agent = AgentProcess(workdir, write_config(workdir, api.url, **sections))
    await agent.start()
    return agent


async def test_every_resource_end_to_end(workdir, api):
    """One event of each resource, sent by the client library, arrives as the API expects:
    timestamp filled from the event time in UTC, unknown fields stripped."""
    agent = await start_agent(workdir, api)
    client = Client(unix=agent.unix_socket)
    for name, record in EXAMPLES.items():
        assert client.emit(name, {**record, "debug_note": "strip me"}, time=EVENT_TIME)
    assert client.emit("playfab", {"EventName": "player_logged_in", "EventId": "ab" * 16})
    with trio.fail_after(GUARD_S):
        await api.wait_until(lambda: all(api.received[n] for n in [*EXAMPLES, "playfab"]))
    for name, record in EXAMPLES.items():
        (got,) = api.received[name]
        expected = dict(record)
        if name != "items":
            expected["timestamp"] = "2019-01-01 15:04:05"
        assert got == expected, name
    assert api.received["playfab"] == [{"EventName": "player_logged_in", "EventId": "ab" * 16}]
    status = agent.status()
    assert status["stripped_fields"] == 7
    assert all(r.headers["user-agent"].startswith("traits-agent/") for r in api.requests)
    assert await agent.terminate() == 0


async def test_20000_events_leave_as_full_batches(workdir, api):
    """20,000 level-ups sent in bursts leave as twenty 1000-item requests, in order."""
    agent = await start_agent(workdir, api, batch={"linger_ms": 600_000})
    datagrams = [
        encode_forward(
            "level_ups",
            [
                (EVENT_TIME, {"user_id": str(i), "level": 1 + i % 99})
                for i in range(start, start + 100)
            ],
        )
        for start in range(0, 20_000, 100)
    ]
    await trio.to_thread.run_sync(send_blocking, agent.unix_socket, datagrams)
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(20_000, "level_ups")
    assert [r.item_count for r in api.requests] == [1000] * 20
    assert [i["user_id"] for i in api.received["level_ups"]] == [str(i) for i in range(20_000)]
    assert await agent.terminate() == 0


async def test_garbage_is_rejected_and_counted_while_valid_events_flow(workdir, api):
    """Broken datagrams and invalid events are counted by reason; every valid one arrives."""
    agent = await start_agent(workdir, api)
    good = [
        encode_event("level_ups", {"user_id": str(i), "level": 5}, EVENT_TIME) for i in range(50)
    ]
    bad = [
        b"\xc1not msgpack",
        msgpack.packb([1, 2]),
        encode_event("no_such_resource", {"user_id": "1"}, EVENT_TIME),
        encode_event("level_ups", {"user_id": "1"}, EVENT_TIME),  # level missing
        encode_event("level_ups", {"user_id": "1", "level": "ten"}, EVENT_TIME),
        encode_event("logins", {"user_id": "1", "country": "USA"}, EVENT_TIME),
    ]
    mixed = []
    for i, g in enumerate(good):
        mixed.append(g)
        mixed.append(bad[i % len(bad)])
    await trio.to_thread.run_sync(send_blocking, agent.unix_socket, mixed)
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(50, "level_ups")
    status = agent.status()
    rejected = status["rejected"]
    # per event; the two garbage datagrams hold no event that could be told apart, so they
    # count (9 times each) as protocol errors only
    assert rejected == {
        "unknown_resource": 8,
        "missing_field": 8,
        "wrong_type": 8,
        "bad_format": 8,
    }
    assert status["protocol_errors"] == {"not_msgpack": 9, "bad_tag": 9}
    assert status["received"]["accepted"] == 50
    assert status["received"]["events"] == 50 + 32
    assert any(e.get("event") == "event_rejected" for e in agent.log_events())
    assert any(e.get("event") == "message_rejected" for e in agent.log_events())
    assert await agent.terminate() == 0


async def test_udp_source(workdir, api):
    """Loopback UDP works like the Unix socket (the bound port comes from status)."""
    agent = await start_agent(workdir, api)
    client = Client(udp=agent.udp_address())
    for i in range(10):
        client.level_up(user_id=str(i), level=3)
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(10)
    assert await agent.terminate() == 0


async def test_sigterm_keeps_backlog_and_restart_delivers(workdir, api):
    """With the API down, SIGTERM exits 0 promptly; the next run delivers everything once."""
    api.inject(Fault(status=503, times=None))
    agent = await start_agent(workdir, api)
    datagrams = [
        encode_event("actions", {**EXAMPLES["actions"], "user_id": str(i)}, EVENT_TIME)
        for i in range(300)
    ]
    await trio.to_thread.run_sync(send_blocking, agent.unix_socket, datagrams)
    with trio.fail_after(GUARD_S):
        while agent.status()["resources"]["actions"]["queued_items"] < 300:  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert await agent.terminate() == 0
    assert api.total_items() == 0
    api.clear_faults()
    again = await start_agent(workdir, api)
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(300)
    ids = [i["user_id"] for i in api.received["actions"]]
    assert ids == [str(i) for i in range(300)]
    assert await again.terminate() == 0


async def test_kill_9_loses_nothing_that_was_fsynced(workdir, api):
    """fsync=always; the API refuses everything; kill -9; restart: every event arrives once."""
    api.inject(Fault(status=503, times=None))
    agent = await start_agent(workdir, api, queue={"fsync": "always"})
    n = 2000
    datagrams = [
        encode_forward(
            "level_ups",
            [(EVENT_TIME, {"user_id": str(i), "level": 7}) for i in range(start, start + 50)],
        )
        for start in range(0, n, 50)
    ]
    await trio.to_thread.run_sync(send_blocking, agent.unix_socket, datagrams)
    with trio.fail_after(GUARD_S):
        while True:
            r = agent.status()["resources"]["level_ups"]
            if r["queued_items"] == n and r["unsynced_items"] == 0:
                break
            await trio.sleep(0.05)
    await agent.kill()
    api.clear_faults()
    again = await start_agent(workdir, api)
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(n)
    ids = [i["user_id"] for i in api.received["level_ups"]]
    assert ids == [str(i) for i in range(n)]
    assert await again.terminate() == 0


async def test_corrupted_segment_is_recovered_around(workdir, api):
    """Flipped bytes in the middle of a stored segment: the agent starts, skips and counts
    the damaged record, and delivers every other one."""
    api.inject(Fault(status=503, times=None))
    agent = await start_agent(workdir, api, queue={"fsync": "always"})
    datagrams = [
        encode_event("level_ups", {"user_id": f"u{i:04d}", "level": 7}, EVENT_TIME)
        for i in range(200)
    ]
    await trio.to_thread.run_sync(send_blocking, agent.unix_socket, datagrams)
    with trio.fail_after(GUARD_S):
        while agent.status()["resources"]["level_ups"]["queued_items"] < 200:  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert await agent.terminate() == 0
    (segment,) = sorted((workdir / "queue" / "level_ups").glob("*.seg"))
    data = bytearray(segment.read_bytes())
    where = data.find(b"u0100")
    data[where : where + 5] = b"XXXXX"
    segment.write_bytes(bytes(data))
    api.clear_faults()
    again = await start_agent(workdir, api)
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(199)
        while again.status()["resources"]["level_ups"]["queued_items"]:  # noqa: ASYNC110
            await trio.sleep(0.05)
    ids = [i["user_id"] for i in api.received["level_ups"]]
    assert ids == [f"u{i:04d}" for i in range(200) if i != 100]
    assert again.status()["resources"]["level_ups"]["corrupt_skipped"] == 1
    assert await again.terminate() == 0


async def test_send_and_status_commands(workdir, api):
    """`traits-agent send` delivers; `status` prints it; both talk to the configured agent."""
    agent = await start_agent(workdir, api)
    cmd = [sys.executable, "-m", "traits_agent"]
    cfg = ["--config", str(agent.config)]
    sent = await trio.run_process(
        [*cmd, "send", *cfg, "level-ups", '{"user_id": "9", "level": 2}'], capture_stdout=True
    )
    assert b"sent 1 level_ups event" in sent.stdout
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(1)
    invalid = await trio.run_process(
        [*cmd, "send", *cfg, "purchases", '{"user_id": "9"}'], check=False, capture_stderr=True
    )
    assert invalid.returncode == 1 and b"item_id" in invalid.stderr
    shown = await trio.run_process([*cmd, "status", *cfg], capture_stdout=True)
    assert b"level_ups" in shown.stdout and b"upstream: ok" in shown.stdout
    assert await agent.terminate() == 0
    gone = await trio.run_process([*cmd, "status", *cfg], check=False, capture_stderr=True)
    assert gone.returncode == 1 and b"no agent is running" in gone.stderr


async def test_api_key_never_logged(workdir, api):
    """The key appears in no log line, even at debug level and through an auth failure."""
    agent = AgentProcess(workdir, write_config(workdir, api.url), api_key="sekrit-key-123")
    await agent.start()
    Client(unix=agent.unix_socket).level_up(user_id="1", level=2)
    with trio.fail_after(GUARD_S):
        while agent.status()["upstream"] != "auth_failed":  # noqa: ASYNC110
            await trio.sleep(0.05)
    status = agent.status()
    assert "401" in status["last_error"] and "sekrit-key-123" not in status["last_error"]
    # when it happened, for `status` and `top` (UTC, ISO 8601)
    at = datetime.fromisoformat(status["last_error_at"])
    assert at.tzinfo is not None and abs(datetime.now(UTC) - at) < timedelta(minutes=5)
    assert await agent.terminate() == 0
    text = agent.log_text()
    assert "upload_auth_failed" in text
    assert "sekrit-key-123" not in text


@pytest.mark.parametrize("bad", ['[queue]\nfsync = "sometimes"\n', "[nope]\n"])
def test_bad_config_exits_2(workdir, bad):
    """A wrong key or section: exit 2, one line on stderr naming it."""
    path = workdir / "bad.toml"
    path.write_text(bad)
    proc = subprocess.run(
        [sys.executable, "-m", "traits_agent", "run", "--fake-api", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1


async def test_control_clients_that_hang_up_do_not_hurt_the_agent(workdir, api):
    """Clients that connect and vanish, or send junk, end only their own connection."""
    agent = await start_agent(workdir, api)
    control = str(workdir / "control.sock")
    for payload in (b"", b"status", b"\xff\xfe junk\n", b"upload kpis x.csv\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(control)
            if payload:
                s.sendall(payload)
    assert agent.status()["upstream"] == "ok"
    assert agent.proc.poll() is None
    assert await agent.terminate() == 0


async def test_start_up_failure_is_one_line(workdir, api):
    """The UDP port is taken: exit 1 with one stderr line naming the problem, no traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        config = write_config(workdir, api.url, listen={"udp": f"127.0.0.1:{port}"})
        proc = await run_until_exit(config)
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "in use" in lines[0]


def test_a_key_no_header_can_carry_exits_2(workdir):
    """A key with a non-ASCII character (a pasted BOM) is a configuration error."""
    config = workdir / "agent.toml"
    config.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "traits_agent", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TRAITS_API_KEY": "\ufeffkey"},
    )
    assert proc.returncode == 2 and "$TRAITS_API_KEY" in proc.stderr
