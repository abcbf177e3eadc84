"""The one upstream policy: how a request goes out, what its answer means, what we do about it.

Both uploaders use it — the events uploader (`uploader.py`, JSON batches) and the CSV spool
(`spool.py`, one file per request) — so a safeguard added here protects both:

==========================  ===============================================================
2xx                         delivered
400, 422                    about the data: the caller dead-letters (events: bisects first)
413                         about the data: too large (events: split; CSV: set aside)
429 / 503 + Retry-After     wait as told (clamped 1 s .. 15 min), retry
408, 429, 5xx, transport,   full-jitter exponential backoff, capped, retry — forever: data
no answer by the deadline   leaves only by delivery, dead letter or the disk quota
401, 403                    hold (nothing is lost), state `auth_failed`, probe every 5..60 s
404, 405, 410, 3xx          hold, state `endpoint_error` (12traits has moved endpoints before)
==========================  ===============================================================

Every request is bounded in time and memory, whatever the server does:

- a *per-request deadline* (send + whole answer): httpx's timeouts are per read, so a server
  trickling one byte a second would never trip them; past the deadline the request is
  abandoned and counts as a transport failure;
- a *capped answer read*: at most `MAX_ANSWER_BYTES` (64 KiB) of the body is read, then the
  response is closed — the API's answers are tiny, a broken proxy's may be a gigabyte. Never
  `response.content`.

States shown by `status`, `/metrics` and `STATUS=` are the `UpstreamHealth` values; when
several upstreams are summarised, `worst_state` picks the most serious.
"""

from __future__ import annotations

import enum
import json
import urllib.request
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog
import trio

from traits_agent import __version__
from traits_agent.delivery.backoff import Backoff, parse_retry_after
from traits_agent.delivery.client import AgentClient
from traits_agent.delivery.transport import LeanTransport
from traits_agent.errors import Stopping
from traits_agent.observe.log import scrub
from traits_agent.observe.metrics import Counters

log = structlog.get_logger(__name__)

__all__ = [
    "MAX_ANSWER_BYTES",
    "USER_AGENT",
    "Answer",
    "Outcome",
    "RetrySchedule",
    "Stopping",
    "UpstreamHealth",
    "UpstreamPolicy",
    "UpstreamState",
    "classify",
    "make_client",
    "worst_state",
]

USER_AGENT = f"traits-agent/{__version__}"
#: while held on 401/403/404, probe at most this often
HOLD_PROBE_MIN_S = 5.0
HOLD_PROBE_MAX_S = 60.0
#: we read at most this much of an answer (the API's are tiny; a broken proxy's may not be)
MAX_ANSWER_BYTES = 64 * 1024
#: an answer nested deeper than this is kept as text only (the API's answers nest 3 deep)
MAX_ANSWER_DEPTH = 16
#: how long closing an abandoned response may take (it runs shielded from cancellation)
CLOSE_TIMEOUT_S = 1.0
DEFAULT_REQUEST_DEADLINE_S = 60.0


class Outcome(enum.Enum):
    """What an answer means for the data that was sent."""

    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"  # 400/422: the items are at fault
    TOO_LARGE = "too_large"  # 413
    AUTH = "auth_failed"  # 401/403
    ENDPOINT = "endpoint_error"  # 404/405/410


class UpstreamHealth(enum.StrEnum):
    """The state of one upstream, most serious last (a str: JSON and labels show the value)."""

    OK = "ok"
    RETRYING = "retrying"
    ENDPOINT_ERROR = "endpoint_error"
    AUTH_FAILED = "auth_failed"


#: outcomes that hold delivery (a configuration problem), and the state each shows
HOLDS = {Outcome.AUTH: UpstreamHealth.AUTH_FAILED, Outcome.ENDPOINT: UpstreamHealth.ENDPOINT_ERROR}
#: outcomes that are an answer about the data: the upstream itself is fine
ABOUT_THE_DATA = (Outcome.DELIVERED, Outcome.REJECTED, Outcome.TOO_LARGE)


def classify(status: int) -> Outcome:
    """Map an HTTP status (0: no answer) to what the agent does about it."""
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
    return Outcome.RETRY  # 0, 408, 429, 5xx and anything unexpected: the data is fine, retry


def worst_state(states: list[str]) -> str:
    """The state to show for several upstreams: the most serious one present."""
    for state in reversed(UpstreamHealth):
        if state is not UpstreamHealth.OK and state in states:
            return state.value
    return UpstreamHealth.OK.value


@dataclass
class UpstreamState:
    """What `status` shows about one upstream (an events resource or a CSV kind)."""

    state: str = UpstreamHealth.OK.value
    last_error: str | None = None
    last_error_at: str | None = None
    next_retry_at: float | None = None  # trio clock
    delivered: int = 0
    dead_lettered: int = 0
    requests: int = 0
    retries: int = 0

    def next_retry_in(self, now: float) -> float | None:
        """Seconds until the next retry (None when none is scheduled), as `status` shows it."""
        if self.next_retry_at is None:
            return None
        return round(max(0.0, self.next_retry_at - now), 1)


