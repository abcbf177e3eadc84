"""The 12traits resources: where each goes, what it holds, and how an event becomes an API item.

This module is the single source of truth for the Ingestion API's schema. Each `Resource` carries
its URL path, the JSON key its batch goes under, the noun of the API's success message and a
table of `Field`s (name, type, required, extra constraint). The one table has two uses:

* `normalize` — the agent's edge. A record from a game server (a msgpack map) is checked and
  turned into the item the API expects, leniently where the interface allows it (an int where a
  string is wanted becomes its decimal string, UTF-8 `bytes` become `str`, a missing
  `timestamp` comes from the event time, unknown fields are removed and reported). A bad event
  raises `Rejected` with a short snake_case `reason` (a counter label) and the `field`.
* `check_api_item` — the server's view, for the local stand-in of the API: the item as JSON
  already decoded, checked strictly (no coercion), every problem reported in the API's wording.

Anything `normalize` returns passes `check_api_item`.

Decisions where the interface is silent:

* bool is never a number or a string (`True` is not `1`).
* An int field takes an integral float (`10.0` -> `10`: some msgpack encoders, e.g. for
  JavaScript or Lua, send every number as a double); `10.5` is `wrong_type`. Ints must fit in a
  signed 64-bit integer (`bad_value`), as a typed API backend would need.
* A float field takes an int (`25` -> `25.0`); NaN and infinities are `bad_value` (not JSON).
* A required string may not be empty (`bad_value`): an event without a user is no event.
* An optional field whose value is nil is treated as absent and dropped silently.
* `action_params` is a list of `{key, value}` maps; `value` also takes an int or a finite float
  (sent as `str(value)`), never bool. Unknown keys inside a param are stripped and reported as
  `action_params.<key>`. As a convenience the whole field may also be a plain map
  `{"item_id": "3003"}`, which becomes `[{"key": "item_id", "value": "3003"}]`.
* `country` is two ASCII letters, sent upper case. `connection` is exactly `linked`/`unlinked`
  (the reference's "unllinked" is a typo), `interaction` exactly `friend`/`party`.
* Every string (param keys and values included) is at most 8192 bytes of UTF-8; strings that are
  not valid UTF-8 (lone surrogates from a lenient msgpack decode) are `wrong_type`.
* `playfab` events are passed through unchanged in shape (a map, or a list of maps; nothing is
  stripped and no timestamp is added), but they must be JSON-encodable: UTF-8 `bytes` become
  `str`, map keys must be strings, floats finite, nesting at most 64 deep.

Speed: regexes are precompiled, hot checks use `type(x) is T`, and validated timestamps are kept
in a small cache, because most events of a burst share their second. Above all, the common event
never reaches `normalize`: `encode_record` (and the datagram fast path in `intake.fastpath`)
first tries the resource's typed `msgspec` struct, built from the same table, which validates and
JSON-encodes in C. Its types are narrower than the rules above (a string field takes a `str` of
at most 2048 characters, never an int or bytes; no unknown fields; no NaN), so whatever it takes,
`normalize` would take with the same item; everything else — every rejection and every lenient
case — goes to `normalize`, which alone decides and explains. tests/test_schema_fast.py holds the
two to that on generated records.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from msgspec import Meta

from traits_agent.errors import Rejected

MAX_STRING_BYTES = 8192
"""The longest string (UTF-8 bytes) a field may hold."""

_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1
_LATEST_EVENT_TIME = 253402300800.0  # 10000-01-01 00:00:00 UTC: a 4-digit year no more
_MAX_PLAYFAB_DEPTH = 64

STRING = "string"
INT = "int"
FLOAT = "float"
TIMESTAMP = "timestamp"
DATE = "date"
PARAMS = "list<ActionParam>"


class Normalized(NamedTuple):
    """An event made ready for the API: `item` to JSON-encode, and the unknown fields removed."""

    item: Any
    stripped: tuple[str, ...]


Validator = Callable[[Any, bool, list[str]], Any]
"""`(value, strict, stripped) -> value to send`; raises `Rejected`. `strict` is the API's view."""


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a resource, as in the API reference.

    `type` is one of `string`, `int`, `float`, `timestamp`, `date`, `list<ActionParam>`.
    `choices` restricts a string to a fixed set; `alpha2` makes it an ISO 3166-1 alpha-2 code.
    """

    name: str
    type: str
    required: bool = False
    choices: tuple[str, ...] = ()
    alpha2: bool = False
    validate: Validator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "validate", _make_validator(self))


@dataclass(frozen=True, slots=True)
class Resource:
    """A 12traits resource: where its batches go and what its items hold.

    `payload_key` is the key of the JSON body (`{"users": [...]}`); None for `playfab`, whose
    events are posted as they are. `noun` is what the API's success message counts
    ("50 virtual purchases have been successfully ingested").
    """

    name: str
    path: str
    payload_key: str | None
    noun: str
    fields: tuple[Field, ...]
    has_timestamp: bool = field(init=False, compare=False)
    required: tuple[str, ...] = field(init=False, repr=False, compare=False)
    by_name: dict[str, Field] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        by_name = {f.name: f for f in self.fields}
        object.__setattr__(self, "by_name", by_name)
        object.__setattr__(self, "has_timestamp", "timestamp" in by_name)
        object.__setattr__(self, "required", tuple(f.name for f in self.fields if f.required))

    @property
    def passthrough(self) -> bool:
        """True for `playfab`: events go upstream as they are, without a field table."""
        return self.payload_key is None


# --------------------------------------------------------------------------- validators


def _wrong_type(name: str, what: str) -> Rejected:
    return Rejected("wrong_type", name, f"{name} must have {what} value")


def _text(name: str, value: Any, strict: bool) -> str:
    """A string field's value: str (or, leniently, an int or UTF-8 bytes), at most 8 KiB."""
    kind = type(value)
    if kind is str:
        s = value
    elif strict:
        raise _wrong_type(name, "a string")
    elif kind is int:
        try:
            return str(value)  # digits and a sign: ASCII, and short unless absurd
        except ValueError:  # beyond int_max_str_digits (4300), so beyond 8 KiB anyway
            raise Rejected("too_long", name, f"{name} must be at most 8192 bytes") from None
    elif kind is bytes:
        try:
            s = value.decode()
        except UnicodeDecodeError:
            raise Rejected("wrong_type", name, f"{name} must be valid UTF-8") from None
    elif isinstance(value, str):  # a str subclass (enum) from an in-process caller
        s = str(value)
    else:
        raise _wrong_type(name, "a string")
    if s.isascii():
        size = len(s)
    else:
        try:
            size = len(s.encode())
        except UnicodeEncodeError:
            raise Rejected("wrong_type", name, f"{name} must be valid UTF-8") from None
    if size > MAX_STRING_BYTES:
        raise Rejected("too_long", name, f"{name} must be at most {MAX_STRING_BYTES} bytes")
    return s


