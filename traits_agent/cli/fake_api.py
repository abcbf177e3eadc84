"""`traits-agent fake-api`: the local stand-in of the 12traits API on its own."""

from __future__ import annotations

import argparse

from traits_agent.cli.common import UsageError
from traits_agent.config import parse_host_port


def cmd_fake_api(args: argparse.Namespace) -> int:
    import trio

    from traits_agent.fakeapi import run_fake_api
    from traits_agent.observe import log

    try:
        host, port = parse_host_port(args.listen)
    except ValueError as e:
        raise UsageError(f"--listen: {e}") from None
    log.setup()
    trio.run(run_fake_api, host, port, args.api_key)
    return 0
