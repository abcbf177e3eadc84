"""The stream fast path (Forward / PackedForward values on a Forward connection) against the
general path (`wire.decode_value` + `schema.normalize`).

It never decides anything: for a value it either refuses (None) or takes it whole — then the
general path must decode the same value without a WireError, into as many events — and for a
slice of the taken events it either hands back exactly the payloads the general path would store
(every event accepted, nothing stripped) or None, and the general path takes that slice. Checked
on generated values, well-formed and broken, in both forms, and through a real ForwardServer for
the counters and the queues.
"""

from __future__ import annotations

import contextlib
import gzip
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from tests.generated_events import datagrams
from tests.intake.test_fastpath import event_time
from tests.intake.test_forward import Rig, acks, level_up, pack, start_server
from traits_agent.errors import WireError
from traits_agent.intake import forward as forward_module
from traits_agent.intake.fastpath import StreamFastPath
from traits_agent.intake.wire import STREAM_BOUNDS, decode_value, stream_unpacker
from traits_agent.schema import Rejected, normalize, resolve_tag

NOW = 1700000000.5


def fast_path() -> StreamFastPath:
    return StreamFastPath(STREAM_BOUNDS.max_entries, STREAM_BOUNDS.max_inflated)


def outcomes(value: list[Any]) -> list[tuple[Any, ...]]:
    """The general path's decision per event of a value it decodes."""
    out: list[tuple[Any, ...]] = []
    for entry in decode_value(value)[0]:
        resource = resolve_tag(entry.tag)
        if resource is None:
            out.append(("rejected", "unknown_resource"))
            continue
        try:
            n = normalize(resource, entry.record, NOW if entry.time is None else entry.time)
        except Rejected as e:
            out.append(("rejected", e.reason))
        else:
            out.append(("ok", n.item, n.stripped))
    return out


def split(data: bytes) -> list[bytes]:
    """The whole msgpack values of `data`, each as its bytes (as a connection's decoder
    yields them)."""
    skipper = msgpack.Unpacker()
    skipper.feed(data)
    out, start = [], 0
    try:
        while True:
            skipper.skip()
            out.append(data[start : skipper.tell()])
            start = skipper.tell()
    except Exception:
        return out


def stream_values(seed: int, count: int) -> list[tuple[bytes, Any]]:
    """(bytes, value) as a Forward connection reads them: the generated datagrams' values, and
    each Forward array also as PackedForward (size right, wrong or absent; gzip)."""
    out: list[tuple[bytes, Any]] = []
    for i, data in enumerate(datagrams(seed=seed, count=count)):
        for raw in split(data):
            try:
                value = unpack(raw)
            except Exception:
                continue
            out.append((raw, value))
            if type(value) is not list or len(value) != 2 or type(value[1]) is not list:
                continue
            try:
                stream = b"".join(msgpack.packb(p, use_bin_type=True) for p in value[1])
            except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
                continue
            n = len(value[1])
            option: dict[str, Any] = [{"size": n}, {"size": n + 1}, {}, {"size": "x"}][i % 4]
            for packed in (
                [value[0], stream, option],
                [value[0], gzip.compress(stream), {"compressed": "gzip", "size": n}],
            ):
                with contextlib.suppress(TypeError, ValueError, UnicodeEncodeError):
                    raw = msgpack.packb(packed, use_bin_type=True)
                    out.append((raw, unpack(raw)))
    return out


def unpack(raw: bytes) -> Any:
    unpacker = stream_unpacker(1 << 24)
    unpacker.feed(raw)
    return next(unpacker)


def check_agreement(fast: StreamFastPath, got: Any, value: list[Any], again: Any) -> bool:
    """`got` (a take of `value`) against the general path; `again` is a fresh take (payloads
    fill in timestamps). True if the whole value was fast."""
    try:
        general = outcomes(value)
    except WireError as e:  # pragma: no cover - the assertion says which
        pytest.fail(f"the fast path took a value the general path refuses: {e} {value}")
    assert len(general) == len(got.events), value
    assert got.option == decode_value(value)[1]
    for i, outcome in enumerate(general):
        payload = fast.payloads(again, i, i + 1)
        if payload is not None:
            assert outcome[0] == "ok" and outcome[2] == (), (value, i, outcome)
            assert json.loads(payload[0]) == outcome[1], (value, i)
    payloads = fast.payloads(got, 0, len(got.events))
    if payloads is None:
        return False
    assert [json.loads(p) for p in payloads] == [o[1] for o in general]
    return True


