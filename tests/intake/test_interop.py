"""Real clients' bytes, replayed: every event in every capture arrives exactly once, on time.

`captures/` holds exactly what Fluent Bit 5.1.1, npm fluent-logger 3.4.1 and
fluent-logger-golang 1.9.0 wrote to a Forward sink (see captures/README.md). The expected
events and times below were read off the bytes by hand, not by the agent's decoder.
"""

from __future__ import annotations

import datetime
import gzip
import json
import math
import struct
from pathlib import Path

import msgpack
import pytest
import trio

from tests.intake.test_forward import GUARD_S, Rig, start_server
from traits_agent.intake.wire import decode_value, stream_unpacker

CAPTURES = Path(__file__).parent / "captures"

FB_USERS = ["u1", "u2", "u3"]
NODE_USERS = ["n-0000000", "n-0000001", "n-0000002"]
GO_USERS = ["g-0000000", "g-0000001", "g-0000002"]

#: file -> (users, [(seconds, nanoseconds)] per event, how many chunks it asks acks for)
EXPECTED: dict[str, tuple[list[str], list[tuple[int, int]], int]] = {
    "fb511-default-ack.bin": (
        FB_USERS,
        [(1795949487, 123358739), (1795949487, 123380281), (1795949487, 123381112)],
        1,
    ),
    "fb511-default-gzip-ack.bin": (
        FB_USERS,
        [(1795949491, 792186497), (1795949491, 792202010), (1795949491, 792202711)],
        1,
    ),
    "fb511-send-options.bin": (
        FB_USERS,
        [(1795949506, 784760000), (1795949506, 784773110), (1795949506, 784773891)],
        0,
    ),
    "fb511-retain-false.bin": (
        FB_USERS,
        [(1795949496, 791966621), (1795949496, 791978719), (1795949496, 791979510)],
        0,
    ),
    "fb511-time-as-integer.bin": (FB_USERS, [(1795949501, 0)] * 3, 0),
    "node-fluent-logger-3.4.1-Message-ack.bin": (NODE_USERS, [(1600000000, 123000000)] * 3, 3),
    "node-fluent-logger-3.4.1-PackedForward-ack.bin": (
        NODE_USERS,
        [(1600000000, 123000000)] * 3,
        1,
    ),
    "node-fluent-logger-3.4.1-CompressedPackedForward-ack.bin": (
        NODE_USERS,
        [(1600000000, 123000000)] * 3,
        1,
    ),
    "go-fluent-logger-1.9.0-subsec-ack.bin": (GO_USERS, [(1600000000, 123456789)] * 3, 3),
    "go-fluent-logger-1.9.0-subsec.bin": (GO_USERS, [(1600000000, 123456789)] * 3, 0),
    "go-fluent-logger-1.9.0-json.bin": (GO_USERS, [(1600000000, 0)] * 3, 0),
}


@pytest.fixture
def rig(tmp_path: Path):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_every_capture_is_listed() -> None:
    assert sorted(p.name for p in CAPTURES.glob("*.bin")) == sorted(EXPECTED)


def utc(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if not n.endswith("json.bin")))
def test_a_capture_decodes_to_its_events_at_their_times(name: str) -> None:
    """Each msgpack capture decodes to its three events, times to the microsecond."""
    users, times, _ = EXPECTED[name]
    unpacker = stream_unpacker(1 << 20)
    unpacker.feed((CAPTURES / name).read_bytes())
    entries = [entry for value in unpacker for entry in decode_value(value)[0]]
    assert [e.record["user_id"] for e in entries] == users
    for entry, (seconds, nanoseconds) in zip(entries, times, strict=True):
        assert entry.tag in ("level_ups", "game.level-ups")
        assert math.isclose(entry.time, seconds + nanoseconds / 1e9, abs_tol=1e-6)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_a_capture_replayed_delivers_every_event_once(
    nursery, rig: Rig, tmp_path: Path, transport: str, name: str
) -> None:
    """Replayed into a listener as the client wrote it: three events stored, exactly once,
    each with its event time as `timestamp`, every chunk acked in the client's encoding
    (msgpack, or JSON for a JSON client), nothing rejected."""
    users, times, chunks = EXPECTED[name]
    data = (CAPTURES / name).read_bytes()
    nursery.start_soon(rig.autosync)
    _, connect = await start_server(nursery, rig, transport, tmp_path)
    async with await connect() as stream:
        await stream.send_all(data)
        got = await replies(stream, chunks, json_client=name.endswith("json.bin"))
    await connection_closed(rig)
    assert got == [{"ack": c} for c in chunk_ids(data)]
    assert rig.items("level_ups") == [
        {"timestamp": utc(seconds), "user_id": user, "level": level}
        for user, (seconds, _), level in zip(users, times, levels(name), strict=True)
    ]
    assert rig.counters.total("rejected_events") == 0
    assert rig.counters.total("protocol_errors") == 0
    assert rig.counters.total("received_events") == 3


