"""JSON-encoded Forward entries on a stream: concatenated JSON arrays/objects, bounded.

fluent-logger-golang with `MarshalAsJSON` (and other clients of Fluentd's in_forward, which picks
JSON when a connection's first byte is `[` or `{`) write each entry as a JSON array, one after
the other, with or without whitespace between them. `JsonStream` finds where each top-level
value ends by scanning brackets and strings (so a value split across reads waits for the rest)
and hands it to `json.loads`. It never holds more than `limit` bytes of an unfinished value.

Errors raise `JsonStreamError(reason)`: `not_json` (not JSON, NaN/Infinity, nesting deeper than
`MAX_DEPTH`, invalid UTF-8), `not_an_entry` (a top-level scalar), `too_large`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

#: deeper nesting than a Forward entry ever needs; bounds json.loads' recursion
MAX_DEPTH = 64
_STRUCTURAL = re.compile(rb'["\[\]{}]')
_IN_STRING = re.compile(rb'["\\]')
_WHITESPACE = b" \t\r\n"


def starts_json(first_byte: int) -> bool:
    """True when a stream starting with this byte is JSON (as Fluentd's in_forward decides).
    In msgpack `[` and `{` are small positive integers, never a Forward entry."""
    return first_byte in b"[{"


class JsonStreamError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class JsonStream:
    """Whole JSON values out of a byte stream (`values(data)` per read)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._pos = 0  # where scanning resumes
        self._depth = 0
        self._in_string = False

    @property
    def held(self) -> int:
        """Bytes held of the value in progress (and whitespace before it)."""
        return len(self._buf)

    def values(self, data: bytes) -> Iterator[Any]:
        self._buf += data
        buf = self._buf
        start = 0
        try:
            while True:
                if self._depth == 0:
                    start = self._pos = _skip_whitespace(buf, self._pos)
                    if self._pos == len(buf):
                        break
                    if buf[self._pos] not in b"[{":
                        raise JsonStreamError("not_an_entry", repr(bytes(buf[start : start + 40])))
                if not self._scan():
                    break
                yield _loads(bytes(buf[start : self._pos]))
                start = self._pos
        finally:
            del buf[:start]
            self._pos -= start
        if len(buf) > self.limit:
            raise JsonStreamError("too_large", f"a value over {self.limit} bytes")

    def _scan(self) -> bool:
        """Advance over the current value; True when it ended at `self._pos`."""
        buf = self._buf
        pos = self._pos
        try:
            while True:
                if self._in_string:
                    m = _IN_STRING.search(buf, pos)
                    if m is None:
                        pos = len(buf)
                        return False
                    pos = m.start()
                    if buf[pos] == 0x5C:  # backslash: skip the escaped character
                        if pos + 1 >= len(buf):
                            return False
                        pos += 2
                        continue
                    self._in_string = False
                    pos += 1
                    continue
                m = _STRUCTURAL.search(buf, pos)
                if m is None:
                    pos = len(buf)
                    return False
                pos = m.start()
                c = buf[pos]
                pos += 1
                if c == 0x22:  # "
                    self._in_string = True
                elif c in b"[{":
                    self._depth += 1
                    if self._depth > MAX_DEPTH:
                        raise JsonStreamError("not_json", f"nested deeper than {MAX_DEPTH}")
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        return True
        finally:
            self._pos = pos


def _skip_whitespace(buf: bytearray, pos: int) -> int:
    while pos < len(buf) and buf[pos] in _WHITESPACE:
        pos += 1
    return pos


def _loads(text: bytes) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise JsonStreamError("not_json", str(e)[:200]) from None
