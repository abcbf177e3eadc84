"""The datagram fast path: the common datagram decoded, validated and JSON-encoded in C.

Most datagrams are one Message `[tag, time, record]`, or one or a few Forward entries `[tag,
[[time, record], ...]]` (no option) of JSON resources, and every record fits the resource's typed
schema (`schema.FAST_SCHEMAS`). For those, a `msgspec` decoder chosen by the datagram's first
bytes (array header + tag) turns the bytes straight into typed structs: no Python objects for
the envelope, no per-field Python checks, and the JSON payload comes out of C too.

Anything else — an option map, PackedForward, PlayFab, a nil heartbeat, a
Fluent Bit metadata entry, an EventTime that is not one, a record with an unknown field, a
lenient case (an int for a string, bytes keys), a bad value of any kind — makes `payloads`
return None, and the caller takes the general path (`wire.decode_datagram` +
`schema.normalize`) for the whole datagram, which alone decides, counts and explains. The fast
path never rejects, and never stores part of a datagram: it only has to agree with the general
path on what it takes (tests/intake/test_fastpath.py checks that on generated datagrams).

The stream fast path (`StreamFastPath`, for the Forward listeners) takes whole stream values,
as the bytes the connection's decoder framed (`take_raw`): a Forward `[tag, [[time, record],
...], option?]` is decoded into typed structs by msgspec straight from its bytes, and a
PackedForward `[tag, bin, option?]` (gzip too) has its `bin` decoded the same way, as one
array; no Python dict is built per event. A value it refuses there (a raw-str PackedForward,
say) is unpacked and offered again as objects (`take`: one `msgspec.convert` for a Forward
array). Either way everything `wire.decode_value` checks is checked for the whole value first;
then `payloads` encodes slices of its events, and a slice holding an event the schema would
not take whole (rejected, stripped, too large) goes to the general path (`wire.decode_value` +
`Ingest.store_entries`), which alone decides, counts and explains.
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any, NamedTuple

import msgpack
import msgspec

from traits_agent.errors import WireError
from traits_agent.intake.wire import LAST_NANOSECOND, check_tag, gunzip
from traits_agent.queue import MAX_PAYLOAD
from traits_agent.schema import (
    FAST_SCHEMAS,
    FastSchema,
    Rejected,
    Resource,
    encode_fast,
    encode_fast_many,
    resolve_tag,
)

_Time = int | float | None | msgspec.msgpack.Ext
_EVENT_TIME = struct.Struct(">II")
_FIXARRAY_2, _FIXARRAY_3 = 0x92, 0x93
_STR8 = 0xD9
_CACHE_MAX = 256  # distinct (form, tag) prefixes remembered; cleared when full
MAX_ENTRIES = 16
"""Entries in one datagram the fast path takes; more go the general path."""
_TRAILING = re.compile(r"MessagePack data is malformed: trailing characters \(byte ([0-9]+)\)")


def _decoders(resource: Resource) -> tuple[msgspec.msgpack.Decoder, msgspec.msgpack.Decoder]:
    """(Message decoder, Forward decoder) for one resource's typed records."""
    record = FAST_SCHEMAS[resource.name].type
    options: dict[str, Any] = {"array_like": True, "forbid_unknown_fields": True, "gc": False}
    message = msgspec.defstruct(
        f"{resource.name}_message", [("tag", str), ("time", _Time), ("record", record)], **options
    )
    pair = msgspec.defstruct(
        f"{resource.name}_pair", [("time", _Time), ("record", record)], **options
    )
    forward = msgspec.defstruct(
        f"{resource.name}_forward",
        [("tag", str), ("events", list[pair])],  # type: ignore[valid-type]
        **options,
    )
    return msgspec.msgpack.Decoder(message), msgspec.msgpack.Decoder(forward)


class _NotFast(Exception):
    """An event time the general path must judge."""


def _event_time(value: Any, now: float) -> float:
    """As `wire._time` reads it (then nil → `now`); `_NotFast` for anything it would reject."""
    kind = type(value)
    if kind is float:
        if math.isfinite(value):
            return value
    elif kind is int:
        return float(value)
    elif value is None:
        return now
    elif kind is tuple:  # the stream's [time, metadata] form: the metadata is ignored
        return _event_time(value[0], now)
    elif value.code == 0 and len(value.data) == 8:  # EventTime
        seconds, nanoseconds = _EVENT_TIME.unpack(value.data)
        if nanoseconds <= LAST_NANOSECOND:
            return seconds + nanoseconds / 1e9
        if nanoseconds < 1_000_000_000:
            return seconds + LAST_NANOSECOND / 1e9
    raise _NotFast


_Ext = msgspec.msgpack.Ext
_unpack_event_time = _EVENT_TIME.unpack


