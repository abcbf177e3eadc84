"""PlayFab events go upstream one per request by default (the shape PlayFab's own webhook
posts), a bounded number at a time; arrays only when configured. Virtual time, real fake API."""

from __future__ import annotations

from collections import Counter

from tests.delivery.test_delivery import Rig, settled
from traits_agent.fakeapi import Fault
from traits_agent.fakeapi.server import PLAYFAB_PATH


def events(n: int) -> list[dict]:
    return [{"EventName": "player_logged_in", "EventId": f"{i:032x}"} for i in range(n)]


async def test_one_event_per_request_by_default(autojump_clock, nursery, api, client, tmp_path):
    """20 events: 20 requests, each one event object (the fake API says so), each event
    once, all on the batch's one pass through the lane."""
    rig = Rig(tmp_path, api, client, "playfab", linger_s=0.0)
    await nursery.start(rig.lane.run)
    rig.add(events(20))
    await settled(rig)
    playfab = [r for r in api.requests if r.path == PLAYFAB_PATH]
    assert [(r.shape, r.item_count, r.status) for r in playfab] == [("object", 1, 201)] * 20
    assert sorted(e["EventId"] for e in api.received["playfab"]) == [f"{i:032x}" for i in range(20)]
    assert len({r.idempotency_key for r in playfab}) == 20
    assert rig.counters.get("delivered_items", resource="playfab") == 20


async def test_single_event_requests_are_bounded(autojump_clock, nursery, api, client, tmp_path):
    """With every answer taking 1 s, at most max_in_flight (4) requests are on the wire at
    once: 20 events take 5 s, not 20 s (one at a time) nor 1 s (all at once)."""
    api.inject(Fault(path=PLAYFAB_PATH, delay=1.0, times=None))
    rig = Rig(tmp_path, api, client, "playfab", linger_s=0.0)
    await nursery.start(rig.lane.run)
    rig.add(events(20))
    await settled(rig)
    arrivals = Counter(round(r.time, 3) for r in api.requests)
    assert max(arrivals.values()) == 4
    assert max(arrivals) - min(arrivals) == 4.0
    assert len(api.received["playfab"]) == 20


async def test_arrays_when_configured(autojump_clock, nursery, api, client, tmp_path):
    """`api.playfab_arrays = true`: one JSON array per batch, as before."""
    rig = Rig(tmp_path, api, client, "playfab", linger_s=0.0)
    rig.uploader.playfab_arrays = True
    await nursery.start(rig.lane.run)
    rig.add(events(20))
    await settled(rig)
    assert [(r.shape, r.item_count) for r in api.requests] == [("array", 20)]


async def test_a_rejected_event_is_dead_lettered_alone(
    autojump_clock, nursery, api, client, tmp_path
):
    """A 400 for one single-event request dead-letters that event only."""
    api.inject(Fault(path=PLAYFAB_PATH, status=400, times=1))
    rig = Rig(tmp_path, api, client, "playfab", linger_s=0.0)
    await nursery.start(rig.lane.run)
    rig.add(events(5))
    await settled(rig)
    assert len(api.received["playfab"]) == 4
    assert rig.counters.total("dead_lettered_items") == 1
