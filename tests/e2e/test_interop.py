"""End to end with real clients' bytes: Fluent Bit 5.1.1's default out_forward (metadata form,
with and without gzip) over TCP and the Unix stream socket into the agent process, out at the
fake API: every event, exactly once, with its event time; and the shared-key handshake
configured from the config file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgpack
import trio

from tests.e2e.harness import AgentProcess, write_config
from tests.intake.test_interop import CAPTURES

GUARD_S = 60
FILES = ["fb511-default-ack.bin", "fb511-default-gzip-ack.bin", "fb511-send-options.bin"]
#: the second of each file's events (read off the bytes, see tests/intake/test_interop.py)
TIMES = {
    "fb511-default-ack.bin": "2026-11-29 10:51:27",
    "fb511-default-gzip-ack.bin": "2026-11-29 10:51:31",
    "fb511-send-options.bin": "2026-11-29 10:51:46",
}


async def read_until(stream: trio.abc.Stream, n: int) -> list:
    unpacker = msgpack.Unpacker(raw=False)
    got: list = []
    with trio.fail_after(GUARD_S):
        while len(got) < n:
            data = await stream.receive_some(4096)
            assert data, f"closed after {got}"
            unpacker.feed(data)
            got.extend(unpacker)
    return got


async def test_fluent_bit_default_bytes_arrive_once_with_their_times(workdir: Path, api) -> None:
    forward_unix = str(workdir / "forward.sock")
    config = write_config(
        workdir, api.url, listen={"forward": "127.0.0.1:0", "forward_unix": forward_unix}
    )
    agent = AgentProcess(workdir, config)
    await agent.start()
    host, _, port = agent.status()["listening"]["forward"].rpartition(":")
    expected = []
    for transport in ("tcp", "unix"):
        for name in FILES:
            if transport == "tcp":
                stream = await trio.open_tcp_stream(host, int(port))
            else:
                stream = await trio.open_unix_socket(forward_unix)
            async with stream:
                data = (CAPTURES / name).read_bytes()
                await stream.send_all(data)
                if name.endswith("ack.bin"):
                    [ack] = await read_until(stream, 1)
                    assert set(ack) == {"ack"}
            expected += [
                {"timestamp": TIMES[name], "user_id": f"u{i}", "level": i} for i in (1, 2, 3)
            ]
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(len(expected), "level_ups")

    def key(item: dict) -> tuple:
        return item["timestamp"], item["user_id"]

    assert sorted(api.received["level_ups"], key=key) == sorted(expected, key=key)
    status = agent.status()
    assert status["rejected"] == {} and status["protocol_errors"] == {}
    assert status["received"]["events"] == len(expected) == 18
    assert await agent.terminate() == 0


async def test_a_shared_key_from_the_config_guards_the_tcp_listener(workdir: Path, api) -> None:
    config = write_config(
        workdir,
        api.url,
        listen={"forward": "127.0.0.1:0", "forward_shared_key": "k3y"},
    )
    agent = AgentProcess(workdir, config)
    await agent.start()
    host, _, port = agent.status()["listening"]["forward"].rpartition(":")
    for key, passed in (("k3y", True), ("wrong", False)):
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            [helo] = await read_until(stream, 1)
            nonce = helo[1]["nonce"]
            digest = hashlib.sha512(b"salt" + b"game-01" + nonce + key.encode()).hexdigest()
            await stream.send_all(msgpack.packb(["PING", "game-01", "salt", digest, "", ""]))
            [pong] = await read_until(stream, 1)
            assert pong[1] is passed
            if passed:
                await stream.send_all((CAPTURES / "fb511-default-ack.bin").read_bytes())
                [ack] = await read_until(stream, 1)
                assert set(ack) == {"ack"}
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(3, "level_ups")
    assert agent.status()["protocol_errors"] == {"auth_failed": 1}
    assert "k3y" not in agent.log_text()
    assert await agent.terminate() == 0