def _int(name: str, value: Any, strict: bool) -> int:
    kind = type(value)
    if kind is int:
        v = value
    elif kind is float and not strict and value.is_integer():
        v = int(value)
    else:
        raise _wrong_type(name, "an integer")
    if not _INT_MIN <= v <= _INT_MAX:
        raise Rejected("bad_value", name, f"{name} must fit in a 64-bit integer")
    return v


def _float(name: str, value: Any, strict: bool) -> float:
    kind = type(value)
    if kind is float:
        if math.isfinite(value):
            return value
        raise Rejected("bad_value", name, f"{name} must have a finite float value")
    if kind is int:
        return value if strict else float(value)
    raise _wrong_type(name, "a float")


_TIMESTAMP_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2}) ([0-9]{2}):([0-9]{2}):([0-9]{2})")
_DATE_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_DAYS_IN_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_valid_timestamps: dict[str, None] = {}  # a bounded cache of strings already found valid
_TIMESTAMP_CACHE_SIZE = 4096


def _real_date(y: int, m: int, d: int) -> bool:
    if y < 1 or not 1 <= m <= 12 or not 1 <= d <= _DAYS_IN_MONTH[m]:
        return False
    return m != 2 or d < 29 or (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0))


def _timestamp(name: str, value: Any, strict: bool) -> str:
    """`YYYY-MM-DD HH:MM:SS`, a real date and time (no leap seconds, no 24:00:00)."""
    s = _text(name, value, strict)
    if s in _valid_timestamps:
        return s
    m = _TIMESTAMP_RE.fullmatch(s)
    if m is None:
        raise Rejected("bad_format", name, f"{name} must have the format YYYY-MM-DD HH:MM:SS")
    y, mo, d, hh, mm, ss = map(int, m.groups())
    if not (_real_date(y, mo, d) and hh < 24 and mm < 60 and ss < 60):
        raise Rejected("bad_value", name, f"{name} must be a real date and time")
    if len(_valid_timestamps) >= _TIMESTAMP_CACHE_SIZE:
        _valid_timestamps.clear()
    _valid_timestamps[s] = None
    return s