def chunk_ids(data: bytes) -> list[str]:
    """The `chunk` options in a msgpack capture, in order (plain msgpack, not the agent's)."""
    if data[:1] == b"[":
        return []
    values = msgpack.Unpacker(raw=False)
    values.feed(data)
    return [v[-1]["chunk"] for v in values if isinstance(v[-1], dict) and "chunk" in v[-1]]


async def connection_closed(rig: Rig) -> None:
    """Wait until the server has read the connection to its end (and so stored everything)."""
    with trio.fail_after(GUARD_S):
        while rig.closed("eof") + rig.closed("reset") == 0:  # noqa: ASYNC110 (a counter, no event)
            await trio.sleep(0.001)


def levels(name: str) -> list[int]:
    return [1, 2, 3] if name.startswith("fb511") else [3, 3, 3]


async def replies(stream: trio.SocketStream, n: int, *, json_client: bool) -> list[dict]:
    """The next `n` replies, decoded as the client would (msgpack, or JSON values)."""
    got: list[dict] = []
    buffer = b""
    unpacker = msgpack.Unpacker()
    with trio.fail_after(GUARD_S):
        while len(got) < n:
            data = await stream.receive_some(4096)
            assert data, f"connection closed after {got}"
            if json_client:
                buffer += data
                decoder = json.JSONDecoder()
                text = buffer.decode()
                i = 0
                while i < len(text):
                    value, i = decoder.raw_decode(text, i)
                    got.append(value)
                buffer = b""
            else:
                unpacker.feed(data)
                got.extend(unpacker)
    return got


async def test_a_json_client_gets_json_acks(nursery, rig: Rig, tmp_path: Path) -> None:
    """fluent-logger-golang with MarshalAsJSON and RequestAck reads its acks with a JSON
    decoder: a JSON connection is answered in JSON; an unusable JSON entry is not acked."""
    nursery.start_soon(rig.autosync)
    _, connect = await start_server(nursery, rig, "tcp", tmp_path)
    message = ["game.level-ups", 1600000000, {"level": 3, "user_id": "j1"}, {"chunk": "YQ=="}]
    async with await connect() as stream:
        await stream.send_all(json.dumps(message).encode() + b"\n")
        assert await replies(stream, 1, json_client=True) == [{"ack": "YQ=="}]
        await stream.send_all(b'["level_ups", {"when": 1}, {"user_id": "j2"}, {"chunk": "Yg=="}]')
        with trio.fail_after(GUARD_S):
            assert await stream.receive_some(100) == b""  # closed, no ack
    assert [r["user_id"] for r in rig.items("level_ups")] == ["j1"]
    assert rig.counters.get("protocol_errors", reason="bad_time") == 1


def fluentd_out_forward(tag: str, entries: bytes, *, compress: str, chunk: str) -> bytes:
    """What Fluentd's out_forward writes (`send_data_actual`, read from its source): a fixed
    3-array header, the tag, the entries as a *str32* of raw bytes (gzip or not), then the
    option map; `chunk` is `Base64.encode64(unique_id)`, trailing newline included."""
    return (
        b"\x93"
        + msgpack.packb(tag)
        + b"\xdb"
        + len(entries).to_bytes(4, "big")
        + entries
        + msgpack.packb({"size": 3, "compressed": compress, "chunk": chunk})
    )


@pytest.mark.parametrize("compress", ["text", "gzip"])
async def test_fluentd_out_forward_packed_str32(
    nursery, rig: Rig, tmp_path: Path, compress: str
) -> None:
    """Fluentd's PackedForward (raw str32 entries, EventTime, gzip or not) is stored and its
    chunk acked verbatim."""
    event_time = msgpack.ExtType(0, struct.pack(">II", 1600000000, 123000000))
    entries = b"".join(
        msgpack.packb([event_time, {"user_id": f"f{i}", "level": 3}]) for i in range(3)
    )
    if compress == "gzip":
        entries = gzip.compress(entries)
    chunk = "AAYV7Rq1Fj2sUqXOt0S0Fg==\n"
    nursery.start_soon(rig.autosync)
    _, connect = await start_server(nursery, rig, "tcp", tmp_path)
    async with await connect() as stream:
        await stream.send_all(
            fluentd_out_forward("game.level_ups", entries, compress=compress, chunk=chunk)
        )
        assert await replies(stream, 1, json_client=False) == [{"ack": chunk}]
    assert [r["user_id"] for r in rig.items("level_ups")] == ["f0", "f1", "f2"]
    assert {r["timestamp"] for r in rig.items("level_ups")} == {"2020-09-13 12:26:40"}
