"""Run code while this process cannot make a new descriptor (EMFILE), as when a flood of
connections has taken every free slot and grabs each one freed."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator


@contextlib.contextmanager
def descriptors_exhausted() -> Iterator[None]:
    """Until exit, every open()/socket()/dup() in this process fails with EMFILE.

    The soft RLIMIT_NOFILE goes to 0: descriptors already open keep working, none can be
    added (a full table whose freed slots a neighbour takes at once). Undone on exit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
