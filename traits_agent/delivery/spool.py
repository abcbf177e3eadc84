"""CSV uploads: a durable on-disk spool between `traits-agent upload` and the API.

    <queue.dir>/csv-spool/
    ├── kpis/                  files waiting for POST /v1/kpis/csv
    │   ├── 01732800000000000000-daily.csv
    │   └── rejected/          what the API refused (400/422/413), each with a .json sidecar
    └── survey-data/           files waiting for POST /v1/survey-data/csv
        └── rejected/

The CLI side (`spool_file`, `traits_agent.cli.upload`) copies the user's file into `<kind>/` under a
dot-prefixed temporary name, fsyncs it, gives it its final name and fsyncs the directory: the
agent never sees a half-copied file, and once `upload` has printed its line a crash loses
nothing. It needs no running agent; the agent picks the file up when it starts.

The agent side (`CsvSpool`) uploads what is spooled, oldest first, one file at a time per kind
(the two kinds are independent, so a 404 on one does not hold the other). It finds new files by
listing the two directories every `poll_interval_s` (1 s): the writer is another process, so an
in-process wake-up cannot reach the agent; an `os.scandir` of a near-empty directory costs
microseconds; inotify would be a Linux-only dependency for a latency nobody needs (the API
ingests a CSV asynchronously, in minutes); and polling also finds a file an operator moved in
by hand. `wake()` exists for in-process callers.

Answers, as the one upstream policy (`policy.py`, shared with the events uploader) reads them;
every request has its deadline (the policy's, plus one second per `MIN_UPLOAD_RATE` bytes of the
file, so a large file on a slow uplink is not cut off) and reads at most 64 KiB of the answer:

==========================  ===============================================================
2xx                         uploaded: the file is deleted
408, 429, 5xx, transport    retry the whole file with full-jitter backoff (429/503
                            Retry-After honoured), forever
400, 422, 413               the file is moved to `rejected/` with a `.json` sidecar holding the
                            status and the API's message: a CSV cannot be bisected, so this is
                            its dead letter
401, 403 / 404, 405, 410    hold (nothing is deleted), state `auth_failed` / `endpoint_error`,
                            probe every 5..60 s, error log at most once a minute
==========================  ===============================================================

Delivery is at-least-once: a crash between the API's 201 and the unlink uploads the file
again after restart, with the same `Idempotency-Key` (derived from the spooled name).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import structlog
import trio

from traits_agent.delivery.backoff import Backoff
from traits_agent.delivery.policy import (
    DEFAULT_REQUEST_DEADLINE_S,
    USER_AGENT,
    Answer,
    Outcome,
    Stopping,
    UpstreamPolicy,
    UpstreamState,
    Voice,
)
from traits_agent.errors import CopyCancelled, SpoolError
from traits_agent.observe.fdlimit import (
    RETRY_MAX_S,
    is_fd_shortage,
    note_shortage,
    retry_on_shortage,
)
from traits_agent.observe.metrics import Counters
from traits_agent.paths import write_all, write_private_file

log = structlog.get_logger(__name__)

#: kind → API path
CSV_PATHS = {"kpis": "/v1/kpis/csv", "survey-data": "/v1/survey-data/csv"}
KINDS = tuple(CSV_PATHS)
#: the spool's directory inside `queue.dir` (next to one directory per resource and
#: `dead-letters/`; the service may write nowhere else)
SPOOL_DIRNAME = "csv-spool"
REJECTED_DIRNAME = "rejected"
#: Largest CSV `upload` accepts. The API documents no limit. A daily KPI file for a million
#: users at ~150 bytes a row is ~150 MiB, so this leaves room; beyond it a single request is
#: the wrong tool: the spool copy shares the disk with the event queue, a CSV cannot be split
#: or resumed, so a connection lost at 99 % re-sends everything, and at a 20 Mbit/s uplink
#: 256 MiB already takes ~2 minutes per attempt.
MAX_CSV_BYTES = 256 * 1024 * 1024
#: free disk space `upload` leaves for the event queue after the copy
MIN_FREE_AFTER_BYTES = 64 * 1024 * 1024
#: a temporary file older than this is a crashed `upload`'s leftover; the agent removes it
STALE_TEMP_S = 3600.0
POLL_INTERVAL_S = 1.0
#: spooled CSVs and their directories are the agent user's alone, whatever the umask
FILE_MODE = 0o600
DIR_MODE = 0o700
COPY_CHUNK = 1024 * 1024
#: a copy still running after this is abandoned (its temporary file removed): `upload`
#: waits at most 600 s for the agent's answer, and a stuck source must not pin a worker
#: thread or stretch the agent's shutdown
COPY_TIMEOUT_S = 300.0
#: serialises "is there room?" + "take the room" across threads and processes (flock)
RESERVE_LOCK_NAME = ".reserve.lock"
#: how much of the file `upload` looks at for NUL bytes (an .xlsx or .gz is not a CSV)
SNIFF_BYTES = 64 * 1024
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: `<20-digit ns timestamp>-<name>`, as `spool_file` names them
_SPOOLED = re.compile(r"^(\d{20})-(.+)$")
MAX_NAME = 120
#: the slowest uplink a CSV upload is given time for (bytes/s, ~2 Mbit/s): its deadline is the
#: policy's plus size / this, e.g. 60 s + 17 min for the largest file (256 MiB)
MIN_UPLOAD_RATE = 256 * 1024

VOICE = Voice(
    retrying="csv_upload_retrying",
    auth_failed="csv_upload_auth_failed",
    endpoint_error="csv_upload_endpoint_error",
    auth_hint="check the API key; CSV uploads are held, nothing is deleted",
    endpoint_hint="check api.endpoint; CSV uploads are held, nothing is deleted",
)


# -- the CLI side ------------------------------------------------------------------------------


def spool_dir_for(config: Any) -> Path:
    """Where the spool lives for this config: `<queue.dir>/csv-spool`."""
    return Path(config.queue.dir) / SPOOL_DIRNAME


def sanitize_name(name: str) -> str:
    """A file name safe to keep on disk and to send as the multipart filename: ASCII letters,
    digits, `._-`; no leading dots; at most MAX_NAME characters; always ending in `.csv`."""
    base = Path(name).name
    if base.lower().endswith(".csv"):
        base = base[:-4]
    base = _SAFE.sub("_", base).lstrip(".").strip("_") or "upload"
    return base[:MAX_NAME] + ".csv"


def is_temp_name(name: str) -> bool:
    return name.startswith(".")


def spool_file(spool_dir: Path, kind: str, source: Path, *, max_bytes: int = MAX_CSV_BYTES) -> Path:
    """Copy `source` durably into `<spool_dir>/<kind>/` and return the spooled path.

    Raises `SpoolError` for a bad kind or an unusable source (missing, not a regular file,
    unreadable, empty, too large, binary) and `OSError` when the spool cannot take it
    (permissions, disk full); nothing is left behind in either case.
    """
    if kind not in CSV_PATHS:
        raise SpoolError(f"KIND: must be one of {', '.join(KINDS)} (got {kind!r})")
    source = Path(source)
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SpoolError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise SpoolError(f"{source}: is a directory") from None
    except OSError as e:
        raise SpoolError(f"{source}: cannot read: {e.strerror or e}") from None
    try:
        return spool_fd(spool_dir, kind, src, source, max_bytes=max_bytes)
    finally:
        os.close(src)


def spool_fd(
    spool_dir: Path,
    kind: str,
    src: int,
    source: Path,
    *,
    max_bytes: int = MAX_CSV_BYTES,
    min_free: int = MIN_FREE_AFTER_BYTES,
    cancelled: Callable[[], bool] | None = None,
    timeout_s: float = COPY_TIMEOUT_S,
) -> Path:
    """`spool_file` for an open file descriptor (`source` names it in messages and gives the
    upload its file name). The agent uses this for files the CLI hands over the control
    socket (SCM_RIGHTS): the sandboxed service cannot open a path in /home or /tmp itself.

    The copy's room on disk is taken before it starts (see `_reserve`), so concurrent copies
    (threads or `upload` processes) together never leave less than `min_free`. The copy
    checks `cancelled()` and `timeout_s` between chunks and raises `CopyCancelled`."""
    if kind not in CSV_PATHS:
        raise SpoolError(f"KIND: must be one of {', '.join(KINDS)} (got {kind!r})")
    st = os.fstat(src)
    if stat.S_ISDIR(st.st_mode):
        raise SpoolError(f"{source}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise SpoolError(f"{source}: not a regular file")
    if st.st_size == 0:
        raise SpoolError(f"{source}: is empty")
    if st.st_size > max_bytes:
        raise SpoolError(f"{source}: {st.st_size} bytes, more than the {_size(max_bytes)} limit")
    try:
        head = os.pread(src, SNIFF_BYTES, 0)
    except OSError as e:
        raise SpoolError(f"{source}: cannot read: {e.strerror or e}") from None
    if b"\x00" in head:
        raise SpoolError(f"{source}: not a CSV text file (it holds NUL bytes)")
    directory = Path(spool_dir) / kind
    _makedirs(directory)
    os.lseek(src, 0, os.SEEK_SET)
    deadline = time.monotonic() + timeout_s
    return _copy_durably(
        src,
        source,
        directory,
        max_bytes,
        size=st.st_size,
        min_free=min_free,
        stop=lambda: (cancelled is not None and cancelled()) or time.monotonic() > deadline,
    )


def _reserve(fd: int, directory: Path, size: int, min_free: int) -> None:
    """Take `size` bytes of disk for the new file `fd` now (fallocate), checking first that
    `min_free` stays free: under an flock shared by every copy into this spool, so five
    concurrent 60 MiB uploads cannot all pass the check against the same free space (they
    did, and left the 64 MiB promised to the event queue at 60 MiB; issue 7 item 16).
    Raises OSError(ENOSPC) when there is no room."""
    lock_path = directory.parent / RESERVE_LOCK_NAME
    lock = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        # `sudo traits-agent upload` makes it as root: hand it to the spool's owner (the
        # agent's user), who must open it too
        _chown_like(lock, directory.parent)
        fcntl.flock(lock, fcntl.LOCK_EX)
        free = shutil.disk_usage(directory).free
        if free < size + min_free:
            raise OSError(
                errno.ENOSPC,
                f"not enough free space in {directory} ({_size(free)} free, "
                f"{_size(size)} needed plus {_size(min_free)} for the queue)",
            )
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OSError(
                    errno.ENOSPC, f"not enough free space in {directory} for {_size(size)}"
                ) from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            # a file system that cannot preallocate: the check above is all we can do
    finally:
        os.close(lock)  # releases the flock


def _copy_durably(
    src: int,
    source: Path,
    directory: Path,
    max_bytes: int,
    *,
    size: int,
    min_free: int,
    stop: Callable[[], bool],
) -> Path:
    safe = sanitize_name(source.name)
    tmp = directory / f".{safe}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)  # the umask may have taken bits away
            _chown_like(fd, directory)
            _reserve(fd, directory, size, min_free)
            copied = 0
            while chunk := os.read(src, COPY_CHUNK):
                if stop():
                    raise CopyCancelled(f"{source}: the copy was stopped after {copied} bytes")
                copied += len(chunk)
                if copied > max_bytes:  # it grew while we copied
                    raise SpoolError(f"{source}: more than the {_size(max_bytes)} limit")
                write_all(fd, chunk)
            if copied == 0:
                raise SpoolError(f"{source}: is empty")
            if copied != size:  # it shrank (or grew) while we copied: drop the preallocation
                os.ftruncate(fd, copied)
            os.fsync(fd)
        finally:
            os.close(fd)
        final = _link_new_name(tmp, directory, safe)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return final


def _link_new_name(tmp: Path, directory: Path, safe: str) -> Path:
    """Give `tmp` its final `<ns>-<name>` name without ever replacing an existing file."""
    while True:
        final = directory / f"{time.time_ns():020d}-{safe}"
        try:
            os.link(tmp, final)
        except FileExistsError:
            continue  # another upload of the same name in the same nanosecond
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # a filesystem without hard links: rename, after a (racy, but this needs the same
            # name within the same nanosecond) check that the name is free
            if final.exists():
                continue
            os.rename(tmp, final)
            return final
        os.unlink(tmp)
        return final


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(directory: Path) -> None:
    """mkdir -p; run as root (`sudo traits-agent upload`), new directories get the owner of
    the directory they are made in, so the agent's user can use them."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=DIR_MODE)
            os.chmod(d, DIR_MODE)  # mkdir's mode passes through the umask
            if os.geteuid() == 0:
                parent = d.parent.stat()
                os.chown(d, parent.st_uid, parent.st_gid)


