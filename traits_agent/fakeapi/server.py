"""The fake 12traits Ingestion API: what the reference documents, recorded for tests.

Per request, in this order (the real API does not document its order; this one is stable):

1. ``/_fake/...``: admin endpoints, no auth (see :meth:`FakeAPI._admin`).
2. Unknown path → 404; a method other than POST → 405 (``Allow: POST``).
3. Injected transport faults (status / drop / delay) — they play a proxy or a sick server, so
   they fire before auth and validation.
4. Auth: ``Authorization: Bearer <key>``; for ``/v1/playfab`` the ``api_key`` query parameter.
   Missing or wrong → 401.
5. Body: ``{"<payload key>": [items]}``; not JSON, key missing, not a list, empty, more than
   ``max_items`` items, or any item failing ``resources.check_api_item`` → 400 in the
   reference's error shape ``{"code":400,"message":"bad request","errors":{field: message}}``.
   The errors name fields, never item positions, and nothing of a rejected batch is kept.
6. Injected ``reject_field`` faults (a batch holding the marked item → 400 naming the field).
7. Accept: 201 ``{"code":201,"message":"N <noun> have been successfully ingested","data":null}``
   and the items are appended to :attr:`FakeAPI.received` (or, ``compact``, the body is kept).

Every API request (not admin) is appended to :attr:`FakeAPI.requests`, faulted ones too; the
API key is never stored or logged (Authorization is kept as ``<redacted>``). Items of a faulted
request are not received, except after a delay-only fault, which then serves normally.

Decisions where the reference is silent:

- More than ``max_items`` items → 400 (not 413), ``errors`` naming the payload key and the limit.
  A 413 server is played with ``Fault(status=413, min_items=N)``.
- Errors of several bad items are merged by field, the first message per field winning.
- The success message always uses the plural noun ("1 actions have been ...").
- PlayFab: key only from ``?api_key=`` (a Bearer header alone is 401); answer 201 with the
  same envelope, noun "events"; at most ``max_items`` events per request.
- CSV: an empty ``file`` is 400; the CSV content itself is not checked (the real API ingests
  it asynchronously). Content-Type of JSON posts is not checked.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import msgspec
import structlog
import trio

from traits_agent.fakeapi.fastcheck import batch_is_valid, decode_body, valid_batch_size
from traits_agent.fakeapi.faults import Fault
from traits_agent.fakeapi.multipart import parse_form_data
from traits_agent.httpserver import DropConnection, Request, Response, json_response, serve_http
from traits_agent.schema import RESOURCES, Resource, check_api_item

#: the largest request body the fake accepts: a CSV at the spool's limit, plus multipart room
FAKE_MAX_BODY = 256 * 1024 * 1024 + 1024 * 1024

log = structlog.get_logger(__name__)

DEFAULT_API_KEY = "test-key"
DEFAULT_MAX_ITEMS = 1000
KEEP_BYTES = 64 * 1024 * 1024
"""``compact``: the accepted bodies kept for ``/_fake/received`` (the most recent ones), and
as much again of CSV uploads."""
KEEP_REQUESTS = 10_000
"""``compact``: the requests kept for ``/_fake/requests`` (the most recent; ~800 bytes each)."""
PLAYFAB_PATH = "/v1/playfab"
PLAYFAB_NAME = "playfab"
CSV_PATHS = {"/v1/kpis/csv": "kpis", "/v1/survey-data/csv": "survey-data"}
REDACTED = "<redacted>"


@dataclass(frozen=True)
class RecordedRequest:
    """One API request as the fake saw it. ``status`` is ``None`` when it dropped the connection.

    ``time`` is ``trio.current_time()`` at arrival (virtual under a MockClock), ``wall_time``
    the epoch time. ``query`` and ``headers`` have the API key redacted.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    resource: str | None
    item_count: int
    status: int | None
    time: float
    wall_time: float
    idempotency_key: str | None = None
    fault: str | None = None
    body_size: int = 0
    #: for /v1/playfab: "object" (one event, as PlayFab's webhook posts by default) or
    #: "array" (its "Post multiple events in JSON array" option)
    shape: str | None = None


