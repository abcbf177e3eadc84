"""Where the agent keeps its sockets, state and config.

Precedence, highest first: an explicit config value, systemd's `$RUNTIME_DIRECTORY` /
`$STATE_DIRECTORY` (set by `RuntimeDirectory=` / `StateDirectory=`), then the per-user
directories (platformdirs' rules). systemd may pass several colon-separated directories; the
first is ours.

Computing a default path never touches the file system in a way that can fail; whether a
directory is fit to use is checked where it is used: the agent creates its directories 0700
and refuses one that another user owns or can write (`ensure_private_dir`); a client refuses
a socket in such a directory (`check_socket_dir`); `doctor` reports both.
"""

from __future__ import annotations

import os
import pwd
import stat
import tempfile
from pathlib import Path

import platformdirs

from traits_agent.errors import UnsafePathError

__all__ = ["UnsafePathError"]

APP_NAME = "traits-agent"
CONFIG_FILE_NAME = "agent.toml"
SOCKET_NAME = "events.sock"
FORWARD_SOCKET_NAME = "forward.sock"
CONTROL_SOCKET_NAME = "control.sock"
#: where logind makes each user's runtime directory
RUN_USER = "/run/user"
#: where the Debian package puts the service's config
SYSTEM_CONFIG_PATH = Path("/etc/traits-agent/agent.toml")


def _first_env_dir(name: str) -> Path | None:
    value = os.environ.get(name, "")
    first = value.split(":", 1)[0]
    return Path(first) if first else None


def user_runtime_base() -> Path:
    """The per-user runtime directory, computed without touching it: `$XDG_RUNTIME_DIR`, else
    `/run/user/<euid>` if it exists, else `<tmp>/runtime-<euid>` (platformdirs' fallback).

    Computing is all this does: it never creates, checks or raises. Whether the directory is
    fit to use (ours, private) is decided when something is about to use it (`ensure_private_dir`,
    `check_socket_dir`), so a config that names every path never depends on this directory at
    all (a `/tmp/runtime-<uid>` planted by another user used to make every command fail with
    a PermissionError traceback, even with every path set; issue 7 item 11).
    """
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return Path(xdg)
    run_user = Path(RUN_USER) / str(os.geteuid())
    if os.path.isdir(run_user):
        return run_user
    return Path(tempfile.gettempdir()) / f"runtime-{os.geteuid()}"


def runtime_dir() -> Path:
    """Directory for sockets: systemd's RuntimeDirectory, else the user runtime dir."""
    return _first_env_dir("RUNTIME_DIRECTORY") or user_runtime_base() / APP_NAME


def state_dir() -> Path:
    """Directory for the queue and dead letters: systemd's StateDirectory, else user data dir."""
    return _first_env_dir("STATE_DIRECTORY") or Path(platformdirs.user_data_dir(APP_NAME))


def default_config_path() -> Path:
    """The platform config file (may not exist: built-in defaults apply then)."""
    return Path(platformdirs.user_config_dir(APP_NAME)) / CONFIG_FILE_NAME


def default_socket_path() -> Path:
    """The Unix datagram socket game servers send to when nothing is configured."""
    return runtime_dir() / SOCKET_NAME


# -- who may touch our directories ---------------------------------------------------------------

#: directories the agent creates: its user's alone, whatever the umask
PRIVATE_DIR_MODE = 0o700
#: files the agent creates (agent-id, dead letters, spooled CSVs)
PRIVATE_FILE_MODE = 0o600


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def directory_problem(path: Path, trusted: frozenset[int] | None = None) -> str | None:
    """Why the existing directory `path` is not safe to keep sockets or state in, or None.

    Unsafe: not a directory; owned by a user outside `trusted` (default: this process's
    user and root); writable by group or others; or below a directory that another user owns
    or that others may write without the sticky bit (they could rename it away and put their
    own in its place). Raises OSError when `path` cannot be looked at (missing included).
    """
    if trusted is None:
        trusted = frozenset({os.geteuid(), 0})
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid not in trusted:
        return f"{path} is owned by {_user(st.st_uid)}, not by {_user(os.geteuid())}"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = "other users" if mode & 0o002 else "its group"
        return f"{path} is writable by {who} (mode {mode:04o}); it must be 0700 or 0750"
    return _parents_problem(path, trusted)


