"""The Forward intake process: the Forward listeners, run on a core of their own.

Why a process: the agent's event loop is one core. A 1000-event Forward message costs about
2 µs of CPU per event to read, decode, validate and JSON-encode, and as much again to store,
batch and post; in one process the two halves share that core and a Forward burst is
delivered at about half the rate it could be stored. Here the first half runs in a child
process (`forward_process.ForwardProcess` starts and watches it); the agent keeps the queue,
the fsyncs and delivery. Every check stays where it was: this process runs the same
`ForwardServer` and the same `Ingest` validation, and only the storing step differs.

What crosses the link (`link`, msgpack frames over a socketpair):
- agent → here: `hello` first (the listeners, their handshake settings, the log settings;
  the listening sockets themselves are inherited descriptors), then `durable(token)`: every
  store message up to `token` is fsynced (or, with `fsync = "never"`, written to the OS), so
  the acks that waited for it go out; `stop` at the agent's shutdown.
- here → agent: `ready` once every listener is served; `store(token, ack, events, runs,
  counters)`: the validated payloads per resource (JSON lines, and their crc32s as the queue
  stores them: the most costly part of framing, done here), the events they came from
  (counted as received by the agent), whether an ack waits for this message, and the counter
  increments since the last message (rejections, connections, acks...: one set of counters,
  the agent's, for `status` and /metrics).

Crash guarantees: nothing changes for a client that asks for acks. An ack is still sent only
after the agent reports the records durable; if either process dies first, the client keeps
the chunk and sends it again (at-least-once). Without acks, what a dying process held in
memory is lost, as it was in one process. If the agent dies, the link closes and this process
exits at once (nothing here can be stored anywhere else); if this process dies, the agent
logs it and starts another on the same listening sockets.

Shutdown: the agent sends `stop` and closes its end of the link. This process then stops the
listeners the way the agent's own shutdown does (each connection stores what the kernel
already holds), sends the last store message and exits once it is written. It ignores SIGTERM
and SIGINT: systemd and a terminal signal every process of the group, and the agent, which is
still storing, decides when this one is done. A link that ends without `stop`, or a write to
it that fails, means the agent died: the process exits at once, without draining its peers
(it could store nothing, and a gzip flood drained for nobody once held 3 GB here).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from bisect import bisect_left
from collections.abc import Collection
from itertools import accumulate
from typing import Any

import structlog
import trio

from traits_agent import malloc
from traits_agent.intake.forward import ForwardServer
from traits_agent.intake.handshake import Security
from traits_agent.intake.ingest import Ingest
from traits_agent.intake.link import LinkClosed, LinkWriter, MessageReader
from traits_agent.observe import log as logsetup
from traits_agent.observe.metrics import Counters
from traits_agent.queue.framing import record_crcs
from traits_agent.schema import Resource

log = structlog.get_logger(__name__)

# message kinds (the first item of every message)
HELLO, READY, STORE, DURABLE, STOP = "hello", "ready", "store", "durable", "stop"
#: the shutdown drain stops reading the peers once this much waits for the link
DRAIN_BYTES = 64 * 1024 * 1024
#: a store message is sent once its payloads pass this many bytes (and at every flush)
MESSAGE_BYTES = 1024 * 1024


class LinkCounters(Counters):
    """Counters whose increments are also kept to be sent to the agent (`take`)."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        #: set by every increment: `_ship` sends them promptly
        self.changed = trio.Event()

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        super().inc(name, amount, **labels)
        key = (name, tuple(sorted(labels.items())))
        self._pending[key] = self._pending.get(key, 0) + amount
        self.changed.set()

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def take(self) -> list[list[Any]]:
        """The increments since the last call, as `[name, amount, [[label, value], ...]]`."""
        out = [[name, n, [list(kv) for kv in key]] for (name, key), n in self._pending.items()]
        self._pending.clear()
        if self.changed.is_set():
            # a new event only for a set one: `_ship` waits on the unset one it holds (a
            # store message that takes the counters must not leave it waiting on an event
            # that no increment sets any more)
            self.changed = trio.Event()
        return out


