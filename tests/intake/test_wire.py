"""Forward-protocol entries on the wire: every form decodes, and garbage never raises."""

from __future__ import annotations

import gzip
import math
import random
import struct
from typing import Any

import msgpack
import pytest

from traits_agent.intake.wire import (
    MAX_DECOMPRESSED,
    DecodeResult,
    Entry,
    WireError,
    decode_datagram,
    decode_value,
    encode_event,
    encode_forward,
    gunzip,
    pack_time,
)

RECORD = {"user_id": "1001", "level": 10}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def event_time_ext8(seconds: int, nanoseconds: int) -> bytes:
    """EventTime as ext8 (0xc7, length 8, type 0) rather than fixext8."""
    return b"\xc7\x08\x00" + struct.pack(">II", seconds, nanoseconds)


def packed_stream(events: list[tuple[Any, Any]]) -> bytes:
    return b"".join(pack([t, r]) for t, r in events)


# --------------------------------------------------------------------------- the forms


def test_message() -> None:
    """[tag, time, record] is one entry."""
    result = decode_datagram(pack(["level_ups", 1546355045, RECORD]))
    assert result == DecodeResult([Entry("level_ups", 1546355045.0, RECORD)], [])


def test_message_with_option() -> None:
    """[tag, time, record, option] is one entry, and the option comes back."""
    entries, option = decode_value(["actions", 5, RECORD, {"chunk": "abc"}])
    assert entries == [Entry("actions", 5.0, RECORD)]
    assert option == {"chunk": "abc"}


def test_forward() -> None:
    """[tag, [[time, record], ...]] is one entry per event."""
    data = pack(["logins", [[1, {"a": 1}], [2.5, {"b": 2}], [None, {"c": 3}]]])
    assert decode_datagram(data).entries == [
        Entry("logins", 1.0, {"a": 1}),
        Entry("logins", 2.5, {"b": 2}),
        Entry("logins", None, {"c": 3}),
    ]


def test_forward_with_option() -> None:
    """A Forward entry may carry an option map."""
    entries, option = decode_value(["logins", [[1, {}]], {"size": 1}])
    assert entries == [Entry("logins", 1.0, {})]
    assert option == {"size": 1}


def test_packed_forward_bin() -> None:
    """[tag, bin] holds concatenated [time, record] arrays."""
    payload = packed_stream([(1, {"i": 1}), (2, {"i": 2})])
    assert decode_datagram(pack(["items", payload])).entries == [
        Entry("items", 1.0, {"i": 1}),
        Entry("items", 2.0, {"i": 2}),
    ]


def test_packed_forward_raw_str() -> None:
    """Old Fluentd sends the packed stream as a raw str (not UTF-8): its bytes are recovered."""
    payload = b"\x92" + event_time_ext8(1, 500_000_000) + pack({"i": 1})
    data = msgpack.packb(["items", payload], use_bin_type=False)
    assert decode_datagram(data).entries == [Entry("items", 1.5, {"i": 1})]


def test_compressed_packed_forward() -> None:
    """option.compressed == "gzip" inflates the packed stream first."""
    payload = gzip.compress(packed_stream([(1, {"i": 1}), (2, {"i": 2})]))
    entries, option = decode_value(["items", payload, {"compressed": "gzip"}])
    assert [e.record for e in entries] == [{"i": 1}, {"i": 2}]
    assert option == {"compressed": "gzip"}


def test_compressed_packed_forward_several_members() -> None:
    """The gzip payload may be several concatenated members."""
    payload = gzip.compress(packed_stream([(1, {"i": 1})])) + gzip.compress(
        packed_stream([(2, {"i": 2}), (3, {"i": 3})])
    )
    result = decode_datagram(pack(["items", payload, {"compressed": "gzip"}]))
    assert [e.time for e in result.entries] == [1.0, 2.0, 3.0]


def test_text_compression_is_plain() -> None:
    """compressed: "text" (Fluent Bit) means not compressed."""
    payload = packed_stream([(1, {"i": 1})])
    assert len(decode_datagram(pack(["t", payload, {"compressed": "text"}])).entries) == 1


def test_empty_packed_stream() -> None:
    """A PackedForward with no events is fine and yields none."""
    assert decode_datagram(pack(["t", b""])) == DecodeResult([], [])


