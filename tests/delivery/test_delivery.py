"""Lanes and the uploader against the real fake API on loopback, on trio's MockClock.

Time here is virtual (`autojump_clock`: MockClock(autojump_threshold=0)), so linger, backoff
and Retry-After are asserted as exact virtual times, never by sleeping.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import partial

import httpx
import pytest
import trio

from tests.conftest import agent_client
from traits_agent.delivery.backoff import Backoff
from traits_agent.delivery.deadletter import DeadLetters
from traits_agent.delivery.lane import Lane
from traits_agent.delivery.uploader import Uploader
from traits_agent.fakeapi import FakeAPI, Fault
from traits_agent.observe.metrics import Counters
from traits_agent.queue import DiskQueue
from traits_agent.schema import RESOURCES

KEY = "test-key"


async def read_request(stream: trio.SocketStream) -> bytes:
    """One HTTP request's bytes off `stream` (head and Content-Length body), for the tests
    whose server must answer what FakeAPI never would."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


class Rig:
    """A queue + lane + uploader for one resource, delivering to a real FakeAPI."""

    def __init__(
        self,
        tmp_path,
        api: FakeAPI,
        client: httpx.AsyncClient,
        resource: str,
        *,
        max_items=1000,
        linger_s=1.0,
        seed=1,
        api_key=KEY,
    ):
        self.resource = RESOURCES[resource]
        self.queue_dir = tmp_path / "queue" / resource
        self.queue = DiskQueue.open(self.queue_dir, fsync="never")
        self.counters = Counters()
        self.dead = DeadLetters(tmp_path / "dead")
        self.backoff = Backoff(initial_s=0.5, max_s=8.0, rng=random.Random(seed))
        self.uploader = Uploader(
            client,
            api_key=api_key,
            counters=self.counters,
            dead_letters=self.dead,
            backoff=self.backoff,
            agent_id="test",
        )
        self.lane = Lane(
            self.resource,
            self.queue,
            self.uploader.deliver,
            max_items=max_items,
            max_bytes=4 * 1024 * 1024,
            linger_s=linger_s,
        )

    def reopen(self, *, linger_s: float) -> None:
        """Open the closed queue again, recovering what is on disk as a restarted agent
        does, and a new lane on it."""
        self.queue = DiskQueue.open(self.queue_dir, fsync="never")
        self.lane = Lane(
            self.resource,
            self.queue,
            self.uploader.deliver,
            max_items=1000,
            max_bytes=1 << 20,
            linger_s=linger_s,
        )

    def add(self, items: list[dict]) -> None:
        for item in items:
            assert self.queue.append(json.dumps(item).encode())
        self.queue.flush()
        self.lane.notify()


async def settled(rig: Rig) -> None:
    """Wait until the lane has committed everything (the API answers before we commit)."""
    # virtual time: polling costs nothing real, and the lane exposes no event for this
    while rig.queue.pending_items or rig.lane.in_flight:  # noqa: ASYNC110
        await trio.sleep(0.001)


def level_ups(n: int, start: int = 0) -> list[dict]:
    return [
        {"timestamp": "2026-11-28 12:00:00", "user_id": str(i), "level": i % 50 + 1}
        for i in range(start, start + n)
    ]


async def test_partial_batch_waits_exactly_linger(autojump_clock, nursery, api, client, tmp_path):
    """Five items leave together, exactly linger_s after the first arrived."""
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=1.0)
    await nursery.start(rig.lane.run)
    t0 = trio.current_time()
    rig.add(level_ups(3))
    await trio.sleep(0.4)
    rig.add(level_ups(2, start=3))
    await api.wait_for_items(5, "level_ups")
    assert [r.item_count for r in api.requests] == [5]
    assert api.requests[0].time == pytest.approx(t0 + 1.0)
    await settled(rig)


async def test_full_batch_leaves_without_waiting(autojump_clock, nursery, api, client, tmp_path):
    """2500 items: two full 1000-item batches at once, the 500 rest one linger later."""
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=5.0)
    t0 = trio.current_time()
    rig.add(level_ups(2500))
    rig.lane._waiting_since = t0  # items arrived now, not before start
    await nursery.start(rig.lane.run)
    await api.wait_for_items(2500, "level_ups")
    counts = [r.item_count for r in api.requests]
    times = [r.time - t0 for r in api.requests]
    assert counts == [1000, 1000, 500]
    assert times[0] == pytest.approx(0) and times[1] == pytest.approx(0)
    assert times[2] == pytest.approx(5.0)
    assert [i["user_id"] for i in api.received["level_ups"]] == [str(i) for i in range(2500)]


