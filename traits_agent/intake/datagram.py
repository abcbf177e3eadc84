"""Datagram sources: a Unix datagram socket and a loopback UDP socket.

Each datagram holds one or more msgpack Forward-protocol entries (see `wire`). Datagram senders
never wait for us, so the cost of falling behind is loss in the kernel, not back-pressure.
Measured on this machine class, `await sock.recv()` per datagram reaches ~45k datagrams/s and
dropped 63% of a 300k burst; so the loop waits for readability once, then drains the
non-blocking socket, many datagrams per system call (`mmsg.Reader`: `recvmmsg`).

Draining comes first, handling second. A burst from a Python sender (~190k one-event
datagrams/s) arrives faster than one core can handle it (~120k/s), so part of it must wait; in
the kernel a small datagram on loopback is charged ~832 bytes of receive buffer (its socket
buffer's truesize: a 109-byte datagram, `bench_intake.py --hold` prints it), so an 8 MiB buffer
holds ~20k of them: 0.1 s of such a burst. Read out at once, the same datagram costs ~127 bytes
of our memory (`Backlog` keeps it compact). So each round first reads everything the kernel
holds into the `Backlog` (at most `BACKLOG_BYTES`), then hands its oldest slice (at most
`DRAIN_MAX` datagrams, `DRAIN_MAX_BYTES`) to the sink, then lets the other tasks run. Reading
costs ~1.1 µs a datagram (~0.4 more in and out of the backlog), handling ~3.5 µs, so the
kernel's buffer is emptied every few ms while a burst lasts, and the backlog is worked off
after it. The kernel's buffer still has to cover the gaps between two reads (our slice, the
other tasks' turns, the process descheduled on a busy host): with 1 MiB a run lost 7.5 % with
room in the backlog, with 8 MiB none. The backlog's memory is held only while a burst is
queued. When it is full the loop stops reading and the kernel drops what its buffer cannot
hold, as before (counted in /proc/net/snmp RcvbufErrors; `udp_rcvbuf_errors` in the metrics);
`datagram_backlog_full` is logged.

SO_REUSEPORT worker processes were considered (issue 12): the kernel spreads datagrams over
reuseport sockets by the sender's address and port, so one sender's burst all lands on one
socket, and with 2 cores one is the sender's anyway.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections import deque
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path

import structlog
import trio

from traits_agent.intake.mmsg import BATCH, Reader
from traits_agent.intake.mmsg import MAX_DATAGRAM as MAX_DATAGRAM
from traits_agent.intake.unixsock import bind_unix

log = structlog.get_logger(__name__)

#: a slice handed to the sink holds at most this many datagrams...
DRAIN_MAX = 1024
#: ... and this many bytes, so 1024 large datagrams never go to the sink at once
DRAIN_MAX_BYTES = 4 * 1024 * 1024
#: datagrams read but not handled yet, per source: at most this many bytes (as `Backlog`
#: counts them), plus one `recvmmsg` call's worth; ~130k one-event datagrams
BACKLOG_BYTES = 16 * 1024 * 1024
#: counted per datagram held in `Backlog` (its size in a list: a pointer, an int past 256) ...
_PER_DATAGRAM = 16
#: ... and per read (the headers of its bytes object and of its list of sizes)
_PER_CHUNK = 160
#: counted per datagram held as a bytes object of its own (header, rounding, list slot)
_BYTES_OBJECT = 48
#: Linux's SO_RCVBUFFORCE, which Python's socket module does not name
_SO_RCVBUFFORCE = getattr(
    socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None
)

#: takes a burst; returns how many datagrams of it it took; called again with the rest after
#: the other tasks had a turn
Sink = Callable[[list[bytes]], int]


def set_receive_buffer(sock: socket.socket, wanted: int, name: str) -> int:
    """Ask for a large SO_RCVBUF and log what the kernel granted (capped by net.core.rmem_max
    unless we hold CAP_NET_ADMIN, in which case SO_RCVBUFFORCE goes past it)."""
    if wanted:
        for option in (_SO_RCVBUFFORCE, socket.SO_RCVBUF):
            if option is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, wanted)
                break
            except OSError:
                continue
    # Linux reports (and sets) double the size asked for, half of it for its bookkeeping; a
    # request above net.core.rmem_max without CAP_NET_ADMIN is capped at rmem_max
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    log.info("receive_buffer_set", source=name, wanted=wanted, granted=granted)
    if wanted and granted < wanted:
        log.warning(
            "receive_buffer_smaller_than_asked",
            source=name,
            wanted=wanted,
            granted=granted,
            hint="raise net.core.rmem_max (the package does, in "
            "/usr/lib/sysctl.d/60-traits-agent.conf; traits-agent doctor checks it)",
        )
    return granted


def bind_unix_datagram(path: Path, mode: int) -> socket.socket:
    """Bind the Unix datagram socket game servers send to (see `unixsock.bind_unix`)."""
    return bind_unix(path, socket.SOCK_DGRAM, mode)


def bind_udp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class Backlog:
    """Datagrams read from the kernel but not handed to the sink yet, oldest first.

    Kept compact, because its size decides how long a burst it absorbs: each read's datagrams
    as one bytes object and the list of their sizes (a 109-byte datagram costs ~125 bytes
    here, ~150 as a bytes object of its own, ~832 in the kernel's receive buffer). `take` cuts
    the oldest out again, at most `DRAIN_MAX` datagrams and `DRAIN_MAX_BYTES` at a time: what
    the sink gets in one call."""

    def __init__(self, max_bytes: int = BACKLOG_BYTES) -> None:
        self.max_bytes = max_bytes
        #: bytes held, as counted against max_bytes (see `_PER_DATAGRAM`, `_PER_CHUNK`)
        self.bytes = 0
        #: the most it held since it was made
        self.peak = 0
        # per read: [datagrams joined, their sizes, how many were taken, at which offset]
        self._chunks: deque[list] = deque()
        # what the sink did not take yet (`put_back`): handed over first
        self._front: list[bytes] = []
        self._front_bytes = 0

    def __bool__(self) -> bool:
        return bool(self._chunks) or bool(self._front)

    def room(self) -> bool:
        return self.bytes < self.max_bytes

    def add(self, datagrams: list[bytes]) -> int:
        """Append freshly read datagrams; returns their bytes as counted.

        Into an empty backlog a read that fits one slice is kept as it is, and `take` hands
        it over next: compacting it (a join, and a slice per datagram to cut it out again)
        would cost ~3 µs per read, plus ~0.16 µs a datagram, for memory it holds only until
        the sink runs. Compacting pays while a burst waits behind it, and only then."""
        if not self and len(datagrams) <= DRAIN_MAX:
            nbytes = sum(map(len, datagrams))
            if nbytes <= DRAIN_MAX_BYTES:
                self._set_front(datagrams, nbytes)
                self.peak = max(self.peak, self.bytes)
                return self._front_bytes
        blob = datagrams[0] if len(datagrams) == 1 else b"".join(datagrams)
        self._chunks.append([blob, list(map(len, datagrams)), 0, 0])
        counted = len(blob) + _PER_DATAGRAM * len(datagrams) + _PER_CHUNK
        self.bytes += counted
        self.peak = max(self.peak, self.bytes)
        return counted

    def take(self) -> list[bytes]:
        """The oldest datagrams, at most a slice's worth ([] when empty)."""
        if self._front:
            front, self._front = self._front, []
            self.bytes -= self._front_bytes
            self._front_bytes = 0
            return front
        out: list[bytes] = []
        room, nbytes, counted = DRAIN_MAX, 0, 0
        chunks = self._chunks
        while chunks and room:
            chunk = chunks[0]
            blob, sizes, i, at = chunk
            first, start = i, at
            if i == 0 and len(sizes) <= room and nbytes + len(blob) <= DRAIN_MAX_BYTES:
                # the whole read (the common case): cut it at its sizes in one go
                ends = list(accumulate(sizes))
                out += map(blob.__getitem__, map(slice, [0, *ends], ends))
                room -= len(sizes)
                nbytes += len(blob)
                counted += len(blob) + _PER_DATAGRAM * len(sizes) + _PER_CHUNK
                chunks.popleft()
                continue
            while i < len(sizes):
                size = sizes[i]
                if not room or (out and nbytes + size > DRAIN_MAX_BYTES):
                    room = 0
                    break
                out.append(blob[at : at + size])  # a copy (the same object if it is the whole blob)
                at += size
                nbytes += size
                i += 1
                room -= 1
            counted += at - start + _PER_DATAGRAM * (i - first)
            if i == len(sizes):
                chunks.popleft()
                counted += _PER_CHUNK
            else:
                chunk[2], chunk[3] = i, at
        self.bytes -= counted
        return out

    def put_back(self, datagrams: list[bytes]) -> None:
        """Return the part of a slice the sink did not take yet: it goes first again."""
        if datagrams:
            self._set_front(datagrams, sum(map(len, datagrams)))

    def _set_front(self, datagrams: list[bytes], nbytes: int) -> None:
        """Hold `datagrams` (`nbytes` long, the front empty) as they are, handed over first;
        counted as bytes objects of their own."""
        self._front = datagrams
        self._front_bytes = nbytes + _BYTES_OBJECT * len(datagrams)
        self.bytes += self._front_bytes


def reads_batched(sock: socket.socket) -> bool:
    """Whether `serve_datagrams` reads `sock` with `recvmmsg` by default: UDP yes, Unix no
    (see `serve_datagrams` for the figures)."""
    return sock.family != socket.AF_UNIX


async def serve_datagrams(
    sock: socket.socket,
    sink: Sink,
    *,
    name: str,
    on_error: Callable[[str], None],
    backlog: Backlog | None = None,
    batch: bool | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Read datagrams from a bound socket until cancelled, handing slices to `sink`.

    `sink` runs synchronously between reads, so a sink slower than the senders fills the
    backlog (`Backlog`, see the module docstring), then the kernel's buffer, then shows up as
    kernel drops, which UDP reports in /proc/net/snmp (RcvbufErrors); `on_error(reason)` counts
    datagrams we threw away ourselves (`too_large`, and `internal_error` when the sink raised:
    the source logs `datagram_burst_failed` and goes on, so no datagram can stop it).
    `batch` reads with `recvmmsg` (True) or one datagram per `recv` (False, the reference the
    tests compare against); by default UDP sockets read with `recvmmsg` and Unix ones with
    `recv`. Measured on this machine class, 200,000 one-event datagrams from a C sender into
    a Unix socket at `max_dgram_qlen` 10: 44-45k events per CPU-second with `recvmmsg`
    against 62-68k with `recv`; at `max_dgram_qlen` 512 (the package's sysctl, measured in a
    network namespace) the two are within noise of each other (recv 145-159k, recvmmsg
    119-171k), and reading by depth (recv until a read finds 64, then recvmmsg) did no better
    than recvmmsg at 10. A UDP burst queues thousands, and there `recvmmsg` costs ~1.1 µs a
    datagram against ~1.8 (`bench_intake.py --drain`).
    """
    sock.setblocking(False)
    reader = Reader(sock, batch=reads_batched(sock) if batch is None else batch)
    held = Backlog() if backlog is None else backlog
    task_status.started(sock.getsockname())
    try:
        while True:
            if not held:
                await trio.lowlevel.wait_readable(sock)
            _fill(reader, held, name, on_error)
            burst = held.take()
            if burst:
                held.put_back(_deliver(burst, sink, name, on_error))
            # let the other tasks run; a cancellation here leaves the backlog to `finally`
            await trio.lowlevel.checkpoint()
    finally:
        # Stopping: handle the backlog and what the kernel already holds (the senders think it
        # was delivered), then close. Synchronous, so it also runs under cancellation, and
        # bounded by the backlog and what the kernel could hold when the stop began (its
        # receive buffer): a sender that keeps sending cannot hold the stop open.
        with contextlib.suppress(OSError):
            _drain_held(sock, reader, held, sink, name, on_error)
        with contextlib.suppress(OSError):
            sock.close()
        reader.close()


def _drain_held(
    sock: socket.socket,
    reader: Reader,
    held: Backlog,
    sink: Sink,
    name: str,
    on_error: Callable[[str], None],
) -> int:
    """At stop: handle the backlog, then read and handle at most the socket's receive
    buffer's worth of bytes (what the kernel can have held when the stop began); returns the
    bytes read from the kernel."""
    budget = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    read = 0
    while True:
        while held:
            burst = held.take()
            while burst:
                burst = _deliver(burst, sink, name, on_error)
        if read >= budget:
            return read
        got = _fill(reader, held, name, on_error)
        if not got:
            return read
        read += got


def _deliver(
    burst: list[bytes], sink: Sink, name: str, on_error: Callable[[str], None]
) -> list[bytes]:
    """Hand `burst` to the sink; what it did not take yet."""
    try:
        taken = sink(burst)
    except Exception:
        # A bug of ours that a peer's bytes found (the sink guards each datagram; this is
        # the last line): count it, log it, keep serving. Only this burst is affected.
        on_error("internal_error")
        log.exception("datagram_burst_failed", source=name, datagrams=len(burst))
        return []
    if taken >= len(burst):
        return []
    return burst[max(taken, 1) :]


def _fill(reader: Reader, held: Backlog, name: str, on_error: Callable[[str], None]) -> int:
    """Read what the socket holds into `held`, until it is empty or `held` is full; returns
    the bytes added (as `held` counts them)."""
    added = 0
    while held.room():
        try:
            got, too_large = reader.read(BATCH)
        except OSError as e:  # e.g. ECONNREFUSED bounced on UDP: not ours to stop on
            log.warning("datagram_receive_failed", source=name, error=str(e))
            return added
        for _ in range(too_large):
            on_error("too_large")
        if got:
            added += held.add(got)
        if len(got) + too_large < BATCH:
            return added  # a read returns fewer only when the socket is empty
    log.warning(
        "datagram_backlog_full",
        source=name,
        backlog_bytes=held.bytes,
        hint="the agent handles datagrams more slowly than they arrive; the kernel drops "
        "what its receive buffer cannot hold (udp_rcvbuf_errors)",
    )
    return added
