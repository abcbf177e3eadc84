"""Injected faults: statuses, delays, dropped connections, item rejection, and their lifetimes."""

from __future__ import annotations

import httpx
import pytest
import trio
from fakeapi_examples import batch

from traits_agent.fakeapi import Fault


async def test_status_fault_with_retry_after(api, client):
    """A status fault answers that status with Retry-After; its items are not received."""
    api.inject(Fault(path="/v1/actions", status=503, retry_after="7"))
    path, body = batch("actions", 5)
    response = await client.post(path, json=body)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert response.json()["code"] == 503
    assert api.received["actions"] == []
    [recorded] = api.requests
    assert (recorded.status, recorded.item_count, recorded.fault) == (503, 5, "status=503")


async def test_status_fault_with_custom_body(api, client):
    """A status fault can carry its own JSON body."""
    api.inject(Fault(status=429, retry_after="1", body={"error": "slow down"}))
    path, body = batch("items")
    response = await client.post(path, json=body)
    assert response.status_code == 429
    assert response.json() == {"error": "slow down"}


async def test_fault_fires_times_then_normal(api, client):
    """A fault with times=2 answers twice, then the API is normal again."""
    api.inject(Fault(path="/v1/level-ups", status=500, times=2))
    path, body = batch("level_ups")
    statuses = [(await client.post(path, json=body)).status_code for _ in range(3)]
    assert statuses == [500, 500, 201]
    assert api.faults == []
    assert len(api.received["level_ups"]) == 1


async def test_fault_targets_only_its_path(api, client):
    """A fault on one path leaves the other resources alone."""
    api.inject(Fault(path="/v1/actions", status=500, times=None))
    path, body = batch("items")
    assert (await client.post(path, json=body)).status_code == 201
    path, body = batch("actions")
    assert (await client.post(path, json=body)).status_code == 500
    assert (await client.post(path, json=body)).status_code == 500
    assert len(api.faults) == 1
    api.clear_faults()
    assert (await client.post(path, json=body)).status_code == 201


async def test_fault_without_path_hits_every_api_path_but_not_admin(api, client):
    """path=None targets every API endpoint (CSV and PlayFab too); /_fake/ stays reachable."""
    api.inject(Fault(status=502, times=None))
    assert (await client.post("/v1/kpis/csv", files={"file": ("a.csv", b"a\n")})).status_code == 502
    assert (await client.post("/v1/playfab", json={})).status_code == 502
    assert (await client.get("/_fake/received")).status_code == 200


async def test_delay_fault_takes_virtual_time(api, client, autojump_clock):
    """A delay fault answers normally after exactly the delay (on trio's clock)."""
    api.inject(Fault(path="/v1/items", delay=30))
    path, body = batch("items")
    start = trio.current_time()
    response = await client.post(path, json=body, timeout=60)
    assert response.status_code == 201
    assert trio.current_time() - start == pytest.approx(30)
    assert len(api.received["items"]) == 1


async def test_delay_longer_than_client_timeout(api, client, autojump_clock):
    """A delay beyond the client's timeout makes it time out, at the virtual timeout."""
    api.inject(Fault(delay=600, status=504))
    path, body = batch("items")
    start = trio.current_time()
    with pytest.raises(httpx.ReadTimeout):
        await client.post(path, json=body, timeout=10)
    assert trio.current_time() - start == pytest.approx(10)


async def test_drop_fault_closes_connection_without_answer(api, client):
    """A drop fault closes the connection mid-request: httpx raises a transport error."""
    api.inject(Fault(path="/v1/actions", drop=True))
    path, body = batch("actions", 3)
    with pytest.raises(httpx.TransportError):
        await client.post(path, json=body)
    assert api.received["actions"] == []
    assert api.requests[0].status is None
    assert api.requests[0].fault == "drop"
    assert (await client.post(path, json=body)).status_code == 201


async def test_reject_fault_names_field_only_for_marked_items(api, client):
    """A reject fault answers 400 naming the field for any batch holding the marked value."""
    api.inject(Fault(reject_field="user_id", reject_value="poison", times=None))
    path, body = batch("actions", 4)
    body["actions"][2]["user_id"] = "poison"
    response = await client.post(path, json=body)
    assert response.status_code == 400
    payload = response.json()
    assert payload["message"] == "bad request"
    assert list(payload["errors"]) == ["user_id"]
    assert api.received["actions"] == []

    # The agent bisects: the clean halves go through, the marked one keeps failing.
    items = body["actions"]
    assert (await client.post(path, json={"actions": items[:2]})).status_code == 201
    assert (await client.post(path, json={"actions": items[3:]})).status_code == 201
    assert (await client.post(path, json={"actions": items[2:3]})).status_code == 400
    assert len(api.received["actions"]) == 3
    assert len(api.faults) == 1


async def test_min_items_fault_plays_a_smaller_limit_with_413(api, client):
    """Fault(status=413, min_items=N) answers 413 only for batches of N items or more."""
    api.inject(Fault(path="/v1/items", status=413, min_items=501, times=None))
    path, body = batch("items", 600)
    assert (await client.post(path, json=body)).status_code == 413
    path, body = batch("items", 300)
    assert (await client.post(path, json=body)).status_code == 201


async def test_first_matching_fault_fires_alone(api, client):
    """Faults fire in injection order, one per request."""
    api.inject(Fault(status=500))
    api.inject(Fault(status=503))
    path, body = batch("items")
    statuses = [(await client.post(path, json=body)).status_code for _ in range(3)]
    assert statuses == [500, 503, 201]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"status": 500, "drop": True},
        {"status": 500, "reject_field": "x"},
        {"reject_field": "x", "delay": 1},
        {"status": 99},
        {"status": 500, "times": 0},
        {"delay": -1},
    ],
)
def test_contradictory_fault_is_refused(kwargs):
    """A fault spec that does nothing, or several things, raises ValueError."""
    with pytest.raises(ValueError):
        Fault(**kwargs)
