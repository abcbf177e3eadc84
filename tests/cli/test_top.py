"""`traits-agent top`: the frame from two snapshots, and the real command on a pseudo-terminal
against a real agent (sized, too small, left with Ctrl-C)."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import termios

import trio

from tests.cli.cli_helpers import start_agent
from traits_agent.cli.top import SHOW_CURSOR, fit, render
from traits_agent.client import Client

GUARD_S = 60


def snapshot(accepted: int, delivered: int, **level_ups) -> dict:
    return {
        "version": "0.1.0",
        "pid": 1,
        "uptime_s": 75,
        "endpoint": "http://127.0.0.1:1",
        "upstream": level_ups.get("upstream", "ok"),
        "rejected": {"missing_field": 3},
        "resources": {
            "level_ups": {
                "accepted": accepted,
                "delivered": delivered,
                "queued_items": accepted - delivered,
                "queued_bytes": 2048,
                "oldest_age_s": 4.2,
                "dead_lettered": 0,
                "dropped": {"drop_oldest": 5},
                **level_ups,
            }
        },
    }


def test_rates_are_counter_differences_over_the_interval():
    """400 accepted and 200 delivered in 2 s: 200/s in, 100/s out; queue, age, drops shown."""
    lines = render(snapshot(100, 100), snapshot(500, 300), 2.0)
    (row,) = [line for line in lines if line.startswith("level_ups")]
    assert row.split()[:8] == ["level_ups", "200", "100", "200", "2.0KiB", "4.2s", "0", "5"]
    assert any(line.startswith("rejected: missing_field=3") for line in lines)


def test_host_udp_drops_are_shown_with_their_rate():
    from traits_agent.cli.top import HOST_UDP_ERRORS

    prev, cur = snapshot(1, 1), snapshot(1, 1)
    prev[HOST_UDP_ERRORS], cur[HOST_UDP_ERRORS] = (10, 4), (30, 10)
    lines = render(prev, cur, 2.0)
    assert "receive errors 30 (+10.0/s), buffer full 10 (+3.0/s)" in lines[-1]


def test_upstream_trouble_shows_the_next_retry():
    lines = render(snapshot(1, 0), snapshot(1, 0, upstream="retrying", next_retry_in_s=12.4), 1.0)
    assert any("retrying, retry in 12s" in line for line in lines)


def test_a_terminal_too_small_says_so():
    assert fit(["x" * 100] * 5, 40, 10) == ["top needs 60x6, terminal is 40x10"]
    tall = fit([str(i) for i in range(50)], 80, 10)
    assert len(tall) == 9 and tall[-1].startswith("… 42 more lines")


def spawn_on_pty(argv: list[str], columns: int, rows: int):
    """`argv` with stdin/stdout/stderr on a new pseudo-terminal of the given size."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env)
    return proc, master, slave


def read_until_exit(proc, master: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer of the terminal has gone
            break
        if not chunk:
            break
        out += chunk
        if proc.poll() is not None and not chunk:
            break
    proc.wait(timeout=GUARD_S)
    return out


def top_argv(agent, *extra: str) -> list[str]:
    return [sys.executable, "-m", "traits_agent", "top", "--config", str(agent.config), *extra]


async def test_top_on_a_terminal_against_a_running_agent(workdir, api):
    """Two live frames in a 100x30 terminal: the table with the delivered events, drawn with
    ANSI clear; the cursor is shown again at the end; exit 0."""
    agent = await start_agent(workdir, api)
    client = Client(unix=agent.unix_socket)
    for i in range(5):  # fewer than a small net.unix.max_dgram_qlen (10)
        client.level_up(user_id=str(i), level=2)
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(5)
    proc, master, slave = spawn_on_pty(
        top_argv(agent, "--iterations", "2", "--interval", "0.2"), 100, 30
    )
    os.close(slave)
    out = await trio.to_thread.run_sync(read_until_exit, proc, master)
    os.close(master)
    assert proc.returncode == 0, out
    text = out.decode()
    assert text.count("\x1b[H\x1b[2J") == 2
    assert "resource" in text and "level_ups" in text
    row = next(line for line in text.splitlines() if line.startswith("level_ups"))
    assert row.split()[3] == "0"  # queued
    assert SHOW_CURSOR in text.rsplit("\x1b[H\x1b[2J", 1)[1]
    assert await agent.terminate() == 0


async def test_top_in_a_small_terminal_says_so(workdir, api):
    agent = await start_agent(workdir, api)
    proc, master, slave = spawn_on_pty(
        top_argv(agent, "--iterations", "1", "--interval", "0.1"), 50, 10
    )
    os.close(slave)
    out = await trio.to_thread.run_sync(read_until_exit, proc, master)
    os.close(master)
    assert proc.returncode == 0
    assert b"top needs 60x6, terminal is 50x10" in out and b"level_ups" not in out
    assert await agent.terminate() == 0


async def test_ctrl_c_leaves_cleanly_and_restores_the_terminal(workdir, api):
    """SIGINT while top runs: exit 0, no traceback, cursor shown, terminal mode as before."""
    agent = await start_agent(workdir, api)
    proc, master, slave = spawn_on_pty(top_argv(agent, "--interval", "0.2"), 100, 30)
    before = termios.tcgetattr(slave)
    seen = b""
    with trio.fail_after(GUARD_S):
        while b"level_ups" not in seen:
            seen += await trio.to_thread.run_sync(os.read, master, 65536)
    assert termios.tcgetattr(slave)[3] & termios.ICANON == 0  # cbreak while it runs
    proc.send_signal(signal.SIGINT)
    try:
        code = await trio.to_thread.run_sync(lambda: proc.wait(timeout=GUARD_S))
    finally:
        if proc.poll() is None:
            proc.kill()
    after = termios.tcgetattr(slave)
    os.close(slave)
    rest = await trio.to_thread.run_sync(read_until_exit, proc, master)
    os.close(master)
    assert code == 0
    assert b"Traceback" not in seen + rest
    assert SHOW_CURSOR.encode() in rest
    assert after == before
    assert await agent.terminate() == 0


async def test_once_prints_one_plain_frame(workdir, api):
    """`top --once` piped: one frame, no escape codes (for scripts and bug reports)."""
    agent = await start_agent(workdir, api)
    proc = await trio.run_process(
        top_argv(agent, "--once", "--interval", "0.1"), capture_stdout=True
    )
    text = proc.stdout.decode()
    assert "\x1b" not in text and "level_ups" in text
    assert await agent.terminate() == 0


async def test_run_on_a_terminal_shows_a_first_run_hint(workdir):
    """`run --fake-api` on a terminal says, once ready, how to send a test event and where to
    look; Ctrl-C then stops it cleanly."""
    from tests.e2e.harness import write_config

    config = write_config(workdir, "sandbox", log={"format": "auto", "level": "info"})
    argv = [sys.executable, "-m", "traits_agent", "run", "--fake-api", "--config", str(config)]
    proc, master, slave = spawn_on_pty(argv, 120, 40)
    os.close(slave)
    seen = b""
    with trio.fail_after(GUARD_S):
        while b"Ctrl-C stops the agent" not in seen:
            seen += await trio.to_thread.run_sync(os.read, master, 65536)
    proc.send_signal(signal.SIGINT)
    rest = await trio.to_thread.run_sync(read_until_exit, proc, master)
    os.close(master)
    assert proc.returncode == 0, seen + rest
    text = seen.decode()
    assert f"traits-agent send --config {config} level_ups" in text
    assert f"traits-agent status --config {config}" in text
    assert b"agent_stopped" in rest