def _event_times(events: list[Any], now: float) -> list[float]:
    """`_event_time` of every event's time, the EventTime case (what Fluentd and Fluent Bit
    send) inline: this runs once per event."""
    out: list[float] = []
    append = out.append
    last = LAST_NANOSECOND  # bound once: the loop reads it per event
    for event in events:
        value = event.time
        data = value.data if type(value) is _Ext else None
        if data is not None and value.code == 0 and len(data) == 8:  # type: ignore[arg-type]
            seconds, nanoseconds = _unpack_event_time(data)
            if nanoseconds > last:
                if nanoseconds >= 1_000_000_000:
                    raise _NotFast
                nanoseconds = last
            append(seconds + nanoseconds / 1e9)
        else:
            append(_event_time(value, now))
    return out


class FastPath:
    """Per-process cache of decoders by datagram prefix; `payloads` is the one entry point."""

    def __init__(self) -> None:
        # prefix (array header + tag) → (resource, decoder, is Forward), None: never fast
        self._by_prefix: dict[bytes, tuple[Resource, msgspec.msgpack.Decoder, bool] | None] = {}
        self._by_resource: dict[str, tuple[msgspec.msgpack.Decoder, msgspec.msgpack.Decoder]] = {}
        # `message`'s own: Message prefix (fixarray 3 + fixstr tag) → (resource, decoder,
        # schema), None: not a fast Message
        self._messages: dict[bytes, tuple[Resource, msgspec.msgpack.Decoder, Any] | None] = {}

    def message(self, data: bytes, now: float) -> tuple[Resource, bytes] | bool | None:
        """The most common datagram, one Message `[tag, time, record]` with a short tag, in
        fewer steps than `payloads`: (its resource, its payload). None: not that form (or
        more than one entry): ask `payloads`. False: that form, but the fast path does not
        take it: the general path decides (asking `payloads` would only repeat the work)."""
        if len(data) < 3 or data[0] != _FIXARRAY_3 or not 0xA0 <= data[1] <= 0xBF:
            return None
        prefix = data[: data[1] - 0x9E]  # 2 + the fixstr's length
        try:
            found = self._messages[prefix]
        except KeyError:
            entry = self._lookup(prefix + b"\xc0")  # _lookup reads the tag only
            found = None
            if entry is not None:
                found = (entry[0], entry[1], FAST_SCHEMAS[entry[0].name])
            if len(self._messages) >= _CACHE_MAX:
                self._messages.clear()
            self._messages[prefix] = found
        if found is None:
            return None
        resource, decoder, fast = found
        try:
            value = decoder.decode(data)
        except msgspec.DecodeError:
            return None  # e.g. trailing bytes: several entries, which `payloads` splits
        except msgspec.ValidationError:
            return False
        try:
            return resource, encode_fast(fast, value.record, _event_time(value.time, now))
        except (Rejected, _NotFast):
            return False

    def _lookup(
        self, data: bytes | memoryview
    ) -> tuple[Resource, msgspec.msgpack.Decoder, bool] | None:
        if len(data) < 3:
            return None
        head, size = data[0], data[1]
        if head != _FIXARRAY_3 and head != _FIXARRAY_2:
            return None
        if 0xA0 <= size <= 0xBF:  # fixstr tag
            start, end = 2, 2 + size - 0xA0
        elif size == _STR8:
            start, end = 3, 3 + data[2]
        else:
            return None
        prefix = bytes(data[:end])
        try:
            return self._by_prefix[prefix]
        except KeyError:
            pass
        found = None
        try:
            resource = resolve_tag(prefix[start:].decode())
        except UnicodeDecodeError:
            resource = None
        if resource is not None and resource.name in FAST_SCHEMAS:
            decoders = self._by_resource.get(resource.name)
            if decoders is None:
                decoders = self._by_resource[resource.name] = _decoders(resource)
            forward = head == _FIXARRAY_2
            found = (resource, decoders[forward], forward)
        if len(self._by_prefix) >= _CACHE_MAX:
            self._by_prefix.clear()
        self._by_prefix[prefix] = found
        return found

    def payloads(self, data: bytes, now: float) -> list[tuple[Resource, list[bytes]]] | None:
        """Per entry in `data`, its resource and the JSON payload of each of its events; or
        None: then the datagram takes the general path. `now` is the event time of events
        sent without one.

        A datagram may hold several entries (the buffered client sends one Forward entry per
        resource): msgspec decodes one value per call and names the byte where trailing data
        starts, so each entry but the last is decoded twice; at most `MAX_ENTRIES`.
        """
        out: list[tuple[Resource, list[bytes]]] = []
        view = memoryview(data)
        try:
            while len(out) < MAX_ENTRIES:
                found = self._lookup(view)
                if found is None:
                    return None
                resource, decoder, forward = found
                try:
                    value = decoder.decode(view)
                    rest = None
                except msgspec.DecodeError as exc:
                    trailing = _TRAILING.fullmatch(str(exc))
                    if trailing is None:
                        return None
                    end = int(trailing.group(1))
                    value, rest = decoder.decode(view[:end]), view[end:]
                fast = FAST_SCHEMAS[resource.name]
                if forward:  # the times, then every record in one C call (as a stream's)
                    events = value.events
                    items = encode_fast_many(
                        fast, [e.record for e in events], _event_times(events, now)
                    )
                else:
                    items = [encode_fast(fast, value.record, _event_time(value.time, now))]
                out.append((resource, items))
                if rest is None:
                    return out
                view = rest
        except (msgspec.DecodeError, msgspec.ValidationError, Rejected, _NotFast):
            return None
        return None


