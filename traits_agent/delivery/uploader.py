"""Uploader: turns one batch into HTTP requests until every item is delivered or dead-lettered.

What an answer means, the retries, holds, deadline and capped read are the one upstream
policy (`policy.py`, shared with the CSV spool). What is particular to batches of events:

==========================  ===============================================================
400, 422                    bisect to isolate the items the API rejects (it names a field, not
                            an item); deliver the rest; dead-letter the rejected single items;
                            stop bisecting when most items fail (schema drift)
413                         split in halves and retry; the byte bound for later batches shrinks
                            (forgotten again after LIMIT_FORGET_AFTER deliveries under it)
==========================  ===============================================================

Every request carries `Idempotency-Key`, stable across retries of the same items, so a server
that deduplicates can. Delivery is still at-least-once: a crash between the API's 2xx and the
queue's commit re-sends that batch after restart.
"""

from __future__ import annotations

import collections
import functools
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import structlog
import trio

from traits_agent.delivery.backoff import Backoff
from traits_agent.delivery.deadletter import DeadLetters
from traits_agent.delivery.policy import (
    DEFAULT_REQUEST_DEADLINE_S,
    USER_AGENT,
    Answer,
    Outcome,
    UpstreamPolicy,
    UpstreamState,
    Voice,
)
from traits_agent.observe.log import add_secret, scrub
from traits_agent.observe.metrics import Counters
from traits_agent.schema import Resource

log = structlog.get_logger(__name__)

#: with at least this many items rejected one by one in a batch, and more than half of what was
#: tried, stop bisecting: it is schema drift, not a bad item
DRIFT_MIN_REJECTED = 16
#: a learned 413 size limit is forgotten after this many deliveries under it
LIMIT_FORGET_AFTER = 100
#: dead-lettered seq ranges remembered per resource (for `send --wait`)
DEAD_LETTER_SEQS_KEPT = 256

VOICE = Voice(
    retrying="upload_retrying",
    auth_failed="upload_auth_failed",
    endpoint_error="upload_endpoint_error",
    auth_hint="check the API key; delivery is held, nothing is dropped",
    endpoint_hint="check api.endpoint; this resource is held, nothing is dropped",
)


#: PlayFab events posted one per request: how many requests at once (all resources together
#: stay within api.max_in_flight)
PLAYFAB_CONCURRENCY = 8


def build_body(resource: Resource, payloads: list[bytes], playfab_arrays: bool = True) -> bytes:
    """The JSON body, assembled from the stored JSON documents without re-encoding them, in
    one copy (a 1000-item body is ~150 KB: each extra concatenation of it cost ~15 µs)."""
    if resource.payload_key is None and not playfab_arrays and len(payloads) == 1:
        return payloads[0]  # playfab, one event per request: the event object itself
    if resource.payload_key is None:  # playfab: a JSON array of events
        head, tail = b"[", b"]"
    else:
        head, tail = b'{"' + resource.payload_key.encode() + b'":[', b"]}"
    if not payloads:
        return head + tail
    if len(payloads) == 1:
        return head + payloads[0] + tail
    # the wrapper rides on the first and last payloads (small copies): one join of the rest
    return b",".join([head + payloads[0], *payloads[1:-1], payloads[-1] + tail])


def idempotency_key(agent_id: str, resource: str, seqs: Sequence[int]) -> str:
    """Stable for the same items across retries and restarts (seqs survive restarts), and
    named by their own seqs: after a skipped damaged record they are not consecutive, and a
    key computed as first + count would name other items (a server would drop them as
    duplicates). Consecutive seqs keep the key they always had."""
    first, count = seqs[0], len(seqs)
    name = f"{agent_id}/{resource}/{first}/{count}"
    if seqs[-1] - first != count - 1:
        name += "/" + ",".join(map(str, seqs))
    return hashlib.sha256(name.encode()).hexdigest()[:32]