def test_the_stream_fast_path_agrees_with_the_general_path() -> None:
    fast = fast_path()
    taken = refused = whole = packed = raw_taken = 0
    for raw, value in stream_values(seed=21, count=6000):
        got_raw = fast.take_raw(raw, NOW)
        if got_raw is not None:
            raw_taken += 1
            check_agreement(fast, got_raw, value, fast.take_raw(raw, NOW))
        if type(value) is not list:
            continue
        got = fast.take(value, NOW)
        if got is None:
            refused += 1
            continue
        taken += 1
        packed += type(value[1]) is bytes
        whole += check_agreement(fast, got, value, fast.take(value, NOW))
    counts = (taken, refused, whole, packed, raw_taken)
    assert taken > 500 and refused > 500 and whole > 300 and packed > 300, counts
    assert raw_taken > 500, counts


@pytest.mark.parametrize(
    "value",
    [
        ["level_ups", [[1, level_up(1)], [None, level_up(2)]]],
        ["level_ups", [[1, level_up(1)]], {"chunk": "c"}],
        ["game.level_ups", b"".join(pack([1.5, level_up(i)]) for i in range(3)), {"size": 3}],
        ["level_ups", b"".join(pack([1, level_up(i)]) for i in range(3)), {"size": 7}],
        ["level_ups", b"".join(pack([1, level_up(i)]) for i in range(20))],
        ["level_ups", [[[1, {"m": 1}], level_up(1)], [[2, None], level_up(2)]]],  # metadata form
    ],
)
def test_common_stream_forms_take_the_fast_path(value: list[Any]) -> None:
    raw = pack(value)
    value = msgpack.unpackb(raw)  # as the Unpacker gives it
    for got in (fast_path().take(value, NOW), fast_path().take_raw(raw, NOW)):
        assert got is not None
        payloads = fast_path().payloads(got, 0, len(got.events))
        assert payloads is not None
        assert [json.loads(p) for p in payloads] == [o[1] for o in outcomes(value)]


@pytest.mark.parametrize(
    "value",
    [
        ["level_ups", 1, level_up(1)],  # a Message
        ["level_ups", [[1, level_up(1)]], {"chunk": "c"}, 1],
        ["level_ups", [[1, level_up(1)]], 5],
        ["playfab", [[1, {"a": 1}]]],
        ["nope", [[1, level_up(1)]]],
        ["x" * 1100 + ".level_ups", [[1, level_up(1)]]],  # a tag over MAX_TAG_LENGTH
        ["level_ups", [[1, level_up(1), 1]]],
        ["level_ups", [[True, level_up(1)]]],
        ["level_ups", [[float("nan"), level_up(1)]]],
        ["level_ups", [[1, {**level_up(1), "extra": 1}]]],
        ["level_ups", b"".join(pack([1, level_up(i)]) for i in range(3))[:-1]],
        ["level_ups", pack([1, level_up(1)]) + b"\xc1"],
        ["level_ups", pack([1, level_up(1)]), {"compressed": "zstd"}],
        ["level_ups", b"not gzip", {"compressed": "gzip"}],
        ["level_ups", pack([msgpack.ExtType(5, b"12345678"), level_up(1)])],
        ["level_ups", b""],
    ],
)
def test_anything_else_takes_the_general_path(value: list[Any]) -> None:
    raw = pack(value)
    assert fast_path().take_raw(raw, NOW) is None
    assert fast_path().take(msgpack.unpackb(raw), NOW) is None