def _chown_like(fd: int, directory: Path) -> None:
    """As root, hand the file to the spool directory's owner: the agent runs as its own user
    and must read and delete it."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        st = directory.stat()
        fst = os.fstat(fd)
        if (fst.st_uid, fst.st_gid) != (st.st_uid, st.st_gid):
            os.fchown(fd, st.st_uid, st.st_gid)


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.0f} MiB"
    return f"{n} bytes"


def receive_upload(
    spool_dir: Path,
    kind: str,
    fd: int,
    name: str,
    *,
    cancelled: Callable[[], bool] | None = None,
    counters: Counters | None = None,
) -> dict[str, Any]:
    """The agent's side of `upload` over the control socket (runs in a worker thread; the
    control socket sets `cancelled` when the agent stops, so the copy ends within a chunk)."""
    try:
        spooled = spool_fd(spool_dir, kind, fd, Path(name or "upload.csv"), cancelled=cancelled)
    except SpoolError as e:
        return {"error": str(e), "exit": 2}
    except CopyCancelled as e:
        if counters is not None:
            counters.inc("csv_copies_cancelled", kind=kind)
        log.warning("csv_copy_cancelled", kind=kind, file=name, error=str(e))
        return {"error": f"{e}; nothing was spooled (the agent is stopping?)", "exit": 1}
    except OSError as e:
        if counters is not None:
            reason = errno.errorcode.get(e.errno or 0, "error").lower()
            counters.inc("csv_copies_refused", kind=kind, reason=reason)
        log.warning("csv_copy_refused", kind=kind, file=name, error=str(e))
        return {"error": f"the agent cannot spool {name}: {e.strerror or e}", "exit": 1}
    log.info("csv_spooled", kind=kind, file=name, spooled_as=spooled.name)
    return {"spooled": str(spooled), "bytes": spooled.stat().st_size}


# -- the agent side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spooled:
    """One file waiting in the spool."""

    path: Path
    kind: str
    size: int
    order: tuple[int, str]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def original(self) -> str:
        """The name it is uploaded under (the spooled name without its timestamp)."""
        m = _SPOOLED.match(self.path.name)
        return m.group(2) if m else self.path.name


def scan(directory: Path, kind: str) -> list[Spooled]:
    """The spooled files of one kind, oldest first. Temporary (dot) names, other suffixes and
    directories are ignored; a missing directory is empty."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if is_temp_name(entry.name) or not entry.name.lower().endswith(".csv"):
            continue
        try:
            if not entry.is_file():
                continue
            st = entry.stat()
        except FileNotFoundError:
            continue
        m = _SPOOLED.match(entry.name)
        order = int(m.group(1)) if m else st.st_mtime_ns  # a file dropped in by hand
        found.append(Spooled(Path(entry.path), kind, st.st_size, (order, entry.name)))
    found.sort(key=lambda s: s.order)
    return found


