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
from traits_agent.fakeapi.fastcheck import batch_is_valid, decode_body, valid_batch_size
from traits_agent.fakeapi.faults import Fault
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
    gen = records(seed, count * 5)
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


def test_valid_batch_size_only_when_json_loads_and_check_api_item_accept() -> None:
    """On whole bodies, those decode_body refuses included: a count means json.loads reads
    that many items under the payload key, 1 to max_items of them, and none has an error."""
    valid = maybe = closed_good = 0
    for name, body in _bodies(seed=13, count=8000):
        resource = RESOURCES[name]
        items = json.loads(body)[resource.payload_key]
        errors = [check_api_item(resource, item) for item in items]
        good = errors == [{}] * len(items)
        closed_good += good and all(_closed(resource, item) for item in items)
        size = valid_batch_size(resource, body, 1000)
        if size:
            valid += 1
            assert good and size == len(items), (name, items, errors)
            assert valid_batch_size(resource, body, len(items) - 1) == 0  # over max_items
        else:
            maybe += 1
    # both sides exercised, and most good batches without unknown fields (the agent's) take
    # the fast path (numbers for the seed)
    assert valid > 80 and maybe > 3000 and valid > 0.6 * closed_good, (valid, maybe, closed_good)


def _closed(resource: Any, item: Any) -> bool:
    """No key outside the resource's fields, nor in an `action_params` entry."""
    names = {f.name for f in resource.fields}
    params = item.get("action_params") or []
    return set(item) <= names and all(set(p) <= {"key", "value"} for p in params)


@pytest.mark.parametrize(
    "body",
    [
        b'{"level_ups":[{"user_id":"u","level":"x","level":3}]}',  # last wins: valid
        b'{"level_ups":[{"user_id":"u","level":3,"level":"x"}]}',  # last wins: invalid
        b'{"level_ups":[{"user_id":"u","level":3}],"level_ups":"x"}',
        b'{"level_ups":"x","level_ups":[{"user_id":"u","level":3}]}',
        b'{"level_ups":[]}',
        b'{"level_ups":[{"user_id":"u","level":3}],"other":NaN}',
        b'{"level_ups":[{"user_id":"u","level":3}]} []',
        b'[{"user_id":"u","level":3}]',
        b'{"level_ups":[{"user_id":"u","level":3,"timestamp":"2019-02-29 00:00:00"}]}',
        b'{"level_ups":[{"user_id":"u","level":3,"timestamp":"2019-02-28 00:00:00"}]}',
        # an unknown key's value, which a typed decoder skips unread: json.loads refuses
        # invalid UTF-8 (but takes encoded surrogates) and integers of over 4300 digits
        b'{"level_ups":[{"user_id":"u","level":3,"x":"\xff"}]}',
        b'{"level_ups":[{"user_id":"u","level":3}],"x":"\xc3"}',
        b'{"actions":[{"user_id":"u","action_id":"a","action_name":"n",'
        b'"action_params":[{"key":"k","value":"v","x":"\xed\xa0\x80"}]}]}',
        b'{"level_ups":[{"user_id":"u","level":3,"x":' + b"9" * 4301 + b"}]}",
        b'{"level_ups":[{"user_id":"u","level":3,"x":{"y":[-' + b"9" * 4301 + b"]}}]}",
    ],
)
def test_a_compact_fake_api_answers_as_the_plain_one(body: bytes) -> None:
    """Edge bodies (duplicate keys, lenient JSON, an impossible date): the compact fake API,
    which checks a body without decoding it to dicts first, answers and keeps the same."""
    plain, compact = FakeAPI(), FakeAPI(compact=True)
    path = "/v1/actions" if body.startswith(b'{"actions"') else "/v1/level-ups"
    answers = [_post_body(api, path, body) for api in (plain, compact)]
    assert answers[0].status == answers[1].status
    assert answers[0].body == answers[1].body
    assert _same(compact.received_items(), plain.received)
    assert compact.total_items() == plain.total_items()


def test_a_compact_fake_api_keeps_what_the_plain_one_keeps() -> None:
    """Generated batches, some with a 1001st item, and a reject fault on the way: the same
    answers, and the same items read back (`/_fake/received` reads `received_items`)."""
    plain, compact = FakeAPI(), FakeAPI(compact=True)
    statuses = set()
    for i, (name, body) in enumerate(_bodies(seed=17, count=600)):
        resource = RESOURCES[name]
        if i % 50 == 7:  # over max_items
            items = json.loads(body)[resource.payload_key]
            body = json.dumps({resource.payload_key: items * (1001 // len(items) + 1)}).encode()
        path = "/v1/" + resource.path.removeprefix("/v1/")
        if i == 300:
            for api in (plain, compact):
                api.inject(Fault(status=503, times=2))
        answers = [_post_body(api, path, body) for api in (plain, compact)]
        assert (answers[0].status, answers[0].body) == (answers[1].status, answers[1].body)
        statuses.add(answers[0].status)
    assert statuses == {201, 400, 503}
    assert compact.received == {name: [] for name in plain.received}  # bodies, not dicts
    assert _same(compact.received_items(), plain.received)
    assert compact.total_items() == plain.total_items() > 40
    assert compact.count("actions") == len(plain.received["actions"])


def test_a_compact_fake_api_keeps_the_most_recent_bodies_and_counts_all() -> None:
    """Past `keep_bytes` the oldest bodies go (never the last one), across resources: the
    counts still cover everything, `dropped` says how many items are no longer listed."""

    def body(key: str, first: int, n: int) -> bytes:
        items = [{"user_id": f"u{i}", "level": 1} for i in range(first, first + n)]
        return json.dumps({key: items}).encode()

    sizes = [len(body("level_ups", 0, 10)), len(body("level_ups", 10, 10))]
    api = FakeAPI(compact=True, keep_bytes=sum(sizes) + 10)
    for i in range(4):
        assert _post_body(api, "/v1/level-ups", body("level_ups", 10 * i, 10)).status == 201
    assert api.count("level_ups") == api.total_items() == 40
    assert api.dropped["level_ups"] == 20
    kept = [item["user_id"] for item in api.received_items()["level_ups"]]
    assert kept == [f"u{i}" for i in range(20, 40)]
    big = json.dumps({"users": [EXAMPLES["logins"]] * 1000}).encode()
    assert len(big) > api.keep_bytes
    assert _post_body(api, "/v1/logins", big).status == 201
    items = api.received_items()
    assert len(items["logins"]) == 1000 and items["level_ups"] == []  # the last one stays
    assert api.dropped == {**dict.fromkeys(api.received, 0), "level_ups": 40}
    api.reset()
    assert api.total_items() == 0 and api.received_items()["logins"] == []
    assert api.dropped["level_ups"] == 0


@pytest.mark.parametrize("name", sorted(JSON_RESOURCES))
def test_reference_examples_are_accepted_by_the_fast_path(name: str) -> None:
    items = json.loads(json.dumps([EXAMPLES[name]] * 3))
    assert batch_is_valid(RESOURCES[name], items)
    body = json.dumps({RESOURCES[name].payload_key: items}).encode()
    assert valid_batch_size(RESOURCES[name], body, 1000) == 3


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
    return _post_body(api, path, json.dumps(doc).encode())


def _post_body(api: FakeAPI, path: str, body: bytes) -> Any:
    import trio

    request = Request("POST", path, {}, {"authorization": f"Bearer {api.api_key}"}, body)

    async def main() -> Any:
        return await api.handle(request)

    return trio.run(main)
