"""`traits-agent upload`: hand a CSV file to the agent's durable spool."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from traits_agent.cli.common import PROG, config_from
from traits_agent.delivery.spool import (
    CSV_PATHS,
    KINDS,
    CopyCancelled,
    SpoolError,
    spool_dir_for,
    spool_fd,
)
from traits_agent.paths import check_socket_dir


def cmd_upload(args: argparse.Namespace) -> int:
    return upload_command(config_from(args), args.kind, args.file)


def upload_command(config: Any, kind: str, path: str | Path) -> int:
    """`traits-agent upload KIND FILE`: spool the file, print one line, return the exit status
    (0 spooled; 1 the spool could not take it; 2 bad kind or file).

    With an agent running, the open file is handed to it over the control socket (so a user
    in the agent's group can upload without write access to the service's state directory);
    with none, the file is copied into the spool directly (as root or the agent's user), and
    the agent uploads it when it starts.
    """
    from traits_agent.observe.control import AgentNotRunning, send_upload

    if kind not in CSV_PATHS:
        print(f"{PROG}: KIND: must be one of {', '.join(KINDS)} (got {kind!r})", file=sys.stderr)
        return 2
    path = Path(path)
    control = getattr(getattr(config, "control", None), "socket", "")
    try:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        print(f"{PROG}: {path}: no such file", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: {path}: cannot read: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        if control:
            # the open file goes to whoever listens there: make sure that is the agent
            check_socket_dir(control, "control.socket")
            try:
                answer = send_upload(Path(control), kind, src, path.name)
            except AgentNotRunning:
                pass
            else:
                if "spooled" in answer:
                    print(
                        f"spooled {path} for upload to {CSV_PATHS[kind]} ({answer['bytes']} bytes)"
                    )
                    return 0
                print(f"{PROG}: {answer.get('error', answer)}", file=sys.stderr)
                return int(answer.get("exit", 1))
        spool_dir = spool_dir_for(config)
        try:
            spooled = spool_fd(spool_dir, kind, src, path)
        except SpoolError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
        except CopyCancelled as e:
            print(f"{PROG}: {e}; nothing was spooled", file=sys.stderr)
            return 1
        except PermissionError as e:
            where = e.filename or spool_dir
            print(
                f"{PROG}: cannot write to the spool {where}: permission denied "
                "(start the agent, or run this as the agent's user or as root)",
                file=sys.stderr,
            )
            return 1
        except OSError as e:
            print(f"{PROG}: cannot spool {path}: {e.strerror or e}", file=sys.stderr)
            return 1
    finally:
        os.close(src)
    size = spooled.stat().st_size
    print(f"spooled {path} for upload to {CSV_PATHS[kind]} ({size} bytes)")
    print(
        f"{PROG}: note: no agent is running; it uploads the file when it starts",
        file=sys.stderr,
    )
    return 0
