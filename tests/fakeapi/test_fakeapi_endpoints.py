"""The fake API answers like the reference: paths, auth, messages, limits, error shape."""

from __future__ import annotations

import json

import httpx
import pytest
import structlog
import trio
from fakeapi_examples import API_KEY, EXAMPLES, batch

from traits_agent.fakeapi import FakeAPI, run_fake_api

DOCUMENTED_MESSAGES = {
    "actions": "50 actions have been successfully ingested",
    "logins": "50 users have been successfully ingested",
    "purchases": "50 purchases have been successfully ingested",
    "virtual_purchases": "50 virtual purchases have been successfully ingested",
    "level_ups": "50 level-ups have been successfully ingested",
    "items": "50 items have been successfully ingested",
    "social_dynamics": "50 social dynamics have been successfully ingested",
}


@pytest.mark.parametrize("resource", sorted(EXAMPLES))
async def test_reference_example_is_accepted_with_documented_message(api, client, resource):
    """Fifty copies of each reference example get 201 and the reference's example message."""
    path, body = batch(resource, 50)
    response = await client.post(path, json=body)
    assert response.status_code == 201
    assert response.json() == {"code": 201, "message": DOCUMENTED_MESSAGES[resource], "data": None}
    assert len(api.received[resource]) == 50
    assert api.received[resource][0] == EXAMPLES[resource][2]
    assert api.total_items() == 50
    [recorded] = api.requests
    assert (recorded.path, recorded.resource, recorded.item_count) == (path, resource, 50)
    assert recorded.status == 201


async def test_items_are_kept_in_arrival_order(api, client):
    """received[resource] lists accepted items in the order they arrived, across requests."""
    for first in (0, 3):
        path, _ = batch("level_ups")
        items = [
            {"timestamp": "2019-01-01 15:04:05", "user_id": "1001", "level": first + i}
            for i in range(3)
        ]
        assert (await client.post(path, json={"level_ups": items})).status_code == 201
    assert [i["level"] for i in api.received["level_ups"]] == list(range(6))


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}],
    ids=["missing", "wrong-key", "no-bearer"],
)
async def test_missing_or_wrong_key_is_401(api, headers):
    """Without the right Bearer key the API answers 401 and keeps nothing."""
    path, body = batch("actions")
    async with httpx.AsyncClient(base_url=api.url) as plain:
        response = await plain.post(path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.json()["code"] == 401
    assert response.json()["message"] == "unauthorized"
    assert api.total_items() == 0
    assert api.requests[0].status == 401


async def test_max_items_accepted_one_more_rejected(api, client):
    """1000 items per request are fine; 1001 get 400 naming the limit, and nothing is kept."""
    path, body = batch("actions", 1000)
    response = await client.post(path, json=body)
    assert response.status_code == 201
    assert response.json()["message"] == "1000 actions have been successfully ingested"

    path, body = batch("actions", 1001)
    response = await client.post(path, json=body)
    assert response.status_code == 400
    payload = response.json()
    assert payload["code"] == 400
    assert payload["message"] == "bad request"
    assert "1000" in payload["errors"]["actions"]
    assert len(api.received["actions"]) == 1000


async def test_max_items_is_configurable(nursery):
    """FakeAPI(max_items=N) plays a server with a smaller limit."""
    api = FakeAPI(API_KEY, max_items=2)
    await nursery.start(api.serve)
    path, body = batch("items", 3)
    async with httpx.AsyncClient(base_url=api.url) as http:
        response = await http.post(path, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400
    assert "at most 2" in response.json()["errors"]["items"]


async def test_invalid_item_rejects_whole_batch_with_field_keyed_errors(api, client):
    """One bad item → 400 in the reference's shape, keyed by field; the good items are not kept."""
    path, body = batch("purchases", 3)
    del body["purchases"][1]["price"]
    body["purchases"][2]["count"] = "two"
    response = await client.post(path, json=body)
    assert response.status_code == 400
    payload = response.json()
    assert payload["code"] == 400
    assert payload["message"] == "bad request"
    assert set(payload["errors"]) == {"price", "count"}
    assert all(isinstance(m, str) and m for m in payload["errors"].values())
    assert api.received["purchases"] == []


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"other": []}', "actions"),
        (b'{"actions": {"user_id": "1"}}', "actions"),
        (b'{"actions": []}', "actions"),
        (b'{"actions":' + b"[" * 5000 + b"]" * 5000 + b"}", "body"),
    ],
    ids=["not-json", "not-object", "key-missing", "not-a-list", "empty", "nested-too-deep"],
)
async def test_malformed_body_is_400(api, client, content, field):
    """A body that is not {"actions": [non-empty list]} gets 400 naming what is wrong."""
    response = await client.post("/v1/actions", content=content)
    assert response.status_code == 400
    assert field in response.json()["errors"]
    assert api.total_items() == 0