@dataclass(frozen=True)
class CsvUpload:
    """One accepted CSV upload; ``kind`` is ``"kpis"`` or ``"survey-data"``."""

    kind: str
    filename: str | None
    content_type: str | None
    data: bytes
    time: float


@dataclass
class _Ctx:
    """What is known about the request being answered, for its record."""

    request: Request
    arrival: float
    wall_time: float
    resource: str | None = None
    item_count: int = 0
    fault: str | None = None
    shape: str | None = None


def _api_path(resource: Resource) -> str:
    path = resource.path
    return path if path.startswith("/") else f"/v1/{path}"


def _bad_request(errors: dict[str, str]) -> dict[str, Any]:
    return {"code": 400, "message": "bad request", "errors": errors}


class FakeAPI:
    """A local stand-in of the 12traits Ingestion API that records what it accepts.

    Start it with ``url = await nursery.start(api.serve)``; then ``api.url`` is set too.
    State is plain attributes, for tests to read directly: :attr:`received` (canonical resource
    name → accepted items in arrival order), :attr:`requests`, :attr:`csv_uploads`,
    :attr:`faults`.

    ``compact``: keep each accepted batch as its request body and decode it only when
    ``/_fake/received`` asks; :attr:`received` then stays empty (`received_items` reads
    both). For a fake API read over HTTP only (``fake-api``, ``run --fake-api``): items as
    dicts took ~1 KB each, all of it walked again by the cyclic GC (a million received
    items made decoding a batch 3x slower, and in ``run --fake-api`` that was the agent's
    own process); a body is ~160 bytes per item that the GC never walks. A valid batch is
    then checked without building its dicts (`fastcheck.valid_batch_size`). Only the most
    recent ``keep_bytes`` of bodies are kept (at least the last one), as much of CSV uploads
    and `KEEP_REQUESTS` requests: a ``run --fake-api`` left running for days must not grow
    without end. Counts cover every accepted item; `dropped` says how many are no longer
    listed, `csv_dropped` how many uploads.
    """

    def __init__(
        self,
        api_key: str = DEFAULT_API_KEY,
        *,
        max_items: int = DEFAULT_MAX_ITEMS,
        compact: bool = False,
        keep_bytes: int = KEEP_BYTES,
    ):
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.api_key = api_key
        self.max_items = max_items
        self.compact = compact
        self.keep_bytes = keep_bytes
        #: compact: the kept bodies in arrival order, as (resource, body, items), their bytes,
        #: and per resource the items accepted and the items no longer kept
        self._kept: deque[tuple[str, bytes, int]] = deque()
        self._kept_bytes = 0
        self._counts: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self._csv_bytes = 0
        self.csv_dropped = 0
        self.url: str | None = None
        self._batch_routes: dict[str, Resource] = {}
        self._playfab_resource: Resource | None = None
        for resource in RESOURCES.values():
            if resource.payload_key:
                self._batch_routes[_api_path(resource)] = resource
            else:
                self._playfab_resource = resource
        self._playfab_name = self._playfab_resource.name if self._playfab_resource else PLAYFAB_NAME
        self.received: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[RecordedRequest] = []
        self.csv_uploads: list[CsvUpload] = []
        self.faults: list[Fault] = []
        self._changed = trio.Event()
        self.reset()

    # -- test-facing API -------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything received and recorded, and clear the faults."""
        names = [r.name for r in self._batch_routes.values()] + [self._playfab_name]
        for name in names:  # in place: a test may hold a reference to a list
            self.received.setdefault(name, []).clear()
            self._counts[name] = self.dropped[name] = 0
        self._kept.clear()
        self._kept_bytes = 0
        self.requests.clear()
        self.csv_uploads.clear()
        self._csv_bytes = self.csv_dropped = 0
        self.faults.clear()

    def total_items(self) -> int:
        """Items accepted so far, all resources together."""
        return sum(self.count(name) for name in self.received)

    def count(self, resource: str) -> int:
        """Items of ``resource`` accepted so far."""
        if self.compact:
            return self._counts.get(resource, 0)
        return len(self.received.get(resource, ()))

    def received_items(self) -> dict[str, list[Any]]:
        """Resource name → accepted items, as :attr:`received` holds them (decoded from the
        kept bodies when ``compact``, as ``json.loads`` reads them)."""
        if not self.compact:
            return self.received
        return self._decode_kept(list(self._kept))

    def _decode_kept(self, kept: list[tuple[str, bytes, int]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in self.received}
        for name, body, _ in kept:
            out[name] += _items_of(name, body)
        return out

    def inject(self, fault: Fault) -> Fault:
        """Add a fault (after the ones already there) and return it."""
        self.faults.append(fault)
        log.info("fake_api_fault_injected", fault=fault.describe(), path=fault.path)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; it is re-checked after every API request."""
        while not predicate():
            await self._changed.wait()

    async def wait_for_items(self, count: int, resource: str | None = None) -> None:
        """Return once ``count`` items were accepted (of ``resource``, or in total)."""

        def enough() -> bool:
            got = self.count(resource) if resource else self.total_items()
            return got >= count

        await self.wait_until(enough)

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; reports (and sets :attr:`url`) once bound."""
        async with trio.open_nursery() as nursery:
            bound_host, bound_port = await nursery.start(
                # CSV uploads may be as large as the agent's spool allows (256 MiB)
                partial(serve_http, self.handle, host, port, max_body_size=FAKE_MAX_BODY)
            )
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            self.url = f"http://{shown}:{bound_port}"
            task_status.started(self.url)

    # -- request handling ------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """The HTTP handler (usable without a socket, e.g. with a hand-built ``Request``)."""
        if request.path == "/_fake" or request.path.startswith("/_fake/"):
            return await self._admin(request)
        ctx = _Ctx(request, trio.current_time(), time.time())
        resource = self._batch_routes.get(request.path)
        is_playfab = request.path == PLAYFAB_PATH
        csv_kind = CSV_PATHS.get(request.path)
        if resource is None and not is_playfab and csv_kind is None:
            return self._answer(ctx, 404, {"code": 404, "message": "not found", "data": None})
        if request.method != "POST":
            body = {"code": 405, "message": "method not allowed", "data": None}
            return self._answer(ctx, 405, body, {"allow": "POST"})

        items: list[Any] | None = None
        error: dict[str, str] | None = None
        decoded_by_msgspec = False
        valid = 0  # compact: the items of a batch `valid_batch_size` found valid undecoded
        if resource is not None:
            ctx.resource = resource.name
            assert resource.payload_key is not None  # only playfab has none, and it is not here
            if self.compact and not self.faults:  # a fault's match needs the items
                valid = valid_batch_size(resource, request.body, self.max_items)
            if not valid:
                items, error, decoded_by_msgspec = _parse_batch(request.body, resource.payload_key)
        elif is_playfab:
            resource = self._playfab_resource
            ctx.resource = self._playfab_name
            items, error = _parse_playfab(request.body)
            ctx.shape = "array" if request.body.lstrip().startswith(b"[") else "object"
        ctx.item_count = valid or (len(items) if items is not None else 0)

        fault = self._take_fault(request.path, items, reject=False)
        if fault is not None:
            ctx.fault = fault.describe()
            if fault.delay > 0:
                await trio.sleep(fault.delay)
            if fault.drop:
                self._record(ctx, None)
                raise DropConnection
            if fault.status is not None and fault.streams_body:
                self._record(ctx, fault.status)
                size = fault.body_size if fault.body_size is not None else 1024 * 1024
                stream_headers = {"content-type": "text/plain", "content-length": str(size)}
                return Response(fault.status, headers=stream_headers, stream=fault.stream_body)
            if fault.status is not None:
                headers = {"retry-after": fault.retry_after} if fault.retry_after else None
                return self._answer(ctx, fault.status, fault.error_body(), headers)

        if not self._authorized(request, query_key=is_playfab):
            errors = {"api_key": "missing or invalid API key"}
            return self._answer(
                ctx, 401, {"code": 401, "message": "unauthorized", "errors": errors}
            )

        if csv_kind is not None:
            return self._accept_csv(ctx, csv_kind)
        if valid:
            return self._accept(ctx, resource, [])
        if error is None:
            assert items is not None
            error = self._check_items(resource, items, fast=decoded_by_msgspec)
        if error is not None:
            return self._answer(ctx, 400, _bad_request(error))

        assert items is not None
        fault = self._take_fault(request.path, items, reject=True)
        if fault is not None:
            ctx.fault = fault.describe()
            return self._answer(ctx, 400, fault.error_body())
        return self._accept(ctx, resource, items)

    def _accept(self, ctx: _Ctx, resource: Resource | None, items: list[Any]) -> Response:
        """Keep an accepted batch of ``ctx.item_count`` items and answer 201: ``compact``, its
        body (``items`` may then be left undecoded, empty), else ``items``."""
        name = ctx.resource
        assert name is not None
        if self.compact:
            self._counts[name] += ctx.item_count
            self._kept.append((name, ctx.request.body, ctx.item_count))
            self._kept_bytes += len(ctx.request.body)
            while self._kept_bytes > self.keep_bytes and len(self._kept) > 1:
                old, body, count = self._kept.popleft()
                self._kept_bytes -= len(body)
                self.dropped[old] += count
        else:
            self.received.setdefault(name, []).extend(items)
        noun = resource.noun if resource is not None else "events"
        message = f"{ctx.item_count} {noun} have been successfully ingested"
        if ctx.shape is not None:  # say which PlayFab shape it got (the real API may differ)
            message += " (one event object)" if ctx.shape == "object" else " (a JSON array)"
        return self._answer(ctx, 201, {"code": 201, "message": message, "data": None})

    def _check_items(
        self, resource: Resource | None, items: list[Any], *, fast: bool = False
    ) -> dict[str, str] | None:
        """The batch's errors, merged by field (first message per field wins), or None.

        `fast`: the items come from `fastcheck.decode_body` (no lone surrogates), so
        `fastcheck.batch_is_valid` may accept them first."""
        if len(items) > self.max_items:
            key = resource.payload_key if resource and resource.payload_key else "events"
            return {key: f"at most {self.max_items} items per request, got {len(items)}"}
        if resource is None:
            return None
        if fast and batch_is_valid(resource, items):  # the common case, in C (see fastcheck)
            return None
        errors: dict[str, str] = {}
        for item in items:
            for name, message in check_api_item(resource, item).items():
                errors.setdefault(name, message)
        return errors or None

    def _accept_csv(self, ctx: _Ctx, kind: str) -> Response:
        request = ctx.request
        try:
            parts = parse_form_data(request.headers.get("content-type", ""), request.body)
        except ValueError as exc:
            return self._answer(ctx, 400, _bad_request({"file": f"multipart form expected: {exc}"}))
        upload = next((p for p in parts if p.name == "file"), None)
        if upload is None:
            return self._answer(ctx, 400, _bad_request({"file": "is required"}))
        if not upload.data:
            return self._answer(ctx, 400, _bad_request({"file": "must not be empty"}))
        self.csv_uploads.append(
            CsvUpload(kind, upload.filename, upload.content_type, upload.data, ctx.arrival)
        )
        if self.compact:
            self._csv_bytes += len(upload.data)
            while self._csv_bytes > self.keep_bytes and len(self.csv_uploads) > 1:
                self._csv_bytes -= len(self.csv_uploads.pop(0).data)
                self.csv_dropped += 1
        body = {
            "code": 201,
            "message": "ingestion has been started",
            "data": {"estimated_time_to_complete": 125},
        }
        return self._answer(ctx, 201, body)

    def _authorized(self, request: Request, *, query_key: bool) -> bool:
        if query_key:
            return request.query.get("api_key") == self.api_key
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and token.strip() == self.api_key

    def _take_fault(self, path: str, items: list[Any] | None, *, reject: bool) -> Fault | None:
        for fault in self.faults:
            if fault.is_reject == reject and fault.matches(path, items):
                if fault.fire():
                    self.faults.remove(fault)
                log.info("fake_api_fault_fired", path=path, fault=fault.describe())
                return fault
        return None

    def _answer(
        self, ctx: _Ctx, status: int, obj: Any, headers: dict[str, str] | None = None
    ) -> Response:
        self._record(ctx, status)
        return json_response(status, obj, headers)

    def _record(self, ctx: _Ctx, status: int | None) -> None:
        request = ctx.request
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query={k: self._redact(k, v) for k, v in request.query.items()},
                headers={k: self._redact(k, v) for k, v in request.headers.items()},
                resource=ctx.resource,
                item_count=ctx.item_count,
                status=status,
                time=ctx.arrival,
                wall_time=ctx.wall_time,
                idempotency_key=request.headers.get("idempotency-key"),
                fault=ctx.fault,
                body_size=len(request.body),
                shape=ctx.shape,
            )
        )
        if self.compact and len(self.requests) > KEEP_REQUESTS:
            del self.requests[0]
        log.debug(
            "fake_api_request",
            method=request.method,
            path=request.path,
            status=status,
            items=ctx.item_count,
            fault=ctx.fault,
        )
        self._changed.set()
        self._changed = trio.Event()

    def _redact(self, name: str, value: str) -> str:
        if name in ("authorization", "api_key") or self.api_key in value:
            return REDACTED
        return value

    # -- admin endpoints -------------------------------------------------------------------

    async def _admin(self, request: Request) -> Response:
        """``GET /_fake/received``, ``GET /_fake/requests``, ``GET|POST|DELETE /_fake/faults``,
        ``POST /_fake/reset``. For a test or integrator in another process; no auth."""
        routes: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {
            "/_fake/received": {"GET": self._admin_received},
            "/_fake/requests": {"GET": self._admin_requests},
            "/_fake/faults": {
                "GET": self._admin_faults,
                "POST": self._admin_inject,
                "DELETE": self._admin_clear,
            },
            "/_fake/reset": {"POST": self._admin_reset},
        }
        methods = routes.get(request.path)
        if methods is None:
            return json_response(404, {"code": 404, "message": "not found", "data": None})
        action = methods.get(request.method)
        if action is None:
            allow = ", ".join(methods)
            body = {"code": 405, "message": "method not allowed", "data": None}
            return json_response(405, body, {"allow": allow})
        return await action(request)

    async def _admin_received(self, request: Request) -> Response:
        """Counts, items and CSV uploads; ``?items=0`` leaves out the items and CSV text.
        ``dropped``: items counted but no longer listed (``compact`` keeps ``keep_bytes``),
        ``csv_dropped``: uploads no longer listed.

        ``compact``, with the items: what is kept is taken here, and decoded and encoded in
        a thread (at 64 MiB kept, ~900k small items, that is ~1.7 s of CPU and a 60 MB
        answer): in ``run --fake-api`` this is the agent's event loop, which must go on
        taking events meanwhile."""
        full = request.query.get("items") != "0"
        state: dict[str, Any] = {
            "total": self.total_items(),
            "counts": {name: self.count(name) for name in self.received},
            "dropped": dict(self.dropped),
            "csv_dropped": self.csv_dropped,
        }
        uploads = list(self.csv_uploads)
        kept = list(self._kept) if self.compact and full else None

        def answer() -> Response:
            if full:
                state["items"] = self.received if kept is None else self._decode_kept(kept)
            state["csv_uploads"] = [
                {
                    "kind": u.kind,
                    "filename": u.filename,
                    "content_type": u.content_type,
                    "size": len(u.data),
                    **({"text": u.data.decode("utf-8", "replace")} if full else {}),
                }
                for u in uploads
            ]
            return json_response(200, state)

        if kept is None:
            return answer()
        return await trio.to_thread.run_sync(answer)

    async def _admin_requests(self, request: Request) -> Response:
        return json_response(200, {"requests": [asdict(r) for r in self.requests]})

    async def _admin_faults(self, request: Request) -> Response:
        return json_response(200, {"faults": [f.to_json() for f in self.faults]})

    async def _admin_inject(self, request: Request) -> Response:
        try:
            spec = json.loads(request.body)
            specs = spec if isinstance(spec, list) else [spec]
            faults = [Fault.from_json(s) for s in specs]
        except (ValueError, TypeError) as exc:
            return json_response(400, _bad_request({"fault": str(exc)}))
        for fault in faults:
            self.inject(fault)
        return json_response(201, {"faults": [f.to_json() for f in self.faults]})

    async def _admin_clear(self, request: Request) -> Response:
        self.clear_faults()
        return json_response(200, {"faults": []})

    async def _admin_reset(self, request: Request) -> Response:
        self.reset()
        return json_response(200, {"code": 200, "message": "reset", "data": None})


