"""The shared-key handshake (HELO / PING / PONG) over real sockets, against a client written
from Fluentd's out_forward (`HandshakeProtocol`): right key, wrong key, a client without a key
to a listener with one, and a client with a key to a listener without one."""

from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path

import msgpack
import pytest
import trio
from structlog.testing import capture_logs
from trio.testing import wait_all_tasks_blocked

from tests.intake.test_forward import (
    GUARD_S,
    T0,
    Rig,
    acks,
    closed_by_server,
    level_up,
    pack,
    start_server,
)
from traits_agent.agent import security_for
from traits_agent.config import ListenConfig
from traits_agent.intake.forward import SILENT_PEER_HINT_S, ForwardServer, bind_forward_tcp
from traits_agent.intake.handshake import Security

KEY = "s3cret-key"
CLIENT_HOST = "game-01"


@pytest.fixture
def rig(tmp_path: Path):
    r = Rig(tmp_path)
    yield r
    r.close()


def sha512_hex(*parts: str | bytes) -> str:
    h = hashlib.sha512()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


async def serve(nursery, rig: Rig, security: Security | None):
    server = ForwardServer(rig.ingest, rig.durability)
    host, port = await nursery.start(
        partial(server.serve, bind_forward_tcp("127.0.0.1", 0), name="forward", security=security)
    )
    return partial(trio.open_tcp_stream, host, port)


class Client:
    """The client side of the handshake, as Fluentd's out_forward does it."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.unpacker = msgpack.Unpacker(raw=False)
        self.salt = os.urandom(16).hex()

    async def receive(self) -> object:
        with trio.fail_after(GUARD_S):
            while True:
                for value in self.unpacker:
                    return value
                data = await self.stream.receive_some(4096)
                assert data, "closed by the agent"
                self.unpacker.feed(data)

    async def handshake(self, key: str, user: str = "", password: str = "") -> list:
        helo = await self.receive()
        assert isinstance(helo, list) and helo[0] == "HELO"
        options = helo[1]
        assert options["keepalive"] is True and len(options["nonce"]) == 16
        self.nonce = options["nonce"]
        digest = sha512_hex(self.salt, CLIENT_HOST, self.nonce, key)
        password_digest = sha512_hex(options["auth"], user, password) if user else ""
        ping = ["PING", CLIENT_HOST, self.salt, digest, user, password_digest]
        await self.stream.send_all(pack(ping))
        return await self.receive()


async def test_the_right_key_passes_and_events_flow(nursery, rig) -> None:
    """PONG says yes, with a digest that proves the agent knows the key; then entries are
    stored and acked as usual."""
    nursery.start_soon(rig.autosync)
    connect = await serve(nursery, rig, Security(KEY))
    async with await connect() as stream:
        client = Client(stream)
        pong = await client.handshake(KEY)
        assert pong[:3] == ["PONG", True, ""]
        hostname = pong[3]
        assert hostname.startswith("traits-agent.")  # never the client's own host name
        assert pong[4] == sha512_hex(client.salt, hostname, client.nonce, KEY)
        await stream.send_all(pack(["level_ups", T0, level_up(1), {"chunk": "c1"}]))
        assert await client.receive() == {"ack": "c1"}
    assert rig.items("level_ups") == [level_up(1)]
    assert rig.counters.total("protocol_errors") == 0


async def test_a_wrong_key_is_refused_and_logged(nursery, rig) -> None:
    connect = await serve(nursery, rig, Security(KEY))
    with capture_logs() as logs:
        async with await connect() as stream:
            client = Client(stream)
            assert await client.handshake("not-the-key") == [
                "PONG",
                False,
                "shared_key mismatch",
                "",
                "",
            ]
            assert await closed_by_server(stream)
    assert rig.items("level_ups") == []
    assert rig.counters.get("protocol_errors", reason="auth_failed") == 1
    assert rig.closed("auth_failed") == 1
    [line] = [e for e in logs if e["event"] == "message_rejected"]
    assert line["reason"] == "auth_failed" and line["error"] == "shared_key mismatch"
    assert KEY not in str(line)


async def test_users_are_checked_when_configured(nursery, rig) -> None:
    """With users, the PING's username/password digest must match one of them."""
    connect = await serve(nursery, rig, Security(KEY, {"alice": "wonder"}))
    async with await connect() as stream:
        assert (await Client(stream).handshake(KEY, "alice", "wonder"))[1] is True
    async with await connect() as stream:
        pong = await Client(stream).handshake(KEY, "alice", "wrong")
        assert pong[1:3] == [False, "username/password mismatch"]
    async with await connect() as stream:
        pong = await Client(stream).handshake(KEY)  # no user at all
        assert pong[1:3] == [False, "username/password mismatch"]
    assert rig.counters.get("protocol_errors", reason="auth_failed") == 2


