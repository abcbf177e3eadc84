"""The queue's exceptions (defined in `traits_agent.errors`, the one tree)::

    TraitsAgentError
    └── QueueError                   anything the queue raises on purpose
        ├── QueueLockedError         another opener holds the directory (our caller's setup)
        ├── QueueClosedError         used after close() (our caller's bug)
        └── QueueWriteError(OSError) the disk refused a write or fsync (outside broke;
                                     errno and the OSError as __cause__ are kept)

Bad data on disk is never an exception: recovery and reads skip it, count it and go on.
An oversized payload is a plain ValueError, like any bad argument.
"""

from __future__ import annotations

from traits_agent.errors import QueueClosedError, QueueError, QueueLockedError, QueueWriteError

__all__ = ["QueueClosedError", "QueueError", "QueueLockedError", "QueueWriteError"]