def _parents_problem(
    path: Path, trusted: frozenset[int], *, including_self: bool = False
) -> str | None:
    """The part of `directory_problem` about the directories above `path`: owned by a
    trusted user, and writable by others only with the sticky bit (like /tmp)."""
    real = Path(os.path.realpath(path))
    for parent in ([real] if including_self else []) + list(real.parents):
        pst = os.stat(parent)
        pmode = stat.S_IMODE(pst.st_mode)
        if pst.st_uid not in trusted:
            problem = f"is owned by {_user(pst.st_uid)}"
        elif pmode & 0o022 and not pmode & stat.S_ISVTX:
            problem = f"is writable by other users (mode {pmode:04o})"
        else:
            continue
        if parent == real:
            return f"{path} {problem}"
        return f"{path} is inside {parent}, which {problem}"
    return None


def ensure_private_dir(path: Path | str, what: str, *, tighten: bool = False) -> Path:
    """`path` ready for the agent: missing directories are created 0700 (chmod after mkdir:
    the umask cannot widen or narrow it), and the whole chain is checked by
    `directory_problem`. Raises UnsafePathError naming `what` (the config key).

    `tighten`: an existing directory of ours that others may read or enter (a queue made by
    hand under umask 022) is made 0700 too; for the state directory, where nobody else has
    anything to read. Socket directories keep their mode (a service's may be 0750 on
    purpose, for the group)."""
    path = Path(path)
    missing = []
    d = path
    while not os.path.lexists(d):
        missing.append(d)
        d = d.parent
    if missing:
        # judge where we are about to create before creating anything (root may mkdir
        # inside another user's directory; that user could then swap it)
        problem = _parents_problem(d, frozenset({os.geteuid(), 0}), including_self=True)
        if problem:
            raise UnsafePathError(f"{what}: refusing to use {path}: {problem}")
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile (by whom is checked below)
        os.chmod(d, PRIVATE_DIR_MODE)
    problem = directory_problem(path)
    if problem:
        raise UnsafePathError(f"{what}: refusing to use {problem}")
    if tighten:
        st = os.stat(path)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != PRIVATE_DIR_MODE:
            os.chmod(path, PRIVATE_DIR_MODE)
            was = f"{stat.S_IMODE(st.st_mode):04o}"
            _log().warning("directory_mode_tightened", key=what, path=str(path), was=was)
    return path


def _log():
    import structlog

    return structlog.get_logger(__name__)


def shared_directory_problem(directory: Path | str) -> str | None:
    """`directory_problem` as seen by someone other than the agent (a client, `doctor` run as
    root): in the per-user runtime directory the whole chain must be the caller's (or
    root's); elsewhere (a service's directory) the directory's owner is trusted too, but
    nobody else may write to it. None when it is fine or cannot be looked at."""
    directory = Path(directory)
    while not os.path.lexists(directory) and directory != directory.parent:
        directory = directory.parent  # what exists decides who can make the rest
    try:
        st = os.stat(directory)
    except OSError:
        return None
    trusted = {os.geteuid(), 0}
    if not _is_within(directory, user_runtime_base()):
        trusted.add(st.st_uid)
    try:
        return directory_problem(directory, frozenset(trusted))
    except OSError:
        return None


def check_socket_dir(socket_path: Path | str, what: str) -> None:
    """Before a client (`status`, `send`, `upload`) talks to the socket at `socket_path`: could
    someone other than the agent have put it there (see `shared_directory_problem`; for a
    missing directory, its nearest existing parent is judged). Raises UnsafePathError."""
    problem = shared_directory_problem(Path(socket_path).parent)
    if problem:
        raise UnsafePathError(
            f"{what}: refusing to talk to {socket_path}: {problem}; another user could have "
            "put their own socket there"
        )


def _is_within(path: Path, base: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(base))
    except ValueError:
        return False
    return True


def write_private_file(path: Path, data: bytes) -> None:
    """Create `path` (which must not exist) with mode 0600 whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """All of `data` to `fd`: `os.write` may write less than asked (a signal, a full pipe, a
    large buffer on some file systems), and a short write must not lose the rest."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