#: what a body nested past the JSON decoders' depth gets (a 400, not the 500 of a crash)
TOO_DEEP = "is nested too deeply to be read"


def _parse_batch(body: bytes, key: str) -> tuple[list[Any] | None, dict[str, str] | None, bool]:
    """``{"<key>": [items]}`` → (items, None, by_msgspec), or (items-if-any, errors, ...).

    ``by_msgspec``: `fastcheck.decode_body` read it (it gives what ``json.loads`` gives, where
    it answers), not ``json.loads`` itself.
    """
    by_msgspec = True
    try:
        try:
            doc = decode_body(body)
        except msgspec.DecodeError:
            by_msgspec = False
            doc = json.loads(body)
    except ValueError:
        return None, {"body": "must be a JSON object"}, False
    except RecursionError:  # both decoders give up on deep nesting (a few thousand levels)
        return None, {"body": TOO_DEEP}, False
    if not isinstance(doc, dict):
        return None, {"body": "must be a JSON object"}, by_msgspec
    if key not in doc:
        return None, {key: "is required"}, by_msgspec
    items = doc[key]
    if not isinstance(items, list):
        return None, {key: "must be a list"}, by_msgspec
    if not items:
        return items, {key: "must not be empty"}, by_msgspec
    return items, None, by_msgspec


