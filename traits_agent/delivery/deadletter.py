"""Dead letters: items the API rejected for themselves, kept for a human to look at or replay.

One NDJSON file per resource in `<state dir>/dead-letters/`, a line per item:
`{"time", "resource", "status", "message", "errors", "attempts", "item"}`. The file is bounded:
past `max_bytes` it is rotated to `<resource>.ndjson.1` (one generation kept), so a schema
drift that rejects everything cannot fill the disk. Rotation drops the older generation; that
drop is counted by the caller through the return value.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from traits_agent.paths import write_all

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: rejected events are the players' data: the agent user's alone, whatever the umask
FILE_MODE = 0o600
FILE_DIR_MODE = 0o700


def dead_letters_for(config: Any) -> DeadLetters:
    """The dead letters of the agent configured by `config` (`<queue.dir>/dead-letters/`)."""
    return DeadLetters(Path(config.queue.dir) / "dead-letters")


class DeadLetters:
    """Append-only, rotated NDJSON files of rejected items, one per resource."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes

    def path(self, resource: str) -> Path:
        return self.directory / f"{resource}.ndjson"

    def add(
        self,
        resource: str,
        items: list[bytes],
        *,
        status: int,
        message: str,
        errors: Any = None,
        attempts: int = 1,
    ) -> int:
        """Append one line per item (each a JSON document as stored in the queue).

        Returns how many older lines rotation discarded (0 almost always).
        """
        _make_private_dir(self.directory)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        lines = []
        for raw in items:
            try:
                item = json.loads(raw)
            except ValueError:
                item = raw.decode("utf-8", "replace")
            record = {
                "time": now,
                "resource": resource,
                "status": status,
                "message": message,
                "errors": errors,
                "attempts": attempts,
                "item": item,
            }
            lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
        # an API message may carry lone surrogates: keep them visible, never fail on them
        data = ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")
        path = self.path(resource)
        discarded = 0
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.max_bytes:
            old = path.with_name(path.name + ".1")
            discarded = _count_lines(old)
            os.replace(path, old)
        _append_durably(path, data)
        return discarded

    def resources(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name.removesuffix(".ndjson") for p in self.directory.glob("*.ndjson"))

    def read(self, resource: str) -> Iterator[dict[str, Any]]:
        """Every dead letter of `resource`, oldest first (rotated generation included)."""
        path = self.path(resource)
        for p in (path.with_name(path.name + ".1"), path):
            if not p.exists():
                continue
            with open(p, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError:
                            continue

    def count(self, resource: str) -> int:
        path = self.path(resource)
        return _count_lines(path) + _count_lines(path.with_name(path.name + ".1"))

    def take(self, resource: str) -> list[Path]:
        """Move the resource's dead-letter files aside (atomically) for a replay, so letters
        written meanwhile go to a fresh file. Returns the moved files, oldest first."""
        taken = []
        path = self.path(resource)
        stamp = time.time_ns()
        for p in (path.with_name(path.name + ".1"), path):
            if p.exists():
                target = p.with_name(f"{p.name}.replay-{stamp}")
                os.replace(p, target)
                taken.append(target)
        return taken

    def restore(self, resource: str, taken: Path) -> None:
        """Put a file moved aside by `take` back (appended to the live file): a replay that
        failed half-way may repeat some items later, but loses none."""
        _append_durably(self.path(resource), taken.read_bytes())
        taken.unlink()

    def purge(self, resource: str) -> int:
        """Delete the resource's dead letters; returns how many were removed."""
        n = self.count(resource)
        path = self.path(resource)
        for p in (path, path.with_name(path.name + ".1")):
            p.unlink(missing_ok=True)
        return n


def _make_private_dir(directory: Path) -> None:
    """mkdir -p, each new directory 0700 whatever the umask (dead letters are event data)."""
    if directory.is_dir():
        return
    _make_private_dir(directory.parent)
    try:
        os.mkdir(directory, FILE_DIR_MODE)
    except FileExistsError:
        return
    os.chmod(directory, FILE_DIR_MODE)


def _append_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
    try:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)  # the umask, or a file from an older version
        if os.geteuid() == 0:
            # `sudo traits-agent dead-letters replay` putting letters back: the file stays
            # the agent's (the directory's owner), or the agent could no longer append to it
            owner = os.stat(path.parent)
            if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
                os.fchown(fd, owner.st_uid, owner.st_gid)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0
