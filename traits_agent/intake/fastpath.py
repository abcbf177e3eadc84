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
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any

import msgspec

from traits_agent.schema import FAST_SCHEMAS, Rejected, Resource, encode_fast, resolve_tag

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
    elif value.code == 0 and len(value.data) == 8:  # EventTime
        seconds, nanoseconds = _EVENT_TIME.unpack(value.data)
        if nanoseconds < 1_000_000_000:
            return seconds + nanoseconds / 1e9
    raise _NotFast


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
                if forward:
                    items = [
                        encode_fast(fast, e.record, _event_time(e.time, now)) for e in value.events
                    ]
                else:
                    items = [encode_fast(fast, value.record, _event_time(value.time, now))]
                out.append((resource, items))
                if rest is None:
                    return out
                view = rest
        except (msgspec.DecodeError, msgspec.ValidationError, Rejected, _NotFast):
            return None
        return None
