"""`traits-agent status`: ask the running agent over its control socket and render the answer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from traits_agent.cli.common import PROG, config_from
from traits_agent.paths import check_socket_dir


def cmd_status(args: argparse.Namespace) -> int:
    from traits_agent.observe.control import AgentNotRunning, request_status

    config = config_from(args)
    check_socket_dir(config.control.socket, "control.socket")
    try:
        snapshot = request_status(Path(config.control.socket))
    except AgentNotRunning as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except PermissionError:
        print(
            f"{PROG}: permission denied on {config.control.socket} "
            "(join the agent's group, e.g. traits-agent)",
            file=sys.stderr,
        )
        return 1
    except (OSError, ValueError) as e:
        print(f"{PROG}: the agent did not answer: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(snapshot, indent=2))
    else:
        print(format_status(snapshot))
    return 0


def format_status(s: dict[str, Any]) -> str:
    """The human view of a status snapshot (keys read defensively: the model may grow).

    The last error is shown while the upstream is not ok, with its time when the snapshot
    has one; after recovery it is gone from here (`status --json` keeps it)."""
    from traits_agent.cli.top import _age, _duration, _size

    upstream = s.get("upstream", "?")
    lines = [
        f"traits-agent {s.get('version', '?')} (pid {s.get('pid', '?')}, "
        f"up {_duration(s.get('uptime_s'))})",
        f"endpoint: {s.get('endpoint', '?')}   upstream: {upstream}",
    ]
    if s.get("last_error") and upstream != "ok":
        when = s.get("last_error_at")
        lines.append(f"last error: {s['last_error']}" + (f" (at {when})" if when else ""))
    for name, res in (s.get("resources") or {}).items():
        if res.get("queue_error"):
            lines.append(f"queue error ({name}): {res['queue_error']}")
    r = s.get("received") or {}
    lines.append(
        f"received: {r.get('events', 0)} events in {r.get('datagrams', 0)} datagrams, "
        f"{r.get('accepted', 0)} accepted"
    )
    if s.get("rejected"):
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["rejected"].items()))
        lines.append(f"rejected: {reasons}")
    if s.get("protocol_errors"):
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["protocol_errors"].items()))
        lines.append(f"protocol errors (messages): {reasons}")
    intake = s.get("forward_process")
    if intake and (intake.get("restarts") or intake.get("state") == "restarting"):
        # shown only when something is wrong: it died (and was replaced), or is down now
        running = f"pid {intake['pid']}" if intake.get("pid") else "not running (restarting)"
        lines.append(
            f"forward intake process: {running}, restarted {intake.get('restarts', 0)} times"
        )
    lines.append("")
    lines.append(
        f"{'resource':<18}{'queued':>8}{'bytes':>10}{'oldest':>8}{'delivered':>11}"
        f"{'dead':>6}{'dropped':>9}  upstream"
    )
    for name, res in (s.get("resources") or {}).items():
        dropped = sum((res.get("dropped") or {}).values())
        state = res.get("upstream", "ok")
        if res.get("next_retry_in_s") is not None and state != "ok":
            state += f" (retry in {res['next_retry_in_s']}s)"
        lines.append(
            f"{name:<18}{res.get('queued_items', 0):>8}{_size(res.get('queued_bytes', 0)):>10}"
            f"{_age(res.get('oldest_age_s')):>8}{res.get('delivered', 0):>11}"
            f"{res.get('dead_lettered', 0):>6}{dropped:>9}  {state}"
        )
    csv = s.get("csv")
    if csv:
        kinds = ", ".join(
            f"{kind} {k.get('pending_files', 0)} ({k.get('pending_bytes', 0)} bytes)"
            for kind, k in (csv.get("kinds") or {}).items()
        )
        lines.append(
            f"csv uploads pending: {kinds}; rejected {csv.get('rejected_files', 0)}  "
            f"{csv.get('state', '?')}"
        )
    return "\n".join(lines)
