"""`traits-agent send`: no false "sent", --wait for the outcome, NDJSON on stdin (issue 10
items 1 and 7), against a real agent process and the fake API."""

from __future__ import annotations

import json
import socket

import trio

from tests.cli.cli_helpers import cli, start_agent
from tests.e2e.harness import write_config
from traits_agent.fakeapi import Fault

GUARD_S = 60
EVENT = '{"user_id": "9", "level": 2}'


async def run_cli(*args, **kwargs):
    return await trio.to_thread.run_sync(lambda: cli(*args, **kwargs))


def test_no_agent_is_exit_1_and_nothing_goes_to_udp(workdir):
    """The Unix socket is missing: exit 1 with one clear line, and no silent UDP fallback
    (here a UDP listener on the configured port would have received it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        port = udp.getsockname()[1]
        config = write_config(workdir, "http://127.0.0.1:9", listen={"udp": f"127.0.0.1:{port}"})
        proc = cli("send", "level_ups", EVENT, config=config)
        assert proc.returncode == 1, proc.stdout
        assert proc.stdout == ""
        (line,) = proc.stderr.strip().splitlines()
        assert "no agent is running" in line and str(workdir / "events.sock") in line
        try:
            udp.recv(65536)
            raise AssertionError("send fell back to UDP")
        except BlockingIOError:
            pass
    waited = cli("send", "--wait", "level_ups", EVENT, config=config)
    assert waited.returncode == 1 and "no agent is running" in waited.stderr


def test_unknown_resource_lists_the_valid_names(workdir):
    """`send levelups`: exit 2, one line listing the valid resources."""
    proc = cli("send", "levelups", EVENT, config=write_config(workdir, "http://127.0.0.1:9"))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "'levelups'" in line and "level_ups" in line and "social_dynamics" in line


def test_an_array_where_one_event_is_expected_is_an_error(workdir):
    """`send playfab '[{...},{...}]'` used to say "sent 1": now exit 2, pointing at NDJSON."""
    config = write_config(workdir, "http://127.0.0.1:9")
    proc = cli("send", "playfab", '[{"a": 1}, {"b": 2}]', config=config)
    assert proc.returncode == 2
    assert "array" in proc.stderr and "send RESOURCE -" in proc.stderr


async def test_wait_reports_stored_then_delivered(workdir, api):
    """--wait returns once the API has the event: exit 0, `stored` then `delivered`."""
    agent = await start_agent(workdir, api)
    proc = await run_cli("send", "--wait", "level-ups", EVENT, config=agent.config)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["stored 1 level_ups event", "delivered 1 level_ups event"]
    assert [i["user_id"] for i in api.received["level_ups"]] == ["9"]
    assert await agent.terminate() == 0


async def test_wait_reports_the_apis_rejection(workdir, api):
    """An event the API rejects (400 naming a field): exit 1 with the API's reason and where
    the dead letter is."""
    api.inject(Fault(reject_field="user_id", reject_value="bad", times=None))
    agent = await start_agent(workdir, api)
    proc = await run_cli(
        "send", "--wait", "level_ups", '{"user_id": "bad", "level": 2}', config=agent.config
    )
    assert proc.returncode == 1
    assert "rejected by the API: 1 level_ups events (HTTP 400" in proc.stderr
    assert "dead-letters show level_ups" in proc.stderr
    assert "delivered 0 level_ups events" in proc.stdout
    assert await agent.terminate() == 0


async def test_wait_times_out_saying_why(workdir, api):
    """Upstream down: after --timeout, exit 1 naming the upstream state; the event stays
    queued."""
    api.inject(Fault(status=503, times=None))
    agent = await start_agent(workdir, api)
    proc = await run_cli(
        "send", "--wait", "--timeout", "1", "level_ups", EVENT, config=agent.config
    )
    assert proc.returncode == 1
    assert "stored 1 level_ups event" in proc.stdout
    assert "not delivered within 1 s (upstream retrying" in proc.stderr
    assert agent.status()["resources"]["level_ups"]["queued_items"] == 1
    assert await agent.terminate() == 0


async def test_the_agent_refuses_what_validation_refuses_with_wait(workdir, api):
    """An invalid event with --wait is refused locally, like without it (exit 1)."""
    agent = await start_agent(workdir, api)
    proc = await run_cli("send", "--wait", "purchases", '{"user_id": "9"}', config=agent.config)
    assert proc.returncode == 1 and "item_id" in proc.stderr
    assert await agent.terminate() == 0


async def test_ndjson_on_stdin_counts_sent_and_invalid(workdir, api):
    """`send RESOURCE -`: 1000 valid lines arrive, 2 invalid ones are named and counted;
    exit 1 because not everything was sent."""
    agent = await start_agent(workdir, api)
    lines = [json.dumps({"user_id": str(i), "level": 1 + i % 50}) for i in range(1000)]
    lines.insert(10, '{"user_id": "x"}')
    lines.insert(500, "not json")
    proc = await run_cli("send", "level_ups", "-", config=agent.config, stdin="\n".join(lines))
    assert proc.returncode == 1
    assert proc.stdout.startswith("sent 1000 level_ups events to ")
    assert "line 11:" in proc.stderr and "line 501: not valid JSON" in proc.stderr
    assert "2 invalid lines not sent" in proc.stderr
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(1000, "level_ups")
    assert await agent.terminate() == 0


async def test_ndjson_with_wait_is_delivered_in_chunks(workdir, api):
    """1200 events through --wait (two control-socket requests, only the last waiting for the
    fsync): all delivered, exit 0."""
    agent = await start_agent(workdir, api)
    lines = "\n".join(json.dumps({"user_id": str(i), "level": 3}) for i in range(1200))
    proc = await run_cli("send", "--wait", "level_ups", "-", config=agent.config, stdin=lines)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "stored 1200 level_ups events",
        "delivered 1200 level_ups events",
    ]
    assert len(api.received["level_ups"]) == 1200
    assert await agent.terminate() == 0


async def test_without_a_unix_socket_send_goes_through_the_control_socket(workdir, api):
    """`[listen] unix = ""`: send uses the control socket (which answers), never UDP."""
    agent = await start_agent(workdir, api, listen={"unix": ""})
    proc = await run_cli("send", "level_ups", EVENT, config=agent.config)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"sent 1 level_ups event to {workdir / 'control.sock'}"
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(1)
    assert await agent.terminate() == 0


def test_ndjson_without_an_agent_fails_before_reading_stdin(workdir):
    """`producer | traits-agent send RESOURCE -` with no agent: exit 1 at once, not after the
    producer is done (stdin here stays open and unread)."""
    import subprocess
    import sys

    config = write_config(workdir, "http://127.0.0.1:9")
    proc = subprocess.Popen(
        [sys.executable, "-m", "traits_agent", "send", "level_ups", "-", "--config", str(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        code = proc.wait(timeout=GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()
    assert code == 1 and b"no agent is running" in proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