@dataclass(frozen=True)
class Answer:
    """The API's answer to one request: `status` 0 when there was none (transport error,
    deadline); `detail` the JSON answer (or its first 200 characters as `message`), secrets
    scrubbed; `retry_after` the clamped Retry-After of a 429/503, in seconds."""

    status: int
    detail: Mapping[str, Any] = field(default_factory=dict)
    retry_after: float | None = None

    @property
    def outcome(self) -> Outcome:
        return classify(self.status)

    @property
    def error(self) -> str:
        """One line for `status` and the logs."""
        detail = self.detail
        return str(detail.get("error") or f"HTTP {self.status} {detail.get('message', '')}".strip())

    @property
    def reason(self) -> str:
        """The `reason` label of `upload_retries`: the status, or `transport`."""
        return str(self.status) if self.status else "transport"


@dataclass
class RetrySchedule:
    """How long to wait before the next try of one request (one batch part, one file): the
    attempt counts that drive the backoff, separately for retrying and holding."""

    backoff: Backoff
    attempt: int = 0
    hold_attempt: int = 0

    def failed(self, st: UpstreamState, answer: Answer) -> float:
        """Record a failed answer in `st`; return the seconds to wait before the next try."""
        st.last_error = answer.error
        st.last_error_at = datetime.now(UTC).isoformat(timespec="seconds")
        hold = HOLDS.get(answer.outcome)
        if hold is not None:
            st.state = hold.value
            delay = min(
                HOLD_PROBE_MAX_S, max(HOLD_PROBE_MIN_S, self.backoff.delay(self.hold_attempt))
            )
            self.hold_attempt += 1
            return delay
        st.state = UpstreamHealth.RETRYING.value
        if answer.retry_after is not None:
            delay = answer.retry_after
        else:
            delay = self.backoff.delay(self.attempt)
        self.attempt += 1
        return delay


@dataclass(frozen=True)
class Voice:
    """How one uploader speaks about its retries and holds: event names and hints (the
    events uploader and the CSV spool log alike, under their own names)."""

    retrying: str
    auth_failed: str
    endpoint_error: str
    auth_hint: str
    endpoint_hint: str


class UpstreamPolicy:
    """Sends requests under the deadline and the read cap, and repeats one until its answer
    is about the data. One per uploader (each has its own `stop()`)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        counters: Counters,
        backoff: Backoff,
        request_deadline_s: float = DEFAULT_REQUEST_DEADLINE_S,
    ) -> None:
        self.client = client
        self.counters = counters
        self.backoff = backoff
        #: a request (send + whole answer) that takes longer than this is abandoned
        self.request_deadline_s = request_deadline_s
        self._stopping = trio.Event()

    def stop(self) -> None:
        """Abandon retry waits now (`Stopping` is raised out of them)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def exchange(
        self, request: httpx.Request, *, label: str, deadline_s: float | None = None
    ) -> Answer:
        """Send `request` and read its answer, within `deadline_s` (default: the policy's)
        and reading at most MAX_ANSWER_BYTES. Counts `upload_requests` and `upload_seconds`
        under `resource=label`. Never raises for what the network or server does."""
        deadline_s = self.request_deadline_s if deadline_s is None else deadline_s
        start = trio.current_time()
        try:
            with trio.move_on_after(deadline_s) as deadline:
                response = await self.client.send(request, stream=True)
                raw = await read_body(response)
        except httpx.HTTPError as e:
            # the message may echo the URL, which for playfab holds the key
            return Answer(0, {"error": scrub(f"{type(e).__name__}: {e}")})
        finally:
            self.counters.inc("upload_requests", resource=label)
        if deadline.cancelled_caught:
            return Answer(0, {"error": f"no answer within {deadline_s:g} s"})
        self.counters.observe("upload_seconds", trio.current_time() - start, resource=label)
        detail, retry_after = read_answer(response.status_code, response.headers, raw)
        return Answer(response.status_code, detail, retry_after)

    async def until_decided(
        self,
        st: UpstreamState,
        label: str,
        attempt: Callable[[], Awaitable[Answer]],
        *,
        voice: Voice,
        context: Mapping[str, Any],
        hold_context: Mapping[str, Any],
    ) -> Answer:
        """Run `attempt` (one request) until its answer is about the data (2xx, 400/422, 413),
        not about the connection, the server's load or our credentials; keep `st` current.
        Raises `Stopping` when `stop()` is called during a wait (nothing is decided)."""
        schedule = RetrySchedule(self.backoff)
        while True:
            answer = await attempt()
            st.requests += 1
            outcome = answer.outcome
            if outcome in ABOUT_THE_DATA:
                if st.state != UpstreamHealth.OK:
                    log.info("upstream_recovered", resource=label, previous=st.state)
                st.state, st.next_retry_at = UpstreamHealth.OK.value, None
                return answer
            delay = schedule.failed(st, answer)
            if outcome is Outcome.AUTH:
                log.error(
                    voice.auth_failed,
                    **hold_context,
                    status=answer.status,
                    error=answer.error,
                    hint=voice.auth_hint,
                    probe_in_s=round(delay, 1),
                )
            elif outcome is Outcome.ENDPOINT:
                log.error(
                    voice.endpoint_error,
                    **hold_context,
                    status=answer.status,
                    error=answer.error,
                    hint=voice.endpoint_hint,
                    probe_in_s=round(delay, 1),
                )
            else:
                log.warning(
                    voice.retrying,
                    **context,
                    status=answer.status or None,
                    error=answer.error,
                    attempt=schedule.attempt,
                    retry_in_s=round(delay, 3),
                )
            self.counters.inc("upload_retries", resource=label, reason=answer.reason)
            await self.wait(st, delay)

    async def wait(self, st: UpstreamState, delay: float) -> None:
        """Sleep `delay` (shown in status as the next retry); raise Stopping if the agent
        stops meanwhile."""
        st.retries += 1
        st.next_retry_at = trio.current_time() + delay
        with trio.move_on_after(delay):
            await self._stopping.wait()
        if self._stopping.is_set():
            raise Stopping


