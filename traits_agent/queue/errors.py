"""The queue's exceptions::

    Exception
    └── QueueError                   anything the queue raises on purpose
        ├── QueueLockedError         another opener holds the directory (our caller's setup)
        ├── QueueClosedError         used after close() (our caller's bug)
        └── QueueWriteError(OSError) the disk refused a write or fsync (outside broke;
                                     errno and the OSError as __cause__ are kept)

Bad data on disk is never an exception: recovery and reads skip it, count it and go on.
An oversized payload is a plain ValueError, like any bad argument.
"""

from __future__ import annotations


class QueueError(Exception):
    """Base class of the queue's own errors."""


class QueueLockedError(QueueError):
    """The queue directory is locked by another open queue (two writers would corrupt it)."""


class QueueClosedError(QueueError):
    """The queue was used after `close()`."""


class QueueWriteError(QueueError, OSError):
    """A write or fsync failed (ENOSPC, EIO, EROFS, ...).

    Nothing is lost by the failure itself: bytes not yet written stay buffered (bounded) and
    go out on a later `flush()`/`sync()` once the disk takes them; after a failed fsync the
    records it covered are written again (see the package docstring).
    """

    @classmethod
    def wrap(cls, what: str, error: OSError) -> QueueWriteError:
        exc = cls(error.errno, f"{what}: {error.strerror or error}")
        exc.__cause__ = error
        return exc
