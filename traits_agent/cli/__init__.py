"""`traits-agent` command line: argv → the command module that runs it (one module per command).

Exit status: 0 success; 1 the thing asked for did not happen (no agent running, event not sent,
invalid event); 2 bad usage or configuration (one line naming the flag or key). Every error of
the agent's own (`traits_agent.errors.TraitsAgentError`) reaches the user as one line
`traits-agent: <message>` with the exit status its class names, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap

from traits_agent import __version__
from traits_agent.cli.common import PROG
from traits_agent.errors import TraitsAgentError

RUN_EPILOG = """\
The API key comes from $TRAITS_API_KEY, else [api] key_file, else
$CREDENTIALS_DIRECTORY/api_key (systemd LoadCredential=); it is never printed or
logged. Without a key, --fake-api runs the whole pipeline against a local stand-in.

Logs go to stdout: a readable console on a terminal (no colour with $NO_COLOR), JSON
lines otherwise (--log-format json|console|auto, [log] format). One `summary` line per
minute while anything happens. Exit status: 0 stopped cleanly, 1 could not start or
could not make the queue durable, 2 bad configuration or usage.
"""

SEND_EPILOG = """\
examples:
  traits-agent send level_ups '{"user_id": "1001", "level": 10}'
  traits-agent send --wait level_ups '{"user_id": "1001", "level": 10}'
  traits-agent send actions - < actions.ndjson      # one JSON object per line

