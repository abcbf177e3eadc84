"""`traits-agent doctor`: check the host and the configuration before (or while) the agent runs.

Each check is a small function returning one `Check`: `ok` is True (fine), None (a warning:
works, but worse than it should) or False (a failure: events will be lost or not delivered).
`run_doctor` runs them all; `exit_code` is 1 when any failed, else 0 (warnings do not fail), so
the command fits a provisioning script or a package test.

The checks only look: they create, change and send nothing (the endpoint check opens one HTTPS
connection and sends a `HEAD /v1/actions` without the key; the agent check asks a running
agent for its status). The key is never printed. With `run --fake-api` running, the key and
endpoint checks look at what that agent really uses: its embedded fake API, no key.
"""

from __future__ import annotations

import argparse
import errno
import grp
import json
import os
import pwd
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import httpx

from traits_agent import __version__, paths
from traits_agent.cli.common import config_from
from traits_agent.config import Config, ConfigError, resolve_api_key

#: the Unix datagram queue length a burst of non-blocking sends needs (the drop-in's value)
MIN_MAX_DGRAM_QLEN = 512
#: where the Debian package installs the sysctl drop-in (systemd/60-traits-agent.conf)
SYSCTL_DROPIN = Path("/usr/lib/sysctl.d/60-traits-agent.conf")
#: the LoadCredential= source of the API key in traits-agent.service
CREDENTIAL_SOURCE = Path("/etc/traits-agent/api_key")
PROC_SYS = Path("/proc/sys")
#: longest AF_UNIX socket path on Linux (sun_path is 108 bytes with the terminating NUL)
MAX_UNIX_PATH = 107
ENDPOINT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    """The outcome of one check. `ok`: True fine, None warning, False failure."""

    name: str
    ok: bool | None
    detail: str
    hint: str = ""

    @property
    def status(self) -> str:
        return {True: "ok", None: "warning", False: "failed"}[self.ok]


def run_doctor(
    config: Config,
    *,
    env: Mapping[str, str] = os.environ,
    network: bool = True,
    proc_sys: Path = PROC_SYS,
    sysctl_dropin: Path = SYSCTL_DROPIN,
    credential_source: Path = CREDENTIAL_SOURCE,
    timeout: float = ENDPOINT_TIMEOUT_S,
) -> list[Check]:
    """Run every check for `config` and return them in a stable order.

    `network=False` skips the endpoint check (reported as a warning). The other keywords
    point the checks elsewhere (tests, or a host whose paths differ).
    """
    listen = config.listen
    agent = running_agent(config)
    # `run --fake-api`: the running agent delivers to its embedded stand-in, with no key
    fake_url = (
        agent.get("endpoint")
        if agent
        and agent.get("endpoint") not in (None, config.api.base_url)
        and is_loopback_url(str(agent.get("endpoint")))
        else None
    )
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("config", lambda: check_config(config)),
        (
            "net.unix.max_dgram_qlen",
            lambda: check_max_dgram_qlen(config, proc_sys, sysctl_dropin),
        ),
        ("net.core.rmem_max", lambda: check_rmem_max(config, proc_sys, sysctl_dropin)),
        ("queue.dir", lambda: check_queue_dir(config)),
        ("directories", lambda: check_directories(config)),
        ("disk space", lambda: check_disk_space(config)),
        (
            "listen.unix",
            lambda: check_unix_socket(
                "listen.unix",
                listen.unix,
                listen.unix_mode,
                socket.SOCK_DGRAM,
                "traits-agent.socket",
            ),
        ),
        (
            "listen.forward_unix",
            lambda: check_unix_socket(
                "listen.forward_unix",
                listen.forward_unix,
                listen.unix_mode,
                socket.SOCK_STREAM,
                "traits-agent-forward.socket",
            ),
        ),
        (
            "api key",
            lambda: (
                Check(
                    "api key", True, f"not needed: the running agent uses the fake API {fake_url}"
                )
                if fake_url
                else check_api_key(config, env, credential_source)
            ),
        ),
        (
            "endpoint",
            lambda: (
                check_endpoint(config, timeout=timeout, base_url=fake_url)
                if network
                else Check("endpoint", None, f"{config.api.base_url}: not checked (--no-network)")
            ),
        ),
        ("agent", lambda: check_agent(config, agent)),
    ]
    results = []
    for name, check in checks:
        try:
            results.append(check())
        except Exception as e:  # a broken check must not hide the others
            results.append(Check(name, False, f"the check itself failed: {e!r}"))
    return results


