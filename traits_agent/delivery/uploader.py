"""Uploader: turns one batch into HTTP requests until every item is delivered or dead-lettered.

The answer table (interface §4) is `classify()`; `Uploader.deliver()` acts on it:

==========================  ===============================================================
2xx                         delivered
429 / 503 + Retry-After     wait as told (clamped 1 s .. 15 min), retry
408, 429, 5xx, transport    full-jitter exponential backoff, capped, retry — forever: data
                            leaves the queue only by delivery, dead letter or the disk quota
400, 422                    bisect to isolate the items the API rejects (it names a field, not
                            an item); deliver the rest; dead-letter the rejected single items
413                         split in halves and retry; the byte bound for later batches shrinks
401, 403                    hold (nothing is lost), state `auth_failed`, error log at most once a
                            minute, probe slowly
404, 405, 410               hold this resource, state `endpoint_error` (12traits has moved
                            endpoints before): a configuration problem, probe slowly
==========================  ===============================================================

Every request carries `Idempotency-Key`, stable across retries of the same items, so a server
that deduplicates can. Delivery is still at-least-once: a crash between the API's 2xx and the
queue's commit re-sends that batch after restart.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import structlog
import trio

from traits_agent import __version__
from traits_agent.delivery.backoff import Backoff, parse_retry_after
from traits_agent.delivery.deadletter import DeadLetters
from traits_agent.observe.log import RateLimited, add_secret, scrub
from traits_agent.observe.metrics import Counters
from traits_agent.schema import Resource

log = structlog.get_logger(__name__)

USER_AGENT = f"traits-agent/{__version__}"
#: while held on 401/403/404, probe at most this often
HOLD_PROBE_MIN_S = 5.0
HOLD_PROBE_MAX_S = 60.0
#: with at least this many items rejected one by one in a batch, and more than half of what was
#: tried, stop bisecting: it is schema drift, not a bad item
DRIFT_MIN_REJECTED = 16
#: a learned 413 size limit is forgotten after this many deliveries under it
LIMIT_FORGET_AFTER = 100
#: we read at most this much of an answer (the API's are tiny; a broken proxy's may not be)
MAX_ANSWER_BYTES = 64 * 1024


class Stopping(Exception):
    """Raised out of `deliver` when the agent stops while a batch waits to be retried; the
    batch is not committed and goes out again after restart."""


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"  # 400/422: the items are at fault
    TOO_LARGE = "too_large"  # 413
    AUTH = "auth_failed"  # 401/403
    ENDPOINT = "endpoint_error"  # 404/405/410


def classify(status: int) -> Outcome:
    """Map an HTTP status to what the agent does about it."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in (400, 422):
        return Outcome.REJECTED
    if status == 413:
        return Outcome.TOO_LARGE
    if status in (401, 403):
        return Outcome.AUTH
    if status in (404, 405, 410) or 300 <= status < 400:
        return Outcome.ENDPOINT
    return Outcome.RETRY  # 408, 429, 5xx and anything unexpected: the data is fine, try again


@dataclass
class UpstreamState:
    """What `status` shows about one resource's upstream."""

    state: str = "ok"  # ok | retrying | auth_failed | endpoint_error
    last_error: str | None = None
    last_error_at: str | None = None
    next_retry_at: float | None = None  # trio clock
    delivered: int = 0
    dead_lettered: int = 0
    requests: int = 0
    retries: int = 0