@pytest.mark.parametrize("compact", [False, True])
async def test_a_body_nested_past_the_decoders_is_400_not_500(nursery, compact):
    """JSON nested deeper than the decoders go (they raise RecursionError, not a parse
    error) is a 400 naming the body, on each path that decodes one: a batch (compact, or
    not), a deep value inside an item, PlayFab events. It used to be a 500."""
    api = FakeAPI(API_KEY, compact=compact)
    await nursery.start(api.serve)
    deep = b"[" * 200_000 + b"]" * 200_000
    item = b'{"user_id":"u","action_id":"a","action_name":"n","action_params":' + deep + b"}"
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        bearer = {"Authorization": f"Bearer {API_KEY}"}
        answers = [
            await http.post("/v1/actions", content=b'{"actions":' + deep + b"}", headers=bearer),
            await http.post("/v1/actions", content=b'{"actions":[' + item + b"]}", headers=bearer),
            await http.post("/v1/playfab", content=deep, params={"api_key": API_KEY}),
        ]
    for answer in answers:
        assert answer.status_code == 400
        assert answer.json()["errors"] == {"body": "is nested too deeply to be read"}
    assert api.total_items() == 0


async def test_unknown_path_is_404_and_wrong_method_is_405(api, client):
    """Unknown paths get 404; GET on an ingestion path gets 405 with Allow: POST."""
    response = await client.post("/v1/nothing", json={"x": [1]})
    assert response.status_code == 404
    assert response.json()["code"] == 404
    response = await client.get("/v1/actions")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert [r.status for r in api.requests] == [404, 405]


async def test_csv_upload_multipart(api, client):
    """Both CSV endpoints take multipart field `file` and answer 'ingestion has been started'."""
    csv = b"timestamp,player_id,ltv\r\n2019-09-23 00:00:00,1001,2.5\r\n"
    for path in ("/v1/kpis/csv", "/v1/survey-data/csv"):
        files = {"file": ("2019-09-23.csv", csv, "text/csv")}
        response = await client.post(path, files=files)
        assert response.status_code == 201
        assert response.json() == {
            "code": 201,
            "message": "ingestion has been started",
            "data": {"estimated_time_to_complete": 125},
        }
    assert [(u.kind, u.filename, u.data) for u in api.csv_uploads] == [
        ("kpis", "2019-09-23.csv", csv),
        ("survey-data", "2019-09-23.csv", csv),
    ]
    assert api.csv_uploads[0].content_type == "text/csv"


async def test_csv_upload_without_file_field_is_400(api, client):
    """A multipart form without `file`, an empty file or no multipart at all get 400."""
    response = await client.post("/v1/kpis/csv", files={"other": ("a.csv", b"x")})
    assert response.status_code == 400
    assert "file" in response.json()["errors"]
    response = await client.post("/v1/kpis/csv", files={"file": ("a.csv", b"")})
    assert response.status_code == 400
    response = await client.post("/v1/kpis/csv", content=b"a,b\n1,2\n")
    assert response.status_code == 400
    assert api.csv_uploads == []


async def test_csv_upload_needs_auth(api):
    """CSV uploads check the Bearer key like the JSON endpoints."""
    async with httpx.AsyncClient(base_url=api.url) as plain:
        response = await plain.post("/v1/kpis/csv", files={"file": ("a.csv", b"a\n")})
    assert response.status_code == 401
    assert api.csv_uploads == []