async def test_recovered_backlog_is_sent_at_once(autojump_clock, nursery, api, client, tmp_path):
    """Items already on disk when the lane starts do not wait for linger."""
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=60.0)
    for item in level_ups(3):
        rig.queue.append(json.dumps(item).encode())
    rig.queue.close()
    rig.reopen(linger_s=60.0)
    t0 = trio.current_time()
    await nursery.start(rig.lane.run)
    await api.wait_for_items(3)
    assert api.requests[0].time == pytest.approx(t0)


async def test_5xx_backoff_full_jitter_exact_times(autojump_clock, nursery, api, client, tmp_path):
    """Three 503s without Retry-After: retries at the seeded full-jitter delays, then 201."""
    api.inject(Fault(status=503, times=3))
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=0.0, seed=42)
    expected = Backoff(initial_s=0.5, max_s=8.0, rng=random.Random(42))
    delays = [expected.delay(n) for n in range(3)]
    t0 = trio.current_time()
    await nursery.start(rig.lane.run)
    rig.add(level_ups(10))
    await api.wait_for_items(10)
    times = [r.time - t0 for r in api.requests]
    assert [r.status for r in api.requests] == [503, 503, 503, 201]
    assert times == pytest.approx([0, delays[0], delays[0] + delays[1], sum(delays)])
    await settled(rig)
    assert rig.counters.total("upload_retries") == 3
    assert rig.uploader.state("level_ups").state == "ok"


async def test_retry_after_is_obeyed(autojump_clock, nursery, api, client, tmp_path):
    """429 with Retry-After: 7 → the retry comes exactly 7 s later, whatever the backoff."""
    api.inject(Fault(status=429, retry_after="7", times=1))
    rig = Rig(tmp_path, api, client, "actions", linger_s=0.0)
    t0 = trio.current_time()
    await nursery.start(rig.lane.run)
    rig.add([{"user_id": "1", "action_id": "2", "action_name": "x"}])
    await api.wait_for_items(1)
    assert [r.time - t0 for r in api.requests] == pytest.approx([0, 7.0])


async def test_backoff_is_capped(autojump_clock, nursery, api, client, tmp_path):
    """Twelve failures in a row never wait longer than max_backoff between tries."""
    api.inject(Fault(status=500, times=12))
    rig = Rig(tmp_path, api, client, "actions", linger_s=0.0)
    await nursery.start(rig.lane.run)
    rig.add([{"user_id": "1", "action_id": "2", "action_name": "x"}])
    await api.wait_for_items(1)
    gaps = [b.time - a.time for a, b in zip(api.requests, api.requests[1:], strict=False)]
    assert len(gaps) == 12
    assert max(gaps) <= 8.0


async def test_dropped_connection_is_retried(autojump_clock, nursery, api, client, tmp_path):
    """A connection dropped mid-request is a transport error: retried, nothing lost."""
    api.inject(Fault(drop=True, times=2))
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=0.0)
    await nursery.start(rig.lane.run)
    rig.add(level_ups(20))
    await api.wait_for_items(20)
    assert rig.counters.get("upload_retries", resource="level_ups", reason="transport") == 2


async def test_400_bisects_to_the_bad_items(autojump_clock, nursery, api, client, tmp_path):
    """Two poisoned items in 100: 98 delivered, exactly those 2 dead-lettered with the message."""
    api.inject(Fault(reject_field="user_id", reject_value="bad", times=None))
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=0.0)
    items = level_ups(100)
    items[17]["user_id"] = "bad"
    items[80]["user_id"] = "bad"
    await nursery.start(rig.lane.run)
    rig.add(items)
    await settled(rig)
    good = [i for i in items if i["user_id"] != "bad"]
    assert api.received["level_ups"] == good  # order kept
    letters = list(rig.dead.read("level_ups"))
    assert [d["item"]["level"] for d in letters] == [items[17]["level"], items[80]["level"]]
    assert all(d["status"] == 400 and "user_id" in d["errors"] for d in letters)
    assert rig.counters.total("dead_lettered_items") == 2
    assert rig.counters.total("delivered_items") == 98


async def test_413_splits_and_learns(autojump_clock, nursery, api, client, tmp_path):
    """A server that takes at most 250 items: the batch is split until it fits, nothing lost."""
    api.inject(Fault(status=413, min_items=251, times=None))
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=0.0)
    await nursery.start(rig.lane.run)
    rig.add(level_ups(1000))
    await api.wait_for_items(1000)
    accepted = [r.item_count for r in api.requests if r.status == 201]
    assert sum(accepted) == 1000 and max(accepted) <= 250
    assert rig.counters.total("dead_lettered_items") == 0