# --------------------------------------------------------------------------- times


@pytest.mark.parametrize(
    ("wire_time", "expected"),
    [
        (pack(1546355045), 1546355045.0),
        (pack(1546355045.25), 1546355045.25),
        (pack(None), None),
        (pack(msgpack.ExtType(0, struct.pack(">II", 1546355045, 250_000_000))), 1546355045.25),
        (event_time_ext8(1546355045, 250_000_000), 1546355045.25),
        (pack(msgpack.Timestamp(1546355045, 250_000_000)), 1546355045.25),
    ],
    ids=["int", "float", "nil", "eventtime-fixext8", "eventtime-ext8", "msgpack-timestamp"],
)
def test_time_forms(wire_time: bytes, expected: float | None) -> None:
    """int, float, EventTime (fixext8 and ext8), msgpack Timestamp and nil are all times."""
    data = b"\x93" + pack("t") + wire_time + pack(RECORD)
    (entry,) = decode_datagram(data).entries
    assert entry.time == expected


def test_eventtime_is_fixext8_on_the_wire() -> None:
    """msgpack-python writes our EventTime as fixext8 type 0, as Fluentd does."""
    assert pack(msgpack.ExtType(0, b"\0" * 8))[:2] == b"\xd7\x00"


# --------------------------------------------------------------------------- many values


def test_several_values_in_one_datagram() -> None:
    """A datagram may hold several entries of any form back to back."""
    data = (
        encode_event("actions", {"a": 1}, 1)
        + encode_forward("logins", [(2, {"b": 2}), (3, {"c": 3})])
        + pack(None)
        + pack(["items", packed_stream([(4, {"d": 4})])])
    )
    result = decode_datagram(data)
    assert [(e.tag, e.time) for e in result.entries] == [
        ("actions", 1.0),
        ("logins", 2.0),
        ("logins", 3.0),
        ("items", 4.0),
    ]
    assert result.errors == []


@pytest.mark.parametrize(
    ("junk", "reason"),
    [(b"\xc1", "not_msgpack"), (b"\x93\xa1t", "truncated"), (pack({"a": 1}), "not_an_entry")],
)
def test_valid_entry_then_junk(junk: bytes, reason: str) -> None:
    """Entries before a broken value are kept; the broken part is one error."""
    result = decode_datagram(encode_event("actions", RECORD, 1) + junk)
    assert result.entries == [Entry("actions", 1.0, RECORD)]
    assert result.errors == [reason]


def test_wrong_value_between_good_ones() -> None:
    """A well-formed but wrong value costs only itself."""
    good = encode_event("actions", RECORD, 1)
    result = decode_datagram(good + pack({"not": "an entry"}) + good)
    assert len(result.entries) == 2
    assert result.errors == ["not_an_entry"]


# --------------------------------------------------------------------------- metadata form


def eventtime(seconds: int, nanoseconds: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack(">II", seconds, nanoseconds))


META_EVENTS = [([eventtime(1795949487, 123_456_789), {}], RECORD), ([7, {"k": 1}], RECORD)]
META_ENTRIES = [Entry("t", 1795949487.123456789, RECORD), Entry("t", 7.0, RECORD)]


@pytest.mark.parametrize(
    "value",
    [
        ["t", [list(e) for e in META_EVENTS]],
        ["t", [list(e) for e in META_EVENTS], {"chunk": "c", "fluent_signal": 0}],
        ["t", packed_stream(META_EVENTS), {"size": 2}],
        ["t", gzip.compress(packed_stream(META_EVENTS)), {"compressed": "gzip"}],
    ],
    ids=["forward", "forward-option", "packed", "compressed-packed"],
)
def test_metadata_form_in_every_array_form(value: list[Any]) -> None:
    """`[[time, metadata], record]` (Fluent Bit >= 5.0.5's default) is the same event: the
    time comes from the first element, the metadata is ignored."""
    assert decode_datagram(pack(value)) == DecodeResult(META_ENTRIES, [], [])


