"""Binding a Unix socket path safely, for every listener the agent has (events datagram,
Forward stream, control stream).

A socket file left by a crashed run is replaced; a path that is not a socket, or a socket
something still answers on, is left alone and reported — two agents on one path would steal
each other's traffic.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path


def socket_is_live(path: Path, sock_type: int) -> bool:
    """True if something answers on the Unix socket at `path` (of `sock_type`)."""
    probe = socket.socket(socket.AF_UNIX, sock_type)
    probe.setblocking(False)  # a live listener with a full backlog answers EAGAIN, not a hang
    try:
        return probe.connect_ex(str(path)) in (0, errno.EAGAIN, errno.EINPROGRESS)
    finally:
        probe.close()


def bind_unix(path: Path | str, sock_type: int, mode: int) -> socket.socket:
    """A Unix socket of `sock_type` bound at `path` with permissions `mode` (chmod after bind:
    the umask does not decide who may send events)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        if socket_is_live(path, sock_type):
            raise OSError(errno.EADDRINUSE, f"another process is using {path}")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, sock_type)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
    except BaseException:
        sock.close()
        raise
    return sock