Without --wait the events go to the Unix socket [listen] unix names ("sent" means the
agent's socket took them); with --wait, through the control socket, and the command
returns once they are delivered, or says why not. Exit status: 0 all sent (delivered);
1 no agent, invalid events, rejected by the API, or not delivered in time; 2 usage.
"""

FAKE_API_EPILOG = """\
API paths as 12traits serves them (POST /v1/actions, /v1/level-ups, /v1/playfab,
/v1/kpis/csv, ...; `Authorization: Bearer KEY`), plus admin paths without auth:
  GET /_fake/received   items received, by resource (?items=0: counts only)
  GET /_fake/requests   every request with its answer
  GET|POST|DELETE /_fake/faults   list, inject, clear faults
  POST /_fake/reset     forget everything
A fault (POST a JSON object, or a list of them) does one thing `times` times (null:
until cleared), on one "path" or all: {"status": 503, "times": 3},
{"status": 429, "retry_after": "7"}, {"drop": true} (close the connection),
{"delay": 2.5} (then answer normally), {"reject_field": "user_id",
"reject_value": "bad"} (400 for batches holding that item), "min_items": N.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Deliver game analytics events to the 12traits Ingestion API, durably.",
        epilog=f"Run `{PROG} COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, epilog: str | None = None):
        return sub.add_parser(
            name,
            help=summary,
            description=textwrap.fill(description, 80),
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            metavar="FILE",
            help="config file (TOML); default: $TRAITS_AGENT_CONFIG, else "
            "~/.config/traits-agent/agent.toml, else /etc/traits-agent/agent.toml, else "
            "built-in defaults",
        )
        return p

    run = with_config(
        command(
            "run",
            "run the agent in the foreground",
            "Run the agent in the foreground until SIGTERM or Ctrl-C: receive events, queue "
            "them on disk, deliver them to the API. A stop leaves the backlog on disk.",
            RUN_EPILOG,
        )
    )
    run.add_argument(
        "--fake-api",
        action="store_true",
        help="deliver to an embedded local stand-in of the API (no key needed)",
    )
    run.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="overrides [log] level (default info)",
    )
    run.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        help="overrides [log] format; auto: console on a terminal, JSON lines otherwise",
    )

    send = with_config(
        command(
            "send",
            "send events to the running agent",
            "Validate events and hand them to the running agent (for shell scripts and "
            "smoke tests; a game server uses the client library).",
            SEND_EPILOG,
        )
    )
    send.add_argument("resource", metavar="RESOURCE", help="e.g. actions, logins, level_ups")
    send.add_argument(
        "json",
        metavar="JSON",
        help="the event as a JSON object, or - to read NDJSON (one object per line) from stdin",
    )
    send.add_argument("--time", type=float, help="event time, seconds since the epoch")
    send.add_argument(
        "--wait",
        action="store_true",
        help="wait until the events are stored, then delivered (or say why not)",
    )
    send.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --wait: give up waiting for delivery after this long (default 60)",
    )

    status = with_config(
        command(
            "status",
            "show what the running agent is doing",
            "Ask the running agent: per resource queued items and bytes, oldest age, "
            "delivered, dead-lettered and dropped counts; rejected by reason; upstream state, "
            "next retry and last error. Exit 1 when no agent is running.",
        )
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")

    top = with_config(
        command(
            "top",
            "a live view of the running agent",
            "A live view of the running agent, refreshed every second: events/s in and out "
            "per resource, queued items and bytes, oldest age, upstream with next retry, "
            "rejections and drops. q or Ctrl-C leaves.",
        )
    )
    top.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="refresh period"
    )
    top.add_argument(
        "--iterations",
        type=int,
        metavar="N",
        help="stop after N refreshes (for scripts; --once is --iterations 1)",
    )
    top.add_argument("--once", action="store_true", help="print one frame and exit")

    cfg = with_config(
        command(
            "config",
            "print the effective configuration",
            "Print the effective configuration: every value with every path resolved, and "
            "where it came from (default, file, env, flag). --check validates only: exit 0 "
            "when the configuration is good, 2 (with one line naming the key) when not.",
        )
    )
    cfg.add_argument("--check", action="store_true", help="validate only; exit 0 or 2")
    cfg.add_argument("--json", action="store_true", help="machine-readable output")

    upload = with_config(
        command(
            "upload",
            "hand a CSV file to the agent's spool for upload",
            "Hand a CSV file to the agent's durable spool and return at once; the agent "
            "uploads it to /v1/kpis/csv or /v1/survey-data/csv with retry.",
        )
    )
    # no `choices=`: upload_command names a bad KIND in one line (argparse would print two)
    upload.add_argument("kind", metavar="KIND", help="kpis or survey-data")
    upload.add_argument("file", metavar="FILE", help="the CSV file (copied; yours is untouched)")

    fake = command(
        "fake-api",
        "run the local stand-in of the 12traits API",
        "Run the local stand-in of the 12traits Ingestion API on its own (for integration "
        "tests): it validates requests like the API and records what it received.",
        FAKE_API_EPILOG,
    )
    fake.add_argument(
        "--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="default 127.0.0.1:8080"
    )
    fake.add_argument(
        "--api-key", default="test-key", metavar="KEY", help="the key it accepts (default test-key)"
    )

    doctor = with_config(
        command(
            "doctor",
            "check this host and the configuration",
            "Check the host and the configuration: kernel socket limits, the queue directory "
            "and free disk, socket permissions, the API key, the endpoint. Exit 1 when a "
            "check fails (warnings do not fail).",
        )
    )
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument(
        "--no-network", action="store_true", help="skip the endpoint reachability check"
    )

    dead = command(
        "dead-letters",
        "items the API rejected",
        "Items the API rejected (400/422) are kept per resource as NDJSON under "
        "<queue dir>/dead-letters/. Look at them, re-send them once the cause is fixed, or "
        "remove them.",
    )
    actions = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, summary, description, needs_resource in (
        (
            "list",
            "how many dead letters each resource has",
            "Count dead letters per resource.",
            False,
        ),
        (
            "show",
            "print a resource's dead letters (NDJSON)",
            "Print a resource's dead letters, one JSON object per line: the item, the API's "
            "status and message, when.",
            True,
        ),
        (
            "replay",
            "send a resource's dead letters through the agent again",
            "Send a resource's dead letters through the running agent again (after fixing the "
            "cause). The dead-letter file is emptied; items the API rejects again come back to "
            "it. Needs a running agent.",
            True,
        ),
        ("purge", "delete a resource's dead letters", "Delete a resource's dead letters.", True),
    ):
        action = with_config(actions.add_parser(name, help=summary, description=description))
        if needs_resource:
            action.add_argument("resource", metavar="RESOURCE", help="e.g. level_ups")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _command(args.command)(args)
    except TraitsAgentError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `traits-agent status | head`: the reader left. Say nothing (it cannot be read
        # anyway), exit as `cat` would after SIGPIPE, and keep Python's exit flush quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


COMMANDS = {
    "run": "traits_agent.cli.run:cmd_run",
    "send": "traits_agent.cli.send:cmd_send",
    "status": "traits_agent.cli.status:cmd_status",
    "fake-api": "traits_agent.cli.fake_api:cmd_fake_api",
    "dead-letters": "traits_agent.cli.dead_letters:cmd_dead_letters",
    "doctor": "traits_agent.cli.doctor:cmd_doctor",
    "upload": "traits_agent.cli.upload:cmd_upload",
    "top": "traits_agent.cli.top:cmd_top",
    "config": "traits_agent.cli.config:cmd_config",
}


def _command(name: str):
    """Import a command's module only when it runs: `send` must not pay for trio and httpx."""
    import importlib

    module, _, attr = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
