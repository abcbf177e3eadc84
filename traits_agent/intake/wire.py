"""msgpack Fluentd Forward-protocol entries <-> `(tag, time, record)` events.

Game servers send events as msgpack in the entry forms of the Fluentd Forward protocol v1, so
any Fluentd / Fluent Bit client library can feed the agent:

* Message        `[tag, time, record]` or `[tag, time, record, option]`
* Forward        `[tag, [[time, record], ...], option?]`
* PackedForward  `[tag, bin, option?]`: `bin` is concatenated msgpack `[time, record]` arrays
  (old Fluentd sends it as a raw str; that works too)
* CompressedPackedForward: the same with `option["compressed"] == "gzip"`; `bin` may be several
  concatenated gzip members.

Amplification is bounded (issue 7: a 16 KB gzip datagram inflated to 5.59M entries and blocked
the agent for 20 s): one value inflates to at most `Bounds.max_inflated` bytes (`bad_compressed`
past it, found without inflating further) and holds at most `Bounds.max_entries` events
(`too_many_entries`, found without unpacking further). A datagram (`DATAGRAM_BOUNDS`: 1 MiB,
16,384 events, for the whole datagram) is bounded much tighter than a Forward stream value
(`STREAM_BOUNDS`: 16 MiB, 262,144 events; Fluentd's default 8 MB chunks of 32-byte events fit).

`time` is an int or float (seconds since the epoch), the protocol's EventTime (ext type 0, eight
bytes: big-endian uint32 seconds and uint32 nanoseconds, as fixext8 or ext8), a msgpack
Timestamp (ext -1), or nil: `Entry.time` is then None and the receiver uses the receive time.

Metadata form: in every form, `time` may also be `[time, metadata]` with a map (or nil) of
metadata, so an event is `[[time, metadata], record]`. Fluent Bit's `out_forward` sends this by
default since 5.0.5 (`retain_metadata_in_forward_mode`), and Fluentd's in_forward reads it the
same way (`extract_event_time`: an array's first element is the time). The metadata is ignored:
no resource has a place for it. Rejecting it would lose every event Fluent Bit sends.

Counting: a `WireError` carries `events`, how many events the unusable value held as far as it
can be told (a Forward array's length, 1 for a Message, the values in a PackedForward stream
that could be split; 0 when it cannot be told), so rejections are counted per event.

A datagram holds one or more concatenated msgpack values. `decode_datagram` never raises on any
input: what it cannot use becomes a snake_case reason in `errors`, and the entries before (and,
for a well-formed but wrong value, after) a broken value are kept. `decode_value` decodes one
already-unpacked value (the stream listener reuses it) and raises `WireError` when it is not a
usable entry; it is all-or-nothing, since a Forward chunk is also the unit of acknowledgement.

This module only checks the envelope. Whether a tag names a resource and whether a record fits
it is `resources`' job.

Error reasons: `not_msgpack`, `truncated` (a value cut short, or an empty datagram),
`not_an_entry`, `bad_tag`, `bad_time`, `bad_option`, `bad_packed`, `bad_compressed`,
`too_many_entries`.
A nil value (a heartbeat) and the one-byte UDP heartbeat `b"\\x00"` are ignored silently.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgpack

from traits_agent.errors import WireError

MAX_DECOMPRESSED = 16 * 1024 * 1024
"""The most bytes one CompressedPackedForward value on a stream may inflate to."""


class Bounds(NamedTuple):
    """What decoding one unit (a datagram, or one stream value) may cost at most."""

    #: bytes all its CompressedPackedForward payloads may inflate to, together
    max_inflated: int
    #: events it may hold, all its entries together
    max_entries: int


STREAM_BOUNDS = Bounds(max_inflated=MAX_DECOMPRESSED, max_entries=256 * 1024)
DATAGRAM_BOUNDS = Bounds(max_inflated=1024 * 1024, max_entries=16 * 1024)

MAX_TAG_LENGTH = 1024

_EVENT_TIME = struct.Struct(">II")
_UDP_HEARTBEAT = b"\x00"


class Entry(NamedTuple):
    """One event: the tag as sent, the event time (None: use the receive time), the record."""

    tag: str
    time: float | None
    record: object


class DecodeResult(NamedTuple):
    """What a datagram held: the usable entries, one reason per thing that was not, and for
    each of those how many events it held as far as can be told (`WireError.events`)."""

    entries: list[Entry]
    errors: list[str]
    lost: list[int] = []  # never mutated: each result builds its own


# --------------------------------------------------------------------------- decoding


#: an EventTime's nanoseconds past this are read as this: as a float, seconds + 0.999999999
#: rounds up to the next second (a double's spacing near 1.7e9 s is ~240 ns), and the event
#: would reach the API stamped a second late. The API's timestamps are whole seconds.
LAST_NANOSECOND = 999_999_000


def _ext_hook(code: int, data: bytes) -> object:
    """EventTime (ext 0, 8 bytes) -> float seconds; any other ext stays an `ExtType`."""
    if code == 0 and len(data) == 8:
        seconds, nanoseconds = _EVENT_TIME.unpack(data)
        if nanoseconds <= LAST_NANOSECOND:
            return seconds + nanoseconds / 1e9
        if nanoseconds < 1_000_000_000:
            return seconds + LAST_NANOSECOND / 1e9
    return msgpack.ExtType(code, data)


# Strings that are not UTF-8 come through with lone surrogates instead of failing the whole
# datagram: a raw-str PackedForward can be turned back into its bytes, and `resources` rejects
# such strings in a record field by field.
_UNPACK_OPTIONS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": False,
    "unicode_errors": "surrogateescape",
    "ext_hook": _ext_hook,
}


def stream_unpacker(max_buffer_size: int, read_size: int = 0) -> msgpack.Unpacker:
    """A streaming `Unpacker` (`feed` it bytes, iterate it for whole values) that reads values
    exactly as `decode_datagram` does: EventTime as float seconds, non-UTF-8 strings with
    surrogateescape, any map keys. It holds at most `max_buffer_size` bytes: `feed` raises
    `msgpack.BufferFull` when a value does not fit. `read_size` is the buffer it starts with
    (msgpack's default is min(max_buffer_size, 1 MiB), per connection)."""
    return msgpack.Unpacker(
        max_buffer_size=max_buffer_size,
        read_size=min(read_size or 1024 * 1024, max_buffer_size),
        **_UNPACK_OPTIONS,
    )


def unpack_value(data: bytes) -> Any:
    """The one msgpack value `data` holds (a stream value framed elsewhere), read as
    `stream_unpacker` reads values; raises what msgpack raises for bytes that are not one."""
    return msgpack.unpackb(data, **_UNPACK_OPTIONS)


def _failure(exc: Exception) -> str:
    if type(exc) is ValueError and "incomplete" in str(exc):
        return "truncated"
    return "not_msgpack"


def _split_values(data: bytes, max_values: int = 1 << 62) -> tuple[list[Any], str | None]:
    """Every msgpack value in `data`, and the reason the rest (if any) could not be read.

    One `unpackb` serves the common case of a single value (the fastest path); only when there
    is more does an `Unpacker` take the rest, with limits sized to it so that a claimed length
    cannot make it allocate more than the bytes at hand. Past `max_values` values it stops
    (`too_many_entries`) without unpacking the rest.
    """
    try:
        return [msgpack.unpackb(data, **_UNPACK_OPTIONS)], None
    except msgpack.ExtraData as more:
        values = [more.unpacked]
        rest: bytes = more.extra
    except Exception as exc:  # malformed input of any kind; never escapes
        return [], _failure(exc)
    unpacker = msgpack.Unpacker(max_buffer_size=len(rest), **_UNPACK_OPTIONS)
    unpacker.feed(rest)
    end = 0  # where the last whole value ended: tell() also counts a partial one
    try:
        for value in unpacker:  # stops quietly at an incomplete tail
            if len(values) >= max_values:
                return values, "too_many_entries"
            values.append(value)
            end = unpacker.tell()
    except Exception as exc:
        return values, _failure(exc)
    if end < len(rest):
        return values, "truncated"
    return values, None


def decode_datagram(data: bytes, bounds: Bounds = DATAGRAM_BOUNDS) -> DecodeResult:
    """All the entries in one datagram, and a reason for each part that was unusable.

    `bounds` hold for the datagram as a whole: the entries that would go past them are
    refused (the value holding them is `too_many_entries` or `bad_compressed`)."""
    entries: list[Entry] = []
    errors: list[str] = []
    lost: list[int] = []
    if data == _UDP_HEARTBEAT:
        return DecodeResult(entries, errors, lost)
    values, failure = _split_values(data, bounds.max_entries)
    inflated = 0
    for value in values:
        if value is None:  # nil: a heartbeat
            continue
        left = Bounds(bounds.max_inflated - inflated, bounds.max_entries - len(entries))
        try:
            got = decode_value(value, left)[0]
        except WireError as exc:
            errors.append(exc.reason)
            lost.append(exc.events)
        else:
            entries.extend(got)
            inflated += getattr(got, "inflated", 0)
    if failure is not None:
        errors.append(failure)
        lost.append(0)
    return DecodeResult(entries, errors, lost)


class _Inflated(list):
    """The entries of a compressed value, remembering how many bytes it inflated to."""

    inflated = 0


def decode_value(
    obj: Any, bounds: Bounds = STREAM_BOUNDS
) -> tuple[list[Entry], dict[Any, Any] | None]:
    """The entries in one unpacked Forward-protocol value, and its option map (or None).

    Raises `WireError` when the value is not an entry in one of the four forms, when any of
    its events is malformed (the value is taken whole or not at all), or when it goes past
    `bounds` (`too_many_entries`, `bad_compressed`).
    """
    try:
        return _decode_value(obj, bounds)
    except WireError as exc:
        if not exc.events:
            exc.events = event_count(obj)
        raise


def _decode_value(obj: Any, bounds: Bounds) -> tuple[list[Entry], dict[Any, Any] | None]:
    if type(obj) is not list or not 2 <= len(obj) <= 4:
        raise WireError("not_an_entry")
    tag = _tag(obj[0])
    second = obj[1]
    kind = type(second)
    if kind is list and not _is_metadata_time(second):  # Forward
        option = _option(obj, 2)
        if len(second) > bounds.max_entries:
            raise WireError("too_many_entries", f"{len(second)} > {bounds.max_entries}")
        return [_pair(tag, event) for event in second], option
    if kind is bytes or kind is str:  # PackedForward, maybe compressed
        option = _option(obj, 2)
        return _packed(tag, second, option, bounds), option
    if len(obj) < 3:  # Message
        raise WireError("not_an_entry", "a message needs a record")
    return [Entry(tag, _time(second), obj[2])], _option(obj, 3)


def _is_metadata_time(value: list[Any]) -> bool:
    """True for a Message's `[time, metadata]`, False for a Forward array of events: an event
    is an array, a time never is."""
    return len(value) == 2 and type(value[0]) is not list and _is_metadata(value[1])


def _is_metadata(value: Any) -> bool:
    return value is None or type(value) is dict


def event_count(obj: Any) -> int:
    """How many events a value that did not decode held, when that can be told cheaply."""
    if type(obj) is not list or len(obj) < 2:
        return 0
    second = obj[1]
    if type(second) is list and not _is_metadata_time(second):
        return len(second)
    if type(second) in (bytes, str):
        return 0  # the stream itself was unusable (else the error would say which event)
    return 1 if len(obj) >= 3 else 0


def check_tag(tag: Any) -> str:
    """`tag` as a valid tag (a bytes tag decoded); raises `WireError("bad_tag")`."""
    return _tag(tag)


def _tag(tag: Any) -> str:
    if type(tag) is bytes:
        try:
            tag = tag.decode()
        except UnicodeDecodeError:
            raise WireError("bad_tag", "not UTF-8") from None
    if type(tag) is not str or not tag or len(tag) > MAX_TAG_LENGTH:
        raise WireError("bad_tag")
    if not tag.isascii():
        try:
            tag.encode()
        except UnicodeEncodeError:
            raise WireError("bad_tag", "not UTF-8") from None
    return tag


def _time(value: Any) -> float | None:
    kind = type(value)
    if kind is list and len(value) == 2 and _is_metadata(value[1]):  # [time, metadata]
        value = value[0]
        kind = type(value)
    if kind is float:
        if math.isfinite(value):
            return value
    elif kind is int:
        return float(value)
    elif value is None:
        return None
    elif kind is msgpack.Timestamp:
        return value.to_unix()
    raise WireError("bad_time")


def _option(obj: list[Any], index: int) -> dict[Any, Any] | None:
    if len(obj) <= index:
        return None
    if len(obj) > index + 1:
        raise WireError("not_an_entry", "too many elements")
    option = obj[index]
    if option is None or type(option) is dict:
        return option
    raise WireError("bad_option")


def _pair(tag: str, event: Any) -> Entry:
    if type(event) is not list or len(event) != 2:
        raise WireError("not_an_entry", "an event must be [time, record]")
    return Entry(tag, _time(event[0]), event[1])


def _packed(
    tag: str, payload: bytes | str, option: dict[Any, Any] | None, bounds: Bounds
) -> list[Entry]:
    if isinstance(payload, str):  # old Fluentd: raw str; surrogateescape gives the bytes back
        payload = payload.encode("utf-8", "surrogateescape")
    compressed = option.get("compressed") if option else None
    inflated = 0
    if compressed == "gzip":
        payload = gunzip(payload, max(bounds.max_inflated, 0))
        inflated = len(payload)
    elif compressed not in (None, "text"):
        raise WireError("bad_compressed", f"unknown compression {compressed!r}")
    if not payload:
        return []
    events, failure = _split_values(payload, bounds.max_entries)
    if failure == "too_many_entries":
        raise WireError(failure, f"more than {bounds.max_entries} events")
    if failure is not None:
        raise WireError("bad_packed", failure, events=len(events) + 1)
    try:
        entries = _Inflated(_pair(tag, event) for event in events)
    except WireError as exc:
        raise WireError("bad_packed", exc.reason, events=len(events)) from None
    entries.inflated = inflated
    return entries


def gunzip(data: bytes, limit: int = MAX_DECOMPRESSED) -> bytes:
    """Inflate one or more concatenated gzip members; `WireError("bad_compressed")` past `limit`.

    Bounded: never holds more than `limit + 1` bytes of output, whatever the input claims.
    """
    out: list[bytes] = []
    total = 0
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            chunk = inflater.decompress(data, limit - total + 1)
        except zlib.error as exc:
            raise WireError("bad_compressed", str(exc)) from None
        total += len(chunk)
        if total > limit:
            raise WireError("bad_compressed", f"inflates past {limit} bytes")
        if not inflater.eof:
            raise WireError("bad_compressed", "truncated gzip member")
        out.append(chunk)
        data = inflater.unused_data
    return b"".join(out)


# --------------------------------------------------------------------------- encoding


def pack_time(t: float | None) -> int | float | msgpack.ExtType | None:
    """The wire form of an event time: nil, an int for whole seconds, else an EventTime.

    A fractional time outside EventTime's range (before 1970 or past 2106) stays a float.
    """
    if t is None or type(t) is int:
        return t
    seconds = math.floor(t) if math.isfinite(t) else None
    if seconds is None or not 0 <= seconds < 2**32:
        return t
    nanoseconds = round((t - seconds) * 1e9)
    if nanoseconds == 0:
        return seconds
    if nanoseconds >= 1_000_000_000:
        return seconds + 1
    return msgpack.ExtType(0, _EVENT_TIME.pack(seconds, nanoseconds))


def encode_event(tag: str, record: object, time: float | None = None) -> bytes:
    """One event as a Message entry `[tag, time, record]`."""
    return msgpack.packb([tag, pack_time(time), record], use_bin_type=True)


def encode_forward(tag: str, events: Iterable[tuple[float | None, object]]) -> bytes:
    """Many events of one tag as a Forward entry `[tag, [[time, record], ...]]`."""
    return msgpack.packb([tag, [[pack_time(t), r] for t, r in events]], use_bin_type=True)
