"""`traits-agent dead-letters`: list, show, replay or purge the items the API rejected."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from traits_agent.cli.common import (
    DATAGRAM_BYTES,
    PROG,
    Datagram,
    UsageError,
    config_from,
    forward_datagrams,
)
from traits_agent.config import Config
from traits_agent.paths import check_socket_dir


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from traits_agent.delivery.deadletter import dead_letters_for

    config = config_from(args)
    letters = dead_letters_for(config)
    if args.action == "list":
        names = letters.resources()
        counts = {name: letters.count(name) for name in names}
        if not any(counts.values()):
            print(f"no dead letters (in {letters.directory})")
            return 0
        for name in names:
            print(f"{name}\t{counts[name]}")
        return 0
    if args.action == "show":
        shown = 0
        for record in letters.read(args.resource):
            print(json.dumps(record, ensure_ascii=False))
            shown += 1
        if not shown:
            print(f"no dead letters of {args.resource}", file=sys.stderr)
        return 0
    if args.action == "replay":
        return _replay_dead_letters(config, letters, args.resource)
    removed = letters.purge(args.resource)
    print(f"purged {removed} dead letters of {args.resource}")
    return 0


def _replay_dead_letters(config: Config, letters: Any, resource: str) -> int:
    """Send dead letters back through the running agent (after fixing what the API disliked,
    e.g. a schema or an endpoint). They are validated again like any event; a file is removed
    only after all its items were handed to the agent's socket (so the dead-letter file is
    empty afterwards; items the API rejects again come back to it)."""
    if not config.listen.unix:
        raise UsageError("dead-letters replay: needs [listen] unix (a datagram socket that waits)")
    if not letters.count(resource):
        print(f"no dead letters of {resource} to replay")
        return 0
    # the letters go to whoever listens there: make sure only the agent could
    check_socket_dir(config.listen.unix, "listen.unix")
    sent = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.connect(config.listen.unix)  # blocking: waits instead of dropping
            except (FileNotFoundError, ConnectionRefusedError):
                print(
                    f"{PROG}: no agent is running: nothing receives on {config.listen.unix}; "
                    f"start one (`{PROG} run`), then replay. Nothing was changed.",
                    file=sys.stderr,
                )
                return 1
            files = letters.take(resource)
            try:
                for path in files:
                    for datagram in _replay_datagrams(resource, _read_ndjson(path)):
                        s.send(datagram.data)
                        sent += datagram.items
                    path.unlink()
            except (OSError, ValueError) as e:
                for path in files:  # put back what was not sent, so nothing is lost
                    if path.exists():
                        letters.restore(resource, path)
                print(f"{PROG}: replay stopped after {sent} items: {e}", file=sys.stderr)
                return 1
    except PermissionError:
        print(f"{PROG}: permission denied on {config.listen.unix}", file=sys.stderr)
        return 1
    print(f"replayed {sent} dead letters of {resource} through {config.listen.unix}")
    return 0


#: replay datagrams stay well under the agent's 64 KiB datagram limit
REPLAY_DATAGRAM_BYTES = DATAGRAM_BYTES


def _replay_datagrams(resource: str, records: Any) -> Iterator[Datagram]:
    """Forward-form datagrams of dead-letter items (`{"item": ...}` records); an item too
    large for any datagram raises ValueError (its file is kept)."""
    try:
        yield from forward_datagrams(resource, ((None, r["item"]) for r in records))
    except ValueError:
        raise ValueError("a dead letter is larger than a datagram may be; it was kept") from None


def _read_ndjson(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