def _date(name: str, value: Any, strict: bool) -> str:
    s = _text(name, value, strict)
    m = _DATE_RE.fullmatch(s)
    if m is None:
        raise Rejected("bad_format", name, f"{name} must have the format YYYY-MM-DD")
    if not _real_date(*map(int, m.groups())):
        raise Rejected("bad_value", name, f"{name} must be a real date")
    return s


def _param_value(name: str, value: Any, strict: bool) -> str:
    if not strict and type(value) is float:
        return str(_float(name, value, strict))
    return _text(name, value, strict)


def _param(key: Any, value: Any, strict: bool) -> dict[str, str]:
    return {
        "key": _text("action_params.key", key, strict),
        "value": _param_value("action_params.value", value, strict),
    }


_PARAMS_SHAPE = "action_params must be a list of {key, value} objects"


def _params(name: str, value: Any, strict: bool, stripped: list[str]) -> list[dict[str, str]]:
    """`action_params`: a list of `{key, value}` maps (leniently also one plain map)."""
    if type(value) is dict and not strict:
        return [_param(k, v, strict) for k, v in value.items()]
    if not (type(value) is list or (type(value) is tuple and not strict)):
        raise Rejected("wrong_type", name, _PARAMS_SHAPE)
    out = []
    for i, p in enumerate(value):
        if type(p) is not dict:
            raise Rejected("wrong_type", name, f"{_PARAMS_SHAPE} (item {i} is not)")
        key = p.get("key")
        val = p.get("value")
        if key is None or val is None:
            missing = "action_params.key" if key is None else "action_params.value"
            raise Rejected("missing_field", missing, f"{missing} is required (item {i})")
        out.append(_param(key, val, strict))
        if len(p) > 2:
            stripped.extend(f"action_params.{k}" for k in p if k not in ("key", "value"))
    return out


def _make_validator(f: Field) -> Validator:
    """Compile a field's rules into one function (closures keep the hot path flat)."""
    name = f.name
    if f.type == PARAMS:
        return lambda v, strict, stripped: _params(name, v, strict, stripped)
    base = {STRING: _text, INT: _int, FLOAT: _float, TIMESTAMP: _timestamp, DATE: _date}[f.type]
    if f.choices:
        choices = f.choices
        message = f"{name} must be one of: {', '.join(choices)}"

        def one_of(v: Any, strict: bool, stripped: list[str]) -> str:
            s = base(name, v, strict)
            if s not in choices:
                raise Rejected("bad_value", name, message)
            return s

        return one_of
    if f.alpha2:
        alpha2_message = f"{name} must be a two-letter ISO country code"

        def alpha2(v: Any, strict: bool, stripped: list[str]) -> str:
            s = str(base(name, v, strict))
            if len(s) != 2 or not s.isascii() or not s.isalpha():
                raise Rejected("bad_format", name, alpha2_message)
            return s.upper()

        return alpha2
    return lambda v, strict, stripped: base(name, v, strict)


# --------------------------------------------------------------------------- the table


def _f(name: str, type_: str, required: bool = False, **kw: Any) -> Field:
    return Field(name, type_, required, **kw)


_TS = _f("timestamp", TIMESTAMP)
_USER = _f("user_id", STRING, True)