class LinkIngest(Ingest):
    """`Ingest` whose storing step sends the payloads to the agent instead of appending them:
    validation, encoding and rejection counting are the inherited ones."""

    def __init__(self, writer: LinkWriter, counters: LinkCounters) -> None:
        super().__init__({}, counters)
        self.counters: LinkCounters = counters
        self.writer = writer
        #: the token of the message being filled (sent with it; acked by `durable`)
        self.token = 1
        self.ack = False
        self._runs: dict[str, list[bytes]] = {}
        self._events = 0
        self._bytes = 0

    def _append_held(self, held: dict[str, tuple[Resource, list[bytes]]], events: int) -> set[str]:
        """Hold the payloads for the message being filled, sending it each time it reaches
        `MESSAGE_BYTES`: one call may bring a slice of 4096 events of up to 1 MiB each (a
        single Forward message of tens of MB of JSON), and one link message must stay under
        `link.MAX_MESSAGE_BYTES`, so a run is cut between payloads (each message is then at
        most `MESSAGE_BYTES` plus one payload)."""
        self._events += events
        touched = set()
        for name, (_, payloads) in held.items():
            if not payloads:
                continue
            touched.add(name)
            ends = list(accumulate(map(len, payloads)))
            start = done = 0
            while start < len(payloads):
                # the payloads that bring the message to MESSAGE_BYTES (all if they do not)
                cut = bisect_left(ends, done + MESSAGE_BYTES - self._bytes, lo=start) + 1
                cut = min(cut, len(payloads))
                part = payloads[start:cut] if start or cut < len(payloads) else payloads
                run = self._runs.get(name)
                if run is None:
                    self._runs[name] = list(part)
                else:
                    run.extend(part)
                self._bytes += ends[cut - 1] - done
                done, start = ends[cut - 1], cut
                if self._bytes >= MESSAGE_BYTES:
                    self.send()
        return touched

    def flush(self, names: set[str]) -> None:
        """Send what is held (the Forward server calls this after every read)."""
        self.send()

    def send(self) -> None:
        """Send the message being filled, if it holds anything."""
        if not (self._runs or self._events or self.ack or self.counters.pending):
            return
        # the record CRCs the queue stores are computed here, on this process's core
        runs = [
            [name, b"\n".join(run), len(run), record_crcs(run)] for name, run in self._runs.items()
        ]
        self.writer.send([STORE, self.token, self.ack, self._events, runs, self.counters.take()])
        self.token += 1
        self.ack = False
        self._runs = {}
        self._events = self._bytes = 0

    async def room(self) -> None:
        """Wait while the link's buffer is full (the agent is behind): reading stops."""
        await self.writer.room()

    def full(self) -> bool:
        """Whether what waits for the link (sent or not) is past `DRAIN_BYTES`: the shutdown
        drain, which cannot wait, stops reading there (a read of gzip values can inflate a
        hundredfold, and every connection drains in one go)."""
        return self.writer.buffered + self._bytes > DRAIN_BYTES


class LinkGate:
    """The `AckGate` of this process: a mark is a store message's token, durable once the
    agent says so (`durable`)."""

    waits_for_fsync = True

    def __init__(self, ingest: LinkIngest) -> None:
        self.ingest = ingest
        self.durable = 0
        self._changed = trio.Event()

    def mark(self, names: Collection[str]) -> int | tuple[()]:
        """Everything stored so far: the message being filled, which now asks for an ack.
        A chunk that stored nothing (no events, or all rejected) gets `()`, as from
        `AckGate.mark`: nothing may send the message being filled after it (no flush
        follows a read that touched no queue), so its reply must not wait for that one."""
        if not names:
            return ()
        return self._mark()

    def _mark(self) -> int:
        self.ingest.ack = True
        return self.ingest.token

    def written(self) -> None:
        pass  # the agent asks for its fsync round when the message arrives

    async def wait(self, mark: int | tuple[()]) -> None:
        """Return once the message `mark` names is durable. `()` is the mark of a reply that
        stores nothing (a handshake answer, a refusal): it waits until the agent has taken
        everything sent so far, so the counters that reply follows (`auth_failed`) are in
        the agent's `status` before the client can see the reply."""
        if mark == ():
            mark = self._mark()
            self.ingest.send()
        while self.durable < mark:  # type: ignore[operator]
            await self._changed.wait()

    def reached(self, token: int) -> None:
        """The agent reports every message up to `token` durable."""
        if token > self.durable:
            self.durable = token
            event, self._changed = self._changed, trio.Event()
            event.set()


