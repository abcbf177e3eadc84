"""The log's heartbeat: one `summary` line per interval (a minute) while anything happened.

A developer tailing the log sees the agent working without sending anything to it: events in,
delivered out, what is queued, rejected, dead-lettered and dropped since the last line. A quiet
agent (nothing in, nothing out) writes nothing, so an idle service does not fill the journal.

It reads the status snapshot (the dict `traits-agent status --json` prints), key by key and
defensively, so the status model can grow without this module changing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog
import trio

log = structlog.get_logger(__name__)

SUMMARY_INTERVAL_S = 60.0


def totals(snapshot: Mapping[str, Any]) -> dict[str, int]:
    """The cumulative counts a summary is the difference of, plus what is queued now."""
    resources = snapshot.get("resources") or {}
    out = {"in": 0, "out": 0, "rejected": 0, "dead_lettered": 0, "dropped": 0}
    out["in"] = int((snapshot.get("received") or {}).get("events", 0))
    out["rejected"] = sum(int(v) for v in (snapshot.get("rejected") or {}).values())
    queued = queued_bytes = 0
    for res in resources.values():
        out["out"] += int(res.get("delivered", 0))
        out["dead_lettered"] += int(res.get("dead_lettered", 0))
        out["dropped"] += sum(int(v) for v in (res.get("dropped") or {}).values())
        queued += int(res.get("queued_items", 0))
        queued_bytes += int(res.get("queued_bytes", 0))
    out["queued"] = queued
    out["queued_bytes"] = queued_bytes
    return out


def summarize(
    before: Mapping[str, int], now: Mapping[str, int], snapshot: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The fields of one `summary` line, or None when nothing happened since `before`."""
    moved = {k: now[k] - before.get(k, 0) for k in ("in", "out", "rejected", "dead_lettered")}
    moved["dropped"] = now["dropped"] - before.get("dropped", 0)
    if not any(moved.values()):
        return None
    return {
        **moved,
        "queued": now["queued"],
        "queued_bytes": now["queued_bytes"],
        "upstream": snapshot.get("upstream", "?"),
    }


async def run_summary(
    snapshot: Callable[[], Mapping[str, Any]],
    *,
    interval_s: float = SUMMARY_INTERVAL_S,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Log one `summary` line every `interval_s` in which something happened, forever."""
    before = totals(snapshot())
    task_status.started()
    while True:
        await trio.sleep(interval_s)
        current = snapshot()
        now = totals(current)
        fields = summarize(before, now, current)
        before = now
        if fields is not None:
            log.info("summary", interval_s=interval_s, **fields)
