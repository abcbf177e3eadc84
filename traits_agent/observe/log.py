"""structlog setup: JSON lines off a TTY (journald, files), a readable console on a TTY.

Events are `snake_case` verbs with key=value context. Two guards sit in the processor chain:
`redact` replaces the API key wherever it appears (a URL with `?api_key=`, an error text that
echoes a header) and `RateLimited` keeps a storm of identical warnings to one line per interval
with a count of what it held back. `sample` makes a rejected event loggable as JSON of bounded
size (so `jq .sample.user_id` reads into it). The console renderer colours only on a terminal
and never when `$NO_COLOR` is set (https://no-color.org).
"""

from __future__ import annotations

import json
import logging
import os
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


#: a log sample's JSON encoding stays under this many characters
SAMPLE_CHARS = 512
#: a string inside a sample is cut to this many characters
SAMPLE_STRING_CHARS = 120


def sample(value: Any, limit: int = SAMPLE_CHARS) -> Any:
    """`value` as something JSON can carry, at most about `limit` characters once encoded.

    A record (dict) stays a dict, so a JSON log line nests it and `jq` reads into it: long
    strings are cut (marked with `…`), and when it is still too large the remaining keys are
    left out and counted under `"…"`. Bytes (undecodable input) become their `repr` text.
    """
    value = _jsonable(value)
    if len(json.dumps(value, ensure_ascii=False, default=str)) <= limit:
        return value
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        used = 2
        for k, v in value.items():
            size = len(json.dumps({k: v}, ensure_ascii=False, default=str))
            if used + size > limit - 16:
                out["…"] = f"{len(value) - len(out)} more fields"
                break
            out[k] = v
            used += size
        return out
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text[: limit - 1] + "…"


def _jsonable(value: Any, depth: int = 0) -> Any:
    if isinstance(value, bytes | bytearray):
        return repr(bytes(value[:SAMPLE_STRING_CHARS]))
    if isinstance(value, str):
        return value if len(value) <= SAMPLE_STRING_CHARS else value[:SAMPLE_STRING_CHARS] + "…"
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth > 4:
        return "…"
    if isinstance(value, dict):
        items = list(value.items())[:50]  # a sample, not a copy: a huge map stays cheap
        return {str(_jsonable(k, depth + 1)): _jsonable(v, depth + 1) for k, v in items}
    if isinstance(value, list | tuple):
        return [_jsonable(v, depth + 1) for v in value[:20]]
    return _jsonable(repr(value), depth + 1)


def wants_colour(stream: Any, env: Any = None) -> bool:
    """Colour only on a terminal, and never with `$NO_COLOR` set to anything non-empty."""
    env = os.environ if env is None else env
    return bool(stream.isatty()) and not env.get("NO_COLOR")


def setup(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog once for the process (called by the CLI)."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=wants_colour(stream))
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
