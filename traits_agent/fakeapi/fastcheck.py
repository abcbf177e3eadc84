"""The fake API's fast path: parse a batch body and accept a valid batch in C (msgspec).

The fake API's answers are defined by ``json.loads`` and ``schema.check_api_item``. Both are
pure Python per item and made the fake API the biggest CPU consumer of an end-to-end bench
(~10 ms per 1000-item batch, on the cores the agent needs). This module only ever answers
"valid, here are the items" or "don't know"; on "don't know" the caller runs the original
code, which alone produces every error and every lenient decision. So it must be *sound*
(whatever it accepts, the slow path accepts with the same items), not complete:

* `decode_body`: ``msgspec.json.decode``. Where it succeeds it returns what ``json.loads``
  returns (same dicts, key order, duplicate keys last-wins, big ints, floats); everything
  ``json.loads`` is lenient about (NaN/Infinity, lone surrogate escapes, ``1e400`` → inf, a
  BOM, UTF-16/32) is an error here, and the caller then uses ``json.loads``.
  tests/fakeapi/test_fakeapi_fastcheck.py holds the two to that.
* `batch_is_valid`: ``msgspec.convert`` of the items into a strict struct per resource, built
  from the same field table (`valid_batch_size` decodes a whole body straight into the same
  structs, closed to unknown keys, for a fake API that keeps bodies rather than items): a
  string field takes a ``str`` of at most 2048 characters (so at most 8192 UTF-8 bytes;
  msgspec never produces lone surrogates), non-empty when required; an int field an int in
  the signed 64-bit range (never a bool or a float); a float field a finite float or an int
  that fits one; choices a ``Literal``; a country two ASCII letters; ``action_params`` a list
  of objects with string ``key`` and ``value``. Unknown fields are ignored, as
  ``check_api_item`` ignores them (the closed structs send them to the slow path). Dates and
  times are typed ``str`` and then checked by the field's own validator, once per distinct
  value in the batch.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from traits_agent.errors import Rejected
from traits_agent.schema import (
    DATE,
    FLOAT,
    INT,
    JSON_RESOURCES,
    MAX_STRING_BYTES,
    PARAMS,
    TIMESTAMP,
    Field,
    Resource,
)

_STR_CHARS = MAX_STRING_BYTES // 4
"""At most this many characters is at most MAX_STRING_BYTES of UTF-8 (longer: slow path)."""
_FLOAT_MAX = 1.7976931348623157e308

_decode = msgspec.json.Decoder().decode


def decode_body(body: bytes) -> Any:
    """``json.loads(body)``, or raises ``msgspec.DecodeError`` (the caller then asks
    ``json.loads``, which decides and explains)."""
    return _decode(body)


def _str(min_length: int = 0) -> Any:
    return Annotated[str, Meta(min_length=min_length, max_length=_STR_CHARS)]


def _param(forbid: bool) -> Any:
    """One ``action_params`` entry, strictly: string ``key`` and ``value``; other keys are
    ignored (``check_api_item`` ignores them too), or with `forbid` refused (see `_Strict`)."""
    name = "api_param_closed" if forbid else "api_param"
    fields = [("key", _str()), ("value", _str())]
    return msgspec.defstruct(name, fields, gc=False, forbid_unknown_fields=forbid)


_PARAM, _PARAM_CLOSED = _param(False), _param(True)


def _strict_type(f: Field, forbid: bool) -> Any:
    if f.type == PARAMS:
        param = _PARAM_CLOSED if forbid else _PARAM
        return list[param]  # type: ignore[valid-type]
    if f.type == INT:
        return Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
    if f.type == FLOAT:
        return Annotated[float, Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]
    if f.choices:
        return Literal[f.choices]
    if f.alpha2:
        return Annotated[str, Meta(pattern=r"\A[A-Za-z]{2}\Z")]
    return _str(1 if f.required else 0)  # a required "" is "is required"


def _items_type(resource: Resource, forbid: bool) -> Any:
    fields: list[Any] = [
        (f.name, _strict_type(f, forbid))
        if f.required
        else (f.name, _strict_type(f, forbid) | None, None)
        for f in resource.fields
    ]
    name = f"{resource.name}_api_item{'_closed' if forbid else ''}"
    struct = msgspec.defstruct(name, fields, kw_only=True, gc=False, forbid_unknown_fields=forbid)
    return list[struct]  # type: ignore[valid-type]


class _Strict:
    """A resource's strict item structs (as list types), a decoder of whole bodies
    (``{"<payload key>": [items]}``) and its date and time fields.

    Two sets of structs: `items_type` ignores unknown keys, as ``check_api_item`` does, for
    items the JSON decoder has already read whole (`batch_is_valid`); `decode_body`'s refuse
    them at every level (the slow path then decides), because a typed msgspec decoder skips
    an unknown key's value without reading it: invalid UTF-8 or an integer ``json.loads``
    refuses (over 4300 digits) would pass there. The agent never sends unknown fields."""

    def __init__(self, resource: Resource) -> None:
        self.items_type: Any = _items_type(resource, forbid=False)
        key = resource.payload_key
        assert key is not None  # JSON resources have one
        batch = msgspec.defstruct(
            f"{resource.name}_api_batch",
            [(key, _items_type(resource, forbid=True))],
            forbid_unknown_fields=True,
        )
        self.decode_body = msgspec.json.Decoder(batch).decode
        self.items_of = attrgetter(key)
        self.post = tuple(
            (f, attrgetter(f.name)) for f in resource.fields if f.type in (TIMESTAMP, DATE)
        )

    def dates_valid(self, structs: list[Any]) -> bool:
        """The date and time fields, checked by their own validator once per distinct value."""
        no_strip: list[str] = []
        for f, get in self.post:
            for value in set(map(get, structs)):
                if value is None:
                    continue
                try:
                    f.validate(value, True, no_strip)
                except Rejected:
                    return False
        return True


_STRICT = {name: _Strict(r) for name, r in JSON_RESOURCES.items()}


def batch_is_valid(resource: Resource, items: list[Any]) -> bool:
    """True if ``check_api_item`` finds nothing wrong with any of ``items``; False means
    "maybe not": ask it."""
    strict = _STRICT.get(resource.name)
    if strict is None:
        return False
    try:
        structs = msgspec.convert(items, strict.items_type)
    except msgspec.ValidationError:
        return False
    return strict.dates_valid(structs)


def valid_batch_size(resource: Resource, body: bytes, max_items: int) -> int:
    """The number of items of ``body`` if it is a batch the fake API accepts as it stands:
    ``json.loads`` reads it as ``{"<payload key>": [1 to max_items items]}`` and
    ``check_api_item`` finds nothing wrong with any item. 0 means "maybe not": ask them.

    Decoding straight into the strict structs builds no dict: 0.55-0.67 µs per item here,
    against 1.0-1.2 for `decode_body` and `batch_is_valid`. Where a key occurs twice msgspec
    checks both values and keeps the last, as ``json.loads`` keeps it."""
    strict = _STRICT.get(resource.name)
    if strict is None:
        return 0
    try:
        structs = strict.items_of(strict.decode_body(body))
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return 0
    if not 0 < len(structs) <= max_items or not strict.dates_valid(structs):
        return 0
    return len(structs)