RESOURCES: dict[str, Resource] = {
    r.name: r
    for r in (
        Resource(
            "actions",
            "/v1/actions",
            "actions",
            "actions",
            (
                _TS,
                _USER,
                _f("action_id", STRING, True),
                _f("action_name", STRING, True),
                _f("action_params", PARAMS),
            ),
        ),
        Resource(
            "logins",
            "/v1/logins",
            "users",
            "users",
            (
                _TS,
                _USER,
                _f("clan_id", STRING),
                _f("level", INT),
                _f("device", STRING),
                _f("country", STRING, alpha2=True),
                _f("platform", STRING),
                _f("language", STRING),
                _f("register_date", DATE),
                _f("last_login_timestamp", TIMESTAMP),
            ),
        ),
        Resource(
            "purchases",
            "/v1/purchases",
            "purchases",
            "purchases",
            (
                _TS,
                _USER,
                _f("item_id", STRING, True),
                _f("count", INT, True),
                _f("price", FLOAT, True),
                _f("platform", STRING),
            ),
        ),
        Resource(
            "virtual_purchases",
            "/v1/virtual-purchases",
            "virtual_purchases",
            "virtual purchases",
            (
                _TS,
                _USER,
                _f("item_id", STRING, True),
                _f("count", INT, True),
                _f("virtual_price", FLOAT, True),
                _f("currency", STRING, True),
            ),
        ),
        Resource(
            "level_ups",
            "/v1/level-ups",
            "level_ups",
            "level-ups",
            (_TS, _USER, _f("level", INT, True)),
        ),
        Resource(
            "items",
            "/v1/items",
            "items",
            "items",
            (
                _f("item_id", STRING, True),
                _f("price", FLOAT, True),
                _f("currency", STRING, True),
                _f("name", STRING, True),
                _f("type", STRING),
            ),
        ),
        Resource(
            "social_dynamics",
            "/v1/social-dynamics",
            "social_dynamics",
            "social dynamics",
            (
                _TS,
                _USER,
                _f("target_user_id", STRING, True),
                _f("connection", STRING, True, choices=("linked", "unlinked")),
                _f("interaction", STRING, True, choices=("friend", "party")),
            ),
        ),
        Resource("playfab", "/v1/playfab", None, "events", ()),
    )
}
"""Every resource by canonical name."""

JSON_RESOURCES: dict[str, Resource] = {n: r for n, r in RESOURCES.items() if not r.passthrough}
"""The seven resources posted as `{"<payload_key>": [items]}` (all but `playfab`)."""

_ALIASES = {"users": "logins"}  # the logins payload key, a likely tag


@lru_cache(maxsize=512)
def resolve_tag(tag: str) -> Resource | None:
    """The resource a Forward-protocol tag names, or None.

    The last dotted component names it (`12traits.actions`, `game.level_ups`); hyphens equal
    underscores (`level-ups`); case does not matter; `users` means `logins`.
    """
    name = tag.rpartition(".")[2].replace("-", "_").lower()
    return RESOURCES.get(_ALIASES.get(name, name))


# --------------------------------------------------------------------------- the edge


_last_second: tuple[int, str] = (-1, "")


def format_timestamp(event_time: float) -> str:
    """An event time (seconds since the epoch) as the API's `YYYY-MM-DD HH:MM:SS` in UTC.

    Raises `Rejected` (`bad_value`, field `timestamp`) for a time outside years 1970..9999.
    """
    global _last_second
    if not 0.0 <= event_time < _LATEST_EVENT_TIME:  # also catches NaN
        raise Rejected("bad_value", "timestamp", f"event time {event_time!r} is out of range")
    second = int(event_time)
    cached = _last_second
    if cached[0] == second:
        return cached[1]
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
    _last_second = (second, text)
    return text


def normalize(resource: Resource, record: Any, event_time: float) -> Normalized:
    """Check a record against `resource`'s table and turn it into the API item.

    Fills a missing `timestamp` from `event_time` (UTC). Raises `Rejected` for an event the
    API would not take. Never mutates `record`.
    """
    if resource.passthrough:
        return Normalized(_playfab(record), ())
    if type(record) is not dict:
        raise Rejected("not_a_map", "", f"a {resource.name} event must be a map")
    by_name = resource.by_name
    item: dict[str, Any] = {}
    stripped: list[str] = []
    for key, value in record.items():
        f = by_name.get(key)
        if f is None:
            if type(key) is bytes:  # a bin-typed key from a lenient encoder
                key = key.decode(errors="replace")
                f = by_name.get(key)
            if f is None:
                stripped.append(key if type(key) is str else repr(key))
                continue
        if value is not None:
            item[f.name] = f.validate(value, False, stripped)
    for name in resource.required:
        if name not in item:
            raise Rejected("missing_field", name, f"{name} is required")
        if item[name] == "":
            raise Rejected("bad_value", name, f"{name} must not be empty")
    if resource.has_timestamp and "timestamp" not in item:
        item["timestamp"] = format_timestamp(event_time)
    return Normalized(item, tuple(stripped))