# --------------------------------------------------------------------------- stream values

#: a stream event's time: as a datagram's, or Fluent Bit's `[time, metadata]` (wire's
#: "metadata form"); what `_event_time` cannot read makes the value take the general path
_StreamTime = _Time | tuple[_Time, dict[Any, Any] | None]


_PLAIN = (str, bytes, int, float, bool, type(None))


class StreamValue(NamedTuple):
    """A stream value the fast path took apart: all its events are typed pairs."""

    resource: Resource
    fast: FastSchema
    #: typed (time, record) pairs, in order
    events: list[Any]
    #: each event's time as seconds (the receive time for nil), all valid
    times: list[float]
    option: dict[Any, Any] | None


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _count_values(stream: bytes, limit: int) -> int | None:
    """How many whole msgpack values `stream` holds exactly (skipped in C, nothing built), or
    None: malformed, a partial tail, or more than `limit`."""
    unpacker = msgpack.Unpacker(max_buffer_size=len(stream))
    unpacker.feed(stream)
    skip = unpacker.skip
    n = 0
    try:
        while n <= limit:
            skip()
            n += 1
    except msgpack.OutOfData:
        pass
    except Exception:  # malformed: the general path says which
        return None
    if n > limit or unpacker.tell() != len(stream):
        return None
    return n


