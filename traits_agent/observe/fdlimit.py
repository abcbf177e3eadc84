"""Running out of file descriptors is a transient condition, not a reason to exit.

A process at its `RLIMIT_NOFILE` (EMFILE) or a host at `fs.file-max` (ENFILE) gets an error
from every `open`, `accept`, `socket` and `scandir` until something is closed. Whoever holds
the descriptors (a flood of connections, another process) usually lets go within seconds, so
the paths that open things in a loop (accepting connections, scanning the CSV spool) wait and
try again instead of letting the error end the agent. Each shortage is logged (`fd_exhausted`,
at most once a minute per place) and counted (`fd_exhausted{where=...}`).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
import trio

from traits_agent.observe.metrics import Counters

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: errors that mean "out of descriptors or kernel memory now", not "this path is wrong"
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: first wait after a shortage; doubles up to RETRY_MAX_S while it lasts
RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 2.0


def is_fd_shortage(error: BaseException) -> bool:
    """True for EMFILE/ENFILE (and the kernel-memory errors accept reports alike)."""
    return isinstance(error, OSError) and error.errno in CAPACITY_ERRNOS


def note_shortage(where: str, error: OSError, counters: Counters | None, **context: Any) -> None:
    """Log (rate-limited) and count one fd shortage at `where`."""
    if counters is not None:
        counters.inc("fd_exhausted", where=where)
    # one line a minute per `where` (observe.log.RATE_LIMITS), with suppressed=N
    log.error(
        "fd_exhausted",
        where=where,
        error=str(error),
        errno=errno.errorcode.get(error.errno or 0, str(error.errno)),
        hint="the agent waits and retries; raise LimitNOFILE= or find what holds descriptors",
        **context,
    )


async def retry_on_shortage(
    where: str,
    fn: Callable[[], T],
    *,
    counters: Counters | None = None,
    initial_s: float = RETRY_INITIAL_S,
    max_s: float = RETRY_MAX_S,
) -> T:
    """`fn()`, retried with a growing wait for as long as it fails with EMFILE/ENFILE.
    Any other error is raised. Cancellation ends the wait."""
    delay = initial_s
    while True:
        try:
            return fn()
        except OSError as e:
            if not is_fd_shortage(e):
                raise
            note_shortage(where, e, counters)
        await trio.sleep(delay)
        delay = min(delay * 2, max_s)
