"""What every command shares: the program name, usage errors, and finding the config."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from traits_agent.config import Config, find_config_file, load_config
from traits_agent.errors import UsageError as UsageError  # re-exported: the commands raise it

PROG = "traits-agent"


def config_from(args: argparse.Namespace) -> Config:
    """The config named by `--config`, else the lookup chain (see `find_config_file`)."""
    return load_config(find_config_file(getattr(args, "config", None)))


class Datagram(NamedTuple):
    data: bytes
    items: int


#: datagrams the CLI sends stay well under the agent's 64 KiB datagram limit
DATAGRAM_BYTES = 60_000


def forward_datagrams(
    resource: str, events: Iterable[tuple[float | None, Any]]
) -> Iterator[Datagram]:
    """Forward-form datagrams `[tag, [[time, record], ...]]` of `events`, each under
    DATAGRAM_BYTES (sizes are added up per event; the array headers add at most a few bytes).
    An event too large for any datagram raises ValueError."""
    import msgpack

    from traits_agent.intake.wire import encode_forward, pack_time

    overhead = len(encode_forward(resource, [])) + 8
    batch: list[tuple[float | None, Any]] = []
    size = overhead
    for event_time, record in events:
        entry_size = len(msgpack.packb([pack_time(event_time), record], use_bin_type=True))
        if overhead + entry_size > DATAGRAM_BYTES:
            raise ValueError("an event is larger than a datagram may be")
        if size + entry_size > DATAGRAM_BYTES:
            yield Datagram(encode_forward(resource, batch), len(batch))
            batch, size = [], overhead
        batch.append((event_time, record))
        size += entry_size
    if batch:
        yield Datagram(encode_forward(resource, batch), len(batch))
