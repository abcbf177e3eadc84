"""The /_fake/ admin endpoints let another process drive and inspect the fake."""

from __future__ import annotations

import json

import httpx
from fakeapi_examples import API_KEY, batch

from traits_agent.fakeapi import FakeAPI


async def test_received_lists_counts_and_items(api):
    """GET /_fake/received needs no key and shows counts per resource, items and CSV uploads."""
    path, body = batch("actions", 2)
    async with httpx.AsyncClient(base_url=api.url) as http:
        await http.post(path, json=body, headers={"Authorization": f"Bearer {api.api_key}"})
        await http.post(
            "/v1/kpis/csv",
            files={"file": ("k.csv", b"a,b\n")},
            headers={"Authorization": f"Bearer {api.api_key}"},
        )
        response = await http.get("/_fake/received")
        brief = (await http.get("/_fake/received", params={"items": "0"})).json()
    assert response.status_code == 200
    state = response.json()
    assert state["total"] == 2
    assert state["counts"]["actions"] == 2
    assert state["counts"]["items"] == 0
    assert state["items"]["actions"] == body["actions"]
    [upload] = state["csv_uploads"]
    assert (upload["kind"], upload["filename"], upload["size"]) == ("kpis", "k.csv", 4)
    assert (upload["content_type"], upload["text"]) == ("text/csv", "a,b\n")
    assert brief["counts"] == state["counts"]
    assert "items" not in brief and "text" not in brief["csv_uploads"][0]


async def test_faults_injected_over_http(api, client):
    """POST /_fake/faults takes a JSON spec (or a list); DELETE clears them."""
    spec = {"path": "/v1/actions", "status": 429, "retry_after": 3, "times": 1}
    response = await client.post("/_fake/faults", json=spec)
    assert response.status_code == 201
    assert response.json()["faults"][0]["status"] == 429
    path, body = batch("actions")
    response = await client.post(path, json=body)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"

    response = await client.post("/_fake/faults", json=[{"drop": True}, {"status": 500}])
    assert len(response.json()["faults"]) == 2
    assert len((await client.get("/_fake/faults")).json()["faults"]) == 2
    assert (await client.delete("/_fake/faults")).status_code == 200
    assert api.faults == []


async def test_bad_fault_spec_is_400(api, client):
    """An unknown key or a contradictory spec is refused with 400 and nothing is injected."""
    for spec in ({"stauts": 500}, {"status": 500, "drop": True}, {"delay": "soon"}, "x"):
        response = await client.post("/_fake/faults", json=spec)
        assert response.status_code == 400, spec
        assert "fault" in response.json()["errors"]
    assert (await client.post("/_fake/faults", content=b"{")).status_code == 400
    assert api.faults == []


async def test_requests_endpoint_and_reset(api, client):
    """GET /_fake/requests lists API requests (not admin ones); POST /_fake/reset forgets all."""
    path, body = batch("items")
    await client.post(path, json=body, headers={"Idempotency-Key": "k1"})
    await client.post("/_fake/faults", json={"status": 500, "times": None})
    await client.post(path, json=body)
    [first, second] = (await client.get("/_fake/requests")).json()["requests"]
    assert (first["path"], first["status"], first["item_count"]) == ("/v1/items", 201, 1)
    assert first["idempotency_key"] == "k1"
    assert (second["status"], second["fault"]) == (500, "status=500")

    assert (await client.post("/_fake/reset")).status_code == 200
    assert api.requests == [] and api.faults == [] and api.total_items() == 0
    assert (await client.post(path, json=body)).status_code == 201


async def test_admin_unknown_path_and_method(api, client):
    """Unknown admin paths are 404, wrong methods 405 with Allow."""
    assert (await client.get("/_fake/nope")).status_code == 404
    response = await client.get("/_fake/reset")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert api.requests == []


async def test_a_compact_fake_api_bounds_what_it_keeps(nursery, monkeypatch):
    """`compact` (fake-api, run --fake-api): batches and CSV uploads past `keep_bytes` and
    requests past KEEP_REQUESTS are let go, oldest first, and said so; /_fake/received
    (decoded in a thread there) lists what is kept, and counts everything."""
    from traits_agent.fakeapi import server

    monkeypatch.setattr(server, "KEEP_REQUESTS", 5)
    path, body = batch("actions", 3)
    size = len(json.dumps(body).encode())
    api = FakeAPI(API_KEY, compact=True, keep_bytes=2 * size + 10)
    await nursery.start(api.serve)
    auth = {"Authorization": f"Bearer {api.api_key}"}
    async with httpx.AsyncClient(base_url=api.url, headers=auth) as http:
        for _ in range(4):
            response = await http.post(path, content=json.dumps(body).encode())
            assert response.status_code == 201
        for i in range(3):
            files = {"file": (f"{i}.csv", b"x" * size)}
            assert (await http.post("/v1/kpis/csv", files=files)).status_code == 201
        state = (await http.get("/_fake/received")).json()
        requests = (await http.get("/_fake/requests")).json()["requests"]
    assert state["total"] == state["counts"]["actions"] == 12
    assert state["dropped"]["actions"] == 6
    assert state["items"]["actions"] == body["actions"] * 2
    assert [u["filename"] for u in state["csv_uploads"]] == ["1.csv", "2.csv"]
    assert state["csv_dropped"] == 1
    assert len(requests) == 5 and requests[-1]["path"] == "/v1/kpis/csv"
