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
    """The human view of a status snapshot."""
    lines = [
        f"traits-agent {s['version']} (pid {s['pid']}, up {s['uptime_s']:.0f}s)",
        f"endpoint: {s['endpoint']}   upstream: {s['upstream']}",
    ]
    if s.get("last_error"):
        lines.append(f"last error: {s['last_error']}")
    r = s["received"]
    lines.append(
        f"received: {r['events']} events in {r['datagrams']} datagrams, {r['accepted']} accepted"
    )
    if s["rejected"]:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["rejected"].items()))
        lines.append(f"rejected: {reasons}")
    lines.append("")
    header = f"{'resource':<18}{'queued':>9}{'delivered':>11}{'dead':>7}{'dropped':>9}  upstream"
    lines.append(header)
    for name, res in s["resources"].items():
        dropped = sum(res["dropped"].values())
        state = res["upstream"]
        if res.get("next_retry_in_s") is not None and state != "ok":
            state += f" (retry in {res['next_retry_in_s']}s)"
        lines.append(
            f"{name:<18}{res['queued_items']:>9}{res['delivered']:>11}"
            f"{res['dead_lettered']:>7}{dropped:>9}  {state}"
        )
    csv = s.get("csv")
    if csv:
        kinds = ", ".join(
            f"{kind} {k['pending_files']} ({k['pending_bytes']} bytes)"
            for kind, k in csv["kinds"].items()
        )
        lines.append(
            f"csv uploads pending: {kinds}; rejected {csv['rejected_files']}  {csv['state']}"
        )
    return "\n".join(lines)
