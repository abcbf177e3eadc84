"""Fault injection for the fake API: make it fail on purpose, for a while, in one way.

A :class:`Fault` targets one path (or every API path; never the ``/_fake/`` admin paths),
fires ``times`` times (``None``: until cleared) and then goes away. Its action is one of:

- ``status``: answer that status (optional ``Retry-After`` and JSON ``body``);
- ``drop``: close the connection without answering;
- ``delay`` alone: wait, then serve the request normally (``delay`` also combines with
  ``status`` and ``drop``: wait first);
- ``reject_field``/``reject_value``: answer 400 naming the field, but only for batches that
  hold an item whose ``reject_field`` equals ``reject_value`` (other batches pass and do not
  count as a firing) — this is how a test makes the API reject one item and watches the
  agent bisect.

``body_size`` and ``trickle`` (with ``status`` only) play a broken proxy or a sick server that
answers with a huge body or sends it a byte at a time: the answer's body is ``body_size`` bytes
of filler (default 1 MiB when only ``trickle`` is given), generated as it is sent (a 1 GiB answer
costs the fake nothing), in 64 KiB chunks — or, with ``trickle``, one byte every ``trickle``
seconds. ``body_sent`` counts the bytes the server got onto the wire (the client may hang up).

``min_items`` restricts a fault to batches of at least that many items, e.g.
``Fault(status=413, min_items=501, times=None)`` plays a server whose limit is 500.

The first matching fault in injection order fires; at most one fault fires per request.
"""

from __future__ import annotations

import http
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import trio


@dataclass
class Fault:
    """One injected misbehaviour. ``times`` counts down as it fires (``None``: forever).

    Raises ``ValueError`` on a contradictory spec.
    """

    path: str | None = None
    times: int | None = 1
    status: int | None = None
    retry_after: str | None = None
    body: Any = None
    delay: float = 0.0
    drop: bool = False
    reject_field: str | None = None
    reject_value: Any = None
    min_items: int | None = None
    body_size: int | None = None
    trickle: float = 0.0

    def __post_init__(self) -> None:
        #: bytes of a ``body_size``/``trickle`` answer sent so far (not a field: not in the spec)
        self.body_sent = 0
        actions = [self.status is not None, self.drop, self.reject_field is not None]
        if sum(actions) > 1:
            raise ValueError("a fault does one of: status, drop, reject_field")
        if not any(actions) and self.delay <= 0:
            raise ValueError("a fault needs status, drop, reject_field or a positive delay")
        if self.reject_field is not None and self.delay > 0:
            raise ValueError("reject_field does not combine with delay")
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"status must be 100..599, not {self.status}")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1 (or None for forever)")
        if self.delay < 0:
            raise ValueError("delay must not be negative")
        if (self.body_size is not None or self.trickle) and self.status is None:
            raise ValueError("body_size and trickle need a status")
        if self.trickle < 0 or (self.body_size is not None and self.body_size < 0):
            raise ValueError("body_size and trickle must not be negative")
        if self.retry_after is not None and not isinstance(self.retry_after, str):
            self.retry_after = str(self.retry_after)

    @property
    def is_reject(self) -> bool:
        return self.reject_field is not None

    def matches(self, path: str, items: list[Any] | None) -> bool:
        """Would this fault fire for a request to ``path`` carrying ``items``?"""
        if self.path is not None and self.path != path:
            return False
        count = len(items) if items is not None else 0
        if self.min_items is not None and count < self.min_items:
            return False
        if self.is_reject:
            return any(
                isinstance(item, dict)
                and self.reject_field in item
                and item[self.reject_field] == self.reject_value
                for item in items or ()
            )
        return True

    def fire(self) -> bool:
        """Count one firing; returns True when the fault is used up."""
        if self.times is None:
            return False
        self.times -= 1
        return self.times <= 0

    def error_body(self) -> Any:
        """The JSON body of a ``status`` or ``reject`` answer."""
        if self.body is not None:
            return self.body
        if self.is_reject:
            return {
                "code": 400,
                "message": "bad request",
                "errors": {self.reject_field: f"{self.reject_value!r} is rejected (injected)"},
            }
        assert self.status is not None
        try:
            message = http.HTTPStatus(self.status).phrase.lower()
        except ValueError:
            message = "injected fault"
        return {"code": self.status, "message": message, "data": None}

    @property
    def streams_body(self) -> bool:
        return self.body_size is not None or self.trickle > 0

    async def stream_body(self) -> AsyncIterator[bytes]:
        """The filler body of a ``body_size``/``trickle`` answer, counted into ``body_sent``."""
        left = self.body_size if self.body_size is not None else 1024 * 1024
        while left > 0:
            if self.trickle:
                await trio.sleep(self.trickle)
            chunk = b"x" * min(left, 1 if self.trickle else 64 * 1024)
            yield chunk
            self.body_sent += len(chunk)
            left -= len(chunk)

    def describe(self) -> str:
        """A short label for logs and the request record."""
        if self.status is not None:
            what = f"status={self.status}"
        elif self.drop:
            what = "drop"
        elif self.is_reject:
            what = f"reject {self.reject_field}={self.reject_value!r}"
        else:
            what = "delay"
        if self.body_size is not None:
            what += f" body {self.body_size} bytes"
        if self.trickle:
            what += f" trickled 1 byte/{self.trickle:g}s"
        if self.delay > 0:
            what += f" after {self.delay:g}s"
        return what

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, spec: Any) -> Fault:
        """Build a fault from the JSON admin spec (same keys as the fields)."""
        if not isinstance(spec, dict):
            raise ValueError("a fault spec is a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"unknown fault keys: {', '.join(unknown)}")
        return cls(**spec)
