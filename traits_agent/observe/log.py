"""structlog setup: JSON lines off a TTY (journald, files), a readable console on a TTY.

Events are `snake_case` verbs with key=value context. Two guards sit in the processor chain:
`RateLimit` keeps a storm of identical lines to one per interval with a count of what it held
back — which lines, and what makes two of them "identical", is the one table `RATE_LIMITS`, so
call sites just log — and `redact` replaces the API key wherever it appears (a URL with
`?api_key=`, an error text that echoes a header).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import structlog

_secrets: list[str] = []

REDACTED = "***"


def add_secret(value: str | None) -> None:
    """Register a string that must never appear in a log line."""
    if value and value not in _secrets:
        _secrets.append(value)


def scrub(value: Any) -> Any:
    """`value` with every registered secret replaced (strings, dicts, lists, recursively)."""
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(scrub(v) for v in value)
    return value


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: replace every registered secret in every value."""
    if not _secrets:
        return event_dict
    return {k: scrub(v) if k != "event" else v for k, v in event_dict.items()}


def setup(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog once for the process (called by the CLI)."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            RateLimit(),  # first: a line held back costs nothing more
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


@dataclass(frozen=True)
class Limit:
    """At most one line per `interval` seconds for each distinct value of the `key` fields;
    numeric `sums` fields of the lines held back are added to the next line that passes."""

    interval: float
    key: tuple[str, ...] = ()
    sums: tuple[str, ...] = ()


#: every rate-limited event, in one place (event name → its limit)
RATE_LIMITS: dict[str, Limit] = {
    # intake: bad input and a full or failing disk can repeat thousands of times a second
    "event_rejected": Limit(10.0, ("reason",)),
    "events_dropped": Limit(10.0, ("resource", "reason"), sums=("dropped",)),
    "queue_write_failed": Limit(10.0, ("resource", "errno")),
    # delivery: one line a minute is enough to say the API refuses or holds
    "dead_lettered": Limit(60.0, ("resource",)),
    "upload_auth_failed": Limit(60.0, ("resource",)),
    "upload_endpoint_error": Limit(60.0, ("resource",)),
    "csv_upload_auth_failed": Limit(60.0, ("kind",)),
    "csv_upload_endpoint_error": Limit(60.0, ("kind",)),
}


class RateLimit:
    """structlog processor: let one line per event and key through every interval; drop the
    rest (`structlog.DropEvent`) and count them.

    The next line that passes carries `suppressed=N`, so an operator sees how much was held
    back. Events not in `limits` pass untouched. `clock` is injectable for tests.
    """

    def __init__(
        self,
        limits: Mapping[str, Limit] = RATE_LIMITS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.clock = clock
        self._next: dict[tuple[str, ...], float] = {}
        self._held: dict[tuple[str, ...], dict[str, float]] = {}

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event = event_dict.get("event")
        limit = self.limits.get(event) if isinstance(event, str) else None
        if limit is None:
            return event_dict
        key = (str(event), *(str(event_dict.get(name)) for name in limit.key))
        now = self.clock()
        if now < self._next.get(key, -math.inf):
            held = self._held.setdefault(key, {"suppressed": 0})
            held["suppressed"] += 1
            for name in limit.sums:
                held[name] = held.get(name, 0) + event_dict.get(name, 0)
            raise structlog.DropEvent
        self._next[key] = now + limit.interval
        held = self._held.pop(key, {})
        event_dict["suppressed"] = int(held.get("suppressed", 0))
        for name in limit.sums:
            if name in held:
                event_dict[name] = event_dict.get(name, 0) + held[name]
        return event_dict