def test_metadata_form_in_a_message_and_a_datagram() -> None:
    """A Message's time may be `[time, metadata]` too (Fluentd reads it so); datagrams take
    every form a stream does, and a Forward array of two events is not mistaken for it."""
    assert decode_value(["t", [5, {}], RECORD, {"chunk": "x"}]) == (
        [Entry("t", 5.0, RECORD)],
        {"chunk": "x"},
    )
    assert decode_value(["t", [5, None], RECORD])[0] == [Entry("t", 5.0, RECORD)]
    two = ["t", [[1, RECORD], [[2, {}], RECORD]]]
    assert decode_value(two)[0] == [Entry("t", 1.0, RECORD), Entry("t", 2.0, RECORD)]
    result = decode_datagram(pack(["t", [list(e) for e in META_EVENTS]]))
    assert result == DecodeResult(META_ENTRIES, [], [])


@pytest.mark.parametrize(
    ("value", "reason", "events"),
    [
        (["t", [[["now", {}], RECORD], [1, RECORD], [1, RECORD]]], "bad_time", 3),
        (["t", [[[1, "meta"], RECORD]]], "bad_time", 1),
        (["t", [[[1, {}, 2], RECORD]]], "bad_time", 1),
        (["t", {"when": 1}, RECORD, {"chunk": "c"}], "bad_time", 1),
        (["t", packed_stream([(1, RECORD), ("x", RECORD)])], "bad_packed", 2),
        (["t", b"not gzip", {"compressed": "gzip"}], "bad_compressed", 0),
        (["", [[1, RECORD]] * 4], "bad_tag", 4),
        (["t", 1], "not_an_entry", 0),
    ],
)
def test_a_bad_value_says_how_many_events_it_held(value: Any, reason: str, events: int) -> None:
    """Rejections are counted per event: WireError.events is the count, where it can be told."""
    with pytest.raises(WireError) as caught:
        decode_value(value)
    assert (caught.value.reason, caught.value.events) == (reason, events)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("actions", "not_an_entry"),
        ({"tag": "actions"}, "not_an_entry"),
        (["actions"], "not_an_entry"),
        (["actions", 1], "not_an_entry"),
        (["actions", 1, RECORD, None, None], "not_an_entry"),
        (["actions", [[1, RECORD]], None, None], "not_an_entry"),
        (["actions", [[1, RECORD, 3]]], "not_an_entry"),
        (["actions", [RECORD]], "not_an_entry"),
        ([7, 1, RECORD], "bad_tag"),
        (["", 1, RECORD], "bad_tag"),
        ([None, 1, RECORD], "bad_tag"),
        (["x" * 2000, 1, RECORD], "bad_tag"),
        (["act\udcffions", 1, RECORD], "bad_tag"),
        ([b"\xff", 1, RECORD], "bad_tag"),
        (["actions", True, RECORD], "bad_time"),
        (["actions", RECORD, RECORD], "bad_time"),
        (["actions", math.nan, RECORD], "bad_time"),
        (["actions", math.inf, RECORD], "bad_time"),
        (["actions", msgpack.ExtType(5, b"12345678"), RECORD], "bad_time"),
        (["actions", msgpack.ExtType(0, b"1234"), RECORD], "bad_time"),
        (["actions", [["now", RECORD]]], "bad_time"),
        (["actions", 1, RECORD, "option"], "bad_option"),
        (["actions", [[1, RECORD]], 5], "bad_option"),
        (["actions", b"\xc1\xc1"], "bad_packed"),
        (["actions", pack([1, RECORD])[:-1]], "bad_packed"),
        (["actions", pack("not a pair")], "bad_packed"),
        (["actions", b"not gzip", {"compressed": "gzip"}], "bad_compressed"),
        (["actions", pack([1, RECORD]), {"compressed": "zstd"}], "bad_compressed"),
    ],
)
def test_bad_values(value: Any, reason: str) -> None:
    """A value that is not a usable entry raises WireError with a counter reason."""
    with pytest.raises(WireError) as caught:
        decode_value(value)
    assert caught.value.reason == reason


def test_nan_time_in_a_datagram() -> None:
    """decode_datagram reports what decode_value raises, and does not raise itself."""
    assert decode_datagram(pack(["a", math.nan, {}])) == DecodeResult([], ["bad_time"], [1])


