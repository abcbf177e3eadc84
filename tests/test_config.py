"""Config: defaults work, every wrong key/type/value names itself, the key never shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from traits_agent.config import (
    Config,
    ConfigError,
    Secret,
    from_mapping,
    load_config,
    resolve_api_key,
)


def test_defaults_are_valid_and_loopback_only():
    """Built-in defaults validate and bind UDP to loopback."""
    config = from_mapping({})
    assert config.listen.udp.startswith("127.0.0.1:")
    assert config.api.base_url == "https://sandbox.api.12traits.com"
    assert config.batch.max_items == 1000


def test_full_example_from_the_interface(tmp_path):
    """The interface's example file loads as written."""
    path = tmp_path / "agent.toml"
    path.write_text(
        """
[api]
endpoint = "production"
[listen]
unix = "/tmp/x/events.sock"
udp = "127.0.0.1:24225"
forward = ""
[queue]
dir = "/tmp/x/queue"
max_bytes = 1073741824
fsync = "always"
fsync_interval_ms = 100
on_full = "drop_newest"
[batch]
max_items = 500
linger_ms = 250
[retry]
initial_backoff_ms = 100
max_backoff_ms = 60000
[log]
format = "json"
level = "debug"
[metrics]
listen = "127.0.0.1:9464"
"""
    )
    config = load_config(path)
    assert config.api.base_url == "https://api.12traits.com"
    assert config.queue.fsync == "always"
    assert config.batch.max_items == 500
    assert config.source == str(path)


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"nope": {}}, "nope", "unknown section"),
        ({"queue": {"fsinc": "always"}}, "queue.fsinc", "unknown key"),
        ({"queue": {"fsync": "sometimes"}}, "queue.fsync", "always, interval, never"),
        ({"queue": {"fsync_interval_ms": "100"}}, "queue.fsync_interval_ms", "an integer"),
        ({"queue": {"on_full": "block"}}, "queue.on_full", "drop_oldest"),
        ({"batch": {"max_items": 1001}}, "batch.max_items", "between 1 and 1000"),
        ({"batch": {"max_items": 0}}, "batch.max_items", "between 1 and 1000"),
        ({"batch": {"linger_ms": -1}}, "batch.linger_ms", "between"),
        ({"listen": {"udp": "0.0.0.0:24225"}}, "listen.udp", "not a loopback"),
        ({"listen": {"udp": "nonsense"}}, "listen.udp", "HOST:PORT"),
        ({"api": {"endpoint": "http://example.com"}}, "api.endpoint", "only to loopback"),
        ({"api": {"endpoint": "staging"}}, "api.endpoint", "production, sandbox"),
        ({"log": {"level": "loud"}}, "log.level", "debug"),
        ({"retry": {"max_backoff_ms": 1, "initial_backoff_ms": 10}}, "retry.max_backoff_ms", ""),
        ({"api": "sandbox"}, "api", "must be a table"),
        ({"listen": {"allow_remote": "yes"}}, "listen.allow_remote", "true or false"),
        ({"listen": {"forward_users": {"a": "b"}}}, "listen.forward_users", "shared key too"),
        (
            {"listen": {"forward_unix_shared_key": "k", "forward_unix_users": {"a": 1}}},
            "listen.forward_unix_users",
            "password strings",
        ),
        ({"listen": {"forward_users": "alice"}}, "listen.forward_users", "must be dict"),
        ({"api": {"playfab_arrays": "yes"}}, "api.playfab_arrays", "true or false"),
    ],
)
def test_wrong_values_name_the_key(data, key, fragment):
    """Each wrong key, type or value raises ConfigError naming exactly that key."""
    with pytest.raises(ConfigError) as info:
        from_mapping(data)
    assert info.value.key == key
    assert fragment in str(info.value)


def test_loopback_http_and_remote_udp_when_allowed():
    """Plain http is fine to loopback; a remote UDP bind needs allow_remote."""
    config = from_mapping(
        {
            "api": {"endpoint": "http://127.0.0.1:8080"},
            "listen": {"udp": "0.0.0.0:24225", "allow_remote": True},
        }
    )
    assert config.api.base_url == "http://127.0.0.1:8080"
    assert from_mapping({"api": {"endpoint": "http://localhost:1/"}}).api.base_url == (
        "http://localhost:1"
    )


def test_api_key_lookup_order(tmp_path):
    """$TRAITS_API_KEY, then [api] key_file, then $CREDENTIALS_DIRECTORY/api_key."""
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api_key").write_text("from-credentials")
    with_file = from_mapping({"api": {"key_file": str(key_file)}})
    env = {"TRAITS_API_KEY": "from-env", "CREDENTIALS_DIRECTORY": str(creds)}
    assert resolve_api_key(with_file, env) == "from-env"
    env.pop("TRAITS_API_KEY")
    assert resolve_api_key(with_file, env) == "from-file"
    assert resolve_api_key(Config(), env) == "from-credentials"
    assert resolve_api_key(Config(), {}) is None
    missing = from_mapping({"api": {"key_file": str(tmp_path / "absent")}})
    with pytest.raises(ConfigError, match=r"api\.key_file"):
        resolve_api_key(missing, {})