@dataclass
class RetryTimer:
    """Retry bookkeeping for one request that has not yet had an answer about its data;
    shared by the event uploader and the CSV spool, which log differently but wait alike."""

    backoff: Backoff
    attempt: int = 0
    hold_attempt: int = 0

    def failed(
        self,
        st: UpstreamState,
        outcome: Outcome,
        status: int,
        detail: dict,
        retry_after: float | None,
    ) -> tuple[str, float]:
        """Record a failed answer in `st`; return (error text, seconds to wait)."""
        error = str(detail.get("error") or f"HTTP {status} {detail.get('message', '')}".strip())
        st.last_error = error
        st.last_error_at = datetime.now(UTC).isoformat(timespec="seconds")
        if outcome in (Outcome.AUTH, Outcome.ENDPOINT):
            st.state = outcome.value
            delay = min(
                HOLD_PROBE_MAX_S, max(HOLD_PROBE_MIN_S, self.backoff.delay(self.hold_attempt))
            )
            self.hold_attempt += 1
        else:
            st.state = "retrying"
            delay = retry_after if retry_after is not None else self.backoff.delay(self.attempt)
            self.attempt += 1
        return error, delay


async def wait_to_retry(st: UpstreamState, delay: float, stopping: trio.Event) -> None:
    """Sleep `delay` (shown in status as the next retry); raise Stopping if the agent stops."""
    st.retries += 1
    st.next_retry_at = trio.current_time() + delay
    with trio.move_on_after(delay):
        await stopping.wait()
    if stopping.is_set():
        raise Stopping


#: PlayFab events posted one per request: how many requests at once (all resources together
#: stay within api.max_in_flight)
PLAYFAB_CONCURRENCY = 8


def worst_state(states: list[str]) -> str:
    """The state to show for several upstreams: the most serious one present."""
    for state in ("auth_failed", "endpoint_error", "retrying"):
        if state in states:
            return state
    return "ok"


def build_body(resource: Resource, payloads: list[bytes], playfab_arrays: bool = True) -> bytes:
    """The JSON body, assembled from the stored JSON documents without re-encoding them."""
    if resource.payload_key is None and not playfab_arrays and len(payloads) == 1:
        return payloads[0]  # playfab, one event per request: the event object itself
    items = b"[" + b",".join(payloads) + b"]"
    if resource.payload_key is None:  # playfab: a JSON array of events
        return items
    return b'{"' + resource.payload_key.encode() + b'":' + items + b"}"


