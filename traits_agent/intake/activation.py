"""Sockets handed to us by systemd socket activation (sd_listen_fds(3)), found by name.

Under `traits-agent*.socket` units, systemd binds the listening sockets itself and passes them
to the service as file descriptors 3, 4, ... with `$LISTEN_PID` (must be us), `$LISTEN_FDS`
(how many) and `$LISTEN_FDNAMES` (colon-separated, one `FileDescriptorName=` per fd). Why the
agent prefers them to binding its own:

- they outlive agent restarts: datagrams sent while the agent restarts wait in the socket's
  queue instead of bouncing (ECONNREFUSED) or being dropped;
- systemd sets owner, group and mode (`SocketGroup=traits-agent`, `SocketMode=0660`) and can
  force a receive buffer past `net.core.rmem_max` (`ReceiveBuffer=` uses SO_RCVBUFFORCE);
- the agent needs no write access to /run and no capability.

Names the shipped units use (`FileDescriptorName=` is per socket unit, hence one unit each):

    events        traits-agent.socket              Unix datagram  /run/traits-agent/events.sock
    udp           traits-agent-udp.socket          UDP            127.0.0.1:24225
    forward_unix  traits-agent-forward.socket      Unix stream    /run/traits-agent/forward.sock
    forward       traits-agent-forward-tcp.socket  TCP            127.0.0.1:24224 (not enabled)

Use: call `InheritedSockets.from_environment()` once, early (it takes ownership of the fds
and removes the variables so that no child process believes they are its own), then for each
configured listener `take(name, kind, address)`: an inherited socket if there is one (by name,
else an unnamed one bound to the same address), else None and the caller binds as usual.
Whatever is left after all listeners took theirs is reported by `close_unclaimed()`.

Sockets come back as blocking stdlib `socket.socket` objects with close-on-exec set; wrap them
with `trio.socket.from_stdlib_socket` (which makes them non-blocking) or use them as they are.
Never unlink the path of an inherited Unix socket: it belongs to the socket unit.
"""

from __future__ import annotations

import enum
import fcntl
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from traits_agent.errors import ActivationError

log = structlog.get_logger(__name__)

#: the first passed file descriptor (SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3
#: the name of every fd when $LISTEN_FDNAMES is absent (as sd_listen_fds_with_names does)
UNKNOWN_NAME = "unknown"
ENV_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

#: FileDescriptorName= of the shipped socket units
EVENTS = "events"
UDP = "udp"
FORWARD_UNIX = "forward_unix"
FORWARD = "forward"


class Kind(enum.Enum):
    """What a listener needs: its address family class and socket type."""

    UNIX_DATAGRAM = (socket.AF_UNIX, socket.SOCK_DGRAM)
    UDP = (None, socket.SOCK_DGRAM)  # AF_INET or AF_INET6
    UNIX_STREAM = (socket.AF_UNIX, socket.SOCK_STREAM)
    TCP = (None, socket.SOCK_STREAM)

    def accepts(self, sock: socket.socket) -> bool:
        family, type_ = self.value
        if family is None:
            return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == type_
        return sock.family == family and sock.type == type_


Address = str | tuple[str, int]