def security_from(value: Any) -> Security | None:
    if not value:
        return None
    key, users = value
    return Security(key, dict(users))


async def serve(link_fd: int) -> None:
    """Run the listeners the agent's `hello` names until told to stop; see the module doc."""
    link = trio.socket.from_stdlib_socket(socket.socket(fileno=link_fd))
    reader = MessageReader(link)
    hello = await reader.next()
    if not hello or hello[0] != HELLO:
        raise LinkClosed(f"expected hello, got {hello!r:.80}")
    settings = hello[1]
    for secret in settings["secrets"]:
        logsetup.add_secret(secret)
    logsetup.setup(settings["log_level"], settings["log_format"])
    structlog.contextvars.bind_contextvars(process="forward_intake")
    writer = LinkWriter(link)
    counters = LinkCounters()
    ingest = LinkIngest(writer, counters)
    gate = LinkGate(ingest)
    server = ForwardServer(ingest, gate)  # type: ignore[arg-type]
    stop = trio.Event()
    async with trio.open_nursery() as outer:
        outer.start_soon(_write_or_exit, writer)
        async with trio.open_nursery() as helpers:
            helpers.start_soon(_replies, reader, gate, stop)
            helpers.start_soon(_ship, ingest)
            async with trio.open_nursery() as listeners:
                for name, fd, security in settings["listeners"]:
                    sock = socket.socket(fileno=fd)
                    await listeners.start(
                        lambda task_status, s=sock, n=name, sec=security: server.serve(
                            s, name=n, security=security_from(sec), task_status=task_status
                        )
                    )
                writer.send([READY, os.getpid()])
                await stop.wait()
                listeners.cancel_scope.cancel()
            ingest.send()  # what the connections stored while they closed
            helpers.cancel_scope.cancel()
        writer.close()


async def _replies(reader: MessageReader, gate: LinkGate, stop: trio.Event) -> None:
    """Apply the agent's `durable` messages until its `stop`: then stop the listeners (each
    connection stores what the kernel holds) and hand everything over. A link that ends
    without `stop` (or breaks) means the agent is gone: nothing here can be stored any more,
    and draining the peers would only cost CPU and memory, so the process exits at once (a
    client with acks sends its unacked chunks again to the next agent)."""
    try:
        while True:
            message = await reader.next()
            if message is None:
                break
            if message[0] == DURABLE:
                gate.reached(message[1])
            elif message[0] == STOP:
                stop.set()
                return
    except LinkClosed as e:
        log.error("forward_intake_link_broken", error=str(e))
    _gone("the link ended without a stop")


async def _write_or_exit(writer: LinkWriter) -> None:
    """The link's writer; when the agent is gone (a write fails), exit at once (`_replies`)."""
    try:
        await writer.run()
    except LinkClosed as e:
        _gone(str(e))


def _gone(why: str) -> None:
    log.warning("forward_intake_agent_gone", error=why)
    os._exit(3)


async def _ship(ingest: LinkIngest) -> None:
    """Counter increments (a rejection, a connection...) and the events of a read whose events
    were all rejected reach the agent promptly, for `status`: right after the step that made
    them (riding its store message when there is one)."""
    while True:
        await ingest.counters.changed.wait()
        await trio.lowlevel.checkpoint()  # the step that counted may send its message first
        ingest.send()


def main(argv: list[str]) -> int:
    """`python -m traits_agent.intake.forward_worker LINK_FD` (started by the agent only)."""
    if len(argv) != 2:
        print("started by traits-agent only", file=sys.stderr)
        return 2
    # the agent decides when this process stops (it closes the link): systemd's SIGTERM and a
    # terminal's Ctrl-C reach every process of the group, and this one must keep storing
    # until the agent has taken its last message
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    malloc.tune()
    failed = False
    try:
        trio.run(serve, int(argv[1]))
    except* LinkClosed as group:
        print(f"forward intake: {group.exceptions[0]}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
