"""The agent's side of the Forward intake process (`forward_worker`): start it, store what it
sends, tell it what is durable, start another if it dies.

The agent binds the Forward listeners (or takes them from systemd) and keeps them: the
intake process gets copies of their descriptors, so connections wait in the listen backlog
while a new process starts, and the addresses never change. Each store message is appended
to the queues in order, exactly as `Ingest` appends a Forward read in one process
(`Ingest.store_runs`); a message that carries an ack is marked on the `AckGate`, and its token
is sent back once the mark is durable, in order.

A process that dies is logged (`forward_intake_exited`, with its exit status), counted
(`forward_intake_restarts`) and started again after a back-off (0.5 s doubling to 30 s; back
to 0.5 s after a minute up). A message the agent fails to store (a bug of ours) is counted,
logged (`forward_intake_store_failed`), never acked, and ends that process the same way. At
shutdown the agent sends `stop` and closes its side of the link, goes on storing what the
process sends until it exits (at most `STOP_GRACE_S`, then it is killed), and only then does
the agent's own final fsync run. (A link that ends without `stop` tells the process the agent
died: it exits without draining its peers.)

`"auto"` (`wanted`, `lazy`): a process only where the agent may use two CPUs or more
(`usable_cpus`: affinity and cgroup quota), started when a Forward peer first connects.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from traits_agent.intake.durability import AckGate, Mark
from traits_agent.intake.forward import ensure_listening
from traits_agent.intake.forward_worker import DURABLE, HELLO, READY, STOP, STORE
from traits_agent.intake.handshake import Security
from traits_agent.intake.ingest import Ingest
from traits_agent.intake.link import LinkClosed, LinkWriter, MessageReader, frame
from traits_agent.schema import RESOURCES

log = structlog.get_logger(__name__)

#: how long the agent waits, at shutdown, for the intake process to send its last messages
STOP_GRACE_S = 10.0
#: how long a new intake process may take to serve its listeners (else it is killed)
START_TIMEOUT_S = 60.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
#: a process up this long is not crash-looping: the back-off starts over
STABLE_S = 60.0


@dataclass(frozen=True)
class Listener:
    """A Forward listener the intake process serves: bound and listening."""

    name: str
    sock: socket.socket
    security: Security | None


def wanted(setting: str, listeners: int) -> bool:
    """Whether `listen.forward_process` asks for the intake process: "always", "never", or
    "auto" (when there is a Forward listener and the agent may use two CPUs or more: its
    affinity and its cgroup's CPU quota both allow it; `usable_cpus`)."""
    if setting == "always":
        return listeners > 0
    if setting == "never" or listeners == 0:
        return False
    return usable_cpus() >= 2


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup", proc_self: str = "/proc/self") -> float:
    """How many CPUs this process may keep busy: the CPUs of its affinity, capped by the CPU
    quota of its cgroup and of every cgroup above it (cgroup v2 `cpu.max`; v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us` of its own): systemd's `CPUQuota=100%` on a
    4-CPU host is one CPU, and a second process would only compete for it."""
    cpus = float(len(os.sched_getaffinity(0)))
    try:
        lines = Path(proc_self, "cgroup").read_text().splitlines()
    except OSError:
        return cpus
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: the unified hierarchy; a quota may sit on any ancestor
            here = Path(cgroup_root + path)
            while True:
                cpus = min(cpus, _quota(here / "cpu.max"))
                if here == Path(cgroup_root) or here.parent == here:
                    break
                here = here.parent
        elif "cpu" in controllers.split(","):
            base = Path(cgroup_root, controllers, path.lstrip("/"))
            try:
                quota = int((base / "cpu.cfs_quota_us").read_text())
                period = int((base / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0:
                cpus = min(cpus, quota / period)
    return cpus


def _quota(path: Path) -> float:
    """CPUs a v2 `cpu.max` ("max 100000" or "QUOTA PERIOD") allows; inf if none or unreadable."""
    try:
        quota, period = path.read_text().split()
        if quota != "max" and int(period) > 0:
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    return math.inf


#: what the intake process must not inherit: the API key (it never needs it), and systemd's
#: notification, watchdog and socket-activation variables (they are the agent's alone)
SCRUBBED_ENV = (
    "TRAITS_API_KEY",
    "CREDENTIALS_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment without `SCRUBBED_ENV`."""
    return {k: v for k, v in env.items() if k not in SCRUBBED_ENV}


def worker_command(link_fd: int) -> list[str]:
    """The intake process's command line. `-P`: `python -m` would put the working directory
    first on its sys.path, and an agent started from a directory others can write to (a
    shared /tmp) would run the `traits_agent` or `msgpack` planted there as its own user."""
    return [sys.executable, "-P", "-m", "traits_agent.intake.forward_worker", str(link_fd)]


class ForwardProcess:
    """Runs the Forward listeners in a child process (see the module docstring)."""

    def __init__(
        self,
        ingest: Ingest,
        gate: AckGate,
        listeners: list[Listener],
        *,
        log_level: str,
        log_format: str,
        secrets: list[str],
        lazy: bool = False,
    ) -> None:
        """`lazy`: start the first process only when a peer first connects (`"auto"`: an
        agent whose Forward listeners nobody uses costs no second process)."""
        self.ingest = ingest
        self.lazy = lazy
        #: "waiting" (lazy, nobody connected yet), "running", "restarting" (status)
        self.state = "waiting" if lazy else "running"
        self.gate = gate
        self.listeners = listeners
        self.log_level = log_level
        self.log_format = log_format
        self.secrets = secrets
        self.counters = ingest.counters
        #: the running process's pid (status, tests), None between processes
        self.pid: int | None = None
        self._unacked: set[str] = set()
        #: events in the store messages taken from all processes so far (the stop's count)
        self.stored_events = 0

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled: start the process (when lazy, at the first connection),
        store what it sends, start another if it dies. `task_status.started()` at once: the
        listeners are listening, and a connection waits in their backlog until a process
        serves it (a few hundred ms of Python start-up the agent's READY=1 need not wait
        for: a recovered backlog is already being delivered)."""
        for one in self.listeners:
            ensure_listening(one.sock)
        task_status.started()
        if self.lazy:
            await self._first_connection()
            log.info("forward_intake_starting", reason="first_connection")
        backoff = BACKOFF_FIRST_S
        while True:
            started = trio.current_time()
            self.state = "running"
            status = await self._one()
            self.state = "restarting"
            uptime = trio.current_time() - started
            if uptime >= STABLE_S:
                backoff = BACKOFF_FIRST_S
            self.counters.inc("forward_intake_restarts")
            log.error(
                "forward_intake_exited",
                status=status,
                uptime_s=round(uptime, 1),
                restart_in_s=backoff,
                hint="the Forward listeners wait for a new intake process; clients with acks "
                "send their unacked chunks again",
            )
            await trio.sleep(backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def _first_connection(self) -> None:
        """Return once a peer waits to be accepted on any listener (it stays in the backlog:
        nothing is accepted here)."""
        async with trio.open_nursery() as nursery:
            for one in self.listeners:
                nursery.start_soon(self._readable, one.sock, nursery.cancel_scope)

    @staticmethod
    async def _readable(sock: socket.socket, done: trio.CancelScope) -> None:
        await trio.lowlevel.wait_readable(sock)
        done.cancel()

    async def _one(self) -> int | None:
        """One process's life: its exit status, after it exited on its own (or broke the
        link and was killed). When cancelled (the agent is stopping), the process is sent
        `stop` and what it sends is stored until it exits (at most `STOP_GRACE_S`), then
        Cancelled goes on."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # the hello is in the link before the process starts: an agent stopped before its
        # writer task ran still hands the process its settings (it then serves, drains what
        # it accepted and exits 0 instead of failing on a link without a hello)
        ours.sendall(frame([HELLO, self._hello()]))
        fds = [theirs.fileno(), *(one.sock.fileno() for one in self.listeners)]
        try:
            proc = await trio.lowlevel.open_process(
                worker_command(fds[0]),
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                env=child_environment(os.environ),
            )
        finally:
            theirs.close()
        self.pid = proc.pid
        link = trio.socket.from_stdlib_socket(ours)
        reader = MessageReader(link)
        writer = LinkWriter(link)
        ready = None
        broken = False
        acks: trio.MemorySendChannel[tuple[int, Mark]]
        acks, pending = trio.open_memory_channel(float("inf"))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                nursery.start_soon(self._send_durable, pending, writer)
                with trio.fail_after(START_TIMEOUT_S):
                    ready = await self._apply_until(reader, acks, READY)
                if ready is not None:
                    log.info("forward_intake_started", pid=proc.pid)
                    await self._apply_until(reader, acks, None)
                # the link ended: the process is exiting on its own (it is not being stopped:
                # that is `_stop`, below); reap it here, so it is not taken for one to stop
                with trio.move_on_after(STOP_GRACE_S):
                    await proc.wait()
                nursery.cancel_scope.cancel()
        except* (LinkClosed, trio.TooSlowError) as group:
            log.error("forward_intake_link_broken", pid=proc.pid, error=str(group.exceptions[0]))
            proc.kill()
            broken = True  # killed: nothing to drain, and the link would only break again
        finally:
            if not broken and proc.returncode is None and proc.poll() is None:
                # the agent is stopping (or failed): let the process hand over what it holds
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + STOP_GRACE_S
                    await self._stop(proc, reader, acks, ready=ready is not None)
                if proc.poll() is None:
                    proc.kill()
            link.close()
            self.pid = None
        await proc.wait()
        return proc.returncode

    def _hello(self) -> dict[str, Any]:
        return {
            "log_level": self.log_level,
            "log_format": self.log_format,
            "secrets": self.secrets,
            "listeners": [
                [
                    one.name,
                    one.sock.fileno(),
                    [one.security.shared_key, dict(one.security.users)] if one.security else None,
                ]
                for one in self.listeners
            ],
        }

    async def _apply_until(
        self,
        reader: MessageReader,
        acks: trio.MemorySendChannel[tuple[int, Mark]],
        kind: str | None,
    ) -> Any:
        """Store the messages that arrive until one of `kind` (returned) or the end of the
        link (None)."""
        while True:
            message = await reader.next()
            if message is None:
                return None
            if message[0] == STORE:
                self._store(message, acks)
            elif message[0] != kind:
                raise LinkClosed(f"unexpected message {message[0]!r:.40}")
            if message[0] == kind:
                return message

    def _store(self, message: list[Any], acks: trio.MemorySendChannel[tuple[int, Mark]]) -> None:
        """Append a store message's runs, count its counters; queue its ack's mark."""
        _, token, ack, events, runs, counters = message
        self.stored_events += events
        for name, amount, labels in counters:
            self.counters.inc(name, amount, **dict(labels))
        held = []
        for name, joined, count, crcs in runs:
            resource = RESOURCES.get(name)
            payloads = joined.split(b"\n")
            if resource is None or len(payloads) != count or len(crcs) != 4 * count:
                raise LinkClosed(f"a store message with a bad run ({name!r:.40}, {count})")
            held.append((resource, payloads, crcs))
        try:
            touched = self.ingest.store_runs(held, events)
            if touched:
                self.ingest.flush(touched)
        except Exception as e:
            # A bug of ours that the child's message found. In one process it would cost the
            # connection that sent it; here it must not stop the agent (datagrams, delivery)
            # nor be acked: counted, logged with its traceback, and the link treated as
            # broken: the child is replaced, its peers reconnect and resend what was unacked.
            self.counters.inc("rejected_events", events, reason="internal_error")
            log.exception("forward_intake_store_failed", events=events, token=token)
            raise LinkClosed(f"storing a message failed: {e!r:.200}") from e
        if touched:
            self.gate.written()
            self._unacked |= touched
        if ack:
            acks.send_nowait((token, self.gate.mark(self._unacked)))
            self._unacked = set()

    async def _send_durable(
        self, pending: trio.MemoryReceiveChannel[tuple[int, Mark]], writer: LinkWriter
    ) -> None:
        """Tell the process, in order, which store messages are durable."""
        async for token, mark in pending:
            await self.gate.wait(mark)
            writer.send([DURABLE, token])

    async def _stop(
        self,
        proc: trio.Process,
        reader: MessageReader,
        acks: trio.MemorySendChannel[tuple[int, Mark]],
        *,
        ready: bool,
    ) -> None:
        """At shutdown: send `stop` and close our side of the link, then store what the
        process sends until it exits. A process stopped while it was starting (`ready` not
        seen yet) still sends its `ready` first, then what it drained. (Our writer task is
        gone by now: `stop` is written here, whole, after whatever it had written.)"""
        with contextlib.suppress(OSError):
            await reader.sock.send(frame([STOP]))  # a few bytes: the socket takes them whole
            reader.sock.shutdown(socket.SHUT_WR)
        before = self.stored_events
        try:
            if ready or await self._apply_until(reader, acks, READY) is not None:
                await self._apply_until(reader, acks, None)
        except LinkClosed as e:
            log.error("forward_intake_link_broken", pid=proc.pid, error=str(e))
            proc.kill()  # it can hand nothing more over: don't wait out the grace for it
        await proc.wait()
        log.info(
            "forward_intake_stopped",
            pid=proc.pid,
            status=proc.returncode,
            events=self.stored_events - before,
        )
