"""The agent: one trio nursery tree from sockets to the API, and its shutdown sequence.

    root nursery
    ├── fake API (only with --fake-api) · signal watcher
    └── delivery nursery ─ one Lane per resource · CSV spool · group-commit syncer · watchdog ·
        │                  STATUS
        └── intake nursery ─ datagram sources · Forward stream listeners (acks after fsync),
                             or the Forward intake process's supervisor
                             (`intake.forward_process`) · control socket · /metrics

Start-up: queues are opened and recovered (synchronously, before any socket is bound), then the
lanes start (a recovered backlog leaves at once), then the sockets are bound and systemd is told
READY=1. Shutdown (SIGTERM/SIGINT): the intake nursery is cancelled, which stops reading (each
source drains what the kernel already holds); every queue is flushed and fsynced; in-flight
requests get `SHUTDOWN_GRACE_S` to finish, then are abandoned (their batches stay queued and are
sent again after restart: at-least-once); queues are closed. The backlog stays on disk.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from traits_agent import __version__, paths
from traits_agent.config import Config, ListenConfig, is_loopback_host, parse_host_port
from traits_agent.delivery.backoff import Backoff
from traits_agent.delivery.deadletter import DeadLetters, dead_letters_for
from traits_agent.delivery.lane import Lane
from traits_agent.delivery.policy import UpstreamHealth, make_client
from traits_agent.delivery.spool import CsvSpool, receive_upload, spool_dir_for
from traits_agent.delivery.uploader import Uploader
from traits_agent.intake import activation, forward_process
from traits_agent.intake.activation import InheritedSockets, Kind
from traits_agent.intake.datagram import (
    bind_udp,
    bind_unix_datagram,
    serve_datagrams,
    set_receive_buffer,
)
from traits_agent.intake.direct import DirectIntake
from traits_agent.intake.durability import AckGate, Syncer
from traits_agent.intake.forward import ForwardServer, bind_forward_tcp, bind_forward_unix
from traits_agent.intake.handshake import Security
from traits_agent.intake.ingest import Ingest
from traits_agent.observe import status as observe_status
from traits_agent.observe import systemd
from traits_agent.observe.control import serve_control
from traits_agent.observe.metrics import Counters
from traits_agent.observe.prometheus import serve_metrics
from traits_agent.observe.status import AgentStatus
from traits_agent.observe.summary import run_summary
from traits_agent.queue import DiskQueue
from traits_agent.queue.files import make_dirs
from traits_agent.queue.quota import SharedQuota
from traits_agent.schema import RESOURCES

log = structlog.get_logger(__name__)

SHUTDOWN_GRACE_S = 3.0
#: a lane with a backlog and a healthy upstream that has not sent for this long is stalled
STALL_AFTER_S = 120.0
#: room left in a batch body for the JSON wrapper around the items
BODY_OVERHEAD = 64


@dataclass
class Agent:
    """Everything one running agent owns; built and run by `run`."""

    config: Config
    api_key: str
    counters: Counters = field(default_factory=Counters)
    queues: dict[str, DiskQueue] = field(default_factory=dict)
    lanes: dict[str, Lane] = field(default_factory=dict)
    uploader: Uploader | None = None
    csv_spool: CsvSpool | None = None
    dead_letters: DeadLetters | None = None
    listening: dict[str, Any] = field(default_factory=dict)
    base_url: str = ""
    started_at: float = field(default_factory=time.time)
    stopping: bool = False
    #: set by SIGTERM/SIGINT: stop reading, flush, exit
    stop_requested: trio.Event = field(default_factory=trio.Event)
    lanes_done: trio.Event = field(default_factory=trio.Event)
    #: socket files we bound ourselves (inherited ones belong to systemd's socket unit)
    owned_paths: list[str] = field(default_factory=list)
    #: the Forward intake process, when the listeners run in one (`listen.forward_process`)
    forward_process: forward_process.ForwardProcess | None = None

    # -- status (the model and its renderers live in observe/status.py) -------------------

    def status(self) -> AgentStatus:
        """What the agent is doing now, as the one typed status model."""
        return observe_status.build(self)

    def snapshot(self) -> dict[str, Any]:
        """What `traits-agent status --json` shows (over the control socket)."""
        return self.status().as_json()

    def receive_upload(
        self, kind: str, fd: int, name: str, *, cancelled: Any = None
    ) -> dict[str, Any]:
        """A CSV handed over the control socket (runs in a worker thread)."""
        answer = receive_upload(
            spool_dir_for(self.config), kind, fd, name, cancelled=cancelled, counters=self.counters
        )
        if "spooled" in answer and self.csv_spool is not None:
            trio.from_thread.run_sync(self.csv_spool.wake, kind)
        return answer

    def describe(self) -> str:
        """One line for systemd's STATUS=."""
        return self.status().summary()

    def is_progressing(self) -> bool:
        """False when some lane has a backlog, a healthy upstream, and has not moved for long:
        the pipeline is wedged (this is what the watchdog and /healthz report)."""
        now = trio.current_time()
        for name, lane in self.lanes.items():
            st = self.uploader.state(name) if self.uploader else None
            if st is not None and st.state != UpstreamHealth.OK:
                continue  # waiting on upstream is known and visible, not a hang
            if lane.queue.pending_items and lane.in_flight == 0:
                waiting = lane.waiting_since
                if waiting is not None and now - waiting > STALL_AFTER_S + lane.linger_s:
                    return False
        return True


