"""structlog setup: JSON lines off a TTY (journald, files), a readable console on a TTY.

Events are `snake_case` verbs with key=value context. Two guards sit in the processor chain:
`RateLimit` keeps a storm of identical lines to one per interval with a count of what it held
back — which lines, and what makes two of them "identical", is the one table `RATE_LIMITS`, so
call sites just log (some are demoted to debug instead of dropped: every retry of an outage is
there at debug, one warning a minute); `bound_sample` makes a rejected event's `sample` JSON
of bounded size (so `jq .sample.user_id` reads into it), after the rate limit, so a line held
back costs no encoding; and `redact` replaces the API key wherever it appears (a URL with
`?api_key=`, an error text that echoes a header). The console renderer colours only on a
terminal and never when `$NO_COLOR` is set (https://no-color.org).
"""

from __future__ import annotations

import json
import logging
import math
import os
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


def bound_sample(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: a `sample` field becomes `sample(value)` (bounded JSON)."""
    if "sample" in event_dict:
        event_dict["sample"] = sample(event_dict["sample"])
    return event_dict


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
    min_level = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            # first (after the level it may demote): a line held back costs nothing more
            structlog.processors.add_log_level,
            RateLimit(min_level=min_level),
            bound_sample,
            structlog.contextvars.merge_contextvars,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


@dataclass(frozen=True)
class Limit:
    """At most one line per `interval` seconds for each distinct value of the `key` fields;
    numeric `sums` fields of the lines held back are added to the next line that passes.
    With `demote`, a line held back is not dropped but logged at debug (when debug is on)."""

    interval: float
    key: tuple[str, ...] = ()
    sums: tuple[str, ...] = ()
    demote: bool = False


#: every rate-limited event, in one place (event name → its limit)
RATE_LIMITS: dict[str, Limit] = {
    # intake: bad input and a full or failing disk can repeat thousands of times a second
    "event_rejected": Limit(10.0, ("reason",)),
    "message_rejected": Limit(10.0, ("reason",)),
    "forward_peer_silent": Limit(60.0, ("source",)),
    "events_dropped": Limit(10.0, ("resource", "reason"), sums=("dropped",)),
    "queue_write_failed": Limit(10.0, ("resource", "errno")),
    # hostile peers (issue 7): a flood of bad input must not become a flood of log lines
    "datagram_failed": Limit(10.0),
    "datagram_burst_failed": Limit(10.0, ("source",)),
    "datagram_backlog_full": Limit(10.0, ("source",)),
    "datagram_receive_failed": Limit(10.0, ("source",)),
    "forward_connection_evicted": Limit(10.0, ("source",)),
    "forward_read_paused": Limit(10.0, ("source",)),
    "forward_ack_unencodable": Limit(10.0, ("source",)),
    "metrics_request_rejected": Limit(10.0, ("reason",)),
    # delivery: one line a minute is enough to say the API refuses or holds
    "dead_lettered": Limit(60.0, ("resource",)),
    "upload_auth_failed": Limit(60.0, ("resource",)),
    "upload_endpoint_error": Limit(60.0, ("resource",)),
    # the queue cannot read (EMFILE, EIO...): the lane retries every second, says so once a minute
    "queue_read_failed": Limit(60.0, ("resource", "errno")),
    "csv_upload_auth_failed": Limit(60.0, ("kind",)),
    "csv_upload_endpoint_error": Limit(60.0, ("kind",)),
    # an outage: one warning a minute per upstream, every attempt at debug
    "upload_retrying": Limit(60.0, ("resource",), demote=True),
    "csv_upload_retrying": Limit(60.0, ("kind",), demote=True),
    # a hostile or broken local client, or a host out of descriptors (issue 7)
    "fd_exhausted": Limit(60.0, ("where",)),
    "control_connection_refused": Limit(10.0),
    "control_request_timed_out": Limit(10.0, demote=True),
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
        min_level: int = logging.DEBUG,
    ) -> None:
        self.limits = limits
        self.clock = clock
        #: the configured level: a demoted line is dropped when debug is off
        self.min_level = min_level
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
            if limit.demote and self.min_level <= logging.DEBUG:
                event_dict["level"] = "debug"
                return event_dict
            raise structlog.DropEvent
        self._next[key] = now + limit.interval
        held = self._held.pop(key, {})
        event_dict["suppressed"] = int(held.get("suppressed", 0))
        for name in limit.sums:
            if name in held:
                event_dict[name] = event_dict.get(name, 0) + held[name]
        return event_dict
