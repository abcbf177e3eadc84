"""`traits-agent fake-api`: the local stand-in of the 12traits API on its own."""

from __future__ import annotations

import argparse
import sys

from traits_agent.cli.common import PROG, UsageError
from traits_agent.config import parse_host_port


def cmd_fake_api(args: argparse.Namespace) -> int:
    import trio

    from traits_agent import malloc
    from traits_agent.fakeapi import run_fake_api
    from traits_agent.observe import log

    malloc.tune()

    try:
        host, port = parse_host_port(args.listen)
    except ValueError as e:
        raise UsageError(f"--listen: {e}") from None
    log.setup()
    try:
        trio.run(run_fake_api, host, port, args.api_key)
    except (OSError, BaseExceptionGroup) as e:
        # a busy port arrives wrapped in the nurseries' exception groups: one line
        cause = e
        while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
            cause = cause.exceptions[0]
        if not isinstance(cause, OSError):
            raise
        print(
            f"{PROG}: fake-api cannot listen on {args.listen}: {cause.strerror or cause}",
            file=sys.stderr,
        )
        return 1
    return 0
