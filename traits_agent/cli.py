"""`traits-agent` command line: argv → config → the right entry point. No pipeline logic here.

Exit status: 0 success; 1 the thing asked for did not happen (no agent running, event not sent,
invalid event); 2 bad usage or configuration (one line naming the flag or key).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any, NamedTuple

from traits_agent import __version__
from traits_agent.config import (
    Config,
    ConfigError,
    find_config_file,
    load_config,
    parse_host_port,
    resolve_api_key,
)

PROG = "traits-agent"
FAKE_API_KEY = "fake-api-key"


class UsageError(Exception):
    """Bad usage that argparse did not catch; exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Deliver game analytics events to the 12traits Ingestion API, durably.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="FILE", help="config file (TOML)")
        return p

    run = with_config(sub.add_parser("run", help="run the agent in the foreground"))
    run.add_argument(
        "--fake-api",
        action="store_true",
        help="deliver to an embedded local stand-in of the API (no key needed)",
    )
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["auto", "json", "console"])

    send = with_config(sub.add_parser("send", help="send one event to the running agent"))
    send.add_argument("resource", help="e.g. actions, logins, level_ups")
    send.add_argument("json", help='the record, e.g. \'{"user_id": "1", "level": 2}\'')
    send.add_argument("--time", type=float, help="event time, seconds since the epoch")

    status = with_config(sub.add_parser("status", help="show what the running agent is doing"))
    status.add_argument("--json", action="store_true", help="machine-readable output")

    upload = with_config(
        sub.add_parser("upload", help="hand a CSV file to the agent's spool for upload")
    )
    # no `choices=`: upload_command names a bad KIND in one line (argparse would print two)
    upload.add_argument("kind", metavar="KIND", help="kpis or survey-data")
    upload.add_argument("file", metavar="FILE", help="the CSV file (copied; yours is untouched)")

    fake = sub.add_parser("fake-api", help="run the local stand-in of the 12traits API")
    fake.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    fake.add_argument("--api-key", default="test-key", metavar="KEY")

    doctor = with_config(sub.add_parser("doctor", help="check this host and the configuration"))
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument(
        "--no-network", action="store_true", help="skip the endpoint reachability check"
    )

    dead = with_config(sub.add_parser("dead-letters", help="items the API rejected"))
    dead.add_argument("action", choices=["list", "show", "replay", "purge"])
    dead.add_argument("resource", nargs="?")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UsageError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _config(args: argparse.Namespace) -> Config:
    return load_config(find_config_file(getattr(args, "config", None)))


# -- run --------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    import dataclasses

    import trio

    from traits_agent import agent, log

    config = _config(args)
    if args.log_level or args.log_format:
        config = dataclasses.replace(
            config,
            log=dataclasses.replace(
                config.log,
                level=args.log_level or config.log.level,
                format=args.log_format or config.log.format,
            ),
        )
    key = resolve_api_key(config)
    if key is None:
        if not args.fake_api:
            raise ConfigError(
                "api key",
                "no API key: set $TRAITS_API_KEY, [api] key_file, or systemd LoadCredential="
                "api_key (or try `traits-agent run --fake-api`)",
            )
        key = FAKE_API_KEY
    log.add_secret(key)
    log.setup(config.log.level, config.log.format)
    from traits_agent.queue import QueueLockedError

    try:
        trio.run(lambda: agent.run(config, key, fake_api=args.fake_api))
    except (OSError, QueueLockedError, BaseExceptionGroup) as e:
        # a start-up failure (address in use, queue locked, directory not writable) arrives
        # wrapped by the nurseries it passed through: name the first cause in one line
        cause = _first_cause(e, (OSError, QueueLockedError))
        if cause is None:
            raise
        import structlog

        structlog.get_logger("traits_agent").error("agent_failed", error=str(cause))
        print(f"{PROG}: {cause}", file=sys.stderr)
        return 1
    return 0


def _first_cause(error: BaseException, kinds: tuple[type[BaseException], ...]):
    """The first leaf of `error` (an exception group, maybe nested) when every leaf is one of
    `kinds`; None when something else is in there (that is a bug: let the traceback show)."""
    if isinstance(error, BaseExceptionGroup):
        matched, rest = error.split(kinds)
        if rest is not None or matched is None:
            return None
        while isinstance(matched, BaseExceptionGroup):
            matched = matched.exceptions[0]
        return matched
    return error if isinstance(error, kinds) else None


# -- send -------------------------------------------------------------------------------------


def cmd_send(args: argparse.Namespace) -> int:
    import time

    from traits_agent.resources import Rejected, normalize, resolve_tag
    from traits_agent.wire import encode_event

    config = _config(args)
    resource = resolve_tag(args.resource)
    if resource is None:
        raise UsageError(f"RESOURCE: unknown resource {args.resource!r}")
    try:
        record = json.loads(args.json)
    except ValueError as e:
        raise UsageError(f"JSON: not valid JSON: {e}") from None
    event_time = args.time if args.time is not None else time.time()
    try:
        normalize(resource, record, event_time)
    except Rejected as e:
        print(f"{PROG}: invalid {resource.name} event: {e}", file=sys.stderr)
        return 1
    datagram = encode_event(resource.name, record, event_time)
    target = _send_datagram(config, datagram)
    print(f"sent 1 {resource.name} event to {target}")
    return 0


def _send_datagram(config: Config, datagram: bytes) -> str:
    from traits_agent_client.where import agent_socket

    errors = []
    # the client's rule ($TRAITS_AGENT_SOCKET, system service, per-user), a config file's
    # [listen] unix in place of the last two
    unix = agent_socket(config.listen.unix if config.source else None)
    if unix:
        address = "\0" + unix[1:] if unix.startswith("@") else unix
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(datagram, address)
            return unix
        except OSError as e:
            errors.append(f"{unix}: {e.strerror or e}")
    if config.listen.udp:
        host, port = parse_host_port(config.listen.udp)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.sendto(datagram, (host, port))
        except OSError as e:
            raise UsageError(f"cannot send to udp {config.listen.udp}: {e.strerror or e}") from e
        # UDP cannot tell whether anyone listens; say where it went
        return f"udp {config.listen.udp}"
    raise UsageError("no agent socket reachable: " + "; ".join(errors or ["none configured"]))


# -- status -----------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from traits_agent.control import AgentNotRunning, request_status

    config = _config(args)
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


# -- fake-api ---------------------------------------------------------------------------------


def cmd_fake_api(args: argparse.Namespace) -> int:
    import trio

    from traits_agent import log
    from traits_agent.fakeapi import run_fake_api

    try:
        host, port = parse_host_port(args.listen)
    except ValueError as e:
        raise UsageError(f"--listen: {e}") from None
    log.setup()
    trio.run(run_fake_api, host, port, args.api_key)
    return 0


# -- dead letters -----------------------------------------------------------------------------


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from traits_agent.deadletter import dead_letters_for

    config = _config(args)
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

    from traits_agent.wire import encode_forward

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


def cmd_upload(args: argparse.Namespace) -> int:
    from traits_agent.spool import upload_command

    return upload_command(_config(args), args.kind, args.file)


def cmd_doctor(args: argparse.Namespace) -> int:
    from traits_agent import doctor

    return doctor.main(_config(args), as_json=args.json, network=not args.no_network)


COMMANDS = {
    "run": cmd_run,
    "send": cmd_send,
    "status": cmd_status,
    "fake-api": cmd_fake_api,
    "dead-letters": cmd_dead_letters,
    "doctor": cmd_doctor,
    "upload": cmd_upload,
}