class StreamFastPath:
    """Per-process cache of per-resource pair types, and of tags; see the module docstring."""

    def __init__(self, max_entries: int, max_inflated: int) -> None:
        #: a value's bounds, as `wire.STREAM_BOUNDS`: past them the general path refuses it
        self.max_entries = max_entries
        self.max_inflated = max_inflated
        self._by_tag: dict[str, Resource | None] = {}
        # resource name → (the pair struct, a msgpack decoder of a list of them)
        self._types: dict[str, tuple[Any, msgspec.msgpack.Decoder]] = {}
        self._entries: dict[str, msgspec.msgpack.Decoder] = {}

    def _resource(self, tag: Any) -> Resource | None:
        if type(tag) is not str:
            return None
        try:
            return self._by_tag[tag]
        except KeyError:
            pass
        try:
            resource = resolve_tag(check_tag(tag))
        except WireError:
            resource = None
        if resource is not None and resource.name not in FAST_SCHEMAS:
            resource = None
        if len(self._by_tag) >= _CACHE_MAX:
            self._by_tag.clear()
        self._by_tag[tag] = resource
        return resource

    def _pair_types(self, resource: Resource) -> tuple[Any, msgspec.msgpack.Decoder]:
        types = self._types.get(resource.name)
        if types is None:
            pair = msgspec.defstruct(
                f"{resource.name}_stream_pair",
                [("time", _StreamTime), ("record", FAST_SCHEMAS[resource.name].type)],
                array_like=True,
                forbid_unknown_fields=True,
                gc=False,
            )
            pairs: Any = list[pair]  # type: ignore[valid-type]
            types = self._types[resource.name] = (pairs, msgspec.msgpack.Decoder(pairs))
        return types

    def _entry_decoder(self, resource: Resource) -> msgspec.msgpack.Decoder:
        """A decoder of a whole `[tag, events | bin, option?]` value of `resource`."""
        decoder = self._entries.get(resource.name)
        if decoder is None:
            list_type = self._pair_types(resource)[0]
            entry = msgspec.defstruct(
                f"{resource.name}_stream_entry",
                [
                    ("tag", str),
                    ("body", list_type | bytes),  # a raw str (old Fluentd): `take`
                    ("option", dict[str, Any] | None, None),
                ],
                array_like=True,
                forbid_unknown_fields=True,
            )
            decoder = self._entries[resource.name] = msgspec.msgpack.Decoder(entry)
        return decoder

    def take_raw(self, raw: bytes, now: float) -> StreamValue | None:
        """`take` for a value still in its msgpack bytes (as the connection's `_Decoder`
        yields it): the envelope and a Forward array's events are decoded by msgspec straight
        from the bytes, with no Python object per event. None: the caller unpacks the bytes
        and goes on as with any value (`take`, then the general path)."""
        if len(raw) < 3:
            return None
        head, size = raw[0], raw[1]
        if head != _FIXARRAY_3 and head != _FIXARRAY_2:
            return None
        if 0xA0 <= size <= 0xBF:  # fixstr tag
            end = 2 + size - 0xA0
        elif size == _STR8:
            end = 3 + raw[2]
        else:
            return None
        try:
            resource = self._resource(raw[2 if size != _STR8 else 3 : end].decode())
        except UnicodeDecodeError:
            return None
        if resource is None:
            return None
        try:
            entry = self._entry_decoder(resource).decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        option = entry.option
        if option is not None and type(option.get("chunk", "")) not in _PLAIN:
            return None  # an ack echoes the chunk id: leave exotic ones to msgpack
        body = entry.body
        try:
            if type(body) is list:
                if len(body) > self.max_entries:
                    return None
                events: list[Any] | None = body
            else:
                stream = self._packed(body, option)
                if not stream:
                    return None
                events = self._decode_packed(self._pair_types(resource)[1], stream, option)
            if events is None:
                return None
            times = _event_times(events, now)
        except (msgspec.DecodeError, msgspec.ValidationError, WireError, _NotFast, UnicodeError):
            return None
        return StreamValue(resource, FAST_SCHEMAS[resource.name], events, times, option)

    def take(self, value: list[Any], now: float) -> StreamValue | None:
        """The typed events of one unpacked stream value (`[tag, events-or-bin, option?]`),
        or None: then the general path takes it.

        Everything `wire.decode_value` checks is checked here, for all the events, before
        anything is stored (the times too): what can still fail afterwards (`payloads`) is
        the schema's verdict on one event, which the general path gives event by event."""
        if not 2 <= len(value) <= 3:
            return None
        resource = self._resource(value[0])
        if resource is None:
            return None
        option = value[2] if len(value) == 3 else None
        if option is not None and type(option) is not dict:
            return None
        body = value[1]
        kind = type(body)
        list_type, decoder = self._pair_types(resource)
        try:
            if kind is list:  # Forward
                if len(body) > self.max_entries:
                    return None
                events = msgspec.convert(body, list_type)
            elif kind is bytes or kind is str:  # PackedForward, maybe compressed
                stream = self._packed(body, option)
                if not stream:
                    return None
                events = self._decode_packed(decoder, stream, option)
                if events is None:
                    return None
            else:  # a Message, or not an entry
                return None
            times = _event_times(events, now)
        except (msgspec.DecodeError, msgspec.ValidationError, WireError, _NotFast, UnicodeError):
            return None
        return StreamValue(resource, FAST_SCHEMAS[resource.name], events, times, option)

    def _packed(self, body: bytes | str, option: dict[Any, Any] | None) -> bytes:
        """The PackedForward stream of `body` (inflated); raises WireError as wire does."""
        # old Fluentd: raw str; surrogateescape gives the bytes back
        data = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else body
        compressed = option.get("compressed") if option else None
        if compressed == "gzip":
            return gunzip(data, self.max_inflated)
        if compressed not in (None, "text"):
            raise WireError("bad_compressed")
        return data

    def _decode_packed(
        self, decoder: msgspec.msgpack.Decoder, stream: bytes, option: dict[Any, Any] | None
    ) -> list[Any] | None:
        """The pairs of a PackedForward stream, decoded as one msgpack array: the count is
        the option's `size` (Fluentd and Fluent Bit send it) when it is right, else counted."""
        size = option.get("size") if option else None
        if type(size) is int and 0 < size <= self.max_entries:
            try:
                return decoder.decode(_array_header(size) + stream)
            except msgspec.DecodeError:
                pass  # a wrong size (trailing or truncated): count them
        count = _count_values(stream, self.max_entries)
        if not count:
            return None
        return decoder.decode(_array_header(count) + stream)

    @staticmethod
    def payloads(taken: StreamValue, start: int, stop: int) -> list[bytes] | None:
        """The JSON payloads of `taken.events[start:stop]`, or None: one of them is not fast
        (the general path then takes these events, and decides for each). Mutates the events
        (fills timestamps)."""
        try:
            out = encode_fast_many(
                taken.fast,
                [e.record for e in taken.events[start:stop]],
                taken.times[start:stop],
            )
        except (Rejected, UnicodeEncodeError):
            return None
        if out and max(map(len, out)) > MAX_PAYLOAD:
            return None
        return out
