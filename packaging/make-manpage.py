"""Write traits-agent(1) in roff to stdout, from the CLI's own argparse help.

Run with the interpreter that has traits_agent installed (build-deb.sh uses the package's
venv), so the page always matches the shipped commands. Usage: python make-manpage.py DATE
"""

from __future__ import annotations

import argparse
import os
import sys

FILES = [
    ("/etc/traits-agent/agent.toml", "configuration (a conffile)"),
    ("/etc/traits-agent/api_key", "the API key, root-only; passed to the service by systemd"),
    ("/var/lib/traits-agent/", "the durable queue (StateDirectory=)"),
    ("/run/traits-agent/events.sock", "Unix datagram socket for events (traits-agent.socket)"),
    ("/run/traits-agent/control/control.sock", "control socket used by status"),
    ("/usr/lib/sysctl.d/60-traits-agent.conf", "net.unix.max_dgram_qlen, net.core.rmem_max"),
]


def roff(text: str) -> str:
    """Escape text for roff: backslashes, and leading dots/quotes that would be requests."""
    lines = []
    for line in text.replace("\\", "\\e").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def preformatted(text: str) -> list[str]:
    return [".nf", roff(text.rstrip()), ".fi"]


def main() -> int:
    date = sys.argv[1] if len(sys.argv) > 1 else ""
    os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal width
    from traits_agent import __version__
    from traits_agent.cli import build_parser

    parser = build_parser()
    out = [
        f'.TH TRAITS-AGENT 1 "{date}" "traits-agent {__version__}" "User Commands"',
        ".SH NAME",
        "traits-agent \\- deliver game analytics events to the 12traits API, durably",
        ".SH SYNOPSIS",
        ".B traits-agent",
        "\\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        roff(parser.description or ""),
        ".PP",
        "Game servers hand events to the agent over a Unix datagram socket, loopback UDP or",
        "the Fluentd Forward protocol; the agent validates them, keeps them in a disk-backed",
        "queue and delivers them in batches over HTTPS, retrying through outages.",
        "Installed as a service, it runs under systemd: traits-agent.service and the",
        "socket units traits-agent.socket, traits-agent-udp.socket and",
        "traits-agent-forward.socket; see /usr/share/doc/traits-agent/.",
        ".SH OPTIONS",
        *preformatted(parser.format_help()),
        ".SH COMMANDS",
    ]
    for action in parser._actions:  # argparse has no public way to list subcommands
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [".SS " + name, *preformatted(sub.format_help())]
    out += [".SH FILES"]
    for path, what in FILES:
        out += [".TP", f"\\fI{path}\\fR", what]
    out += [
        ".SH EXIT STATUS",
        "0 success; 1 the thing asked for did not happen (for example no agent is running);",
        "2 bad usage or configuration.",
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBsystemd.socket\\fR(5)",
    ]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
