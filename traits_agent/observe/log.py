"""structlog setup: JSON lines off a TTY (journald, files), a readable console on a TTY.

Events are `snake_case` verbs with key=value context. Two guards sit in the processor chain:
`redact` replaces the API key wherever it appears (a URL with `?api_key=`, an error text that
echoes a header) and `RateLimited` keeps a storm of identical warnings to one line per interval
with a count of what it held back.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

_secrets: list[str] = []

REDACTED = "***"


def add_secret(value: str | None) -> None:
    """Register a string that must never appear in a log line."""
    if value and value not in _secrets:
        _secrets.append(value)


def scrub(value: Any) -> Any:
    """`value` with every registered secret replaced (strings, dicts, lists, recursively).

    Dict keys are scrubbed too: an API answer may name the offending field by its value
    (`{"errors": {"<the key>": "unknown"}}`), and a key reaches a log line or a dead-letter
    file exactly like a value does. Two keys that scrub to the same text keep both values
    (the later one gets a numbered suffix), so nothing the answer said is lost.
    """
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        cleaned: dict[Any, Any] = {}
        for k, v in value.items():
            key = scrub(k) if isinstance(k, str) else k
            if key in cleaned and key != k:
                n = 2
                while f"{key}#{n}" in cleaned:
                    n += 1
                key = f"{key}#{n}"
            cleaned[key] = scrub(v)
        return cleaned
    if isinstance(value, list | tuple):
        return type(value)(scrub(v) for v in value)
    return value


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: replace every registered secret in every key and value (the
    event name is ours, never a secret)."""
    if not _secrets:
        return event_dict
    return {
        (k if k == "event" else scrub(k)): (v if k == "event" else scrub(v))
        for k, v in event_dict.items()
    }


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


class RateLimited:
    """Let one line per `key` through every `interval` seconds; count the rest.

    The next line that passes carries `suppressed=N`, so an operator sees how much was held
    back. `clock` is injectable for tests (defaults to time.monotonic).
    """

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str) -> int | None:
        """None: hold this line back. An int: log it, with that many suppressed before it."""
        now = self.clock()
        if now < self._next.get(key, float("-inf")):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._next[key] = now + self.interval
        return self._held.pop(key, 0)