def test_bad_eventtime_nanoseconds() -> None:
    """An EventTime with nanoseconds past a second is not a time."""
    data = b"\x93" + pack("t") + event_time_ext8(1, 1_000_000_000) + pack({})
    assert decode_datagram(data).errors == ["bad_time"]


@pytest.mark.parametrize(
    ("data", "errors"),
    [
        (b"\x00", []),
        (b"\xc0", []),
        (b"\xc0\xc0", []),
        (b"", ["truncated"]),
        (b"\xc1", ["not_msgpack"]),
        (b"\x93\xa1t\x01", ["truncated"]),
        (b"\xdd\xff\xff\xff\xff", ["not_msgpack"]),
        (b"\x91" * 5000, ["not_msgpack"]),
        (b"\x81\x91\x01\x02", ["not_msgpack"]),
        (b"\x01\x02", ["not_an_entry", "not_an_entry"]),
    ],
    ids=[
        "udp-heartbeat",
        "nil",
        "two-nils",
        "empty",
        "reserved-byte",
        "truncated",
        "huge-array-claim",
        "too-deep",
        "unhashable-key",
        "bare-ints",
    ],
)
def test_datagram_errors(data: bytes, errors: list[str]) -> None:
    """Heartbeats are ignored; everything else unusable is counted."""
    assert decode_datagram(data) == DecodeResult([], errors, [0] * len(errors))


def test_integer_map_keys_are_fine() -> None:
    """A record with integer keys decodes (the record check strips them later)."""
    (entry,) = decode_datagram(pack(["a", 1, {1: "x", "k": "v"}])).entries
    assert entry.record == {1: "x", "k": "v"}


def test_non_utf8_record_strings_survive_decoding() -> None:
    """A non-UTF-8 str in a record does not fail the datagram (resources rejects it)."""
    data = msgpack.packb(["a", 1, {b"k": b"\xff"}], use_bin_type=False)
    (entry,) = decode_datagram(data).entries
    assert entry.record == {"k": "\udcff"}


# --------------------------------------------------------------------------- decompression


def test_zip_bomb_is_refused() -> None:
    """A payload that inflates past the cap is bad_compressed, without inflating it all."""
    bomb = gzip.compress(b"\x90" * (MAX_DECOMPRESSED + 1))
    assert len(bomb) < 65_000
    assert decode_datagram(pack(["t", bomb, {"compressed": "gzip"}])).errors == ["bad_compressed"]


def test_gunzip_limit_exact() -> None:
    """gunzip accepts exactly `limit` bytes and refuses one more."""
    assert gunzip(gzip.compress(b"a" * 100), limit=100) == b"a" * 100
    with pytest.raises(WireError):
        gunzip(gzip.compress(b"a" * 101), limit=100)
    with pytest.raises(WireError):
        gunzip(gzip.compress(b"a" * 60) + gzip.compress(b"a" * 60), limit=100)


def test_truncated_gzip() -> None:
    """A gzip member cut short is bad_compressed."""
    with pytest.raises(WireError) as caught:
        gunzip(gzip.compress(b"a" * 1000)[:-5])
    assert caught.value.reason == "bad_compressed"


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    ("t", "wire"),
    [
        (None, None),
        (1546355045, 1546355045),
        (1546355045.0, 1546355045),
        (1546355045.9999999999, 1546355046),
        (1546355045.5, msgpack.ExtType(0, struct.pack(">II", 1546355045, 500_000_000))),
        (-1.5, -1.5),
        (2.0**33 + 0.5, 2.0**33 + 0.5),
    ],
)
def test_pack_time(t: float | None, wire: Any) -> None:
    """Whole seconds go as an int, fractions as EventTime, out-of-range as a float."""
    assert pack_time(t) == wire


@pytest.mark.parametrize("t", [None, 7, 1546355045.125])
def test_encode_event_roundtrip(t: float | None) -> None:
    """encode_event makes a Message entry that decodes to the same event."""
    assert decode_datagram(encode_event("actions", RECORD, t)).entries == [
        Entry("actions", None if t is None else float(t), RECORD)
    ]


