"""The one upstream policy (delivery/policy.py), tested once for both uploaders: the answer table,
the retry schedule, and every request bounded in time (deadline) and memory (capped read),
against the real fake API on loopback, on trio's MockClock."""

from __future__ import annotations

import random

import pytest
import trio

from traits_agent.delivery.backoff import Backoff
from traits_agent.delivery.policy import (
    MAX_ANSWER_BYTES,
    Answer,
    Outcome,
    RetrySchedule,
    UpstreamHealth,
    UpstreamPolicy,
    UpstreamState,
    Voice,
    classify,
    worst_state,
)
from traits_agent.errors import Stopping
from traits_agent.fakeapi import Fault
from traits_agent.observe.metrics import Counters

PATH = "/v1/level-ups"
BODY = b'{"level_ups":[{"timestamp":"2026-11-28 12:00:00","user_id":"1","level":2}]}'
VOICE = Voice("t_retrying", "t_auth_failed", "t_endpoint_error", "auth hint", "endpoint hint")


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (201, Outcome.DELIVERED),
        (400, Outcome.REJECTED),
        (422, Outcome.REJECTED),
        (413, Outcome.TOO_LARGE),
        (401, Outcome.AUTH),
        (403, Outcome.AUTH),
        (404, Outcome.ENDPOINT),
        (405, Outcome.ENDPOINT),
        (410, Outcome.ENDPOINT),
        (301, Outcome.ENDPOINT),
        (0, Outcome.RETRY),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (503, Outcome.RETRY),
        (418, Outcome.RETRY),
    ],
)
def test_classify(status: int, outcome: Outcome) -> None:
    """Each status means what the table in the module docstring says."""
    assert classify(status) is outcome


def test_worst_state_shows_the_most_serious() -> None:
    """auth_failed > endpoint_error > retrying > ok, whatever the order given."""
    assert worst_state([]) == "ok"
    assert worst_state(["ok", "retrying"]) == "retrying"
    assert worst_state(["retrying", "endpoint_error", "ok"]) == "endpoint_error"
    assert worst_state(["endpoint_error", "auth_failed"]) == "auth_failed"
    assert worst_state([UpstreamHealth.RETRYING]) == "retrying"


def test_retry_schedule_backs_off_honours_retry_after_and_probes_holds_slowly() -> None:
    """Retries follow the jittered backoff unless Retry-After says otherwise; a hold probes
    every 5..60 s on its own attempt count."""
    schedule = RetrySchedule(Backoff(initial_s=0.5, max_s=300.0, rng=random.Random(2)))
    reference = Backoff(initial_s=0.5, max_s=300.0, rng=random.Random(2))
    st = UpstreamState()
    assert schedule.failed(st, Answer(503)) == reference.delay(0)
    assert st.state == "retrying" and st.last_error == "HTTP 503"
    assert schedule.failed(st, Answer(429, {"message": "slow down"}, retry_after=7.0)) == 7.0
    assert st.last_error == "HTTP 429 slow down"
    holds = [schedule.failed(st, Answer(401)) for _ in range(12)]
    assert st.state == "auth_failed"
    assert all(5.0 <= d <= 60.0 for d in holds)
    assert schedule.attempt == 2 and schedule.hold_attempt == 12
    schedule.failed(st, Answer(404))
    assert st.state == "endpoint_error"


def make_policy(client, deadline_s: float = 60.0) -> UpstreamPolicy:
    return UpstreamPolicy(
        client,
        counters=Counters(),
        backoff=Backoff(initial_s=0.5, max_s=8.0, rng=random.Random(1)),
        request_deadline_s=deadline_s,
    )


async def test_a_huge_answer_is_read_up_to_64_kib(autojump_clock, api, client) -> None:
    """A 64 MiB answer: 64 KiB are read, the connection is dropped, the status still counts."""
    huge = api.inject(Fault(path=PATH, status=201, body_size=64 * 1024 * 1024))
    policy = make_policy(client)
    answer = await policy.exchange(client.build_request("POST", PATH, content=BODY), label="t")
    assert answer.status == 201 and answer.outcome is Outcome.DELIVERED
    assert answer.detail == {"message": "x" * 200}  # not JSON: its first 200 characters
    assert MAX_ANSWER_BYTES <= huge.body_sent < 16 * 1024 * 1024
    assert policy.counters.get("upload_requests", resource="t") == 1


async def test_a_trickled_answer_is_abandoned_at_the_deadline(autojump_clock, api, client) -> None:
    """One byte a second never trips a per-read timeout; the request deadline ends it exactly
    at 30 s, as a transport failure (status 0), and no latency is recorded."""
    api.inject(Fault(path=PATH, status=201, trickle=1.0, body_size=1000))
    policy = make_policy(client, deadline_s=30.0)
    t0 = trio.current_time()
    answer = await policy.exchange(client.build_request("POST", PATH, content=BODY), label="t")
    assert trio.current_time() == pytest.approx(t0 + 30.0)
    assert answer == Answer(0, {"error": "no answer within 30 s"})
    assert answer.outcome is Outcome.RETRY and answer.reason == "transport"
    assert policy.counters.get("upload_requests", resource="t") == 1
    assert "upload_seconds" not in policy.counters.histograms


async def test_until_decided_retries_until_the_answer_is_about_the_data(
    autojump_clock, api, client
) -> None:
    """503, 401, then 400: two waits (backoff, then a 5..60 s probe), and the 400 returns with
    the upstream back to ok."""
    api.inject(Fault(path=PATH, status=503))
    api.inject(Fault(path=PATH, status=401))
    api.inject(Fault(path=PATH, status=400))
    policy = make_policy(client)
    st = UpstreamState()

    async def attempt() -> Answer:
        return await policy.exchange(client.build_request("POST", PATH, content=BODY), label="t")

    answer = await policy.until_decided(st, "t", attempt, voice=VOICE, context={}, hold_context={})
    assert answer.status == 400 and answer.outcome is Outcome.REJECTED
    assert [r.status for r in api.requests] == [503, 401, 400]
    assert st.state == "ok" and st.next_retry_at is None
    assert st.requests == 3 and st.retries == 2
    assert policy.counters.get("upload_retries", resource="t", reason="503") == 1
    assert policy.counters.get("upload_retries", resource="t", reason="401") == 1


async def test_stop_ends_a_retry_wait_with_stopping(autojump_clock, api, client) -> None:
    """stop() during a wait raises Stopping at once: nothing is decided, nothing committed."""
    api.inject(Fault(path=PATH, status=503, times=None))
    policy = make_policy(client)
    st = UpstreamState()

    async def attempt() -> Answer:
        return await policy.exchange(client.build_request("POST", PATH, content=BODY), label="t")

    async def stop_soon() -> None:
        await trio.sleep(100)
        policy.stop()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_soon)
        t0 = trio.current_time()
        with pytest.raises(Stopping):
            await policy.until_decided(st, "t", attempt, voice=VOICE, context={}, hold_context={})
        assert trio.current_time() == pytest.approx(t0 + 100)
    assert st.state == "retrying"