def check_api_item(resource: Resource, item: Any) -> dict[str, str]:
    """What the real API would reject in one decoded JSON item: `{field: message}`, or `{}`.

    Strict: no coercion (a string field needs a JSON string, an int field a JSON integer; a
    float field takes any JSON number). Unknown fields are ignored, as a JSON API does.
    """
    if resource.passthrough:
        ok = type(item) is dict or (type(item) is list and all(type(x) is dict for x in item))
        return {} if ok else {"item": "a playfab event must be an object or a list of objects"}
    if type(item) is not dict:
        return {"item": "an item must be a JSON object"}
    errors: dict[str, str] = {}
    ignored: list[str] = []
    for f in resource.fields:
        value = item.get(f.name)
        if value is None:
            if f.required:
                errors[f.name] = f"{f.name} is required"
            continue
        try:
            f.validate(value, True, ignored)
        except Rejected as e:
            errors[f.name] = e.message
            continue
        if f.required and value == "":
            errors[f.name] = f"{f.name} is required"
    return errors


def _playfab(record: Any) -> Any:
    """A PlayFab event (a map or a list of maps), made JSON-encodable, else `Rejected`."""
    if type(record) is dict:
        return _json_value(record, 0)
    if type(record) is list and record and all(type(x) is dict for x in record):
        return [_json_value(x, 0) for x in record]
    raise Rejected("not_a_map", "", "a playfab event must be a map or a list of maps")


def _json_str(value: Any) -> str:
    """A PlayFab string: `str` or UTF-8 `bytes`, valid UTF-8 either way (no size limit)."""
    try:
        if type(value) is bytes:
            return value.decode()
        if not value.isascii():
            value.encode()
        return value
    except UnicodeError:
        raise Rejected("wrong_type", "playfab", "playfab strings must be valid UTF-8") from None


def _json_value(value: Any, depth: int) -> Any:
    kind = type(value)
    if kind is str or kind is bytes:
        return _json_str(value)
    if value is None or kind is bool or kind is int:
        return value
    if kind is float:
        return _float("playfab", value, False)
    if depth >= _MAX_PLAYFAB_DEPTH:
        raise Rejected("bad_value", "playfab", "a playfab event may nest at most 64 deep")
    if kind is dict:
        out = {}
        for k, v in value.items():
            if type(k) is not str and type(k) is not bytes:
                raise Rejected("wrong_type", "playfab", "playfab map keys must be strings")
            out[_json_str(k)] = _json_value(v, depth + 1)
        return out
    if kind is list or kind is tuple:
        return [_json_value(v, depth + 1) for v in value]
    raise Rejected("wrong_type", "playfab", f"a playfab event cannot hold {kind.__name__}")


# --------------------------------------------------------------------------- the fast path

_FAST_STR_CHARS = MAX_STRING_BYTES // 4
"""A str of at most this many characters is at most MAX_STRING_BYTES of UTF-8 (the typed
decoder counts characters, not bytes; a longer string takes `normalize`, which counts bytes)."""
_FLOAT_MAX = 1.7976931348623157e308  # a finite float: NaN and infinities fail both bounds
_FAST_ERRORS = (msgspec.ValidationError, UnicodeEncodeError, Rejected)
"""What makes an event leave the fast path for `normalize` (lone surrogates fail the encode)."""
_NO_STRIP: list[str] = []  # no validator in the fast path's post list ever strips


def _fast_str(min_length: int = 0) -> Any:
    return Annotated[str, Meta(min_length=min_length, max_length=_FAST_STR_CHARS)]