def test_encode_forward_roundtrip() -> None:
    """encode_forward makes one Forward entry holding every event."""
    events = [(1.5, {"i": 1}), (None, {"i": 2}), (3, {"blob": b"\x00\xff"})]
    result = decode_datagram(encode_forward("logins", events))
    assert result.entries == [
        Entry("logins", 1.5, {"i": 1}),
        Entry("logins", None, {"i": 2}),
        Entry("logins", 3.0, {"blob": b"\x00\xff"}),
    ]


# --------------------------------------------------------------------------- fuzz


def assert_well_formed(result: Any) -> None:
    assert isinstance(result, DecodeResult)
    for entry in result.entries:
        assert isinstance(entry.tag, str) and entry.tag
        assert entry.time is None or (isinstance(entry.time, float) and math.isfinite(entry.time))
    assert all(isinstance(e, str) for e in result.errors)


def random_object(rng: random.Random, depth: int = 0) -> Any:
    choices = ["int", "float", "str", "bin", "nil", "bool", "ext"]
    if depth < 4:
        choices += ["list", "map"] * 2
    kind = rng.choice(choices)
    if kind == "int":
        return rng.choice([0, 1, -1, 2**31, -(2**63), 2**64 - 1, rng.randint(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.5, math.nan, math.inf, -1e300, rng.random() * 2e9])
    if kind == "str":
        return rng.choice(["", "actions", "12traits.level-ups", "x" * rng.randint(0, 50)])
    if kind == "bin":
        return rng.randbytes(rng.randint(0, 40))
    if kind == "nil":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "ext":
        return msgpack.ExtType(rng.choice([0, 0, 1, 127]), rng.randbytes(rng.choice([8, 8, 4, 12])))
    if kind == "list":
        return [random_object(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice(["a", 1, b"k", "compressed"]): random_object(rng, depth + 1) for _ in range(3)
    }


def random_entry(rng: random.Random) -> Any:
    """Something close to an entry, so the fuzz reaches the entry checks."""
    tag = rng.choice(["actions", "", 5, b"logins"])
    second = rng.choice(
        [
            1,
            None,
            msgpack.ExtType(0, rng.randbytes(8)),
            [[1, {}], random_object(rng)],
            packed_stream([(1, {"i": 1})]),
            rng.randbytes(20),
            gzip.compress(packed_stream([(1, {})])),
        ]
    )
    option = rng.choice([None, {"compressed": "gzip"}, {"chunk": "x"}, 3])
    return [tag, second, random_object(rng), option][: rng.randint(1, 4)]


def test_fuzz_random_bytes() -> None:
    """Seeded random bytes of every length never raise."""
    rng = random.Random(20261104)
    for _ in range(5000):
        assert_well_formed(decode_datagram(rng.randbytes(rng.randint(0, 300))))


def test_fuzz_random_objects() -> None:
    """Random msgpack values and near-entries never raise."""
    rng = random.Random(7)
    for _ in range(3000):
        value = random_entry(rng) if rng.random() < 0.6 else random_object(rng)
        data = b"".join(pack(value) for _ in range(rng.randint(1, 3)))
        assert_well_formed(decode_datagram(data))


def test_fuzz_truncations_and_mutations() -> None:
    """Every truncation and many byte flips of a valid datagram never raise."""
    rng = random.Random(42)
    valid = (
        encode_event("actions", {"user_id": "1", "params": [1, 2.5, "x"]}, 1.25)
        + encode_forward("logins", [(1, {"a": "b"}), (2, {"c": b"d"})])
        + pack(["items", gzip.compress(packed_stream([(3, {"e": 1})])), {"compressed": "gzip"}])
    )
    full = decode_datagram(valid)
    assert len(full.entries) == 4 and full.errors == []
    for cut in range(len(valid)):
        result = decode_datagram(valid[:cut])
        assert_well_formed(result)
        assert len(result.entries) <= 4
    for _ in range(3000):
        mutated = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        assert_well_formed(decode_datagram(bytes(mutated)))


def test_fuzz_deep_nesting() -> None:
    """Nesting deeper than the decoder's stack is an error, not a crash."""
    for depth in (100, 1023, 1024, 1025, 100_000):
        assert_well_formed(decode_datagram(b"\x91" * depth + b"\xc0"))
        assert_well_formed(decode_datagram(b"\x81\xa1k" * depth + b"\xc0"))