def test_secret_repr_hides_the_key():
    """A Secret never shows its value in repr (and so in tracebacks or structlog output)."""
    assert "abc" not in repr(Secret("abc"))


def _agent_command(
    command: list[str], config: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m traits_agent COMMAND --config CONFIG`, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "traits_agent", *command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


def test_cli_exits_2_with_one_line_naming_the_key(tmp_path):
    """A wrong key in the file: exit status 2 and one stderr line naming it."""
    path = tmp_path / "agent.toml"
    path.write_text('[queue]\nfsync = "sometimes"\n')
    proc = _agent_command(["run"], path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "queue.fsync" in lines[0]


def test_cli_without_key_says_how_to_get_one(tmp_path):
    """`run` without any key exits 2 and mentions --fake-api."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = _agent_command(["run"], Path("/dev/null"), env=env)
    assert proc.returncode == 2
    assert "--fake-api" in proc.stderr


def test_replay_datagrams_stay_under_the_datagram_limit():
    """dead-letters replay packs items into datagrams the agent accepts (< 64 KiB), all of
    them, in order; an item no datagram can carry stops the replay (its file is kept)."""
    import msgpack

    from traits_agent.cli.dead_letters import REPLAY_DATAGRAM_BYTES, _replay_datagrams

    records = [{"item": {"user_id": str(i), "blob": "x" * 2000}} for i in range(60)]
    datagrams = list(_replay_datagrams("level_ups", records))
    assert all(len(d.data) <= REPLAY_DATAGRAM_BYTES for d in datagrams)
    assert len(datagrams) > 1
    items = [rec for d in datagrams for _t, rec in msgpack.unpackb(d.data)[1]]
    assert [i["user_id"] for i in items] == [str(i) for i in range(60)]
    assert sum(d.items for d in datagrams) == 60
    with pytest.raises(ValueError, match="larger than a datagram"):
        list(_replay_datagrams("level_ups", [{"item": {"blob": "x" * 70_000}}]))


def test_forward_secrets_stay_out_of_the_repr():
    config = from_mapping(
        {"listen": {"forward_shared_key": "s3cret", "forward_users": {"alice": "pw0rd"}}}
    )
    assert config.listen.forward_shared_key == "s3cret"
    assert "s3cret" not in repr(config) and "pw0rd" not in repr(config)


README = __import__("pathlib").Path(__file__).resolve().parents[1] / "README.md"


def readme_example_config() -> str:
    """The TOML block of the README's Configuration section, exactly as a newcomer copies it."""
    text = README.read_text()
    section = text[text.index("## Configuration") :]
    return section.split("```toml\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("line", ['dir = "<state dir>/queue"', 'unix = "<runtime dir>/e.sock"'])
def test_a_placeholder_path_is_an_error(tmp_path, line):
    """`<state dir>` copied from the docs is refused, naming the key (issue 10 item 2)."""
    section = "queue" if line.startswith("dir") else "listen"
    path = tmp_path / "agent.toml"
    path.write_text(f"[{section}]\n{line}\n")
    with pytest.raises(ConfigError, match="placeholder") as e:
        load_config(path)
    assert e.value.key in ("queue.dir", "listen.unix")
    work = tmp_path / "cwd"
    work.mkdir()
    for command in (["doctor", "--no-network"], ["run", "--fake-api"], ["config", "--check"]):
        proc = _agent_command(command, path, cwd=work)
        # doctor no longer calls such a path ok: nothing runs on it at all
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert "placeholder" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list(work.iterdir()) == []


def test_the_readme_example_copied_as_is_works_and_creates_nothing_here(tmp_path):
    """The README's example config, copied as-is, is valid, every path in it is absolute,
    and the commands create nothing in the working directory (it used to create
    `./<state dir>/queue`; issue 10 item 2)."""
    path = tmp_path / "agent.toml"
    path.write_text(readme_example_config())
    config = load_config(path)
    for value in (config.queue.dir, config.listen.unix, config.control.socket):
        assert value.startswith("/") and "<" not in value
    work = tmp_path / "cwd"
    work.mkdir()
    for command in (["config", "--check"], ["doctor", "--no-network"]):
        proc = _agent_command(command, path, cwd=work)
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # doctor may find things
        assert "Traceback" not in proc.stderr
    assert list(work.iterdir()) == []


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path, monkeypatch):
    """`dir = "queue"` means next to the config file, wherever the command runs from."""
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "agent.toml"
    path.write_text(
        '[queue]\ndir = "state/queue"\n[listen]\nunix = "../run/e.sock"\n'
        '[control]\nsocket = "c.sock"\n[api]\nkey_file = "key"\n'
    )
    monkeypatch.chdir("/")
    config = load_config(path)
    assert config.queue.dir == str(tmp_path / "etc" / "state" / "queue")
    assert config.listen.unix == str(tmp_path / "run" / "e.sock")
    assert config.control.socket == str(tmp_path / "etc" / "c.sock")
    assert config.api.key_file == str(tmp_path / "etc" / "key")


def test_a_relative_path_without_a_file_is_an_error():
    """Built from a mapping (no file to be relative to), a relative path names its key."""
    with pytest.raises(ConfigError, match=r"queue\.dir: must be an absolute path"):
        from_mapping({"queue": {"dir": "queue"}})
