"""The resource table, `normalize` (the agent's edge) and `check_api_item` (the API's view)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from tests.reference_examples import EXAMPLES as REFERENCE_EXAMPLES
from traits_agent.schema import (
    JSON_RESOURCES,
    MAX_STRING_BYTES,
    RESOURCES,
    Rejected,
    check_api_item,
    format_timestamp,
    normalize,
    resolve_tag,
)

EXAMPLES = REFERENCE_EXAMPLES

EVENT_TIME = 1546355045.75  # 2019-01-01 15:04:05.75 UTC


def with_field(resource: str, field: str, value: Any) -> dict[str, Any]:
    record = copy.deepcopy(EXAMPLES[resource])
    if value is MISSING:
        record.pop(field, None)
    else:
        record[field] = value
    return record


MISSING = object()


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize(
    ("name", "path", "payload_key", "noun"),
    [
        ("actions", "/v1/actions", "actions", "actions"),
        ("logins", "/v1/logins", "users", "users"),
        ("purchases", "/v1/purchases", "purchases", "purchases"),
        ("virtual_purchases", "/v1/virtual-purchases", "virtual_purchases", "virtual purchases"),
        ("level_ups", "/v1/level-ups", "level_ups", "level-ups"),
        ("items", "/v1/items", "items", "items"),
        ("social_dynamics", "/v1/social-dynamics", "social_dynamics", "social dynamics"),
        ("playfab", "/v1/playfab", None, "events"),
    ],
)
def test_resource_metadata(name: str, path: str, payload_key: str | None, noun: str) -> None:
    """Each resource knows its URL path, JSON payload key and the API's noun."""
    r = RESOURCES[name]
    assert (r.name, r.path, r.payload_key, r.noun) == (name, path, payload_key, noun)


def test_json_resources_are_the_seven_without_playfab() -> None:
    """JSON_RESOURCES holds every resource but playfab."""
    assert set(JSON_RESOURCES) == set(EXAMPLES)
    assert "playfab" in RESOURCES and "playfab" not in JSON_RESOURCES


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("actions", "actions"),
        ("12traits.actions", "actions"),
        ("game.level_ups", "level_ups"),
        ("level-ups", "level_ups"),
        ("a.b.Virtual-Purchases", "virtual_purchases"),
        ("SOCIAL_DYNAMICS", "social_dynamics"),
        ("users", "logins"),
        ("playfab", "playfab"),
        ("action", None),
        ("actions.", None),
        ("", None),
        ("actions.extra", None),
    ],
)
def test_resolve_tag(tag: str, expected: str | None) -> None:
    """The last dotted component names the resource; hyphens equal underscores."""
    found = resolve_tag(tag)
    assert (found.name if found else None) == expected


# --------------------------------------------------------------------------- normalize: valid


@pytest.mark.parametrize("resource", sorted(EXAMPLES))
def test_reference_example_passes_unchanged(resource: str) -> None:
    """The reference's request example for each resource is taken as it is."""
    result = normalize(RESOURCES[resource], EXAMPLES[resource], EVENT_TIME)
    assert result.item == EXAMPLES[resource]
    assert result.stripped == ()
    assert check_api_item(RESOURCES[resource], result.item) == {}