def _agent_id(directory: Path) -> str:
    """A stable random id for this queue directory (part of every Idempotency-Key)."""
    path = directory / "agent-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        value = uuid.uuid4().hex
        tmp = path.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # a crash's leftover
        paths.write_private_file(tmp, (value + "\n").encode())
        os.replace(tmp, path)
        return value


def prepare_directories(config: Config) -> None:
    """Create (0700, whatever the umask) and check every directory the agent will keep state
    or sockets in, before it opens anything: one that another user owns or can write is
    refused with one line naming the config key (issue 7 item 4)."""
    wanted = config.private_directories()
    for key, directory in wanted:
        try:
            paths.ensure_private_dir(directory, key, tighten=key == "queue.dir")
        except paths.UnsafePathError as e:
            log.error("directory_refused", key=key, path=str(directory), error=str(e))
            raise


def open_queues(config: Config) -> dict[str, DiskQueue]:
    """Open (and recover) one queue per resource, logging what recovery found."""
    root = Path(config.queue.dir)
    make_dirs(str(root))
    queues: dict[str, DiskQueue] = {}
    try:
        for name in RESOURCES:
            q = DiskQueue.open(
                root / name,
                segment_bytes=config.queue.segment_bytes,
                fsync=config.queue.fsync,
                max_bytes=config.queue.max_bytes,  # then shared: see SharedQuota
                on_full=config.queue.on_full,
            )
            queues[name] = q
            report = q.recovery
            if q.pending_items or report.has_findings:
                log.info(
                    "queue_recovered", resource=name, pending=q.pending_items, **report.as_dict()
                )
    except BaseException:
        for q in queues.values():
            q.close()
        raise
    return queues


