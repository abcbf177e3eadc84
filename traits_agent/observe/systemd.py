"""Talk to systemd's service manager: readiness, status, watchdog, stopping (sd_notify(3)).

The protocol is one datagram of newline-separated `KEY=VALUE` lines sent to the Unix socket
named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). We speak it
directly rather than through libsystemd: it is a dozen lines and leaves us no C dependency.

What the agent sends, and when (the service runs `Type=notify`, `NotifyAccess=main`):

- `READY=1` + `STATUS=...` once the queue is recovered and every listener is bound; systemd
  holds back units ordered after us until then, and `systemctl start` returns then.
- `STATUS=...` (queue depth, upstream state) refreshed while running: `systemctl status` shows it.
- `WATCHDOG=1` every half `WatchdogSec=`, and only while the pipeline makes progress, so
  that a wedged agent is killed and restarted (`Restart=on-failure`) instead of sitting still.
- `STOPPING=1`, then `EXTEND_TIMEOUT_USEC=...` while the final flush makes events durable, so
  that a large backlog does not get us SIGKILLed half-way through.

Outside systemd (`$NOTIFY_SOCKET` unset) every call is a cheap no-op returning False. Nothing
here raises: a broken notify socket must not take the agent down, so a failed send is logged
once per process and reported through the return value.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import structlog
import trio

log = structlog.get_logger(__name__)

#: how long one notification may block when systemd's socket queue is full (it never should be:
#: PID 1 drains it promptly, but a send must not hang the agent's only thread)
SEND_TIMEOUT_S = 2.0

#: how often `status_task` re-reads the status text by default
DEFAULT_STATUS_INTERVAL_S = 5.0

_failure_logged = False


def _address(value: str) -> str | None:
    """The `connect()` address for a `$NOTIFY_SOCKET` value; None if we cannot use it."""
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace: leading NUL, no file on disk
    if value.startswith("/"):
        return value
    return None  # e.g. "vsock:..." (systemd >= 254, for VMs): not ours to speak


def _log_failure_once(event: str, **fields: object) -> None:
    global _failure_logged
    if not _failure_logged:
        _failure_logged = True
        log.warning(event, **fields, hint="further notify failures are not logged")


def notify(*lines: str) -> bool:
    """Send `lines` (each `KEY=VALUE`) to systemd as one datagram.

    Returns True when the datagram was sent, False when `$NOTIFY_SOCKET` is unset (not under
    systemd, or `NotifyAccess=` excludes us) or the send failed. Never raises.
    """
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value or not lines:
        return False
    address = _address(value)
    if address is None:
        _log_failure_once("sd_notify_unsupported_socket", notify_socket=value)
        return False
    payload = "\n".join(lines).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.connect(address)
            sock.send(payload)
    except OSError as e:
        _log_failure_once("sd_notify_failed", notify_socket=value, error=str(e))
        return False
    return True


def _one_line(text: str) -> str:
    # a newline would start a new KEY=VALUE assignment: keep STATUS= one line
    return " ".join(text.split("\n"))


def ready(status: str | None = None) -> bool:
    """Tell systemd the agent is up: queue recovered, listeners bound (`READY=1`)."""
    lines = ["READY=1"]
    if status is not None:
        lines.append("STATUS=" + _one_line(status))
    return notify(*lines)


def status(text: str) -> bool:
    """Set the free-form line `systemctl status` shows (`STATUS=`)."""
    return notify("STATUS=" + _one_line(text))


def stopping(status: str | None = None) -> bool:
    """Tell systemd a graceful stop has begun (`STOPPING=1`)."""
    lines = ["STOPPING=1"]
    if status is not None:
        lines.append("STATUS=" + _one_line(status))
    return notify(*lines)


def extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more before systemd gives up on the current start or stop.

    Each call re-arms the extension from now (`EXTEND_TIMEOUT_USEC=`): call it again before it
    runs out while a long recovery or final flush is still making progress.
    """
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog() -> bool:
    """Pet the watchdog once (`WATCHDOG=1`)."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings, or None when systemd expects none.

    That is half of `$WATCHDOG_USEC` (what sd_watchdog_enabled(3) recommends), and only if
    `$WATCHDOG_PID` is unset or names this process: a child that inherited the variables
    must not pet its parent's watchdog.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


async def watchdog_task(
    is_progressing: Callable[[], bool],
    *,
    interval: float | None = None,
    task_status: trio.TaskStatus[float | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Pet systemd's watchdog while, and only while, `is_progressing()` says so.

    Start it with `await nursery.start(watchdog_task, is_progressing)`: it reports the interval
    in use (None: no watchdog configured, and the task has already returned). Then it sends
    `WATCHDOG=1` at once and every `interval` seconds (default: `watchdog_interval()`) for as
    long as `is_progressing()` returns True. When it returns False the pings stop, and after
    `WatchdogSec=` systemd kills the agent with SIGABRT and restarts it.

    That this task runs at all proves the event loop turns; `is_progressing` is there to tell
    "idle" from "wedged" in the pipeline itself (a stage stuck on an await that should have
    finished). It must return True when the agent is merely idle, and must not block. An
    exception from it counts as "not progressing" and is logged.
    """
    if interval is None:
        interval = watchdog_interval()
    task_status.started(interval)
    if interval is None:
        return
    stalled = False
    while True:
        try:
            progressing = bool(is_progressing())
        except Exception as e:
            log.exception("watchdog_check_failed", error=repr(e))
            progressing = False
        if progressing:
            if stalled:
                log.info("watchdog_resumed")
                stalled = False
            watchdog()
        elif not stalled:
            stalled = True
            log.error(
                "watchdog_withheld",
                reason="pipeline is not making progress; systemd will restart the agent",
            )
        await trio.sleep(interval)


async def status_task(
    describe: Callable[[], str],
    *,
    interval: float = DEFAULT_STATUS_INTERVAL_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep `STATUS=` fresh: every `interval` seconds send `describe()` if it changed.

    Does nothing (and returns at once) outside systemd.
    """
    task_status.started()
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    last: str | None = None
    while True:
        try:
            text = describe()
        except Exception as e:
            log.exception("status_describe_failed", error=repr(e))
        else:
            if text != last and status(text):
                last = text
        await trio.sleep(interval)