async def test_a_client_without_the_key_is_refused_not_acked(nursery, rig) -> None:
    """A client that sends entries straight away to a listener with a key gets a failed PONG
    and a closed connection; its chunk is neither stored nor acked (it keeps it)."""
    connect = await serve(nursery, rig, Security(KEY))
    with capture_logs() as logs:
        async with await connect() as stream:
            await stream.send_all(pack(["level_ups", [[T0, level_up(1)]] * 2, {"chunk": "c"}]))
            client = Client(stream)
            assert (await client.receive())[0] == "HELO"
            pong = await client.receive()
            assert pong[:3] == ["PONG", False, "invalid ping message"]
            assert await closed_by_server(stream)
    assert rig.items("level_ups") == []
    assert rig.counters.get("protocol_errors", reason="handshake_expected") == 1
    assert rig.counters.get("rejected_events", reason="handshake_expected") == 2
    assert rig.counters.total("forward_acks") == 0
    [line] = [e for e in logs if e["event"] == "message_rejected"]
    assert "forward_shared_key" in line["hint"]


async def test_a_ping_to_a_listener_without_a_key_gets_a_clear_no(nursery, rig) -> None:
    """A client with a key that sends its PING anyway: a failed PONG that says why, an error
    in the log, the connection closed."""
    connect = await serve(nursery, rig, None)
    with capture_logs() as logs:
        async with await connect() as stream:
            await stream.send_all(pack(["PING", CLIENT_HOST, "salt", "digest", "", ""]))
            pong = await Client(stream).receive()
            assert pong[:3] == ["PONG", False, "this listener has no shared key configured"]
            assert await closed_by_server(stream)
    assert rig.counters.get("protocol_errors", reason="unexpected_handshake") == 1
    [line] = [e for e in logs if e["event"] == "message_rejected"]
    assert line["log_level"] == "error" and "shared key" in line["hint"]


async def test_a_client_waiting_for_a_helo_is_logged_not_left_silent(
    autojump_clock, nursery, rig, tmp_path
) -> None:
    """A client configured with a key waits for a HELO a keyless listener never sends. After
    SILENT_PEER_HINT_S the agent logs a warning that names the likely cause (once), and keeps
    the connection: a quiet client is allowed, and it may still speak."""
    _, connect = await start_server(nursery, rig, "unix", tmp_path)
    with capture_logs() as logs:
        async with await connect() as stream:
            await trio.sleep(SILENT_PEER_HINT_S + 1)
            await wait_all_tasks_blocked()
            [line] = [e for e in logs if e["event"] == "forward_peer_silent"]
            assert line["log_level"] == "warning" and "HELO" in line["hint"]
            await stream.send_all(pack(["level_ups", T0, level_up(1), {"chunk": "late"}]))
            nursery.start_soon(rig.autosync)
            rig.wanted.set()
            assert await acks(stream, 1) == [{"ack": "late"}]
    assert rig.counters.get("forward_silent_connections", source="forward_unix") == 1


async def test_fluent_bit_style_ping_with_a_raw_binary_salt(nursery, rig) -> None:
    """Fluent Bit packs its 16 random salt bytes as a msgpack *str* (not bin, not UTF-8): the
    digest is over those exact bytes, on both sides."""
    connect = await serve(nursery, rig, Security(KEY))
    salt = bytes(range(0xF0, 0x100))  # not UTF-8
    async with await connect() as stream:
        client = Client(stream)
        helo = await client.receive()
        nonce = helo[1]["nonce"]
        digest = sha512_hex(salt, CLIENT_HOST, nonce, KEY).encode()
        ping = (
            b"\x96"
            + pack("PING")
            + pack(CLIENT_HOST)
            + b"\xd9\x10"  # str 8, 16 bytes
            + salt
            + b"\xd9\x80"  # str 8, 128 bytes
            + digest
            + pack("")
            + pack("")
        )
        await stream.send_all(ping)
        pong = await client.receive()
        assert pong[:3] == ["PONG", True, ""]
        assert pong[4] == sha512_hex(salt, pong[3], nonce, KEY)


def test_security_comes_from_the_config_per_listener() -> None:
    """forward_shared_key/forward_users guard the TCP listener, forward_unix_* the Unix one;
    a TCP listener beyond loopback without a key is allowed but logged at start."""
    listen = ListenConfig(
        forward="127.0.0.1:24224",
        forward_shared_key="k",
        forward_users={"alice": "pw"},
        forward_unix_shared_key="",
    )
    security = security_for(listen, "forward")
    assert security is not None and security.shared_key == "k"
    assert dict(security.users) == {"alice": "pw"} and "pw" not in repr(security)
    assert security_for(listen, "forward_unix") is None
    with capture_logs() as logs:
        assert security_for(ListenConfig(forward="0.0.0.0:24224"), "forward") is None
        assert security_for(ListenConfig(forward="127.0.0.1:24224"), "forward") is None
    assert [e["event"] for e in logs] == ["forward_listener_unauthenticated"]