# (resource, field, value given, value sent)
ACCEPTED = [
    ("actions", "user_id", 1001, "1001"),
    ("actions", "user_id", -7, "-7"),
    ("actions", "user_id", b"1001", "1001"),
    ("actions", "action_name", "k\u00e4ufen", "k\u00e4ufen"),
    ("actions", "action_params", [], []),
    ("actions", "action_params", [{"key": "n", "value": 3}], [{"key": "n", "value": "3"}]),
    ("actions", "action_params", [{"key": "p", "value": 2.5}], [{"key": "p", "value": "2.5"}]),
    ("actions", "action_params", [{"key": 7, "value": b"x"}], [{"key": "7", "value": "x"}]),
    ("actions", "action_params", {"item_id": "3003"}, [{"key": "item_id", "value": "3003"}]),
    ("actions", "action_params", ({"key": "a", "value": "b"},), [{"key": "a", "value": "b"}]),
    ("purchases", "price", 25, 25.0),
    ("purchases", "price", 0.0, 0.0),
    ("purchases", "price", -3.5, -3.5),
    ("purchases", "count", 2.0, 2),
    ("purchases", "count", 2**63 - 1, 2**63 - 1),
    ("logins", "level", 0, 0),
    ("logins", "country", "us", "US"),
    ("logins", "country", "De", "DE"),
    ("logins", "register_date", "2020-02-29", "2020-02-29"),
    ("logins", "register_date", "2000-02-29", "2000-02-29"),
    ("logins", "last_login_timestamp", "2019-12-31 23:59:59", "2019-12-31 23:59:59"),
    ("logins", "timestamp", "0001-01-01 00:00:00", "0001-01-01 00:00:00"),
    ("social_dynamics", "connection", "unlinked", "unlinked"),
    ("social_dynamics", "interaction", "party", "party"),
    ("items", "name", "a" * MAX_STRING_BYTES, "a" * MAX_STRING_BYTES),
    ("items", "name", "\U0001f600" * (MAX_STRING_BYTES // 4), "\U0001f600" * 2048),
    ("items", "type", "\u00e9" * (MAX_STRING_BYTES // 2), "\u00e9" * 4096),
]


@pytest.mark.parametrize(
    ("resource", "field", "given", "sent"),
    ACCEPTED,
    ids=[f"{r}.{f}-{i}" for i, (r, f, *_) in enumerate(ACCEPTED)],
)
def test_rule_accepts(resource: str, field: str, given: Any, sent: Any) -> None:
    """A value the rules accept is sent in the API's form, and the API view accepts it."""
    result = normalize(RESOURCES[resource], with_field(resource, field, given), EVENT_TIME)
    assert result.item[field] == sent
    assert type(result.item[field]) is type(sent)
    assert check_api_item(RESOURCES[resource], result.item) == {}


# --------------------------------------------------------------------------- normalize: invalid

BAD_UTF8 = "\udcff"  # what a lenient msgpack decode makes of a non-UTF-8 byte

# (resource, field, value given, reason, field reported)
REJECTED = [
    ("actions", "user_id", MISSING, "missing_field", "user_id"),
    ("actions", "user_id", None, "missing_field", "user_id"),
    ("actions", "user_id", "", "bad_value", "user_id"),
    ("actions", "user_id", True, "wrong_type", "user_id"),
    ("actions", "user_id", 1.5, "wrong_type", "user_id"),
    ("actions", "user_id", ["1001"], "wrong_type", "user_id"),
    ("actions", "user_id", b"\xff\xfe", "wrong_type", "user_id"),
    ("actions", "user_id", BAD_UTF8, "wrong_type", "user_id"),
    ("actions", "action_id", MISSING, "missing_field", "action_id"),
    ("actions", "action_name", {"a": 1}, "wrong_type", "action_name"),
    ("actions", "action_params", "item_id=3003", "wrong_type", "action_params"),
    ("actions", "action_params", ["item_id"], "wrong_type", "action_params"),
    ("actions", "action_params", [{"value": "1"}], "missing_field", "action_params.key"),
    ("actions", "action_params", [{"key": "k"}], "missing_field", "action_params.value"),
    (
        "actions",
        "action_params",
        [{"key": "k", "value": True}],
        "wrong_type",
        "action_params.value",
    ),
    (
        "actions",
        "action_params",
        [{"key": "k", "value": math.nan}],
        "bad_value",
        "action_params.value",
    ),
    ("actions", "action_params", [{"key": 1.5, "value": "v"}], "wrong_type", "action_params.key"),
    ("actions", "action_params", {"k": None}, "wrong_type", "action_params.value"),
    (
        "actions",
        "action_params",
        [{"key": "k", "value": "v" * 8193}],
        "too_long",
        "action_params.value",
    ),
    ("purchases", "count", MISSING, "missing_field", "count"),
    ("purchases", "count", True, "wrong_type", "count"),
    ("purchases", "count", 1.5, "wrong_type", "count"),
    ("purchases", "count", "1", "wrong_type", "count"),
    ("purchases", "count", math.inf, "wrong_type", "count"),
    ("purchases", "count", 2**63, "bad_value", "count"),
    ("purchases", "count", -(2**63) - 1, "bad_value", "count"),
    ("purchases", "price", MISSING, "missing_field", "price"),
    ("purchases", "price", True, "wrong_type", "price"),
    ("purchases", "price", "25.50", "wrong_type", "price"),
    ("purchases", "price", math.nan, "bad_value", "price"),
    ("purchases", "price", -math.inf, "bad_value", "price"),
    ("virtual_purchases", "currency", MISSING, "missing_field", "currency"),
    ("virtual_purchases", "virtual_price", None, "missing_field", "virtual_price"),
    ("level_ups", "level", "10", "wrong_type", "level"),
    ("logins", "level", False, "wrong_type", "level"),
    ("level_ups", "timestamp", "2019-01-01T15:04:05", "bad_format", "timestamp"),
    ("level_ups", "timestamp", "2019-01-01 15:04:05Z", "bad_format", "timestamp"),
    ("level_ups", "timestamp", "2019-1-01 15:04:05", "bad_format", "timestamp"),
    ("level_ups", "timestamp", "2019-01-01", "bad_format", "timestamp"),
    (
        "level_ups",
        "timestamp",
        "\u0662\u0660\u0661\u0669-01-01 15:04:05",
        "bad_format",
        "timestamp",
    ),
    ("level_ups", "timestamp", 1546355045, "bad_format", "timestamp"),
    ("level_ups", "timestamp", 1546355045.0, "wrong_type", "timestamp"),
    ("level_ups", "timestamp", "2019-02-30 00:00:00", "bad_value", "timestamp"),
    ("level_ups", "timestamp", "2019-02-29 00:00:00", "bad_value", "timestamp"),
    ("level_ups", "timestamp", "2019-13-01 00:00:00", "bad_value", "timestamp"),
    ("level_ups", "timestamp", "2019-01-00 00:00:00", "bad_value", "timestamp"),
    ("level_ups", "timestamp", "2019-01-01 24:00:00", "bad_value", "timestamp"),
    ("level_ups", "timestamp", "2019-01-01 23:60:00", "bad_value", "timestamp"),
    ("level_ups", "timestamp", "2016-12-31 23:59:60", "bad_value", "timestamp"),
    ("level_ups", "timestamp", "0000-01-01 00:00:00", "bad_value", "timestamp"),
    ("logins", "last_login_timestamp", "yesterday", "bad_format", "last_login_timestamp"),
    ("logins", "last_login_timestamp", "2019-04-31 10:00:00", "bad_value", "last_login_timestamp"),
    ("logins", "register_date", "2018/11/14", "bad_format", "register_date"),
    ("logins", "register_date", "2018-11-14 00:00:00", "bad_format", "register_date"),
    ("logins", "register_date", "1900-02-29", "bad_value", "register_date"),
    ("logins", "register_date", "2018-11-31", "bad_value", "register_date"),
    ("logins", "country", "USA", "bad_format", "country"),
    ("logins", "country", "U", "bad_format", "country"),
    ("logins", "country", "U1", "bad_format", "country"),
    ("logins", "country", "\u00dcS", "bad_format", "country"),
    ("logins", "country", 12, "bad_format", "country"),
    ("social_dynamics", "connection", "unllinked", "bad_value", "connection"),
    ("social_dynamics", "connection", "Linked", "bad_value", "connection"),
    ("social_dynamics", "interaction", "guild", "bad_value", "interaction"),
    ("social_dynamics", "target_user_id", MISSING, "missing_field", "target_user_id"),
    ("items", "name", "a" * (MAX_STRING_BYTES + 1), "too_long", "name"),
    ("items", "name", "\u00e9" * 4096 + "a", "too_long", "name"),
    ("items", "name", 10**5000, "too_long", "name"),
    ("items", "type", 3.5, "wrong_type", "type"),
]


@pytest.mark.parametrize(
    ("resource", "field", "given", "reason", "where"),
    REJECTED,
    ids=[f"{r}.{f}-{reason}-{i}" for i, (r, f, _, reason, _) in enumerate(REJECTED)],
)
def test_rule_rejects(resource: str, field: str, given: Any, reason: str, where: str) -> None:
    """A value a rule refuses raises Rejected naming the reason and the field."""
    with pytest.raises(Rejected) as caught:
        normalize(RESOURCES[resource], with_field(resource, field, given), EVENT_TIME)
    assert (caught.value.reason, caught.value.field) == (reason, where)
    assert str(caught.value)


@pytest.mark.parametrize("record", [None, "x", 5, ["user_id", "1001"], b"\x80"])
def test_record_must_be_a_map(record: Any) -> None:
    """A record that is not a map is rejected as not_a_map."""
    with pytest.raises(Rejected) as caught:
        normalize(RESOURCES["actions"], record, EVENT_TIME)
    assert caught.value.reason == "not_a_map"


# --------------------------------------------------------------------------- stripping, filling


def test_unknown_fields_are_stripped_and_reported() -> None:
    """Unknown fields (any key type) and unknown param keys are removed and listed."""
    record = dict(EXAMPLES["actions"], color="red", score=3)
    record[7] = "seven"
    record["action_params"] = [{"key": "a", "value": "b", "weight": 2}]
    result = normalize(RESOURCES["actions"], record, EVENT_TIME)
    assert result.stripped == ("action_params.weight", "color", "score", "7")
    assert set(result.item) == set(EXAMPLES["actions"])
    assert result.item["action_params"] == [{"key": "a", "value": "b"}]


def test_bytes_keys_are_field_names() -> None:
    """A bin-typed key names a field like a str key."""
    result = normalize(RESOURCES["level_ups"], {b"user_id": "1", b"level": 2}, EVENT_TIME)
    assert result.item == {"user_id": "1", "level": 2, "timestamp": "2019-01-01 15:04:05"}


def test_optional_nil_is_dropped_not_stripped() -> None:
    """An optional field holding nil is left out of the item without being reported."""
    record = dict(EXAMPLES["logins"], clan_id=None, level=None)
    result = normalize(RESOURCES["logins"], record, EVENT_TIME)
    assert "clan_id" not in result.item and "level" not in result.item
    assert result.stripped == ()


def test_normalize_does_not_mutate_the_record() -> None:
    """normalize builds a new item and leaves the record as it was."""
    record = with_field("actions", "user_id", 5)
    record.pop("timestamp")
    before = copy.deepcopy(record)
    normalize(RESOURCES["actions"], record, EVENT_TIME)
    assert record == before


@pytest.mark.parametrize("resource", sorted(JSON_RESOURCES))
def test_missing_timestamp_comes_from_event_time_in_utc(resource: str) -> None:
    """Where a resource has a timestamp and the record lacks it, the event time fills it."""
    record = with_field(resource, "timestamp", MISSING)
    item = normalize(RESOURCES[resource], record, EVENT_TIME).item
    if resource == "items":
        assert "timestamp" not in item
    else:
        assert item["timestamp"] == "2019-01-01 15:04:05"


def test_given_timestamp_wins_over_event_time() -> None:
    """A record's own timestamp is kept as sent."""
    item = normalize(RESOURCES["level_ups"], EXAMPLES["level_ups"], 0.0).item
    assert item["timestamp"] == "2019-01-01 15:04:05"


@pytest.mark.parametrize(
    ("event_time", "text"),
    [
        (0.0, "1970-01-01 00:00:00"),
        (951782400.0, "2000-02-29 00:00:00"),
        (1546355045.999, "2019-01-01 15:04:05"),
        (253402300799.5, "9999-12-31 23:59:59"),
    ],
)
def test_format_timestamp(event_time: float, text: str) -> None:
    """Event times format as UTC with the second truncated."""
    assert format_timestamp(event_time) == text


@pytest.mark.parametrize("event_time", [-1.0, 253402300800.0, math.nan, math.inf])
def test_event_time_out_of_range_is_rejected(event_time: float) -> None:
    """An event time that cannot be a 4-digit-year timestamp rejects the event."""
    with pytest.raises(Rejected) as caught:
        normalize(RESOURCES["level_ups"], {"user_id": "1", "level": 1}, event_time)
    assert (caught.value.reason, caught.value.field) == ("bad_value", "timestamp")


# --------------------------------------------------------------------------- playfab


@pytest.mark.parametrize(
    ("record", "item"),
    [
        ({"EventName": "player_logged_in", "n": 1, "x": [1.5, None, True]}, None),
        ([{"EventName": "a"}, {"EventName": "b", "Nested": {"k": "v"}}], None),
        ({b"EventName": b"caf\xc3\xa9"}, {"EventName": "caf\u00e9"}),
    ],
)
def test_playfab_passes_through(record: Any, item: Any) -> None:
    """PlayFab events pass as they are (bytes made str), unstripped, with no timestamp."""
    result = normalize(RESOURCES["playfab"], record, EVENT_TIME)
    assert result.item == (record if item is None else item)
    assert result.stripped == ()
    assert check_api_item(RESOURCES["playfab"], result.item) == {}


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ("event", "not_a_map"),
        ([], "not_a_map"),
        ([{"a": 1}, 2], "not_a_map"),
        ({"a": math.nan}, "bad_value"),
        ({"a": b"\xff"}, "wrong_type"),
        ({"a": BAD_UTF8}, "wrong_type"),
        ({1: "int key"}, "wrong_type"),
        ({"a": {1, 2}}, "wrong_type"),
    ],
)
def test_playfab_must_be_json(record: Any, reason: str) -> None:
    """A PlayFab event must be a map or list of maps that JSON can carry."""
    with pytest.raises(Rejected) as caught:
        normalize(RESOURCES["playfab"], record, EVENT_TIME)
    assert caught.value.reason == reason


def test_playfab_nesting_is_bounded() -> None:
    """Absurd nesting is rejected instead of exhausting the stack."""
    deep: Any = "leaf"
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(Rejected) as caught:
        normalize(RESOURCES["playfab"], {"deep": deep}, EVENT_TIME)
    assert caught.value.reason == "bad_value"


# --------------------------------------------------------------------------- the API's view


@pytest.mark.parametrize(
    ("resource", "item", "errors"),
    [
        ("level_ups", {"level": 3}, {"user_id": "user_id is required"}),
        ("level_ups", {"user_id": "", "level": 3}, {"user_id": "user_id is required"}),
        (
            "level_ups",
            {"user_id": 1001, "level": 3},
            {"user_id": "user_id must have a string value"},
        ),
        (
            "level_ups",
            {"user_id": "1", "level": 3.0},
            {"level": "level must have an integer value"},
        ),
        ("purchases", dict(EXAMPLES["purchases"], price=25), {}),
        (
            "purchases",
            dict(EXAMPLES["purchases"], price="25"),
            {"price": "price must have a float value"},
        ),
        ("purchases", dict(EXAMPLES["purchases"], unknown=1), {}),
        (
            "actions",
            dict(EXAMPLES["actions"], action_params={"a": "b"}),
            {"action_params": "action_params must be a list of {key, value} objects"},
        ),
        (
            "actions",
            dict(EXAMPLES["actions"], action_params=[{"key": "a", "value": 1}]),
            {"action_params": "action_params.value must have a string value"},
        ),
        (
            "logins",
            dict(EXAMPLES["logins"], timestamp="2019-01-01", register_date="2019-02-30"),
            {
                "timestamp": "timestamp must have the format YYYY-MM-DD HH:MM:SS",
                "register_date": "register_date must be a real date",
            },
        ),
        ("logins", dict(EXAMPLES["logins"], country="us"), {}),
        (
            "purchases",
            dict(EXAMPLES["purchases"], count=1.0),
            {"count": "count must have an integer value"},
        ),
        ("items", dict(EXAMPLES["items"], name=b"Axe"), {"name": "name must have a string value"}),
        ("items", ["not", "an", "object"], {"item": "an item must be a JSON object"}),
        ("playfab", "x", {"item": "a playfab event must be an object or a list of objects"}),
    ],
)
def test_check_api_item(resource: str, item: Any, errors: dict[str, str]) -> None:
    """The API's view is strict about JSON types and reports every field in the API's words."""
    assert check_api_item(RESOURCES[resource], item) == errors