def _items_of(name: str, body: bytes) -> list[Any]:
    """The items of an accepted body of resource ``name`` (``compact``), read again as they
    were read when it was accepted."""
    key = RESOURCES[name].payload_key
    items = _parse_batch(body, key)[0] if key else _parse_playfab(body)[0]
    assert items is not None  # it was accepted
    return items


def _parse_playfab(body: bytes) -> tuple[list[Any] | None, dict[str, str] | None]:
    """One PlayStream event object, or a JSON array of them."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None, {"body": "must be a JSON object or array"}
    except RecursionError:
        return None, {"body": TOO_DEEP}
    if isinstance(doc, dict):
        return [doc], None
    if not isinstance(doc, list):
        return None, {"body": "must be a JSON object or array"}
    if not doc:
        return doc, {"events": "must not be empty"}
    return doc, None


async def run_fake_api(
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str = DEFAULT_API_KEY,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a fresh :class:`FakeAPI` until cancelled (``traits-agent fake-api``).

    Logs one ``fake_api_listening url=...`` line once bound and reports the URL through
    ``task_status``. Raises ``OSError`` if the address cannot be bound.
    """
    api = FakeAPI(api_key, compact=True)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(api.serve, host, port)
        log.info("fake_api_listening", url=url, admin=f"{url}/_fake/received")
        task_status.started(url)
