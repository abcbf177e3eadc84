"""Every command as a newcomer and an operator meet it (issue 10 items 4, 5, 6, 9; config)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request

import pytest
import trio

from tests.cli.cli_helpers import cli, start_agent
from tests.e2e.harness import write_config
from traits_agent.cli import COMMANDS, build_parser
from traits_agent.client import Client
from traits_agent.delivery.deadletter import DeadLetters


def run_cli(*args, **kwargs):
    return trio.to_thread.run_sync(lambda: cli(*args, **kwargs))


# -- help (item 9) ---------------------------------------------------------------------------


def test_every_command_has_its_own_description():
    """`COMMAND --help` describes that command (they used to share the generic usage)."""
    texts = {}
    for name in COMMANDS:
        proc = cli(name, "--help")
        assert proc.returncode == 0, name
        description = proc.stdout.split("\n\n")[1]
        assert len(description) > 40, (name, proc.stdout)
        assert not description.startswith(("positional arguments", "options")), proc.stdout
        texts[name] = description
    assert len(set(texts.values())) == len(COMMANDS)


def test_run_help_explains_the_key_and_the_log_flags():
    text = cli("run", "--help").stdout
    assert "TRAITS_API_KEY" in text and "--fake-api" in text
    assert "--log-format" in text and "JSON lines" in text and "NO_COLOR" in text


def test_dead_letters_subcommands_have_their_own_help():
    """list/show/replay/purge each explain themselves; replay says it empties the file."""
    helps = {
        a: cli("dead-letters", a, "--help").stdout for a in ("list", "show", "replay", "purge")
    }
    assert len(set(helps.values())) == 4
    assert "emptied" in helps["replay"]


def test_fake_api_help_documents_port_key_and_faults():
    text = cli("fake-api", "--help").stdout
    assert "127.0.0.1:8080" in text and "test-key" in text
    assert "/_fake/faults" in text and '"status": 503' in text


# -- status | head, fake-api on a busy port (item 4) -----------------------------------------


async def test_status_into_a_closed_pipe_is_silent(workdir, api):
    """`status | head` where head has left: no traceback, exit 141 (as after SIGPIPE)."""
    agent = await start_agent(workdir, api)
    read, write = os.pipe()
    os.close(read)
    try:
        proc = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "traits_agent", "status", "--config", str(agent.config)],
                stdout=write,
                stderr=subprocess.PIPE,
                timeout=60,
            )
        )
    finally:
        os.close(write)
    assert proc.stderr == b""
    assert proc.returncode == 141
    assert await agent.terminate() == 0


def test_fake_api_on_a_busy_port_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("fake-api", "--listen", f"127.0.0.1:{port}")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert f"127.0.0.1:{port}" in line and "in use" in line


# -- dead letters (item 6) -------------------------------------------------------------------


def test_dead_letters_without_an_agent_or_letters(workdir):
    """`list` with nothing says so; `replay` with the agent down names the problem in one
    line, exit 1, and keeps the letters."""
    config = write_config(workdir, "http://127.0.0.1:9")
    listed = cli("dead-letters", "list", config=config)
    assert listed.returncode == 0 and listed.stdout.startswith("no dead letters")
    letters = DeadLetters(workdir / "queue" / "dead-letters")
    letters.add("level_ups", [b'{"user_id":"1","level":2}'], status=400, message="bad")
    replay = cli("dead-letters", "replay", "level_ups", config=config)
    assert replay.returncode == 1
    (line,) = replay.stderr.strip().splitlines()
    assert "no agent is running" in line and "Errno" not in line
    assert letters.count("level_ups") == 1


# -- doctor next to a running agent (item 5) -------------------------------------------------


async def test_doctor_during_run_fake_api_checks_what_the_agent_uses(workdir):
    """With `run --fake-api` running and no key anywhere, the key and endpoint checks pass:
    the agent delivers to its embedded fake API."""
    agent = await start_agent(workdir, "sandbox", args=("--fake-api",))
    env = {k: v for k, v in os.environ.items() if k != "TRAITS_API_KEY"}
    proc = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [
                sys.executable,
                "-m",
                "traits_agent",
                "doctor",
                "--json",
                "--config",
                str(agent.config),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    )
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["api key"]["ok"] is True, checks["api key"]
    assert checks["endpoint"]["ok"] is True, checks["endpoint"]
    assert checks["agent"]["ok"] is True
    assert await agent.terminate() == 0


async def test_run_fake_api_shows_what_it_received(workdir):
    """`run --fake-api` keeps accepted batches as their bodies (`FakeAPI(compact=True)`):
    `/_fake/received` still shows each item as sent (timestamp filled), counts them, and
    `/_fake/reset` empties it."""
    agent = await start_agent(workdir, "sandbox", args=("--fake-api",))
    url = agent.status()["endpoint"]
    client = Client(unix=agent.unix_socket)
    for i in range(3):
        assert client.level_up(user_id=f"u{i}", level=i + 1)
    assert client.emit("playfab", {"EventName": "player_logged_in", "EventId": "ab" * 16})

    def received(query: str = "", method: str = "GET", path: str = "received") -> dict:
        request = urllib.request.Request(f"{url}/_fake/{path}{query}", method=method)
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    with trio.fail_after(30):
        while received("?items=0")["total"] < 4:  # noqa: ASYNC110
            await trio.sleep(0.05)
    state = received()
    assert state["counts"]["level_ups"] == 3 and state["counts"]["playfab"] == 1
    items = state["items"]["level_ups"]
    assert [(i["user_id"], i["level"]) for i in items] == [("u0", 1), ("u1", 2), ("u2", 3)]
    assert all(len(i["timestamp"]) == 19 for i in items)
    assert state["items"]["playfab"][0]["EventName"] == "player_logged_in"
    received(method="POST", path="reset")
    assert received()["total"] == 0 and received()["items"]["level_ups"] == []
    assert await agent.terminate() == 0


async def test_doctor_fails_a_wrong_base_path(workdir, api):
    """A base URL with a wrong path: the agent holds in endpoint_error, and doctor says FAIL
    (it used to say `ok ... answered HTTP 404`)."""
    agent = await start_agent(workdir, api.url + "/wrong")
    agent_client_send = await run_cli(
        "send", "level_ups", '{"user_id": "1", "level": 2}', config=agent.config
    )
    assert agent_client_send.returncode == 0
    with trio.fail_after(60):
        while agent.status()["upstream"] != "endpoint_error":  # noqa: ASYNC110
            await trio.sleep(0.05)
    proc = await run_cli("doctor", "--json", config=agent.config)
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["endpoint"]["ok"] is False and "404" in checks["endpoint"]["detail"]
    assert checks["agent"]["ok"] is False and "endpoint_error" in checks["agent"]["detail"]
    assert proc.returncode == 1
    assert await agent.terminate() == 0


# -- config ----------------------------------------------------------------------------------


def test_config_shows_every_value_resolved_with_its_source(workdir, monkeypatch):
    """Relative paths come out absolute; each value says default/file/env."""
    path = workdir / "agent.toml"
    path.write_text('[queue]\ndir = "q"\n[batch]\nlinger_ms = 250\n')
    env = {"RUNTIME_DIRECTORY": str(workdir / "run"), "TRAITS_API_KEY": "sekrit-123"}
    proc = cli("config", "--json", config=path, env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    values = doc["values"]
    assert values["queue.dir"] == {"value": str(workdir / "q"), "source": "file"}
    assert values["batch.linger_ms"] == {"value": 250, "source": "file"}
    assert values["batch.max_items"]["source"] == "default"
    assert values["listen.unix"] == {
        "value": str(workdir / "run" / "events.sock"),
        "source": "env $RUNTIME_DIRECTORY",
    }
    assert doc["config_file_source"] == "flag --config"
    assert "TRAITS_API_KEY" in doc["api_key"]
    text = cli("config", config=path, env=env).stdout
    assert "sekrit-123" not in text and "sekrit-123" not in proc.stdout
    assert f'dir = "{workdir / "q"}"' in text and "# file" in text


@pytest.mark.parametrize(
    ("content", "code"),
    [("[batch]\nlinger_ms = 5\n", 0), ('[queue]\nfsync = "sometimes"\n', 2), ("[x]\n", 2)],
)
def test_config_check_exits_0_or_2(workdir, content, code):
    path = workdir / "agent.toml"
    path.write_text(content)
    proc = cli("config", "--check", config=path)
    assert proc.returncode == code
    assert len((proc.stdout + proc.stderr).strip().splitlines()) == 1


def test_parser_builds():
    assert build_parser().parse_args(["top", "--once"]).once