def exit_code(checks: Iterable[Check]) -> int:
    """1 if any check failed, else 0 (warnings do not fail)."""
    return 1 if any(c.ok is False for c in checks) else 0


def format_checks(checks: list[Check]) -> str:
    """The human report: one line per check, its hint indented below, a summary last."""
    marks = {True: "ok  ", None: "WARN", False: "FAIL"}
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{marks[c.ok]}  {c.name:<{width}}  {c.detail}")
        if c.hint and c.ok is not True:
            lines.extend(f"      {'':<{width}}  {line}" for line in c.hint.splitlines())
    failed = sum(c.ok is False for c in checks)
    warned = sum(c.ok is None for c in checks)
    lines.append("")
    lines.append(
        f"{failed} failed, {warned} warning{'s' if warned != 1 else ''}, "
        f"{len(checks) - failed - warned} ok"
    )
    return "\n".join(lines)


def checks_json(checks: list[Check]) -> str:
    """The machine report: {"ok": bool, "checks": [{name, ok, status, detail, hint}]}."""
    return json.dumps(
        {
            "ok": exit_code(checks) == 0,
            "checks": [{**asdict(c), "status": c.status} for c in checks],
        },
        indent=2,
    )


def main(
    config: Config, *, as_json: bool = False, network: bool = True, out: IO[str] | None = None
) -> int:
    """What `traits-agent doctor` runs: print the report, return the exit status."""
    checks = run_doctor(config, network=network)
    print(checks_json(checks) if as_json else format_checks(checks), file=out)
    return exit_code(checks)


# -- the checks -----------------------------------------------------------------------------


def check_config(config: Config) -> Check:
    source = config.source or "none found: built-in defaults"
    return Check("config", True, f"{source} (endpoint {config.api.base_url})")


def _read_sysctl(proc_sys: Path, key: str) -> int | None:
    try:
        return int((proc_sys / key.replace(".", "/")).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _sysctl_hint(key: str, value: int, dropin: Path) -> str:
    if dropin.exists():
        return (
            f"{dropin} sets it but is not applied (a container or a host that skipped "
            f"it): run `sysctl --system`, or `sysctl -w {key}={value}`"
        )
    return (
        f"run `sysctl -w {key}={value}` and make it permanent in a file under "
        f"/etc/sysctl.d/ (the Debian package installs {dropin})"
    )


def check_max_dgram_qlen(config: Config, proc_sys: Path, dropin: Path) -> Check:
    name = "net.unix.max_dgram_qlen"
    if not config.listen.unix:
        return Check(name, True, "not needed (listen.unix is disabled)")
    value = _read_sysctl(proc_sys, name)
    if value is None:
        return Check(name, None, f"cannot read {proc_sys}/net/unix/max_dgram_qlen")
    if value >= MIN_MAX_DGRAM_QLEN:
        return Check(name, True, str(value))
    return Check(
        name,
        False,
        f"{value} (< {MIN_MAX_DGRAM_QLEN}): a non-blocking game server drops events once "
        f"{value} datagrams wait on the socket",
        _sysctl_hint(name, MIN_MAX_DGRAM_QLEN, dropin),
    )


def check_rmem_max(config: Config, proc_sys: Path, dropin: Path) -> Check:
    name = "net.core.rmem_max"
    wanted = config.listen.receive_buffer
    if not (config.listen.unix or config.listen.udp) or not wanted:
        return Check(name, True, "not needed (no datagram listener, or receive_buffer = 0)")
    value = _read_sysctl(proc_sys, name)
    if value is None:
        return Check(name, None, f"cannot read {proc_sys}/net/core/rmem_max")
    if value >= wanted:
        return Check(name, True, f"{value} (>= listen.receive_buffer {wanted})")
    return Check(
        name,
        None,
        f"{value} < listen.receive_buffer {wanted}: sockets the agent binds itself get at most "
        f"{value} bytes of buffer (socket-activated ones get ReceiveBuffer= regardless)",
        _sysctl_hint(name, wanted, dropin),
    )


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        try:
            candidate.stat()
        except OSError:  # missing, or not ours to look at: its parent is on the same disk
            continue
        return candidate
    return Path("/")


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def check_queue_dir(config: Config) -> Check:
    name = "queue.dir"
    path = Path(config.queue.dir)
    try:
        st = path.stat()
    except FileNotFoundError:
        parent = _nearest_existing(path.parent)
        if not parent.is_dir():
            return Check(name, False, f"{path}: {parent} is not a directory")
        if os.access(parent, os.W_OK | os.X_OK):
            return Check(name, True, f"{path} does not exist yet; the agent will create it")
        return Check(
            name,
            False,
            f"{path} does not exist and {parent} is not writable by uid {os.geteuid()}",
            "create it for the agent's user (the systemd unit's StateDirectory= does this)",
        )
    except PermissionError:
        return Check(
            name,
            None,
            f"{path}: permission denied looking at it (uid {os.geteuid()})",
            "run the doctor as root or as the agent's user to check it",
        )
    except NotADirectoryError:
        return Check(name, False, f"{path}: a parent of it is not a directory")
    if not stat.S_ISDIR(st.st_mode):
        return Check(name, False, f"{path} exists and is not a directory")
    where = f"{path} ({_owner(st)}, mode {stat.S_IMODE(st.st_mode):04o})"
    if os.access(path, os.W_OK | os.X_OK):
        return Check(name, True, f"{where}, writable")
    if os.geteuid() not in (0, st.st_uid):
        return Check(
            name,
            None,
            f"{where}, not writable by you (uid {os.geteuid()})",
            "fine if the agent runs as its owner; run the doctor as root or that user to check",
        )
    return Check(
        name,
        False,
        f"{where}, not writable (read-only file system?)",
        "the agent cannot store events: fix the mount or point queue.dir elsewhere",
    )


def check_directories(config: Config) -> Check:
    """No directory holding the queue or a socket may be owned or writable by a user other
    than the agent's (the agent refuses to start on one, and clients refuse its sockets): the
    same rule as `paths.shared_directory_problem`, so run as root it judges the service's."""
    name = "directories"
    wanted = config.private_directories()
    problems = []
    for key, directory in wanted:
        problem = paths.shared_directory_problem(directory)
        if problem:
            problems.append(f"{key}: {problem}")
    if problems:
        return Check(
            name,
            False,
            "; ".join(problems),
            "another user could read the queue or plant a socket there: use a directory only "
            "the agent's user can write (mode 0700, or 0750 for a group), owned by it or root",
        )
    checked = ", ".join(sorted({str(d) for _, d in wanted}))
    return Check(name, True, f"private to the agent's user: {checked}")


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                continue
    return total


def check_disk_space(config: Config) -> Check:
    name = "disk space"
    path = Path(config.queue.dir)
    try:
        where = _nearest_existing(path)
        vfs = os.statvfs(where)
    except OSError as e:
        return Check(name, None, f"cannot stat the file system of {path}: {e.strerror}")
    free = vfs.f_bavail * vfs.f_frsize
    used = _tree_bytes(path) if where == path else 0
    room = free + used
    quota = config.queue.max_bytes
    minimum = 2 * config.queue.segment_bytes
    detail = (
        f"{_size(free)} free on the file system of {where}, queue uses {_size(used)}, "
        f"queue.max_bytes {_size(quota)}"
    )
    if free < minimum:
        return Check(
            name,
            False,
            detail,
            f"less than {_size(minimum)} free: the queue cannot take events; free some space",
        )
    if room < quota:
        return Check(
            name,
            None,
            detail,
            f"the disk fills before the queue reaches its quota (then writes fail instead of "
            f"on_full dropping the oldest): free space or set queue.max_bytes below "
            f"{_size(room)}",
        )
    return Check(name, True, detail)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def check_unix_socket(
    name: str, path_text: str, mode: int, kind: int, unit: str = "traits-agent.socket"
) -> Check:
    """Exists, is a socket, has the configured mode, and someone receives on it. `kind` is
    SOCK_DGRAM or SOCK_STREAM; `unit` names the socket unit that owns it under systemd."""
    if not path_text:
        return Check(name, True, "disabled")
    path = Path(path_text)
    length = len(os.fsencode(path))
    if length > MAX_UNIX_PATH:
        return Check(
            name,
            False,
            f"{path} is {length} bytes: longer than the {MAX_UNIX_PATH} a Unix socket path "
            "may have",
            "choose a shorter path",
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        return Check(
            name,
            None,
            f"{path} does not exist: the agent (or {unit}) is not running",
            f"start the agent: `systemctl enable --now {unit} traits-agent.service`, or "
            "`traits-agent run`",
        )
    except OSError as e:
        return Check(name, None, f"{path}: cannot look at it: {e.strerror}")
    if not stat.S_ISSOCK(st.st_mode):
        return Check(
            name,
            False,
            f"{path} exists and is not a socket: the agent will refuse to start",
            "remove it or choose another path",
        )
    actual = stat.S_IMODE(st.st_mode)
    where = f"{path} ({_owner(st)}, mode {actual:04o})"
    problems = []
    hints = []
    if actual != mode:
        problems.append(f"mode is not listen.unix_mode {mode:04o}")
    if actual & 0o002:
        problems.append("any local user can send events")
    if not actual & 0o020:
        problems.append("its group cannot send events")
        hints.append("game servers send as members of the socket's group: chmod g+w")
    live = _probe(path, kind)
    if live is not None:
        problems.append(live)
        if "nobody" in live:
            hints.append("start the agent (a stale socket file is replaced when it starts)")
        else:
            hints.append("add the sending user to the socket's group")
    if problems:
        return Check(name, None, f"{where}: " + "; ".join(problems), "\n".join(hints))
    return Check(name, True, f"{where}, the agent is receiving")


def _probe(path: Path, kind: int) -> str | None:
    """None if connecting works; else what connecting says (connect sends nothing)."""
    probe = socket.socket(socket.AF_UNIX, kind)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return "nobody is receiving on it (stale socket file)"
    except PermissionError:
        return f"you (uid {os.geteuid()}) may not send to it"
    except OSError as e:
        return f"connecting fails: {e.strerror or e}"
    finally:
        probe.close()
    return None


def check_api_key(config: Config, env: Mapping[str, str], credential_source: Path) -> Check:
    """Present (never shown), and a key file no one else can read."""
    name = "api key"
    try:
        key = resolve_api_key(config, env)
    except ConfigError as e:
        return Check(name, False, str(e), "fix the key file, or unset api.key_file")
    if key is not None:
        if env.get("TRAITS_API_KEY"):
            return Check(name, True, "set by $TRAITS_API_KEY")
        if config.api.key_file:
            return _key_file_check(name, Path(config.api.key_file), "api.key_file")
        path = Path(env["CREDENTIALS_DIRECTORY"]) / "api_key"
        return _key_file_check(name, path, "the systemd credential")
    # Outside the service, systemd's credential is not passed: look at its source.
    if credential_source.exists():
        return _key_file_check(name, credential_source, "the service's LoadCredential= source")
    return Check(
        name,
        False,
        "no API key: none of $TRAITS_API_KEY, api.key_file, $CREDENTIALS_DIRECTORY/api_key, "
        f"{credential_source}",
        f'install -m 0600 /dev/stdin {credential_source} <<<"$KEY"',
    )


def _key_file_check(name: str, path: Path, origin: str) -> Check:
    try:
        st = path.stat()
    except OSError as e:
        return Check(name, False, f"{path} ({origin}): {e.strerror}")
    mode = stat.S_IMODE(st.st_mode)
    where = f"in {path} ({origin}; {_owner(st)}, mode {mode:04o})"
    if st.st_size == 0:
        return Check(name, False, f"{where} is empty")
    if mode & 0o004:
        return Check(
            name,
            False,
            f"{where}: readable by every local user",
            f"chmod 0600 {path}",
        )
    if mode & 0o040:
        return Check(
            name,
            None,
            f"{where}: readable by its group",
            f"chmod 0600 {path} unless only the agent's user is in that group",
        )
    return Check(name, True, where)


def is_loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    from traits_agent.config import is_loopback_host

    return is_loopback_host(urlsplit(url).hostname or "")


def running_agent(config: Config) -> dict | None:
    """The running agent's status snapshot, or None when none answers on the control socket."""
    from traits_agent.observe.control import AgentNotRunning, request_status

    if paths.shared_directory_problem(Path(config.control.socket).parent):
        return None  # not trusted (the `directories` check says why): do not ask it
    try:
        return request_status(Path(config.control.socket), timeout=2.0)
    except (AgentNotRunning, OSError, ValueError):
        return None


def check_agent(config: Config, agent: dict | None) -> Check:
    """Is an agent running on this config's control socket, and can it deliver?"""
    name = "agent"
    if agent is None:
        # not a finding: doctor also runs before the agent is first started
        return Check(name, True, f"not running (nothing answers on {config.control.socket})")
    upstream = agent.get("upstream", "?")
    where = f"pid {agent.get('pid', '?')}, delivering to {agent.get('endpoint', '?')}"
    if upstream in ("auth_failed", "endpoint_error"):
        return Check(
            name,
            False,
            f"running ({where}) but delivery is held: {upstream}: {agent.get('last_error')}",
            "auth_failed: check the API key; endpoint_error: check api.endpoint (base URL)",
        )
    if upstream != "ok":
        return Check(
            name, None, f"running ({where}); upstream {upstream}: {agent.get('last_error')}"
        )
    return Check(name, True, f"running ({where}), upstream ok")


#: an API path every 12traits endpoint serves (POST); HEAD without a key answers 401/405 there,
#: and 404 where the base URL is wrong
PROBE_PATH = "/v1/actions"


def check_endpoint(
    config: Config, *, timeout: float = ENDPOINT_TIMEOUT_S, base_url: str | None = None
) -> Check:
    """One `HEAD {base}/v1/actions` without the key: reachable, and an API lives there (a
    404/410 or a redirect means the base URL is wrong: the agent would hold in
    `endpoint_error`). `base_url`: check this one instead (the running fake API)."""
    name = "endpoint"
    url = (base_url or config.api.base_url).rstrip("/")
    started = time.monotonic()
    try:
        with httpx.Client(
            timeout=timeout,
            follow_redirects=False,
            trust_env=not url.startswith("http://"),  # as the agent's client does
            headers={"User-Agent": f"traits-agent/{__version__} (doctor)"},
        ) as client:
            response = client.head(url + PROBE_PATH)
    except httpx.TimeoutException as e:
        stage = "connecting" if isinstance(e, httpx.ConnectTimeout) else "waiting for an answer"
        return Check(
            name,
            False,
            f"{url}: no answer after {timeout:g} s {stage}",
            _NETWORK_HINT,
        )
    except httpx.HTTPError as e:
        return Check(name, False, f"{url}: {_explain(e)}", _NETWORK_HINT)
    ms = (time.monotonic() - started) * 1000
    status = response.status_code
    if status in (404, 410) or 300 <= status < 400:
        return Check(
            name,
            False,
            f"{url} answered HTTP {status} for {PROBE_PATH}: no 12traits API at that base URL",
            "check api.endpoint: production, sandbox, or the base URL without /v1 "
            "(the agent holds delivery in endpoint_error until it is right)",
        )
    return Check(
        name,
        True,
        f"{url} answered HTTP {response.status_code} in {ms:.0f} ms (reachable; the key is not "
        "tested)",
    )


#: OpenSSL's words for "the peer answered, but not with TLS"
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")
_NETWORK_HINT = (
    "the agent keeps events queued until the endpoint is reachable; check DNS, outbound "
    "HTTPS (port 443) through firewalls, $HTTPS_PROXY, and api.endpoint"
)


def _explain(error: BaseException) -> str:
    """The root cause of an httpx error, in words."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    for cause in reversed(seen):
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve the host name (DNS): {cause.strerror or cause}"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {cause.verify_message or cause}"
        if isinstance(cause, ssl.SSLError):
            reason = cause.reason or str(cause)
            if reason in _NOT_TLS:
                reason += " (does the server speak TLS on that port?)"
            return f"TLS handshake failed: {reason}"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (nothing listens on that port)"
        if isinstance(cause, OSError) and cause.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return f"no route to the host: {cause.strerror}"
    text = str(error) or type(error).__name__
    for phrase, meaning in (
        ("Name or service not known", "cannot resolve the host name (DNS)"),
        ("Temporary failure in name resolution", "cannot resolve the host name (DNS)"),
        ("Connection refused", "connection refused (nothing listens on that port)"),
        ("Network is unreachable", "no route to the host (network unreachable)"),
        ("CERTIFICATE_VERIFY_FAILED", "TLS certificate not trusted"),
        ("WRONG_VERSION_NUMBER", "TLS handshake failed (the server does not speak TLS there)"),
    ):
        if phrase in text:
            return f"{meaning}: {text}"
    return f"{type(error).__name__}: {text}"


def cmd_doctor(args: argparse.Namespace) -> int:
    return main(config_from(args), as_json=args.json, network=not args.no_network)