def parse_environment(env: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The `(fd, name)` pairs that `env` passes to process `pid` (pure; no fd is touched).

    Empty when `$LISTEN_PID` is missing or names another process (the variables were
    inherited from a parent, so the fds are not ours). A `$LISTEN_FDNAMES` whose count does
    not match `$LISTEN_FDS` is ignored with a warning: every fd is then "unknown".
    """
    try:
        if int(env.get("LISTEN_PID", "")) != pid:
            return []
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if count <= 0:
        return []
    names = env["LISTEN_FDNAMES"].split(":") if "LISTEN_FDNAMES" in env else []
    if names and len(names) != count:
        log.warning(
            "listen_fdnames_mismatch", listen_fds=count, listen_fdnames=env["LISTEN_FDNAMES"]
        )
        names = []
    if not names:
        names = [UNKNOWN_NAME] * count
    return [(LISTEN_FDS_START + i, names[i] or UNKNOWN_NAME) for i in range(count)]


def _adopt(fd: int) -> socket.socket | None:
    """Wrap fd as a socket object (family/type read from the kernel), close-on-exec."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        return socket.socket(fileno=fd)
    except OSError as e:  # not open, or not a socket (ListenFIFO=, ListenSpecial=...)
        log.warning("inherited_fd_unusable", fd=fd, error=str(e))
        return None


def listen_fds(*, unset_environment: bool = True) -> dict[str, list[socket.socket]]:
    """Adopt the sockets systemd passed to this process, grouped by `FileDescriptorName=`.

    Call once: the returned objects own the fds. Unless `unset_environment` is False, the
    three variables are removed from `os.environ` (also when they were not for us).
    """
    pairs = parse_environment(os.environ, os.getpid())
    if unset_environment:
        for name in ENV_VARS:
            os.environ.pop(name, None)
    found: dict[str, list[socket.socket]] = {}
    for fd, name in pairs:
        sock = _adopt(fd)
        if sock is not None:
            found.setdefault(name, []).append(sock)
    return found


def _local_address(sock: socket.socket) -> Address | None:
    try:
        address = sock.getsockname()
    except OSError:
        return None
    if isinstance(address, bytes):  # abstract Unix name
        return "@" + address[1:].decode(errors="replace")
    if isinstance(address, tuple):
        return (address[0], address[1])
    return address


def _normalize(address: Address, kind: Kind) -> Address:
    """`address` as `getsockname()` reports it: an absolute path or "@name" for Unix kinds,
    `(host, port)` for IP kinds (also given as "host:port" / "[v6]:port", numeric hosts)."""
    if kind in (Kind.UNIX_DATAGRAM, Kind.UNIX_STREAM):
        if not isinstance(address, str):
            raise TypeError(f"a Unix socket address is a path, not {address!r}")
        return address if address.startswith("@") else os.path.abspath(address)
    if isinstance(address, str):
        host, sep, port = address.rpartition(":")
        if not sep:
            raise ValueError(f"expected HOST:PORT, got {address!r}")
        address = (host.removeprefix("[").removesuffix("]"), int(port))
    return (address[0], int(address[1]))


def describe(sock: socket.socket) -> str:
    """A human form of a socket's local address, for logs."""
    address = _local_address(sock)
    if isinstance(address, tuple):
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)


@dataclass
class InheritedSockets:
    """The sockets systemd passed us, handed out once each to the listener they belong to."""

    by_name: dict[str, list[socket.socket]] = field(default_factory=dict)

    @classmethod
    def from_environment(cls) -> InheritedSockets:
        """Adopt the passed fds (see `listen_fds`); empty when not socket-activated."""
        inherited = cls(listen_fds())
        for name, socks in inherited.by_name.items():
            for sock in socks:
                log.info("socket_inherited", name=name, address=describe(sock))
        return inherited

    def __bool__(self) -> bool:
        return any(self.by_name.values())

    def take(self, name: str, kind: Kind, address: Address | None = None) -> socket.socket | None:
        """The inherited socket for listener `name`, removed from the pool; None if none.

        A socket passed under `name` wins (systemd's unit is what clients reach); if its
        address differs from the configured `address` that is logged. Failing that, a socket
        of the right kind bound to exactly `address`, under any name, is taken (a unit that
        sets no `FileDescriptorName=`). `address` is a path (Unix kinds) or numeric
        `(host, port)` / "host:port" (IP kinds), as in the config. Raises `ActivationError`
        when the socket named `name` is of the wrong kind, e.g. a stream socket for the
        datagram listener.
        """
        named = self.by_name.get(name, [])
        if named:
            sock = named[0]
            if not kind.accepts(sock):
                raise ActivationError(
                    f"socket unit passes {name!r} ({describe(sock)}) as "
                    f"{socket.SocketKind(sock.type).name}/{socket.AddressFamily(sock.family).name}"
                    f", but the {name} listener needs {kind.name}"
                )
            named.pop(0)
            if address is not None and _local_address(sock) != _normalize(address, kind):
                log.warning(
                    "inherited_socket_address_differs",
                    name=name,
                    inherited=describe(sock),
                    configured=str(address),
                    using="inherited",
                )
            return sock
        if address is None:
            return None
        wanted = _normalize(address, kind)
        for socks in self.by_name.values():
            for sock in socks:
                if kind.accepts(sock) and _local_address(sock) == wanted:
                    socks.remove(sock)
                    return sock
        return None

    def close_unclaimed(self) -> list[tuple[str, str]]:
        """Close (our copy of) every socket no listener took, and say which they were.

        systemd keeps its own copy open, so a sender can still queue data there that nobody
        reads: each one is logged with a hint to disable the unit or enable the listener.
        """
        left = []
        for name, socks in self.by_name.items():
            for sock in socks:
                left.append((name, describe(sock)))
                log.warning(
                    "inherited_socket_unused",
                    name=name,
                    address=describe(sock),
                    hint="enable this listener in the config or disable its .socket unit",
                )
                sock.close()
        self.by_name.clear()
        return left