@pytest.mark.parametrize("form", ["packed", "forward"])
@pytest.mark.parametrize(
    ("times", "fast"),
    [
        ([event_time(1700000000, 0), event_time(1700000001, 999_999_999)], True),
        ([event_time(1700000000, 5), 1700000003.75, None, 7], True),  # mixed: event by event
        ([event_time(1700000000, 5), event_time(1700000000, 1_000_000_000)], False),
        ([event_time(1700000000, 0), msgpack.ExtType(0, b"1234567")], False),
        ([event_time(1700000000, 0), msgpack.ExtType(0, b"123456789")], False),
        ([msgpack.ExtType(1, b"12345678"), event_time(1700000000, 0)], False),
    ],
    ids=["eventtimes", "mixed", "bad_nanoseconds", "short_ext", "long_ext", "other_ext_type"],
)
def test_event_times_are_read_whole_and_checked_as_the_general_path_does(
    form: str, times: list[Any], fast: bool
) -> None:
    """EventTimes, alone or mixed with the other time forms, are taken and give the general
    path's payloads (timestamps included); a time the general path refuses (nanoseconds past
    10**9, an Ext that is not an 8-byte EventTime of type 0) is never taken."""
    pairs = [[t, level_up(i)] for i, t in enumerate(times)]
    value: list[Any] = ["level_ups", pairs]
    if form == "packed":
        value = ["level_ups", b"".join(pack(p) for p in pairs), {"size": len(pairs)}]
    raw = pack(value)
    unpacked = unpack(raw)
    for got in (fast_path().take(unpacked, NOW), fast_path().take_raw(raw, NOW)):
        if not fast:
            assert got is None
            continue
        assert got is not None
        payloads = fast_path().payloads(got, 0, len(got.events))
        assert payloads is not None
        assert [json.loads(p) for p in payloads] == [o[1] for o in outcomes(unpacked)]


@pytest.mark.parametrize("form", ["packed", "forward"])
def test_an_eventtime_in_its_last_nanoseconds_keeps_its_second(form: str) -> None:
    """A stream's EventTime at 22:13:21.999999999 is stamped 22:13:21 (the float sum was the
    next second), on the fast path and the general one alike."""
    records = [{"user_id": "u", "level": i} for i in range(2)]  # no timestamp of their own
    pairs = [
        [event_time(1700000001, ns), r] for r, ns in zip(records, (999_999_999, 0), strict=True)
    ]
    value: list[Any] = ["level_ups", pairs]
    if form == "packed":
        value = ["level_ups", b"".join(pack(p) for p in pairs), {"size": len(pairs)}]
    raw = pack(value)
    got = fast_path().take_raw(raw, NOW)
    assert got is not None
    payloads = fast_path().payloads(got, 0, len(got.events))
    assert payloads is not None
    stamps = [json.loads(p)["timestamp"] for p in payloads]
    assert stamps == [o[1]["timestamp"] for o in outcomes(unpack(raw))]
    assert stamps == ["2023-11-14 22:13:21"] * 2


def test_a_tag_that_is_not_utf8_takes_the_general_path() -> None:
    tag = b"\xff.level_ups"
    data = b"\x92" + bytes((0xA0 | len(tag),)) + tag + pack([[1, level_up(1)]])
    unpacker = stream_unpacker(1 << 20)
    unpacker.feed(data)
    (value,) = list(unpacker)  # the str comes with a lone surrogate: bad_tag for wire
    with pytest.raises(WireError):
        decode_value(value)
    assert fast_path().take(value, NOW) is None
    assert fast_path().take_raw(data, NOW) is None


def test_a_string_with_a_lone_surrogate_takes_the_general_path() -> None:
    """Found by the Forward fuzz target: a record (or field) that is a str the Unpacker read
    with surrogateescape made `msgspec.convert` raise UnicodeEncodeError, which closed the
    connection as internal_error."""
    raw = b"\x92\xa9level_ups\x91\x92\xce\x00\x00\x00\x00\xa7\x00\x00\x00\x00\x00\x00\x80"
    value = unpack(raw)
    assert fast_path().take_raw(raw, NOW) is None
    assert fast_path().take(value, NOW) is None
    field = msgpack.unpackb(pack(["level_ups", [[1, level_up(1)]]]))
    field[1][0][1]["user_id"] = "a\udc80"  # a field: taken, but the slice is not fast
    taken = fast_path().take(field, NOW)
    assert taken is not None and fast_path().payloads(taken, 0, 1) is None


def test_more_events_than_the_bound_take_the_general_path() -> None:
    fast = StreamFastPath(max_entries=5, max_inflated=1 << 20)
    six = [[1, level_up(i)] for i in range(6)]
    stream = b"".join(pack(p) for p in six)
    for value in (["level_ups", six], ["level_ups", stream], ["level_ups", stream, {"size": 6}]):
        assert fast.take(value, NOW) is None
        assert fast.take_raw(pack(value), NOW) is None
    assert fast.take(["level_ups", six[:5]], NOW) is not None
    assert fast.take_raw(pack(["level_ups", six[:5]]), NOW) is not None


# --------------------------------------------------------------------------- through the server