async def test_401_holds_and_recovers(autojump_clock, nursery, api, client, tmp_path):
    """A wrong key holds delivery (auth_failed) without dropping; a fixed key delivers."""
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=0.0, api_key="wrong")
    await nursery.start(rig.lane.run)
    rig.add(level_ups(5))
    await api.wait_until(lambda: len(api.requests) >= 3)
    assert rig.uploader.state("level_ups").state == "auth_failed"
    assert rig.queue.pending_items == 5
    gaps = [b.time - a.time for a, b in zip(api.requests, api.requests[1:], strict=False)]
    assert min(gaps) >= 5.0  # probes slowly
    rig.uploader.api_key = KEY
    await api.wait_for_items(5)
    await settled(rig)
    assert rig.uploader.state("level_ups").state == "ok"


async def test_404_holds_the_resource(autojump_clock, nursery, api, client, tmp_path):
    """404 is a configuration error: held as endpoint_error, delivered once it is fixed."""
    api.inject(Fault(status=404, path="/v1/level-ups", times=4))
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=0.0)
    await nursery.start(rig.lane.run)
    rig.add(level_ups(5))
    await api.wait_until(lambda: len(api.requests) >= 2)
    assert rig.uploader.state("level_ups").state == "endpoint_error"
    await api.wait_for_items(5)
    await settled(rig)
    assert rig.uploader.state("level_ups").state == "ok"


async def test_idempotency_key_stable_across_retries(
    autojump_clock, nursery, api, client, tmp_path
):
    """Retries of the same items carry the same Idempotency-Key; the next batch another."""
    api.inject(Fault(status=503, times=2))
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=0.0, max_items=10)
    await nursery.start(rig.lane.run)
    rig.add(level_ups(20))
    await api.wait_for_items(20)
    keys = [r.idempotency_key for r in api.requests]
    assert len(keys) == 4 and keys[0] == keys[1] == keys[2] != keys[3]


async def test_resources_do_not_block_each_other(autojump_clock, nursery, api, client, tmp_path):
    """One resource stuck on 503s does not delay another's delivery."""
    api.inject(Fault(status=503, path="/v1/actions", times=None))
    stuck = Rig(tmp_path, api, client, "actions", linger_s=0.0)
    fine = Rig(tmp_path, api, client, "level_ups", linger_s=0.0)
    await nursery.start(stuck.lane.run)
    await nursery.start(fine.lane.run)
    t0 = trio.current_time()
    stuck.add([{"user_id": "1", "action_id": "2", "action_name": "x"}])
    fine.add(level_ups(3))
    await api.wait_for_items(3, "level_ups")
    assert trio.current_time() - t0 < 0.01
    assert stuck.queue.pending_items == 1


async def test_2xx_with_an_undecodable_body_counts_as_delivered(autojump_clock, nursery, tmp_path):
    """A 201 whose gzip body is garbage: the status line is the answer (delivered), and the
    lane goes on instead of crashing the agent."""
    requests = 0

    async def server(stream: trio.SocketStream) -> None:
        nonlocal requests
        async with stream:
            await read_request(stream)
            requests += 1
            await stream.send_all(
                b"HTTP/1.1 201 Created\r\nContent-Encoding: gzip\r\n"
                b"Content-Length: 5\r\nConnection: close\r\n\r\nabcde"
            )

    (listener,) = await nursery.start(partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    async with agent_client(f"http://127.0.0.1:{port}") as client:
        rig = Rig(tmp_path, None, client, "level_ups", linger_s=0.0)
        await nursery.start(rig.lane.run)
        rig.add(level_ups(3))
        await settled(rig)
        assert requests == 1
        assert rig.counters.total("delivered_items") == 3
        assert rig.lane.failures == 0


async def test_lone_surrogate_in_api_message_is_dead_lettered(
    autojump_clock, nursery, api, client, tmp_path
):
    """An API message with a lone surrogate still makes a readable dead letter."""
    api.inject(Fault(status=400, body={"code": 400, "message": "bad \ud800", "errors": {}}))
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=0.0)
    await nursery.start(rig.lane.run)
    rig.add(level_ups(1))
    await settled(rig)
    (letter,) = rig.dead.read("level_ups")
    assert letter["message"].startswith("bad ")
    assert rig.lane.failures == 0


async def test_dead_letter_write_failure_keeps_items_queued(
    autojump_clock, nursery, api, client, tmp_path
):
    """While the dead-letter file cannot be written the rejected item stays in the queue;
    once it can, the item is dead-lettered and the queue moves on."""
    api.inject(Fault(reject_field="user_id", reject_value="bad", times=None))
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=0.0)
    blocker = tmp_path / "dead"
    blocker.write_text("a file where the dead-letter directory should be")
    await nursery.start(rig.lane.run)
    items = level_ups(1)
    items[0]["user_id"] = "bad"
    rig.add(items)
    await trio.sleep(30)
    assert rig.queue.pending_items == 1
    assert rig.counters.total("dead_lettered_items") == 0
    blocker.unlink()
    await settled(rig)
    assert [d["item"]["user_id"] for d in rig.dead.read("level_ups")] == ["bad"]


