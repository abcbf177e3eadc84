"""`traits-agent send`: validate events and hand them to the running agent — never a false "sent".

    send RESOURCE JSON            one event, as a datagram to the configured Unix socket
    send RESOURCE -               NDJSON on stdin (one event per line), packed into datagrams
    send --wait RESOURCE JSON|-   through the control socket: waits until the events are stored
                                  (fsynced), then until they are delivered, or says why not

The datagram socket is the one `[listen] unix` names, and only that one: no fallback to UDP
(a UDP datagram "sent" to a port nobody listens on, or another user's agent, is a lie). A
missing agent is exit 1 with one line. A socket that does not wait (UDP) cannot tell; with
`[listen] unix = ""` the command goes through the control socket, which answers.

Exit status: 0 every event sent (with --wait: delivered); 1 something was not: invalid, no
agent, rejected by the API, or not delivered within --timeout (it stays queued); 2 usage.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from traits_agent.cli.common import PROG, UsageError, config_from, forward_datagrams
from traits_agent.config import Config
from traits_agent.errors import TraitsAgentError
from traits_agent.paths import check_socket_dir

#: records per `send` request over the control socket (under its MAX_RECORDS)
CHUNK_RECORDS = 1000
#: how often `--wait` asks whether the events were delivered
POLL_S = 0.2
#: invalid NDJSON lines named one by one on stderr before the rest are only counted
SHOW_INVALID = 10


class NotSent(TraitsAgentError):
    """The events did not reach the agent; the message says why (exit 1)."""


def cmd_send(args: argparse.Namespace) -> int:
    from traits_agent.schema import RESOURCES, resolve_tag

    config = config_from(args)
    resource = resolve_tag(args.resource)
    if resource is None:
        raise UsageError(
            f"RESOURCE: unknown resource {args.resource!r} (valid: {', '.join(RESOURCES)})"
        )
    event_time = args.time if args.time is not None else time.time()
    invalid = [0]  # invalid NDJSON lines, counted as they are read
    records: Iterable[dict]
    if args.json == "-":
        # streamed: a file of any size is read, validated and sent in bounded memory
        records = _read_ndjson(sys.stdin, resource, event_time, invalid)
    else:
        record = _parse_one(args.json)
        if (reason := _invalid(resource, record, event_time)) is not None:
            print(f"{PROG}: invalid {resource.name} event: {reason}", file=sys.stderr)
            return 1
        records = [record]
    try:
        if args.wait:
            ok = _send_and_wait(config, resource.name, records, event_time, args.timeout)
        else:
            target, sent = _send(config, resource.name, records, event_time)
            noun = "event" if sent == 1 else "events"
            print(f"sent {sent} {resource.name} {noun} to {target}")
            ok = True
    except NotSent as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if invalid[0]:
        lines = "line" if invalid[0] == 1 else "lines"
        print(f"{PROG}: {invalid[0]} invalid {lines} not sent", file=sys.stderr)
    return 0 if ok and not invalid[0] else 1


def _parse_one(text: str) -> dict:
    try:
        record = json.loads(text)
    except ValueError as e:
        raise UsageError(f"JSON: not valid JSON: {e}") from None
    if isinstance(record, list):
        raise UsageError(
            "JSON: an array, where one event (an object) is expected; send many as NDJSON "
            f"on stdin: `{PROG} send RESOURCE - < events.ndjson`"
        )
    if not isinstance(record, dict):
        raise UsageError(f"JSON: an event is a JSON object, got {type(record).__name__}")
    return record


def _invalid(resource: Any, record: Any, event_time: float) -> str | None:
    """Why the agent would refuse `record`, or None (the same validation it runs)."""
    from traits_agent.schema import Rejected, normalize

    try:
        normalize(resource, record, event_time)
    except Rejected as e:
        return str(e)
    return None


def _read_ndjson(
    stream: TextIO, resource: Any, event_time: float, invalid: list[int]
) -> Iterator[dict]:
    """The valid records, one by one; the others are counted in `invalid[0]`, and the first
    SHOW_INVALID named on stderr with their line number and reason."""
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            reason: str | None = f"not valid JSON: {e}"
        else:
            if isinstance(record, dict):
                reason = _invalid(resource, record, event_time)
            else:
                reason = f"an event is a JSON object, got {type(record).__name__}"
        if reason is None:
            yield record
            continue
        invalid[0] += 1
        if invalid[0] <= SHOW_INVALID:
            print(f"{PROG}: line {number}: {reason}", file=sys.stderr)


# -- fire and forget: datagrams ---------------------------------------------------------------


def _send(config: Config, name: str, records: Iterable[dict], event_time: float) -> tuple[str, int]:
    """Datagrams to the agent's socket (found as the client finds it); without one, the
    control socket. Returns where to, and how many events went."""
    from traits_agent_client.where import agent_socket

    # $TRAITS_AGENT_SOCKET, else a config file's [listen] unix, else the system service's
    # socket when it exists, else the per-user default: the client's rule, written once
    path = agent_socket(config.listen.unix if config.source else None)
    if not path:
        answers = _store(Path(config.control.socket), name, records, event_time)
        return config.control.socket, sum(a["stored"] for a in answers)
    if not path.startswith("@"):
        # the events go to whoever listens there: make sure only the agent could
        check_socket_dir(path, "listen.unix")
    sent = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            # before reading stdin: no agent fails at once
            s.connect("\0" + path[1:] if path.startswith("@") else path)
            # blocking: a full socket queue makes us wait for the agent, never drop
            s.settimeout(30.0)
            for datagram in forward_datagrams(name, ((event_time, r) for r in records)):
                s.send(datagram.data)
                sent += datagram.items
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotSent(
            f"no agent is running: nothing receives on {path} (start one: `{PROG} run`)"
        ) from None
    except PermissionError:
        raise NotSent(
            f"permission denied on {path} (join the agent's group, e.g. traits-agent)"
        ) from None
    except ValueError as e:  # one event over a datagram's size
        raise NotSent(f"{e}: send it with --wait (through the control socket)") from None
    except TimeoutError:
        raise NotSent(f"the agent did not read from {path} for 30 s; not all was sent") from None
    except OSError as e:
        raise NotSent(f"cannot send to {path}: {e.strerror or e}") from None
    return path, sent


# -- --wait: through the control socket ------------------------------------------------------


def _request(control: Path, command: str, body: dict, timeout: float = 30.0) -> dict:
    from traits_agent.observe.control import AgentNotRunning, request

    check_socket_dir(control, "control.socket")
    try:
        answer = request(control, command, body, timeout=timeout)
    except AgentNotRunning as e:
        raise NotSent(str(e)) from None
    except PermissionError:
        raise NotSent(
            f"permission denied on {control} (join the agent's group, e.g. traits-agent)"
        ) from None
    except (OSError, ValueError) as e:
        raise NotSent(f"the agent did not answer on {control}: {e}") from None
    if "error" in answer:
        raise NotSent(f"the agent refused the request: {answer['error']}")
    return answer


def _chunks(records: Iterable[dict]) -> Iterator[tuple[list[dict], bool]]:
    """(chunk, is_last) of at most CHUNK_RECORDS records; at least one (maybe empty) chunk."""
    it = iter(records)
    chunk = list(itertools.islice(it, CHUNK_RECORDS))
    while True:
        following = list(itertools.islice(it, CHUNK_RECORDS))
        yield chunk, not following
        if not following:
            return
        chunk = following


def _store(control: Path, name: str, records: Iterable[dict], event_time: float) -> list[dict]:
    """Hand `records` to the agent; its answers (one per chunk), once they are on disk."""
    answers = []
    for chunk, last in _chunks(records):
        # only the last chunk waits for the fsync: it covers every earlier one
        body = {"resource": name, "records": chunk, "time": event_time, "sync": last}
        answer = _request(control, "send", body)
        # keep what --wait needs, not the records' echo: memory stays bounded
        answers.append({k: v for k, v in answer.items() if k != "rejected"})
        answers[-1]["rejected"] = answer.get("rejected", [])[:SHOW_INVALID]
    return answers


def _send_and_wait(
    config: Config, name: str, records: Iterable[dict], event_time: float, timeout: float
) -> bool:
    """Store through the control socket, then wait for delivery. True: all delivered."""
    control = Path(config.control.socket)
    answers = _store(control, name, records, event_time)
    stored = sum(a["stored"] for a in answers)
    rejected = [r for a in answers for r in a.get("rejected", [])]
    refused = sum(a.get("refused_queue_full", 0) for a in answers)
    for r in rejected[:SHOW_INVALID]:
        print(f"{PROG}: rejected by the agent: {r['error']}", file=sys.stderr)
    if refused:
        print(f"{PROG}: {refused} refused: the queue is full (on_full = drop_newest)")
    noun = "event" if stored == 1 else "events"
    print(f"stored {stored} {name} {noun}", flush=True)
    if not stored:
        return False
    ranges = [(a["first_seq"], a["last_seq"]) for a in answers if a["stored"]]
    first, last = ranges[0][0], ranges[-1][1]
    deadline = time.monotonic() + timeout
    start = _request(control, "outcome", {"resource": name, "first_seq": first, "last_seq": last})
    state = start
    while not state["done"]:
        if time.monotonic() >= deadline:
            upstream = state["upstream"]
            why = f"upstream {upstream}"
            if state.get("last_error"):
                why += f": {state['last_error']}"
            if state.get("next_retry_in_s") is not None:
                why += f", next retry in {state['next_retry_in_s']} s"
            print(
                f"{PROG}: not delivered within {timeout:g} s ({why}); "
                "the events stay queued and the agent keeps trying",
                file=sys.stderr,
            )
            return False
        time.sleep(POLL_S)
        state = _request(
            control, "outcome", {"resource": name, "first_seq": first, "last_seq": last}
        )
    dead = sum(d["items"] for d in state["dead_lettered"])
    dropped = sum(state["dropped"].values()) - sum(start["dropped"].values())
    delivered = stored - dead
    if dropped:
        print(
            f"{PROG}: the disk quota dropped {dropped} {name} events meanwhile; some of these "
            "may be among them (see `traits-agent status`)",
            file=sys.stderr,
        )
    if dead:
        reasons = "; ".join(
            sorted({f"HTTP {d['status']} {d['message']}".strip() for d in state["dead_lettered"]})
        )
        print(
            f"{PROG}: rejected by the API: {dead} {name} events ({reasons}); "
            f"see `{PROG} dead-letters show {name}`",
            file=sys.stderr,
        )
    noun = "event" if delivered == 1 else "events"
    print(f"delivered {delivered} {name} {noun}")
    return not dead and not rejected and not refused
