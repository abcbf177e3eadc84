"""`traits-agent send`: validate one event and hand it to the agent's socket."""

from __future__ import annotations

import argparse
import json
import socket
import sys

from traits_agent.cli.common import PROG, UsageError, config_from
from traits_agent.config import Config, parse_host_port
from traits_agent.paths import check_socket_dir


def cmd_send(args: argparse.Namespace) -> int:
    import time

    from traits_agent.intake.wire import encode_event
    from traits_agent.schema import Rejected, normalize, resolve_tag

    config = config_from(args)
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
    errors = []
    if config.listen.unix:
        check_socket_dir(config.listen.unix, "listen.unix")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(datagram, config.listen.unix)
            return config.listen.unix
        except OSError as e:
            errors.append(f"{config.listen.unix}: {e.strerror or e}")
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