def idempotency_key(agent_id: str, kind: str, spooled_name: str) -> str:
    """Stable across retries and restarts: the spooled name never changes."""
    return hashlib.sha256(f"{agent_id}/csv/{kind}/{spooled_name}".encode()).hexdigest()[:32]


class CsvSpool:
    """Uploads spooled CSV files over the agent's shared HTTP client."""

    def __init__(
        self,
        directory: Path,
        client: httpx.AsyncClient,
        *,
        api_key: str,
        counters: Counters,
        backoff: Backoff,
        agent_id: str = "",
        poll_interval_s: float = POLL_INTERVAL_S,
        wall_clock: Callable[[], float] = time.time,
        request_deadline_s: float = DEFAULT_REQUEST_DEADLINE_S,
    ) -> None:
        self.directory = Path(directory)
        self.client = client
        self.api_key = api_key
        self.counters = counters
        self.backoff = backoff
        self.agent_id = agent_id
        self.poll_interval_s = poll_interval_s
        self.wall_clock = wall_clock
        self.states = {kind: UpstreamState() for kind in KINDS}
        #: the file being uploaded, per kind
        self.uploading: dict[str, str | None] = dict.fromkeys(KINDS)
        self._kick = {kind: trio.Event() for kind in KINDS}
        #: files that could be neither uploaded nor moved aside nor deleted (permissions):
        #: left alone until restart, so they cannot spin the worker
        self._stuck: set[Path] = set()
        self.policy = UpstreamPolicy(
            client, counters=counters, backoff=backoff, request_deadline_s=request_deadline_s
        )

    # -- control --------------------------------------------------------------------------

    def kind_dir(self, kind: str) -> Path:
        return self.directory / kind

    def rejected_dir(self, kind: str) -> Path:
        return self.directory / kind / REJECTED_DIRNAME

    def wake(self, kind: str | None = None) -> None:
        """Look at the spool now instead of at the next poll."""
        for k in (kind,) if kind else KINDS:
            self._kick[k].set()

    def stop(self) -> None:
        """Start no new upload and abandon retry waits; `run` then returns. A request on the
        wire is left to finish (or to the caller's cancellation: the file stays spooled)."""
        self.policy.stop()
        self.wake()

    def status(self) -> dict[str, Any]:
        """For `traits-agent status`: what waits, what was rejected, the upstream state
        (`observe.status.CsvStatus` as JSON)."""
        from traits_agent.observe.status import as_json, csv_status

        result: dict[str, Any] = as_json(csv_status(self))
        return result

    # -- running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Upload what is spooled, then what arrives, until `stop()` or cancellation."""
        for kind in KINDS:
            _makedirs(self.kind_dir(kind))
            await self._retrying("csv_spool_scan", partial(self._remove_stale_temps, kind))
        pending = {kind: await self._scan(kind) for kind in KINDS}
        if any(pending.values()):
            log.info(
                "csv_spool_pending",
                dir=str(self.directory),
                **{kind.replace("-", "_"): len(files) for kind, files in pending.items()},
            )
        async with trio.open_nursery() as nursery:
            for kind in KINDS:
                nursery.start_soon(self._worker, kind)
            task_status.started()

    async def _worker(self, kind: str) -> None:
        while not self.policy.stopping:
            files = [f for f in await self._scan(kind) if f.path not in self._stuck]
            for spooled in files:
                if self.policy.stopping:
                    return
                try:
                    await self._deliver(spooled)
                except Stopping:
                    return
                await trio.lowlevel.checkpoint()
            if files:
                continue  # look again at once: more may have come meanwhile
            with trio.move_on_after(self.poll_interval_s):
                await self._kick[kind].wait()
            if self._kick[kind].is_set():
                self._kick[kind] = trio.Event()

    async def _retrying(self, where: str, fn: Callable[[], Any]) -> Any:
        """`fn()`, waiting out EMFILE/ENFILE instead of letting it end the agent."""
        return await retry_on_shortage(where, fn, counters=self.counters)

    async def _scan(self, kind: str) -> list[Spooled]:
        return await self._retrying("csv_spool_scan", partial(scan, self.kind_dir(kind), kind))

    async def _deliver(self, spooled: Spooled) -> None:
        """POST one file until the answer is about the file (2xx, 400/422/413)."""
        kind = spooled.kind
        st = self.states[kind]
        key = idempotency_key(self.agent_id, kind, spooled.name)
        self.uploading[kind] = spooled.name
        try:
            while True:
                try:
                    answer = await self.policy.until_decided(
                        st,
                        f"csv_{kind}",
                        lambda: self._post(spooled, key),
                        voice=VOICE,
                        context={"kind": kind, "file": spooled.name},
                        hold_context={"kind": kind, "path": CSV_PATHS[kind]},
                    )
                except FileNotFoundError:
                    log.info("csv_vanished", kind=kind, file=spooled.name)
                    return
                except OSError as e:  # our side: the file cannot be read
                    if is_fd_shortage(e):  # not the file's fault: wait, never set it aside
                        note_shortage("csv_spool_open", e, self.counters, file=spooled.name)
                        if self.policy.stopping:
                            return
                        await trio.sleep(RETRY_MAX_S)
                        continue
                    error = f"cannot read the spooled file: {e.strerror or e}"
                    self._reject(spooled, None, {"message": error}, reason="unreadable")
                    return
                break
            if answer.outcome is Outcome.DELIVERED:
                self._delivered(spooled, st, answer)
            else:
                reason = "too_large" if answer.outcome is Outcome.TOO_LARGE else "rejected"
                self._reject(spooled, answer.status, answer.detail, reason=reason)
        finally:
            self.uploading[kind] = None

    async def _post(self, spooled: Spooled, key: str) -> Answer:
        """One request, the file streamed from disk in 64 KiB reads (httpx's multipart encoder
        reads a file object chunk by chunk and sends Content-Length from fstat), under the
        policy's deadline (plus time for the file's size) and read cap. Raises OSError when
        the file cannot be opened."""
        headers = {
            "Authorization": f"Bearer {self.api_key}",
            "User-Agent": USER_AGENT,
            "Idempotency-Key": key,
        }
        kind = spooled.kind
        with open(spooled.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            request = self.client.build_request(
                "POST",
                CSV_PATHS[kind],
                files={"file": (spooled.original, f, "text/csv")},
                headers=headers,
            )
            deadline_s = self.policy.request_deadline_s + size / MIN_UPLOAD_RATE
            return await self.policy.exchange(request, label=f"csv_{kind}", deadline_s=deadline_s)

    def _delivered(self, spooled: Spooled, st: UpstreamState, answer: Answer) -> None:
        kind = spooled.kind
        status, detail, size = answer.status, answer.detail, spooled.size
        st.delivered += 1
        try:
            os.unlink(spooled.path)
            _fsync_dir(spooled.path.parent)
        except FileNotFoundError:
            pass
        except OSError as e:
            # it will go out again (same Idempotency-Key): at-least-once, never lost
            log.error("csv_unlink_failed", kind=kind, file=spooled.name, error=str(e))
        self.counters.inc("csv_uploaded_files", kind=kind)
        self.counters.inc("csv_uploaded_bytes", size, kind=kind)
        data = detail.get("data")
        log.info(
            "csv_uploaded",
            kind=kind,
            file=spooled.original,
            spooled_as=spooled.name,
            bytes=size,
            status=status,
            estimated_time_to_complete=(
                data.get("estimated_time_to_complete") if isinstance(data, dict) else None
            ),
        )

    def _reject(
        self, spooled: Spooled, status: int | None, detail: Mapping[str, Any], *, reason: str
    ) -> None:
        """Sidecar first, then the move: a crash in between uploads the file again and writes
        the same sidecar again."""
        kind = spooled.kind
        self.states[kind].dead_lettered += 1
        target_dir = self.rejected_dir(kind)
        target = target_dir / spooled.name
        sidecar = target_dir / (spooled.name + ".json")
        record = {
            "time": datetime.fromtimestamp(self.wall_clock(), UTC).isoformat(timespec="seconds"),
            "kind": kind,
            "endpoint": CSV_PATHS[kind],
            "file": spooled.original,
            "spooled_as": spooled.name,
            "bytes": spooled.size,
            "status": status,
            "reason": reason,
            "message": detail.get("message"),
            "errors": detail.get("errors"),
        }
        self.counters.inc("csv_rejected_files", kind=kind, reason=reason)
        try:
            _makedirs(target_dir)
            tmp = target_dir / f".{spooled.name}.json.{secrets.token_hex(4)}.tmp"
            text = json.dumps(record, ensure_ascii=False, indent=2) + "\n"
            write_private_file(tmp, text.encode("utf-8", "backslashreplace"))
            os.replace(tmp, sidecar)
            os.replace(spooled.path, target)
            _fsync_dir(target_dir)
            _fsync_dir(spooled.path.parent)
        except OSError as e:
            log.error("csv_reject_move_failed", kind=kind, file=spooled.name, error=str(e))
            if is_fd_shortage(e):
                # out of descriptors, not a broken spool: keep the file where it is; the
                # next scan sends it again and this is tried again (nothing is lost)
                return
            # cannot move it aside: delete it rather than upload it again and again
            try:
                os.unlink(spooled.path)
            except FileNotFoundError:
                pass
            except OSError:
                self._stuck.add(spooled.path)
            target = spooled.path
        log.error(
            "csv_rejected",
            kind=kind,
            file=spooled.original,
            spooled_as=spooled.name,
            status=status,
            reason=reason,
            message=record["message"],
            errors=record["errors"],
            moved_to=str(target),
        )

    def _remove_stale_temps(self, kind: str) -> None:
        """Leftovers of an `upload` that crashed mid-copy (a live one is younger than this)."""
        now = self.wall_clock()
        try:
            entries = list(os.scandir(self.kind_dir(kind)))
        except FileNotFoundError:
            return
        for entry in entries:
            if not (is_temp_name(entry.name) and entry.name.endswith(".tmp")):
                continue
            try:
                if entry.is_file() and now - entry.stat().st_mtime > STALE_TEMP_S:
                    os.unlink(entry.path)
                    log.info("csv_spool_stale_temp_removed", kind=kind, file=entry.name)
            except OSError:
                continue
