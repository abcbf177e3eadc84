"""The fake API's fast path (fakeapi.fastcheck) against its contract: ``json.loads`` and
``schema.check_api_item``, on generated items. The fast path may only accept what they
accept, with the same items; everything else goes to them, so the answers stay theirs."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import msgspec
import pytest

from tests.generated_events import records
from tests.reference_examples import EXAMPLES
from traits_agent.fakeapi.fastcheck import batch_is_valid, decode_body
from traits_agent.fakeapi.server import FakeAPI
from traits_agent.httpserver import Request
from traits_agent.schema import JSON_RESOURCES, RESOURCES, check_api_item


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0 here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def _bodies(seed: int, count: int) -> list[tuple[str, bytes]]:
    """(resource, body) of 1 to 5 generated items each, those json.dumps can write."""
    rng = random.Random(seed)
    gen = records(seed, count * 3)
    out = []
    for _ in range(count):
        name = rng.choice(sorted(JSON_RESOURCES))
        items = [next(gen)[1] for _ in range(rng.randint(1, 5))]
        try:
            body = json.dumps({RESOURCES[name].payload_key: items}).encode()
        except (TypeError, ValueError):  # bytes, non-str keys: no JSON body holds them
            continue
        out.append((name, body))
    return out


def test_decode_body_is_json_loads_where_it_answers() -> None:
    answered = refused = 0
    for _, body in _bodies(seed=7, count=6000):
        expected = json.loads(body)
        try:
            got = decode_body(body)
        except msgspec.DecodeError:
            refused += 1
            continue
        answered += 1
        assert _same(got, expected), body
    assert answered > 3000 and refused > 50, (answered, refused)


@pytest.mark.parametrize(
    "body",
    [
        b'{"actions":[{"a":NaN}]}',
        b'{"actions":[{"a":Infinity}]}',
        b'{"actions":[{"a":1e400}]}',
        b'{"actions":[{"a":"\\ud800"}]}',
        b'{"actions":[{"a":"\\udc00\\ud800"}]}',
        b'\xef\xbb\xbf{"actions":[]}',
        '{"actions":[]}'.encode("utf-16"),
    ],
)
def test_decode_body_refuses_what_json_loads_is_lenient_about(body: bytes) -> None:
    json.loads(body)  # takes it
    with pytest.raises(msgspec.DecodeError):
        decode_body(body)


def test_batch_is_valid_only_when_check_api_item_finds_nothing() -> None:
    """On what decode_body returns (its only input in the fake API)."""
    valid = maybe = all_good = 0
    for name, body in _bodies(seed=11, count=8000):
        try:  # (the fast check's input: fakeapi.server falls back to json.loads as a whole)
            items = decode_body(body)[RESOURCES[name].payload_key]
        except msgspec.DecodeError:
            continue
        errors = [check_api_item(RESOURCES[name], item) for item in items]
        all_good += errors == [{}] * len(items)
        if batch_is_valid(RESOURCES[name], items):
            valid += 1
            assert errors == [{}] * len(items), (name, items, errors)
        else:
            maybe += 1
    # both sides exercised, and most good batches take the fast path (numbers for the seed)
    assert valid > 300 and maybe > 3000 and valid > 0.6 * all_good, (valid, maybe, all_good)


@pytest.mark.parametrize("name", sorted(JSON_RESOURCES))
def test_reference_examples_are_accepted_by_the_fast_path(name: str) -> None:
    items = json.loads(json.dumps([EXAMPLES[name]] * 3))
    assert batch_is_valid(RESOURCES[name], items)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("level", True),
        ("level", 10.0),
        ("level", 2**63),
        ("level", None),
        ("user_id", ""),
        ("user_id", 7),
        ("user_id", "é" * 4097),
        ("timestamp", "2019-02-29 00:00:00"),
        ("timestamp", "2019-01-01 24:00:00"),
    ],
)
def test_one_bad_item_in_a_batch_gets_the_slow_paths_answer(field: str, value: Any) -> None:
    """A 1000-item batch with one bad item: 400 naming the field, in check_api_item's words,
    and nothing of it kept."""
    good = {"timestamp": "2019-01-01 15:04:05", "user_id": "u", "level": 3}
    bad = dict(good, **{field: value})
    expected = check_api_item(RESOURCES["level_ups"], bad)
    assert expected, "the case must be one the API rejects"
    items = [good] * 500 + [bad] + [good] * 499
    api = FakeAPI()
    response = _post(api, "/v1/level-ups", {"level_ups": items})
    assert response.status == 400
    assert json.loads(response.body) == {"code": 400, "message": "bad request", "errors": expected}
    assert api.received["level_ups"] == []


def test_an_accepted_batch_is_received_as_json_loads_reads_it() -> None:
    items = [
        {"user_id": "é€😀", "level": 2**63 - 1, "extra": {"nested": [1, 2.5, None, True]}},
        {"user_id": "u", "level": -1, "timestamp": None, "Level": "x"},
    ]
    api = FakeAPI()
    response = _post(api, "/v1/level-ups", {"level_ups": items})
    assert response.status == 201
    assert _same(api.received["level_ups"], json.loads(json.dumps(items)))


def _post(api: FakeAPI, path: str, doc: Any) -> Any:
    import trio

    request = Request(
        "POST", path, {}, {"authorization": f"Bearer {api.api_key}"}, json.dumps(doc).encode()
    )

    async def main() -> Any:
        return await api.handle(request)

    return trio.run(main)