class Uploader:
    """Delivers batches for every resource over one shared HTTP client."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        api_key: str,
        counters: Counters,
        dead_letters: DeadLetters,
        backoff: Backoff,
        max_in_flight: int = 4,
        agent_id: str = "",
        request_deadline_s: float = DEFAULT_REQUEST_DEADLINE_S,
        playfab_arrays: bool = False,
    ) -> None:
        self.client = client
        #: post PlayFab events as JSON arrays (the account enabled PlayFab's "Post multiple
        #: events in JSON array"); by default one event per request, as the webhook does
        self.playfab_arrays = playfab_arrays
        self._dead_letter_lock = trio.Lock()
        self.api_key = api_key
        self.counters = counters
        self.dead_letters = dead_letters
        self.backoff = backoff
        self.limiter = trio.CapacityLimiter(max_in_flight)
        self.agent_id = agent_id
        self.policy = UpstreamPolicy(
            client, counters=counters, backoff=backoff, request_deadline_s=request_deadline_s
        )
        self.states: dict[str, UpstreamState] = {}
        #: per (resource path, API key): what each POST shares (`_head`)
        self._heads: dict[tuple[str, str], tuple[httpx.URL, httpx.Headers]] = {}
        #: per resource, the last seq ranges dead-lettered (first, last, status, message):
        #: `traits-agent send --wait` tells "rejected by the API" from "delivered" with it
        self.dead_lettered_seqs: dict[str, collections.deque] = {}
        #: shrinks after a 413 so later batches fit (bytes of JSON body)
        self.byte_limit: dict[str, int] = {}
        self._limit_successes: dict[str, int] = {}
        add_secret(api_key)  # answers echoing the key are scrubbed before status shows them

    @property
    def request_deadline_s(self) -> float:
        return self.policy.request_deadline_s

    def stop(self) -> None:
        """Abandon retry waits now (requests on the wire are left to finish)."""
        self.policy.stop()

    def state(self, resource: str) -> UpstreamState:
        return self.states.setdefault(resource, UpstreamState())

    async def deliver(
        self, resource: Resource, payloads: list[bytes], seqs: Sequence[int] | int
    ) -> None:
        """Return once every payload is delivered or dead-lettered. Cancellation is safe: the
        caller has not committed anything, so the batch is re-read after restart.

        `seqs`: the queue seq of each payload (an int: the first of consecutive ones)."""
        if isinstance(seqs, int):
            seqs = range(seqs, seqs + len(payloads))
        if resource.payload_key is None and not self.playfab_arrays and len(payloads) > 1:
            await self._deliver_each(resource, payloads, seqs)
            return
        st = self.state(resource.name)
        # parts still to send, in queue order; (offset in batch, payloads)
        parts: list[tuple[int, list[bytes]]] = [(0, payloads)]
        tried = rejected = 0
        drift = False
        while parts:
            offset, part = parts.pop(0)
            key = idempotency_key(self.agent_id, resource.name, seqs[offset : offset + len(part)])
            answer = await self._send_until_decided(resource, part, key, st)
            status, detail, outcome = answer.status, answer.detail, answer.outcome
            if outcome is Outcome.DELIVERED:
                tried += len(part)
                st.delivered += len(part)
                self.counters.inc("delivered_items", len(part), resource=resource.name)
                self.counters.inc("delivered_batches", resource=resource.name)
                log.info(
                    "batch_delivered",
                    resource=resource.name,
                    items=len(part),
                    status=status,
                    message=detail.get("message"),
                )
                continue
            # REJECTED or TOO_LARGE: the answer is about these items. A too-large part is
            # always split (its items were maybe never even sent); a rejected one is bisected
            # until drift says the schema, not an item, is wrong.
            if len(part) > 1 and (outcome is Outcome.TOO_LARGE or not drift):
                half = len(part) // 2
                parts[0:0] = [(offset, part[:half]), (offset + half, part[half:])]
                continue
            tried += len(part)
            rejected += len(part)
            await self._dead_letter(resource, part, status, detail, drift)
            self.dead_lettered_seqs.setdefault(
                resource.name, collections.deque(maxlen=DEAD_LETTER_SEQS_KEPT)
            ).append(
                (
                    seqs[offset],  # the part's own seqs: not consecutive after damage
                    seqs[offset + len(part) - 1],
                    status,
                    scrub(str(detail.get("message", ""))),
                )
            )
            if not drift and rejected >= DRIFT_MIN_REJECTED and rejected * 2 > tried:
                drift = True
                log.error(
                    "schema_drift_suspected",
                    resource=resource.name,
                    rejected=rejected,
                    tried=tried,
                    status=status,
                    message=detail.get("message"),
                    hint="most items are rejected: check the event schema against the API",
                )

    async def _deliver_each(
        self, resource: Resource, payloads: list[bytes], seqs: Sequence[int]
    ) -> None:
        """PlayFab, one event per request (the shape PlayFab's own webhook posts unless the
        account enabled arrays), PLAYFAB_CONCURRENCY at a time (and within max_in_flight), so
        a batch of 1000 events does not take 1000 round trips end to end."""
        slots = trio.Semaphore(PLAYFAB_CONCURRENCY)

        async def one(index: int, payload: bytes) -> None:
            try:
                await self.deliver(resource, [payload], [seqs[index]])
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for index, payload in enumerate(payloads):
                await slots.acquire()
                nursery.start_soon(one, index, payload)

    async def _dead_letter(
        self,
        resource: Resource,
        part: list[bytes],
        status: int,
        detail: Mapping[str, Any],
        drift: bool,
    ) -> None:
        """Write the rejected items to the dead-letter file, retrying until it works: the
        batch is committed (and the items leave the queue) only after this returns."""
        st = self.state(resource.name)
        reason = "schema_drift" if drift else ("too_large" if status == 413 else "rejected")
        write = functools.partial(
            self.dead_letters.add,
            resource.name,
            part,
            status=status,
            message=str(detail.get("message", "")),
            errors=detail.get("errors"),
        )
        attempt = 0
        while True:
            try:
                async with self._dead_letter_lock:  # PlayFab's concurrent single events
                    lost = await trio.to_thread.run_sync(write)
                break
            except (OSError, ValueError) as e:
                log.error(
                    "dead_letter_write_failed",
                    resource=resource.name,
                    items=len(part),
                    error=str(e),
                    hint="the items stay queued until the dead-letter file can be written",
                )
                await self.policy.wait(st, self.backoff.delay(attempt))
                attempt += 1
        st.dead_lettered += len(part)
        self.counters.inc("dead_lettered_items", len(part), resource=resource.name, reason=reason)
        if lost:
            self.counters.inc(
                "dropped_items", lost, resource=resource.name, reason="dead_letter_rotated"
            )
        log.warning(
            "dead_lettered",
            resource=resource.name,
            items=len(part),
            status=status,
            message=detail.get("message"),
            errors=detail.get("errors"),
        )

    async def _send_until_decided(
        self, resource: Resource, part: list[bytes], key: str, st: UpstreamState
    ) -> Answer:
        """POST `part` until the answer is about the items (2xx, 400/422/413), not about
        the connection, the server's load or our credentials."""
        body = build_body(resource, part, self.playfab_arrays)
        limit = self.byte_limit.get(resource.name)
        if limit is not None and len(body) > limit and len(part) > 1:
            return Answer(413, {"message": "split to fit the learned size limit"})
        answer = await self.policy.until_decided(
            st,
            resource.name,
            functools.partial(self._post, resource, body, key, len(part)),
            voice=VOICE,
            context={"resource": resource.name, "items": len(part)},
            hold_context={"resource": resource.name, "path": resource.path},
        )
        if answer.outcome is Outcome.DELIVERED:
            self._learned_limit_worked(resource.name)
        elif answer.outcome is Outcome.TOO_LARGE and len(part) > 1:
            # learn from batches only: a single item too large is that item's fault
            self.byte_limit[resource.name] = max(1024, len(body) // 2)
            self._limit_successes[resource.name] = 0
        return answer

    def _head(self, resource: Resource) -> tuple[httpx.URL, httpx.Headers]:
        """What every POST of `resource` shares, as the client builds it (its base URL, the
        query, its default headers merged with ours), made once: `client.build_request` per
        POST was 12 % of a POST's CPU (cProfile). A request made from it, with its
        Idempotency-Key and body, is the one `build_request` makes (Host and Content-Length
        are left out here: `httpx.Request` adds them, in the same places)."""
        params = {"api_key": self.api_key} if resource.payload_key is None else None
        headers = {
            "Authorization": f"Bearer {self.api_key}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        probe = self.client.build_request("POST", resource.path, headers=headers, params=params)
        shared = httpx.Headers(
            [(k, v) for k, v in probe.headers.raw if k.lower() not in (b"host", b"content-length")]
        )
        head = self._heads[(resource.path, self.api_key)] = (probe.url, shared)
        return head

    def _learned_limit_worked(self, name: str) -> None:
        """Forget a learned 413 limit after LIMIT_FORGET_AFTER deliveries under it: a proxy's
        passing 413 must not split every later batch for the rest of the agent's life."""
        if name not in self.byte_limit:
            return
        self._limit_successes[name] = self._limit_successes.get(name, 0) + 1
        if self._limit_successes[name] >= LIMIT_FORGET_AFTER:
            del self.byte_limit[name]
            self._limit_successes.pop(name, None)

    async def _post(self, resource: Resource, body: bytes, key: str, items: int) -> Answer:
        """One request (under the policy's deadline and read cap)."""
        head = self._heads.get((resource.path, self.api_key)) or self._head(resource)
        url, shared = head
        headers = httpx.Headers(shared)
        headers["Idempotency-Key"] = key
        # a free slot is taken without `async with`'s extra trip through the scheduler (the
        # request itself yields at every socket operation); a full limiter waits as before
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            await self.limiter.acquire()
        try:
            request = httpx.Request("POST", url, headers=headers, content=body)
            answer = await self.policy.exchange(request, label=resource.name)
        finally:
            self.limiter.release()
        log.debug(
            "upload_answered",
            resource=resource.name,
            items=items,
            bytes=len(body),
            status=answer.status,
        )
        return answer