async def run_chunk(directory: Path, data: bytes) -> Rig:
    """`data` (one acked chunk "c") through a real ForwardServer; the rig afterwards."""
    rig = Rig(directory)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.autosync)
        _, connect = await start_server(nursery, rig, "unix", directory)
        async with await connect() as stream:
            await stream.send_all(data)
            assert await acks(stream, 1) == [{"ack": "c"}]
        nursery.cancel_scope.cancel()
    return rig


@pytest.mark.parametrize("compressed", [False, True])
async def test_a_chunk_with_bad_events_counts_and_stores_as_the_general_path(
    tmp_path, monkeypatch, compressed
) -> None:
    """A 1,000-event PackedForward chunk, slices of 100, with events the schema rejects or
    strips in some slices: the fast path stores the good slices, the general path the others;
    the queue and every counter come out as with the general path alone."""
    monkeypatch.setattr(forward_module, "SLICE_ENTRIES", 100)
    events = [[1546355045.5, level_up(i)] for i in range(1000)]
    events[150][1] = {**level_up(150), "level": "high"}  # rejected
    events[420][1] = {**level_up(420), "extra": 1}  # stripped
    events[421][0] = None  # the receive time
    stream = b"".join(pack(e) for e in events)
    option: dict[str, Any] = {"chunk": "c", "size": 1000}
    if compressed:
        stream, option["compressed"] = gzip.compress(stream), "gzip"
    data = pack(["level_ups", stream, option])
    fast_rig = await run_chunk(tmp_path / "fast", data)
    with monkeypatch.context() as patch:
        patch.setattr(StreamFastPath, "take", lambda self, value, now: None)
        general_rig = await run_chunk(tmp_path / "general", data)
    try:
        assert len(fast_rig.items("level_ups")) == 999
        assert fast_rig.items("level_ups") == general_rig.items("level_ups")
        for name in ("received_events", "rejected_events", "stripped_fields", "accepted_events"):
            assert fast_rig.counters.total(name) == general_rig.counters.total(name), name
        assert fast_rig.counters.by_label("rejected_events", "reason") == {"wrong_type": 1}
    finally:
        fast_rig.close()
        general_rig.close()


async def test_a_clean_packed_chunk_never_takes_the_general_path(tmp_path, monkeypatch) -> None:
    """The point of the fast path: a PackedForward chunk of valid events is stored without a
    Python dict per event (the general path's `store_entries` is not called)."""
    from traits_agent.intake.ingest import Ingest

    def no(self, entries, now):
        raise AssertionError("the general path was taken")

    monkeypatch.setattr(Ingest, "store_entries", no)
    stream = b"".join(pack([1546355045, level_up(i)]) for i in range(500))
    data = pack(["level_ups", stream, {"chunk": "c", "size": 500}])
    rig = await run_chunk(tmp_path, data)
    try:
        assert rig.items("level_ups") == [level_up(i) for i in range(500)]
        assert rig.counters.get("accepted_events", resource="level_ups") == 500
        assert rig.counters.get("received_events") == 500
    finally:
        rig.close()


async def test_chunks_cut_anywhere_are_stored_whole_and_in_order(tmp_path) -> None:
    """Forward and PackedForward chunks of 1,000 events, a Message and heartbeats between
    them, written in pieces that end anywhere inside a value: every event stored once, in
    order, every chunk acked (the decoder holds a value's bytes across reads)."""
    rig = Rig(tmp_path)
    data, expected = b"", []
    for c in range(4):
        events = [[1546355045, level_up(1000 * c + i)] for i in range(1000)]
        expected += [e[1] for e in events]
        if c % 2:
            body: Any = b"".join(pack(e) for e in events)
        else:
            body = events
        data += pack(None) + pack(["level_ups", body, {"chunk": f"c{c}", "size": 1000}])
        data += pack(["level_ups", 1546355045, level_up(-c)])
        expected.append(level_up(-c))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.autosync)
            _, connect = await start_server(nursery, rig, "tcp", tmp_path)
            async with await connect() as stream:
                for i in range(0, len(data), 4099):
                    await stream.send_all(data[i : i + 4099])
                assert await acks(stream, 4) == [{"ack": f"c{c}"} for c in range(4)]
            nursery.cancel_scope.cancel()
        batch = rig.queues["level_ups"].read_batch(10_000, 1 << 26)
        assert [json.loads(p) for p in batch.payloads] == expected
        assert rig.counters.get("accepted_events", resource="level_ups") == 4004
    finally:
        rig.close()