async def test_413_for_a_single_item_teaches_no_limit(
    autojump_clock, nursery, api, client, tmp_path
):
    """A lone item answered 413 is dead-lettered; it does not shrink later batches."""
    api.inject(Fault(status=413, times=1))
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=0.0)
    await nursery.start(rig.lane.run)
    rig.add(level_ups(1))
    await settled(rig)
    assert rig.counters.total("dead_lettered_items") == 1
    assert "level_ups" not in rig.uploader.byte_limit
    rig.add(level_ups(500, start=1))
    await settled(rig)
    assert api.requests[-1].item_count == 500


async def test_learned_413_limit_is_forgotten(autojump_clock, nursery, api, client, tmp_path):
    """A 413 from a passing proxy splits batches for a while, not forever."""
    from traits_agent.delivery.uploader import LIMIT_FORGET_AFTER

    api.inject(Fault(status=413, min_items=2, times=1))
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=0.0, max_items=4)
    await nursery.start(rig.lane.run)
    rig.add(level_ups(4))
    await settled(rig)
    assert "level_ups" in rig.uploader.byte_limit
    rig.add(level_ups(4 * LIMIT_FORGET_AFTER, start=4))
    await settled(rig)
    assert "level_ups" not in rig.uploader.byte_limit
    rig.add(level_ups(4, start=10_000))
    await settled(rig)
    assert api.requests[-1].item_count == 4


async def test_key_echoed_in_an_answer_never_reaches_status(
    autojump_clock, nursery, api, client, tmp_path
):
    """A proxy page echoing the PlayFab URL (with ?api_key=) is scrubbed before status."""
    api.inject(Fault(status=404, times=1, body={"message": f"no route /v1/playfab?api_key={KEY}"}))
    rig = Rig(tmp_path, api, client, "playfab", linger_s=0.0)
    await nursery.start(rig.lane.run)
    rig.add([{"EventName": "x"}])
    await api.wait_until(lambda: len(api.requests) >= 1)
    await trio.sleep(0.01)
    st = rig.uploader.state("playfab")
    assert st.last_error and KEY not in st.last_error
    await settled(rig)


def _corrupt_record(segment_path, index: int) -> None:
    """Flip a payload byte of the `index`-th frame (0-based) of a segment file."""
    data = bytearray(segment_path.read_bytes())
    pos = 0
    for _ in range(index):
        pos += 24 + int.from_bytes(data[pos + 4 : pos + 8], "little")
    data[pos + 24] ^= 0x01
    segment_path.write_bytes(bytes(data))


async def test_idempotency_keys_of_split_parts_follow_real_seqs(
    autojump_clock, nursery, api, client, tmp_path
):
    """A damaged record skipped in the middle leaves a gap in the batch's seqs: each part of
    a split batch is keyed by its own seqs. Before: the second part was keyed first_seq + 4
    = 5, i.e. as the items 5..9, a set other items can have (a server dedupes them away)."""
    api.inject(Fault(status=413, min_items=6, times=None))
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=0.0)
    for item in level_ups(10):  # seqs 1..10, user_id = seq - 1
        assert rig.queue.append(json.dumps(item).encode())
    rig.queue.close()
    (segment,) = (tmp_path / "queue" / "level_ups").glob("*.seg")
    _corrupt_record(segment, 4)  # seq 5
    rig.reopen(linger_s=0.0)
    await nursery.start(rig.lane.run)
    await api.wait_for_items(9)
    await settled(rig)
    assert rig.queue.corrupt_skipped == 1
    delivered = [int(i["user_id"]) + 1 for i in api.received["level_ups"]]
    assert delivered == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    keys = [r.idempotency_key for r in api.requests]
    assert [r.item_count for r in api.requests] == [9, 4, 5]

    def key(name: str) -> str:  # consecutive seqs: sha256 of agent/resource/first/count
        return hashlib.sha256(name.encode()).hexdigest()[:32]

    assert keys[1:] == [key("test/level_ups/1/4"), key("test/level_ups/6/5")]
    assert keys[0] not in (key("test/level_ups/1/9"), *keys[1:])


async def test_key_used_as_a_json_key_never_reaches_the_dead_letter_file(
    autojump_clock, nursery, api, client, tmp_path
):
    """`{"errors": {"<KEY>": ...}}`: scrub() cleaned values only, so the key was written to the
    dead-letter file as a JSON key (issue 7, item 10)."""
    api.inject(Fault(status=422, times=1, body={"message": "no", "errors": {KEY: ["unknown"]}}))
    rig = Rig(tmp_path, api, client, "playfab", linger_s=0.0)
    await nursery.start(rig.lane.run)
    rig.add([{"EventName": "x"}])
    await settled(rig)
    text = rig.dead.path("playfab").read_text()
    assert KEY not in text
    assert json.loads(text)["errors"] == {"***": ["unknown"]}
