"""The fast path of `schema.encode_record` against `schema.normalize`, on generated records.

`normalize` is the contract (tests/test_schema.py); the typed msgspec structs may only take
records that `normalize` takes, and must then produce the same item. Whatever they do not take
goes to `normalize`, so `encode_record` decides and explains exactly as `normalize` does.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import pytest

from tests.generated_events import records
from tests.reference_examples import EXAMPLES
from traits_agent.schema import (
    FAST_SCHEMAS,
    RESOURCES,
    Rejected,
    encode_fast,
    encode_item,
    encode_record,
    normalize,
)

EVENT_TIME = 1546355045.75


def outcome(name: str, record: Any) -> tuple[str, ...] | tuple[str, Any, tuple[str, ...]]:
    try:
        n = normalize(RESOURCES[name], record, EVENT_TIME)
    except Rejected as e:
        return ("rejected", e.reason, e.field, str(e))
    return ("ok", n.item, n.stripped)


def fast(name: str, record: Any) -> bytes | None:
    """The fast path alone: the payload, or None where it would hand over to normalize."""
    schema = FAST_SCHEMAS[name]
    try:
        return encode_fast(schema, msgspec.convert(record, schema.type), EVENT_TIME)
    except (msgspec.ValidationError, UnicodeEncodeError, Rejected):
        return None


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values (NaN never gets this far: both paths refuse it)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def test_the_fast_path_takes_only_what_normalize_takes_and_gives_the_same_item() -> None:
    taken = handed_over = 0
    for name, record in records(seed=12, count=20_000):
        expected = outcome(name, record)
        payload = fast(name, record) if type(record) is dict else None
        if payload is None:
            handed_over += 1
        else:
            taken += 1
            assert expected[0] == "ok", (name, record, expected)
            assert expected[2] == (), (name, record)  # stripping is normalize's to report
            item = json.loads(payload)
            assert item == expected[1], (name, record)
            assert all(same(item[k], v) for k, v in expected[1].items()), (name, record)
        # and encode_record, whichever path it took, decides and explains as normalize does
        try:
            payload, stripped = encode_record(RESOURCES[name], record, EVENT_TIME)
        except Rejected as e:
            assert expected == ("rejected", e.reason, e.field, str(e))
        else:
            assert expected[0] == "ok", (name, record, expected)
            assert (json.loads(payload), stripped) == (expected[1], expected[2])
    # the generator exercises both sides (numbers for the seed above)
    assert taken > 3000 and handed_over > 10_000, (taken, handed_over)


@pytest.mark.parametrize("name", sorted(FAST_SCHEMAS))
def test_reference_examples_take_the_fast_path(name: str) -> None:
    payload = fast(name, EXAMPLES[name])
    assert payload is not None
    assert json.loads(payload) == EXAMPLES[name]


def test_playfab_has_no_fast_path() -> None:
    assert "playfab" not in FAST_SCHEMAS
    payload, _ = encode_record(RESOURCES["playfab"], {"a": [1, 2.5, None]}, EVENT_TIME)
    assert json.loads(payload) == {"a": [1, 2.5, None]}


def test_encode_item_is_compact_utf8_json() -> None:
    """The stored payload: what json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
    gave before msgspec, byte for byte for strings and ints."""
    item = {"user_id": 'é€\x01"\\', "level": 10, "action_params": [{"key": "k", "value": ""}]}
    old = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode(item).encode()
    assert encode_item(item) == old