async def read_body(response: httpx.Response) -> bytes:
    """At most MAX_ANSWER_BYTES of a streamed response's body, then close it. A body that
    breaks off reads as what arrived: the status line is the answer.

    The cap is on the bytes received *and* on what they decode to: the client asks for no
    encoding (`Accept-Encoding: identity`), and an answer compressed anyway is inflated once
    and to at most the cap (httpx would inflate each chunk without a bound, and stack
    encodings: a 1 KB answer became 256 MiB). One it cannot inflate reads as it came."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_raw():
            chunks.append(chunk)
            size += len(chunk)
            if size >= MAX_ANSWER_BYTES:
                break
    except httpx.HTTPError:
        pass
    finally:
        # shielded: an abandoned (deadline) response must still give its connection back.
        # A body read to its end was closed by httpx already: no scopes to set up then.
        if not response.is_closed:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await response.aclose()
    return _inflated(response.headers.get("content-encoding"), b"".join(chunks)[:MAX_ANSWER_BYTES])


def _inflated(encoding: str | None, raw: bytes) -> bytes:
    """`raw` as sent with Content-Encoding `encoding`: gzip or deflate inflated once, to at
    most MAX_ANSWER_BYTES; anything else (identity, none, br, stacked encodings) as it came."""
    if encoding is None or encoding.strip().lower() not in ("gzip", "x-gzip", "deflate"):
        return raw
    try:  # wbits 47: a gzip or zlib header, told apart by the bytes
        return zlib.decompressobj(wbits=47).decompress(raw, MAX_ANSWER_BYTES)
    except zlib.error:
        return raw


def read_answer(
    status: int, headers: httpx.Headers, body: bytes
) -> tuple[dict[str, Any], float | None]:
    """The API's JSON answer (or its first 200 characters as `message`), with any secret
    scrubbed, and on 429/503 the clamped Retry-After in seconds."""
    detail: dict[str, Any] = {}
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: JSON nested past Python's stack
        parsed = None
        detail = {"message": body[:200].decode("utf-8", "replace")}
    if isinstance(parsed, dict):
        if _nesting(parsed) <= MAX_ANSWER_DEPTH:
            detail = parsed
        else:  # scrub, the dead-letter file and the log walk it recursively
            detail = {"message": body[:200].decode("utf-8", "replace")}
    retry_after = None
    if status in (429, 503):
        retry_after = parse_retry_after(headers.get("retry-after"))
    return scrub(detail), retry_after


def _nesting(value: object) -> int:
    """How deep containers nest in a parsed JSON value (iterative: safe on any depth)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_ANSWER_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def make_client(
    base_url: str, *, connect_timeout: float, timeout: float, max_in_flight: int
) -> AgentClient:
    """The one shared client: keep-alive, explicit timeouts, no redirects (a redirect means the
    endpoint is wrong, and following it would re-send the key elsewhere), no cookies, over the
    lean HTTP/1.1 transport (`transport.py`: half the CPU per request of httpx's default),
    which `AgentClient.send` calls directly (`client.py`).

    An https endpoint honours a proxy from the environment (`HTTPS_PROXY`, `ALL_PROXY`,
    `NO_PROXY`), as httpx does: then the client keeps httpx's own transport, which speaks to
    proxies (httpx ignores the environment's proxies once given a transport)."""
    trust_env = not base_url.startswith("http://")
    connections = max_in_flight + 4
    proxied = trust_env and _environment_proxies(httpx.URL(base_url))
    return AgentClient(
        base_url=base_url,
        headers={"Accept-Encoding": "identity"},  # see read_body: answers are read capped
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        follow_redirects=False,
        trust_env=trust_env,
        transport=None if proxied else LeanTransport(max_connections=connections),
    )


def _environment_proxies(url: httpx.URL) -> bool:
    """Whether the environment names a proxy for `url`'s scheme (or `all`). `no_proxy` is
    left to httpx, whose transport then runs and applies its own rules: judging it here
    could only disagree with httpx (`.example.com` and the apex host, say) in the direction
    that skips a proxy the operator set."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get(url.scheme) or proxies.get("all"))