def idempotency_key(agent_id: str, resource: str, first_seq: int, count: int) -> str:
    """Stable for the same items across retries and restarts (seqs survive restarts)."""
    digest = hashlib.sha256(f"{agent_id}/{resource}/{first_seq}/{count}".encode()).hexdigest()
    return digest[:32]


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
        request_deadline_s: float = 60.0,
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
        self.states: dict[str, UpstreamState] = {}
        #: shrinks after a 413 so later batches fit (bytes of JSON body)
        self.byte_limit: dict[str, int] = {}
        self._limit_successes: dict[str, int] = {}
        self._ratelimit = RateLimited(interval=60.0, clock=trio.current_time)
        self._stopping = trio.Event()
        #: a request (send + answer) that takes longer than this is abandoned as a timeout;
        #: httpx's timeouts are per read, so a server trickling bytes would never trip them
        self.request_deadline_s = request_deadline_s
        add_secret(api_key)  # answers echoing the key are scrubbed before status shows them

    def stop(self) -> None:
        """Abandon retry waits now (requests on the wire are left to finish)."""
        self._stopping.set()

    def state(self, resource: str) -> UpstreamState:
        return self.states.setdefault(resource, UpstreamState())

    async def deliver(self, resource: Resource, payloads: list[bytes], first_seq: int) -> None:
        """Return once every payload is delivered or dead-lettered. Cancellation is safe: the
        caller has not committed anything, so the batch is re-read after restart."""
        if resource.payload_key is None and not self.playfab_arrays and len(payloads) > 1:
            await self._deliver_each(resource, payloads, first_seq)
            return
        st = self.state(resource.name)
        # parts still to send, in queue order; (offset in batch, payloads)
        parts: list[tuple[int, list[bytes]]] = [(0, payloads)]
        tried = rejected = 0
        drift = False
        while parts:
            offset, part = parts.pop(0)
            key = idempotency_key(self.agent_id, resource.name, first_seq + offset, len(part))
            outcome, status, detail = await self._send_until_decided(resource, part, key, st)
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
        self, resource: Resource, payloads: list[bytes], first_seq: int
    ) -> None:
        """PlayFab, one event per request (the shape PlayFab's own webhook posts unless the
        account enabled arrays), PLAYFAB_CONCURRENCY at a time (and within max_in_flight), so
        a batch of 1000 events does not take 1000 round trips end to end."""
        slots = trio.Semaphore(PLAYFAB_CONCURRENCY)

        async def one(index: int, payload: bytes) -> None:
            try:
                await self.deliver(resource, [payload], first_seq + index)
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for index, payload in enumerate(payloads):
                await slots.acquire()
                nursery.start_soon(one, index, payload)

    async def _dead_letter(
        self, resource: Resource, part: list[bytes], status: int, detail: dict, drift: bool
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
                await wait_to_retry(st, self.backoff.delay(attempt), self._stopping)
                attempt += 1
        st.dead_lettered += len(part)
        self.counters.inc("dead_lettered_items", len(part), resource=resource.name, reason=reason)
        if lost:
            self.counters.inc(
                "dropped_items", lost, resource=resource.name, reason="dead_letter_rotated"
            )
        key = f"dead_letter/{resource.name}"
        suppressed = self._ratelimit(key)
        if suppressed is not None:
            log.warning(
                "dead_lettered",
                resource=resource.name,
                items=len(part),
                status=status,
                message=detail.get("message"),
                errors=detail.get("errors"),
                suppressed=suppressed,
            )

    async def _send_until_decided(
        self, resource: Resource, part: list[bytes], key: str, st: UpstreamState
    ) -> tuple[Outcome, int, dict]:
        """POST `part` until the answer is about the items (2xx, 400/422/413), not about
        the connection, the server's load or our credentials."""
        timer = RetryTimer(self.backoff)
        while True:
            limit = self.byte_limit.get(resource.name)
            body = build_body(resource, part, self.playfab_arrays)
            if limit is not None and len(body) > limit and len(part) > 1:
                return Outcome.TOO_LARGE, 413, {"message": "split to fit the learned size limit"}
            status, detail, retry_after = await self._post(resource, body, key, len(part))
            st.requests += 1
            outcome = classify(status) if status else Outcome.RETRY
            if outcome in (Outcome.DELIVERED, Outcome.REJECTED, Outcome.TOO_LARGE):
                # an answer about the data: the upstream itself is fine
                if st.state != "ok":
                    log.info("upstream_recovered", resource=resource.name, previous=st.state)
                st.state, st.next_retry_at = "ok", None
            if outcome is Outcome.DELIVERED:
                self._learned_limit_worked(resource.name)
                return outcome, status, detail
            if outcome in (Outcome.REJECTED, Outcome.TOO_LARGE):
                if outcome is Outcome.TOO_LARGE and len(part) > 1:
                    # learn from batches only: a single item too large is that item's fault
                    self.byte_limit[resource.name] = max(1024, len(body) // 2)
                    self._limit_successes[resource.name] = 0
                return outcome, status, detail
            error, delay = timer.failed(st, outcome, status, detail, retry_after)
            if outcome in (Outcome.AUTH, Outcome.ENDPOINT):
                self._log_hold(resource, outcome, status, error, delay)
            else:
                log.warning(
                    "upload_retrying",
                    resource=resource.name,
                    items=len(part),
                    status=status or None,
                    error=error,
                    attempt=timer.attempt,
                    retry_in_s=round(delay, 3),
                )
            self.counters.inc("upload_retries", resource=resource.name, reason=_reason(status))
            await wait_to_retry(st, delay, self._stopping)

    def _learned_limit_worked(self, name: str) -> None:
        """Forget a learned 413 limit after LIMIT_FORGET_AFTER deliveries under it: a proxy's
        passing 413 must not split every later batch for the rest of the agent's life."""
        if name not in self.byte_limit:
            return
        self._limit_successes[name] = self._limit_successes.get(name, 0) + 1
        if self._limit_successes[name] >= LIMIT_FORGET_AFTER:
            del self.byte_limit[name]
            self._limit_successes.pop(name, None)

    def _log_hold(
        self, resource: Resource, outcome: Outcome, status: int, error: str, delay: float
    ) -> None:
        suppressed = self._ratelimit(f"{outcome.value}/{resource.name}")
        if suppressed is None:
            return
        if outcome is Outcome.AUTH:
            log.error(
                "upload_auth_failed",
                resource=resource.name,
                status=status,
                error=error,
                hint="check the API key; delivery is held, nothing is dropped",
                probe_in_s=round(delay, 1),
                suppressed=suppressed,
            )
        else:
            log.error(
                "upload_endpoint_error",
                resource=resource.name,
                status=status,
                error=error,
                path=resource.path,
                hint="check api.endpoint; this resource is held, nothing is dropped",
                probe_in_s=round(delay, 1),
                suppressed=suppressed,
            )

    async def _post(
        self, resource: Resource, body: bytes, key: str, items: int
    ) -> tuple[int, dict, float | None]:
        """One request. Returns (status or 0 for transport errors, detail, retry_after)."""
        params = {"api_key": self.api_key} if resource.payload_key is None else None
        headers = {
            "Authorization": f"Bearer {self.api_key}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Idempotency-Key": key,
        }
        async with self.limiter:
            start = trio.current_time()
            request = self.client.build_request(
                "POST", resource.path, content=body, headers=headers, params=params
            )
            try:
                with trio.move_on_after(self.request_deadline_s) as deadline:
                    response = await self.client.send(request, stream=True)
                    raw = await read_body(response)
            except httpx.HTTPError as e:
                # the message may echo the URL, which for playfab holds the key
                return 0, {"error": scrub(f"{type(e).__name__}: {e}")}, None
            finally:
                self.counters.inc("upload_requests", resource=resource.name)
            if deadline.cancelled_caught:
                return 0, {"error": f"no answer within {self.request_deadline_s:g} s"}, None
            elapsed = trio.current_time() - start
            self.counters.observe("upload_seconds", elapsed, resource=resource.name)
        detail, retry_after = read_answer(response.status_code, response.headers, raw)
        log.debug(
            "upload_answered",
            resource=resource.name,
            items=items,
            bytes=len(body),
            status=response.status_code,
            seconds=round(elapsed, 4),
        )
        return response.status_code, detail, retry_after


async def read_body(response: httpx.Response) -> bytes:
    """At most MAX_ANSWER_BYTES of a streamed response's body, then close it. A body that
    breaks off or cannot be decoded reads as what arrived: the status line is the answer."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= MAX_ANSWER_BYTES:
                break
    except httpx.HTTPError:
        pass
    finally:
        await response.aclose()
    return b"".join(chunks)[:MAX_ANSWER_BYTES]


def read_answer(status: int, headers: httpx.Headers, body: bytes) -> tuple[dict, float | None]:
    """The API's JSON answer (or its first 200 characters as `message`), with any secret
    scrubbed, and on 429/503 the clamped Retry-After in seconds."""
    detail: dict = {}
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            detail = parsed
    except ValueError:
        detail = {"message": body[:200].decode("utf-8", "replace")}
    retry_after = None
    if status in (429, 503):
        retry_after = parse_retry_after(headers.get("retry-after"))
    return scrub(detail), retry_after


def _reason(status: int) -> str:
    if status == 0:
        return "transport"
    return str(status)


def make_client(base_url: str, *, connect_timeout: float, timeout: float, max_in_flight: int):
    """The one shared client: keep-alive, explicit timeouts, no redirects (a redirect means the
    endpoint is wrong, and following it would re-send the key elsewhere)."""
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        limits=httpx.Limits(
            max_connections=max_in_flight + 4, max_keepalive_connections=max_in_flight + 4
        ),
        follow_redirects=False,
        trust_env=not base_url.startswith("http://"),
    )
