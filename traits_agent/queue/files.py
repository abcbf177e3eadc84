"""Private modes for everything the queue creates: 0700 directories, 0600 files.

Queued events are the players' data: no other user may read them, whatever the umask of
whoever started the agent (run by hand with umask 022, or as root with umask 000). The mode
is passed to the creating call and then set again with chmod, because the umask may have
taken bits from it (it can only take, never add, so the fchmod is what makes it exact).
"""

from __future__ import annotations

import os

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_dirs(path: str) -> None:
    """Create `path` and any missing parents, each 0700. Existing directories are left as
    they are (their owner chose their mode)."""
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.isdir(parent):
        make_dirs(parent)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    os.chmod(path, DIR_MODE)


def open_private(path: str, flags: int) -> int:
    """`os.open` with O_CREAT and O_CLOEXEC, the file made 0600 whatever the umask."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd
