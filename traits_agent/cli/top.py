"""`traits-agent top`: a live view of the running agent, like `vector top`.

Every `--interval` (1 s) it asks the agent for its status snapshot over the control socket
and draws one frame: per resource events/s in (accepted) and out (delivered), queued items and
bytes, the oldest queued item's age, dead-lettered and dropped counts, the upstream state with
the next retry; rejections by reason; the host's UDP drop counters (what clients lose to a
full socket, read from /proc/net/snmp as /metrics does); the last error. Rates are differences
of the agent's counters between two snapshots, so they are exact over the interval, whatever
the refresh lag.

Terminal handling is plain ANSI (clear, home, hide/show the cursor), which every terminal and
SSH session understands; no curses. A terminal too small for the table says so instead of
drawing a mangled frame. `q` or Ctrl-C leaves, and the cursor and terminal mode are restored.
Not on a terminal (piped, or `--once`) it prints frames as plain text, one after the other.

The snapshot is read key by key with defaults: the status model may grow without this
module changing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from traits_agent.cli.common import PROG, config_from

#: the smallest terminal the table is drawn in
MIN_COLUMNS = 60
MIN_ROWS = 6

CLEAR = "\x1b[H\x1b[2J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"


def cmd_top(args: argparse.Namespace) -> int:
    from traits_agent.observe.control import AgentNotRunning, request_status
    from traits_agent.paths import check_socket_dir

    config = config_from(args)
    control = Path(config.control.socket)
    check_socket_dir(control, "control.socket")
    try:
        first = request_status(control)
    except AgentNotRunning as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except PermissionError:
        print(
            f"{PROG}: permission denied on {control} (join the agent's group, e.g. traits-agent)",
            file=sys.stderr,
        )
        return 1
    except (OSError, ValueError) as e:
        print(f"{PROG}: the agent did not answer: {e}", file=sys.stderr)
        return 1
    iterations = 1 if args.once else args.iterations
    interval = max(0.1, args.interval)
    out = sys.stdout
    live = out.isatty() and not args.once

    def fetch() -> dict[str, Any] | None:
        try:
            snapshot = request_status(control)
        except (OSError, ValueError, AgentNotRunning):
            return None
        snapshot[HOST_UDP_ERRORS] = _host_udp_errors()
        return snapshot

    first[HOST_UDP_ERRORS] = _host_udp_errors()

    if not live:

        def sleep() -> bool:
            time.sleep(interval)
            return False

        with contextlib.suppress(KeyboardInterrupt):
            for lines in _frames(first, fetch, sleep, iterations):
                size = shutil.get_terminal_size((100, 40))
                out.write("\n".join(fit(lines, size.columns, size.lines)) + "\n\n")
                out.flush()
        return 0
    # Ctrl-C is how one leaves top, even when started with SIGINT ignored (a script's `&`)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _screen(out), _keys(sys.stdin) as pressed:
            for lines in _frames(first, fetch, lambda: pressed(interval), iterations):
                size = shutil.get_terminal_size((100, 40))
                out.write(CLEAR + "\r\n".join(fit(lines, size.columns, size.lines)))
                out.flush()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves top: the terminal is restored, exit 0
    return 0


def _frames(
    first: dict[str, Any], fetch: Any, wait: Any, iterations: int | None
) -> Iterator[list[str]]:
    """One rendered frame per refresh, until `iterations` or until `wait()` (which waits one
    interval) says the user quit. A rate needs two snapshots: the first frame comes after
    one interval."""
    prev, prev_t = first, time.monotonic()
    n = 0
    while iterations is None or n < iterations:
        if wait():
            return
        cur = fetch()
        now = time.monotonic()
        if cur is None:
            yield [f"{PROG} top: the agent stopped answering; asking again"]
        else:
            yield render(prev, cur, now - prev_t)
            prev, prev_t = cur, now
        n += 1


@contextlib.contextmanager
def _screen(out: TextIO) -> Iterator[None]:
    out.write(HIDE_CURSOR)
    try:
        yield
    finally:
        out.write(SHOW_CURSOR + "\r\n")
        out.flush()


@contextlib.contextmanager
def _keys(stdin: TextIO) -> Iterator[Any]:
    """`pressed(timeout)`: wait up to `timeout` s; True if `q` was pressed. Puts a terminal
    stdin in cbreak mode (keys arrive unbuffered, Ctrl-C still interrupts), and back."""
    fd = stdin.fileno() if stdin.isatty() else None
    saved = None
    if fd is not None:
        import termios
        import tty

        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)

    def pressed(timeout: float) -> bool:
        if fd is None:
            time.sleep(timeout)
            return False
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if ready and os.read(fd, 32).lower().startswith(b"q"):
                return True
        return False

    try:
        yield pressed
    finally:
        if fd is not None and saved is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# -- rendering (pure: tested without a terminal) -------------------------------------------


def fit(lines: list[str], columns: int, rows: int) -> list[str]:
    """`lines` cut to the terminal; a terminal too small for the table says so."""
    if columns < MIN_COLUMNS or rows < MIN_ROWS:
        # short enough for the smallest terminal anyone uses; cut only if smaller still
        return [f"top needs {MIN_COLUMNS}x{MIN_ROWS}, terminal is {columns}x{rows}"[:columns]]
    if len(lines) > rows - 1:
        hidden = len(lines) - (rows - 2)
        lines = [*lines[: rows - 2], f"… {hidden} more lines (make the terminal taller)"]
    return [line[:columns] for line in lines]


def render(prev: Mapping[str, Any], cur: Mapping[str, Any], dt: float) -> list[str]:
    """The frame for snapshot `cur`, with rates against `prev` taken `dt` seconds earlier."""
    dt = max(dt, 1e-6)
    resources = cur.get("resources") or {}
    before = prev.get("resources") or {}
    total_in = total_out = queued = queued_bytes = 0.0
    rows = []
    for name, res in resources.items():
        old = before.get(name) or {}
        rate_in = max(0, _n(res, "accepted") - _n(old, "accepted")) / dt
        rate_out = max(0, _n(res, "delivered") - _n(old, "delivered")) / dt
        total_in += rate_in
        total_out += rate_out
        queued += _n(res, "queued_items")
        queued_bytes += _n(res, "queued_bytes")
        state = str(res.get("upstream", "ok"))
        retry = res.get("next_retry_in_s")
        if state != "ok" and retry is not None:
            state += f", retry in {retry:.0f}s"
        rows.append(
            f"{name:<17}{_rate(rate_in):>8}{_rate(rate_out):>8}{_n(res, 'queued_items'):>9}"
            f"{_size(_n(res, 'queued_bytes')):>9}{_age(res.get('oldest_age_s')):>8}"
            f"{_n(res, 'dead_lettered'):>6}{sum((res.get('dropped') or {}).values()):>8}  {state}"
        )
    rejected = cur.get("rejected") or {}
    rejected_before = prev.get("rejected") or {}
    lines = [
        f"{PROG} {cur.get('version', '?')}  pid {cur.get('pid', '?')}  "
        f"up {_duration(cur.get('uptime_s'))}  {time.strftime('%H:%M:%S')}",
        f"endpoint {cur.get('endpoint', '?')}  upstream {cur.get('upstream', '?')}",
        f"in {_rate(total_in)}/s  out {_rate(total_out)}/s  queued {int(queued)} "
        f"({_size(queued_bytes)})  rejected {sum(rejected.values())}",
        "",
        f"{'resource':<17}{'in/s':>8}{'out/s':>8}{'queued':>9}{'bytes':>9}{'oldest':>8}"
        f"{'dead':>6}{'dropped':>8}  upstream",
        *rows,
    ]
    if rejected:
        parts = []
        for reason, count in sorted(rejected.items()):
            rate = max(0, count - rejected_before.get(reason, 0)) / dt
            parts.append(f"{reason}={count}" + (f" (+{_rate(rate)}/s)" if rate else ""))
        lines += ["", "rejected: " + ", ".join(parts)]
    errors, errors_before = cur.get(HOST_UDP_ERRORS), prev.get(HOST_UDP_ERRORS)
    if errors and errors_before:
        # datagrams the kernel dropped before any reader saw them (all UDP sockets of the
        # host): what a client sending to a full socket loses
        lost = [max(0, a - b) / dt for a, b in zip(errors, errors_before, strict=True)]
        lines += [
            "",
            f"host UDP drops (all sockets): receive errors {errors[0]} (+{_rate(lost[0])}/s), "
            f"buffer full {errors[1]} (+{_rate(lost[1])}/s)",
        ]
    if cur.get("last_error") and cur.get("upstream", "ok") != "ok":
        when = cur.get("last_error_at")
        lines += ["", f"last error: {cur['last_error']}" + (f" (at {when})" if when else "")]
    return lines


#: where top keeps the host's UDP drop counters next to a snapshot (not the agent's key)
HOST_UDP_ERRORS = "_top_host_udp_errors"


def _host_udp_errors() -> tuple[int, int] | None:
    """(InErrors, RcvbufErrors) of the host's UDP, as /metrics exports them."""
    from traits_agent.observe.prometheus import read_udp_errors

    return read_udp_errors()


def _n(res: Mapping[str, Any], key: str) -> int:
    value = res.get(key, 0)
    return int(value) if isinstance(value, int | float) else 0


def _rate(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value else "0"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"


def _age(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or seconds <= 0:
        return "-"
    return _duration(seconds)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
