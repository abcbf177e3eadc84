"""`traits-agent` command line: argv → the command module that runs it (one module per command).

Exit status: 0 success; 1 the thing asked for did not happen (no agent running, event not sent,
invalid event); 2 bad usage or configuration (one line naming the flag or key), including a
directory another user owns or can write.
"""

from __future__ import annotations

import argparse
import sys

from traits_agent import __version__
from traits_agent.cli.common import PROG, UsageError
from traits_agent.config import ConfigError
from traits_agent.paths import UnsafePathError


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
        return _command(args.command)(args)
    except (ConfigError, UsageError, UnsafePathError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


COMMANDS = {
    "run": "traits_agent.cli.run:cmd_run",
    "send": "traits_agent.cli.send:cmd_send",
    "status": "traits_agent.cli.status:cmd_status",
    "fake-api": "traits_agent.cli.fake_api:cmd_fake_api",
    "dead-letters": "traits_agent.cli.dead_letters:cmd_dead_letters",
    "doctor": "traits_agent.cli.doctor:cmd_doctor",
    "upload": "traits_agent.cli.upload:cmd_upload",
}


def _command(name: str):
    """Import a command's module only when it runs: `send` must not pay for trio and httpx."""
    import importlib

    module, _, attr = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