async def run(
    config: Config,
    api_key: str,
    *,
    fake_api: bool = False,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the agent until SIGTERM/SIGINT (or cancellation)."""
    agent = Agent(config=config, api_key=api_key)
    prepare_directories(config)
    agent.queues = open_queues(config)
    failed = True
    try:
        async with trio.open_nursery() as root:
            root.start_soon(_watch_signals, agent.stop_requested)
            base_url: str = config.api.base_url
            if fake_api:
                from traits_agent.fakeapi import FakeAPI

                api = FakeAPI(api_key=api_key, compact=True)
                await root.start(api.serve)
                assert api.url is not None  # set once serving
                base_url = api.url
                log.info("fake_api_started", url=base_url)
            agent.base_url = base_url
            await _run_pipeline(agent, base_url, task_status)
            root.cancel_scope.cancel()
        failed = False
    finally:
        close_errors: list[OSError] = []
        for q in agent.queues.values():
            try:
                q.close()
            except OSError as e:
                close_errors.append(e)
                log.error("queue_close_failed", path=str(getattr(q, "directory", "")), error=str(e))
        if not failed:
            # a failed start is reported once, as `agent_failed`, by the caller
            log.info("agent_stopped", queued=sum(q.pending_items for q in agent.queues.values()))
    if close_errors:
        # what was received may not be on disk: say so with the exit status (1), not only
        # in the log
        raise close_errors[0]


async def _run_pipeline(agent: Agent, base_url: str, task_status) -> None:
    config = agent.config
    agent.dead_letters = dead_letters_for(config)
    client = make_client(
        base_url,
        connect_timeout=config.api.connect_timeout_s,
        timeout=config.api.timeout_s,
        max_in_flight=config.api.max_in_flight,
    )
    agent_id = _agent_id(Path(config.queue.dir))
    agent.uploader = Uploader(
        client,
        api_key=agent.api_key,
        counters=agent.counters,
        dead_letters=agent.dead_letters,
        backoff=Backoff(
            initial_s=config.retry.initial_backoff_ms / 1000,
            max_s=config.retry.max_backoff_ms / 1000,
        ),
        max_in_flight=config.api.max_in_flight,
        agent_id=agent_id,
        playfab_arrays=config.api.playfab_arrays,
        request_deadline_s=2 * config.api.timeout_s,
    )
    agent.csv_spool = CsvSpool(
        spool_dir_for(config),
        client,
        api_key=agent.api_key,
        counters=agent.counters,
        backoff=agent.uploader.backoff,
        agent_id=agent_id,
        request_deadline_s=agent.uploader.request_deadline_s,
    )
    for name, queue in agent.queues.items():
        agent.lanes[name] = Lane(
            RESOURCES[name],
            queue,
            agent.uploader.deliver,
            max_items=config.batch.max_items,
            # the body adds a comma per item and the {"key":[...]} wrapper to the payloads
            max_bytes=config.batch.max_bytes - BODY_OVERHEAD - config.batch.max_items,
            linger_s=config.batch.linger_ms / 1000,
        )
    syncer = Syncer(
        agent.queues,
        agent.counters,
        policy=config.queue.fsync,
        interval_s=config.queue.fsync_interval_ms / 1000,
    )
    quota = SharedQuota(agent.queues, config.queue.max_bytes, floor=2 * config.queue.segment_bytes)
    quota.rebalance()
    ack_gate = AckGate(
        agent.queues,
        fsync=config.queue.fsync,
        request_sync=syncer.dirty,
        request_prompt_sync=syncer.prompt,
    )
    syncer.on_synced = ack_gate.synced
    for queue in agent.queues.values():  # commits never fsync in the event loop: the syncer does
        queue.sync_requested = syncer.settle
    ingest = Ingest(
        agent.lanes,
        agent.counters,
        on_write_error=syncer.write_failed,
        after_flush=quota.rebalance,
    )
    # the first line of every run, before a recovered backlog's first `batch_delivered`
    log.info(
        "agent_started",
        version=__version__,
        pid=os.getpid(),
        endpoint=base_url,
        queue_dir=config.queue.dir,
        fsync=config.queue.fsync,
        queued=sum(q.pending_items for q in agent.queues.values()),
    )
    try:
        await _serve(agent, base_url, client, syncer, ingest, ack_gate, task_status)
    finally:
        # also after a failed start (a port in use): no socket file of ours is left behind
        for path in agent.owned_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)


async def _serve(
    agent: Agent,
    base_url: str,
    client: Any,
    syncer: Syncer,
    ingest: Ingest,
    ack_gate: AckGate,
    task_status: Any,
) -> None:
    """The running pipeline: lanes, intake, control socket; then the shutdown sequence."""
    config = agent.config
    uploader, csv_spool = agent.uploader, agent.csv_spool
    assert uploader is not None and csv_spool is not None  # built by _run_pipeline
    async with client, trio.open_nursery() as delivery:
        delivery.start_soon(syncer.run)
        lanes = await _start_lanes(agent, delivery)
        await delivery.start(csv_spool.run)
        async with trio.open_nursery() as intake:
            await _start_sources(agent, ingest, syncer, ack_gate, intake)
            direct = DirectIntake(agent.queues, ingest, ack_gate, lambda: agent.uploader)
            await intake.start(
                functools.partial(
                    serve_control,
                    Path(config.control.socket),
                    agent.snapshot,
                    upload=agent.receive_upload,
                    send=direct.store,
                    outcome=direct.outcome,
                    counters=agent.counters,
                )
            )
            agent.listening["control"] = config.control.socket
            if config.metrics.listen:
                host, port = parse_host_port(config.metrics.listen)
                h, p = await intake.start(
                    functools.partial(serve_metrics, counters=agent.counters), agent, host, port
                )
                agent.listening["metrics"] = f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
            intake.start_soon(_cancel_when_set, agent.stop_requested, intake.cancel_scope)
            await delivery.start(systemd.watchdog_task, agent.is_progressing)
            delivery.start_soon(systemd.status_task, agent.describe)
            delivery.start_soon(run_summary, agent.snapshot)
            log.info("agent_ready", **agent.listening)
            systemd.ready(agent.describe())
            task_status.started(agent)
        # intake is done: no more reading. Make everything received durable.
        for path in agent.owned_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        agent.owned_paths.clear()
        agent.stopping = True
        systemd.stopping("flushing the queue to disk")
        systemd.extend_timeout(SHUTDOWN_GRACE_S + 10)
        await syncer.sync_all()
        in_flight = sum(1 for lane in agent.lanes.values() if lane.in_flight)
        log.info("agent_stopping", in_flight_batches=in_flight, grace_s=SHUTDOWN_GRACE_S)
        uploader.stop()
        csv_spool.stop()
        for lane in agent.lanes.values():
            lane.stop()
        # requests on the wire get the grace period; then everything else stops
        lanes.deadline = trio.current_time() + SHUTDOWN_GRACE_S
        await agent.lanes_done.wait()
        delivery.cancel_scope.cancel()
    await syncer.sync_all()


async def _start_lanes(agent: Agent, nursery: trio.Nursery) -> trio.CancelScope:
    """Run every lane in a child nursery; `agent.lanes_done` is set when all have returned.
    Returns the child's cancel scope, whose deadline bounds the shutdown."""
    scope = trio.CancelScope()

    async def lanes(task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                async with trio.open_nursery() as inner:
                    for lane in agent.lanes.values():
                        await inner.start(lane.run)
                    task_status.started()
        finally:
            agent.lanes_done.set()

    await nursery.start(lanes)
    return scope


async def _start_sources(
    agent: Agent, ingest: Ingest, syncer: Syncer, ack_gate: AckGate, nursery: trio.Nursery
) -> None:
    config = agent.config.listen

    def sink(datagrams: list[bytes]) -> int:
        taken = ingest.handle(datagrams)
        syncer.dirty()
        return taken

    inherited = InheritedSockets.from_environment()
    sockets: list[tuple[str, socket.socket, str | None]] = []
    if config.unix:
        sock = inherited.take(activation.EVENTS, Kind.UNIX_DATAGRAM, config.unix)
        if sock is None:
            sock = bind_unix_datagram(Path(config.unix), config.unix_mode)
            set_receive_buffer(sock, config.receive_buffer, "unix")
            agent.owned_paths.append(config.unix)  # ours to remove at stop; systemd's is not
        sockets.append(("unix", sock, config.unix))
    if config.udp:
        sock = inherited.take(activation.UDP, Kind.UDP, config.udp)
        if sock is None:
            host, port = parse_host_port(config.udp)
            sock = bind_udp(host, port)
            set_receive_buffer(sock, config.receive_buffer, "udp")
        sockets.append(("udp", sock, None))
    streams: list[tuple[str, socket.socket, str | None]] = []
    if config.forward_unix:
        sock = inherited.take(activation.FORWARD_UNIX, Kind.UNIX_STREAM, config.forward_unix)
        if sock is None:
            sock = bind_forward_unix(Path(config.forward_unix), config.unix_mode)
            agent.owned_paths.append(config.forward_unix)
        streams.append(("forward_unix", sock, config.forward_unix))
    if config.forward:
        sock = inherited.take(activation.FORWARD, Kind.TCP, config.forward)
        if sock is None:
            host, port = parse_host_port(config.forward)
            sock = bind_forward_tcp(host, port)
        streams.append(("forward", sock, None))
    inherited.close_unclaimed()
    for name, sock, label in sockets:
        address = await nursery.start(
            lambda task_status, s=sock, n=name: serve_datagrams(
                s, sink, name=n, on_error=ingest.reject, task_status=task_status
            )
        )
        agent.listening[name] = label or (f"{address[0]}:{address[1]}")
    if forward_process.wanted(config.forward_process, len(streams)):
        listeners = [
            forward_process.Listener(name, sock, security_for(config, name))
            for name, sock, _ in streams
        ]
        process = forward_process.ForwardProcess(
            ingest,
            ack_gate,
            listeners,
            log_level=agent.config.log.level,
            log_format=agent.config.log.format,
            secrets=[s for one in listeners if one.security for s in one.security.secrets()],
            lazy=config.forward_process == "auto",
        )
        agent.forward_process = process
        await nursery.start(process.run)
    else:
        forward = ForwardServer(ingest, ack_gate)
        for name, sock, _ in streams:
            await nursery.start(
                functools.partial(
                    forward.serve, sock, name=name, security=security_for(config, name)
                )
            )
    for name, sock, label in streams:  # served either way: the address is the socket's
        address = sock.getsockname()
        agent.listening[name] = label or f"{address[0]}:{address[1]}"


def security_for(listen: ListenConfig, name: str) -> Security | None:
    """The handshake settings of the Forward listener `name` ("forward", "forward_unix"). A TCP
    listener beyond loopback without a shared key accepts events from anyone who can reach
    it: allowed (a firewall may guard it), but said loudly at start."""
    key = getattr(listen, f"{name}_shared_key")
    if key:
        return Security(key, dict(getattr(listen, f"{name}_users")))
    if name == "forward" and listen.forward:
        host, _ = parse_host_port(listen.forward)
        if not is_loopback_host(host):
            log.warning(
                "forward_listener_unauthenticated",
                listen=listen.forward,
                hint="anyone who reaches this address can send events: set "
                "listen.forward_shared_key (and the same key on the clients)",
            )
    return None


async def _watch_signals(stop: trio.Event) -> None:
    """Installed first thing, so a SIGTERM during start-up still means a graceful stop."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal_received", signal=signal.Signals(signum).name)
            stop.set()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
