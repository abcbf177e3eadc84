"""`traits-agent dead-letters`: list, show, replay or purge the items the API rejected."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any, NamedTuple

from traits_agent.cli.common import PROG, UsageError, config_from
from traits_agent.config import Config


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from traits_agent.delivery.deadletter import dead_letters_for

    config = config_from(args)
    letters = dead_letters_for(config)
    if args.action == "list":
        for name in letters.resources():
            print(f"{name}\t{letters.count(name)}")
        return 0
    if not args.resource:
        raise UsageError(f"dead-letters {args.action}: RESOURCE is required")
    if args.action == "show":
        for record in letters.read(args.resource):
            print(json.dumps(record, ensure_ascii=False))
        return 0
    if args.action == "replay":
        return _replay_dead_letters(config, letters, args.resource)
    removed = letters.purge(args.resource)
    print(f"purged {removed} dead letters of {args.resource}")
    return 0


def _replay_dead_letters(config: Config, letters: Any, resource: str) -> int:
    """Send dead letters back through the running agent (after fixing what the API disliked,
    e.g. a schema or an endpoint). They are validated again like any event; a file is removed
    only after all its items were handed to the agent's socket."""
    if not config.listen.unix:
        raise UsageError("dead-letters replay: needs [listen] unix (a datagram socket that waits)")
    files = letters.take(resource)
    sent = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(config.listen.unix)  # blocking: waits instead of dropping
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
    print(f"replayed {sent} dead letters of {resource} through {config.listen.unix}")
    return 0


class _Datagram(NamedTuple):
    data: bytes
    items: int


#: replay datagrams stay well under the agent's 64 KiB datagram limit
REPLAY_DATAGRAM_BYTES = 60_000


def _replay_datagrams(resource: str, records: Any) -> Any:
    """Forward-form datagrams of dead-letter items, each under REPLAY_DATAGRAM_BYTES (sizes
    are added up per item; the array headers add at most a few bytes). An item too large for
    any datagram raises ValueError (its file is kept)."""
    import msgpack

    from traits_agent.intake.wire import encode_forward

    overhead = len(encode_forward(resource, [])) + 8
    batch: list[tuple[None, Any]] = []
    size = overhead
    for record in records:
        entry = (None, record["item"])
        entry_size = len(msgpack.packb(entry, use_bin_type=True))
        if overhead + entry_size > REPLAY_DATAGRAM_BYTES:
            raise ValueError("a dead letter is larger than a datagram may be; it was kept")
        if size + entry_size > REPLAY_DATAGRAM_BYTES:
            yield _Datagram(encode_forward(resource, batch), len(batch))
            batch, size = [], overhead
        batch.append(entry)
        size += entry_size
    if batch:
        yield _Datagram(encode_forward(resource, batch), len(batch))


def _read_ndjson(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