class FastParam(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One `action_params` entry as the fast path takes it: exactly `{key, value}`, strings."""

    key: _fast_str()  # type: ignore[valid-type]
    value: _fast_str()  # type: ignore[valid-type]


def _fast_type(f: Field) -> Any:
    """The narrowest msgspec type whose values `f.validate` takes unchanged (or, for the fields
    in `FastSchema.post`, after `f.validate` is run on them)."""
    if f.type == PARAMS:
        return list[FastParam]
    if f.type == INT:
        return Annotated[int, Meta(ge=_INT_MIN, le=_INT_MAX)]
    if f.type == FLOAT:
        return Annotated[float, Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]
    if f.choices:
        return Literal[f.choices]
    return _fast_str(1 if f.required else 0)  # required strings may not be empty


class FastSchema(NamedTuple):
    """A resource's typed record struct, and the fields it still checks in Python."""

    type: type[msgspec.Struct]
    timestamp: Field | None  # filled from the event time when absent, else checked
    post: tuple[Field, ...]  # other dates and times, country: their rules are not types


def _fast_schema(resource: Resource) -> FastSchema:
    fields: list[Any] = [
        (f.name, _fast_type(f)) if f.required else (f.name, _fast_type(f) | None, None)
        for f in resource.fields
    ]
    struct = msgspec.defstruct(
        f"{resource.name}_record",
        fields,
        kw_only=True,
        forbid_unknown_fields=True,  # unknown fields are stripped and reported: normalize
        omit_defaults=True,  # an optional nil is dropped, as normalize drops it
        gc=False,  # str, numbers and lists of FastParam only: no cycles; cheaper to allocate
    )
    timestamp = resource.by_name.get("timestamp")
    post = tuple(
        f
        for f in resource.fields
        if f is not timestamp and (f.type in (TIMESTAMP, DATE) or f.alpha2)
    )
    return FastSchema(struct, timestamp, post)


FAST_SCHEMAS: dict[str, FastSchema] = {n: _fast_schema(r) for n, r in JSON_RESOURCES.items()}
"""The fast path's struct per JSON resource (`playfab` has none: it has no table)."""

_encode_struct = msgspec.json.Encoder().encode


def encode_fast(fast: FastSchema, record: msgspec.Struct, event_time: float) -> bytes:
    """The payload of a record already decoded into `fast.type`; raises `Rejected` (the caller
    then hands the original record to `normalize`, for its decision and its reason)."""
    if fast.timestamp is not None:
        given = record.timestamp  # type: ignore[attr-defined]
        if given is None:
            record.timestamp = format_timestamp(event_time)  # type: ignore[attr-defined]
        elif given not in _valid_timestamps:
            fast.timestamp.validate(given, False, _NO_STRIP)
    for f in fast.post:
        value = getattr(record, f.name)
        if value is not None:
            setattr(record, f.name, f.validate(value, False, _NO_STRIP))
    return _encode_struct(record)


_encode_lines = msgspec.json.Encoder().encode_lines


def encode_fast_many(
    fast: FastSchema, records: list[msgspec.Struct], event_times: list[float]
) -> list[bytes]:
    """`encode_fast` of each record with its event time, in one go: the timestamps are filled
    (formatted once per second of event time) and checked in a loop, and the records
    JSON-encoded by one C call (as JSON lines: a newline is escaped inside a JSON string, so
    the lines split exactly). Raises `Rejected` for any record `encode_fast` would refuse."""
    stamp = fast.timestamp
    if stamp is not None:
        valid = _valid_timestamps
        low, high, text = 1.0, 0.0, ""  # event times in [low, high) format as `text`
        for record, event_time in zip(records, event_times, strict=True):
            given = record.timestamp  # type: ignore[attr-defined]
            if given is None:
                if not low <= event_time < high:
                    text = format_timestamp(event_time)  # raises for a time out of range
                    low = float(int(event_time))
                    high = low + 1.0
                record.timestamp = text  # type: ignore[attr-defined]
            elif given not in valid:
                stamp.validate(given, False, _NO_STRIP)
    for f in fast.post:
        name, validate = f.name, f.validate
        for record in records:
            value = getattr(record, name)
            if value is not None:
                setattr(record, name, validate(value, False, _NO_STRIP))
    return _encode_lines(records).split(b"\n")[:-1]


def encode_item(item: Any) -> bytes:
    """An API item (from `normalize`) as the JSON bytes stored and sent: UTF-8, compact."""
    return _encode_struct(item)


def encode_record(resource: Resource, record: Any, event_time: float) -> Normalized:
    """`normalize`, with the item already JSON-encoded (`Normalized.item` is bytes): the
    payload stored in the queue and sent as is. Raises `Rejected` as `normalize` does."""
    fast = FAST_SCHEMAS.get(resource.name)
    if fast is not None and type(record) is dict:
        try:
            return Normalized(encode_fast(fast, msgspec.convert(record, fast.type), event_time), ())
        except _FAST_ERRORS:
            pass
    normalized = normalize(resource, record, event_time)
    return Normalized(encode_item(normalized.item), normalized.stripped)
