"""Every exception traits-agent raises on purpose, in one tree (like httpx/_exceptions.py)::

    TraitsAgentError                  root: catch this to catch anything the agent means to raise
    ├── UsageError                    bad command-line usage argparse did not catch      (exit 2)
    ├── ConfigError(ValueError)       a config key, flag or value is wrong; `.key` names it (2)
    ├── SpoolError                    `upload`: the file or its KIND cannot be spooled      (2)
    ├── CopyCancelled                 a CSV copy stopped (agent stopping) or timed out      (1)
    ├── UnsafePathError(ValueError)   a directory another user owns or can write            (2)
    ├── AgentNotRunning               nothing answers on the control socket                 (1)
    ├── ActivationError               an inherited (systemd) socket does not fit its listener (1)
    ├── QueueError                    the disk queue's own errors                           (1)
    │   ├── QueueLockedError          another opener holds the directory (our caller's setup)
    │   ├── QueueClosedError          used after close() (our caller's bug)
    │   └── QueueWriteError(OSError)  the disk refused a write or fsync (outside broke;
    │                                 errno and the OSError as __cause__ are kept)
    ├── Rejected                      an event the API would not take (counted, never stored)
    ├── WireError(ValueError)         a msgpack value that is not a Forward-protocol entry
    └── Stopping                      delivery abandoned because the agent stops (control flow:
                                      the batch stays queued; never reaches the user)

Whose fault it is decides the exit status `cli.main` returns with its one-line message:
`exit_status` 2 for the user's arguments or configuration, 1 for "the thing asked for did not
happen". Lower-layer exceptions (OSError, httpx.HTTPError) are translated where they cross into
the agent, not here: the uploaders turn transport errors into an answer with status 0, the
queue wraps OSError in QueueWriteError. Signals private to one module stay there and out of
this tree (httpserver's DropConnection, forward's protocol error).
"""

from __future__ import annotations


class TraitsAgentError(Exception):
    """The root of every exception traits-agent raises on purpose."""

    #: the CLI's exit status when this reaches it (1: did not happen; 2: usage/configuration)
    exit_status: int = 1


class UsageError(TraitsAgentError):
    """Bad usage that argparse did not catch; exit 2."""

    exit_status = 2


class ConfigError(TraitsAgentError, ValueError):
    """A config key, flag or value is wrong; `key` names it for the one-line message."""

    exit_status = 2

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class SpoolError(TraitsAgentError):
    """The file cannot be spooled because of the file or the arguments (exit status 2)."""

    exit_status = 2


class CopyCancelled(TraitsAgentError):
    """A CSV copy into the spool was stopped (the agent stops) or took longer than its
    bound; nothing was spooled and the temporary file is gone."""


class UnsafePathError(TraitsAgentError, ValueError):
    """A directory the agent would use (or a client would trust for a socket) is owned or
    writable by another user; the one-line message names the config key and why."""

    exit_status = 2


class AgentNotRunning(TraitsAgentError):
    """No agent answers on the control socket."""


class ActivationError(TraitsAgentError):
    """An inherited socket does not fit the listener that claims it (a unit/config mismatch)."""


class QueueError(TraitsAgentError):
    """Base class of the queue's own errors."""


class QueueLockedError(QueueError):
    """The queue directory is locked by another open queue (two writers would corrupt it)."""


class QueueClosedError(QueueError):
    """The queue was used after `close()`."""


class QueueWriteError(QueueError, OSError):
    """A write or fsync failed (ENOSPC, EIO, EROFS, ...).

    Nothing is lost by the failure itself: bytes not yet written stay buffered (bounded) and
    go out on a later `flush()`/`sync()` once the disk takes them; after a failed fsync the
    records it covered are written again (see the queue package's docstring).
    """

    @classmethod
    def wrap(cls, what: str, error: OSError) -> QueueWriteError:
        exc = cls(error.errno, f"{what}: {error.strerror or error}")
        exc.__cause__ = error
        return exc


class Rejected(TraitsAgentError):
    """An event the API would not take; it is counted by `reason` and never stored.

    `reason` is a short snake_case label for a counter (`missing_field`, `wrong_type`,
    `bad_format`, `bad_value`, `too_long`, `not_a_map`); `field` names the offending field
    ("" for the record as a whole; `action_params.key` for a part of a param). `str(exc)` is a
    human message in the API's style.
    """

    def __init__(self, reason: str, field: str, message: str) -> None:
        super().__init__(reason, field, message)
        self.reason = reason
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return self.message


class WireError(TraitsAgentError, ValueError):
    """A msgpack value that is not a usable Forward-protocol entry; `reason` is a counter label,
    `events` how many events the value held as far as can be told (0: unknown)."""

    def __init__(self, reason: str, detail: str = "", events: int = 0) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.events = events


class Stopping(TraitsAgentError):
    """Raised out of a delivery when the agent stops while it waits to retry; nothing was
    committed, so the batch (or CSV file) goes out again after restart."""