async def test_playfab_key_in_query_single_event_and_array(api):
    """PlayFab posts carry the key as ?api_key=; one event or an array; 201 and recorded."""
    event = {"EventName": "player_logged_in", "EventId": "a" * 32, "EntityId": "42"}
    async with httpx.AsyncClient(base_url=api.url) as plain:
        one = await plain.post("/v1/playfab", params={"api_key": API_KEY}, json=event)
        many = await plain.post("/v1/playfab", params={"api_key": API_KEY}, json=[event, event])
        header_only = await plain.post(
            "/v1/playfab", json=event, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        wrong = await plain.post("/v1/playfab", params={"api_key": "nope"}, json=event)
    assert one.status_code == 201
    assert one.json()["message"] == "1 events have been successfully ingested (one event object)"
    assert many.status_code == 201
    assert many.json()["message"] == "2 events have been successfully ingested (a JSON array)"
    assert [r.shape for r in api.requests[:2]] == ["object", "array"]
    assert (header_only.status_code, wrong.status_code) == (401, 401)
    assert api.received["playfab"] == [event] * 3


async def test_playfab_rejects_non_objects(api):
    """A PlayFab array must hold objects, and must not be empty."""
    async with httpx.AsyncClient(base_url=api.url, params={"api_key": API_KEY}) as plain:
        assert (await plain.post("/v1/playfab", json=[1, 2])).status_code == 400
        assert (await plain.post("/v1/playfab", json=[])).status_code == 400
        assert (await plain.post("/v1/playfab", content=b"{")).status_code == 400
    assert api.received["playfab"] == []


async def test_api_key_is_never_recorded_or_logged(api, client):
    """Recorded requests and log lines hold no API key: not from the header, not from the query."""
    with structlog.testing.capture_logs() as logs:
        path, body = batch("actions")
        await client.post(path, json=body)
        await client.post("/v1/playfab", params={"api_key": API_KEY}, json={"EventName": "x"})
        await client.post("/v1/playfab", params={"api_key": "wrong"}, json={"EventName": "x"})
    assert API_KEY not in repr(api.requests)
    assert API_KEY not in repr(logs)
    assert api.requests[0].headers["authorization"] == "<redacted>"
    assert api.requests[1].query == {"api_key": "<redacted>"}
    admin = await client.get("/_fake/requests")
    assert API_KEY not in admin.text


async def test_idempotency_key_is_recorded_per_request(api, client):
    """An Idempotency-Key header is kept on the request's record."""
    path, body = batch("items")
    await client.post(path, json=body, headers={"Idempotency-Key": "batch-7"})
    await client.post(path, json=body)
    assert [r.idempotency_key for r in api.requests] == ["batch-7", None]


async def test_requests_record_virtual_arrival_time(api, client, autojump_clock):
    """RecordedRequest.time is trio's clock at arrival, so tests can measure retry spacing."""
    path, body = batch("items")
    await client.post(path, json=body)
    await trio.sleep(42)
    await client.post(path, json=body)
    first, second = api.requests
    assert second.time - first.time == pytest.approx(42)


async def test_wait_for_items_returns_once_enough_arrived(api, client, nursery):
    """wait_for_items blocks until the count is reached, with no polling by the caller."""
    done = trio.Event()

    async def waiter() -> None:
        await api.wait_for_items(4, "items")
        done.set()

    nursery.start_soon(waiter)
    path, body = batch("items", 2)
    await client.post(path, json=body)
    await trio.testing.wait_all_tasks_blocked()
    assert not done.is_set()
    await client.post(path, json=body)
    with trio.fail_after(5):
        await done.wait()


async def test_run_fake_api_serves_and_logs_url(nursery):
    """run_fake_api logs one fake_api_listening line with the URL, and serves there."""
    with structlog.testing.capture_logs() as logs:
        url = await nursery.start(run_fake_api, "127.0.0.1", 0, "cli-key")
    [line] = [e for e in logs if e["event"] == "fake_api_listening"]
    assert line["url"] == url
    assert url.startswith("http://127.0.0.1:")
    path, body = batch("level_ups")
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.post(path, json=body, headers={"Authorization": "Bearer cli-key"})
    assert response.status_code == 201
    assert "cli-key" not in json.dumps(logs)
