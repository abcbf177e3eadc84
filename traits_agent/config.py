"""Configuration: TOML file + environment + CLI flags → one frozen `Config`.

Every key has a default that works on a developer's machine, so no file is needed to start.
A wrong key, type or value raises `ConfigError` naming the key; the CLI turns that into one line
on stderr and exit status 2. The API key is never part of `Config`'s repr (see `Secret`).
"""

from __future__ import annotations

import ipaddress
import math
import os
import reprlib
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from traits_agent import paths
from traits_agent.errors import ConfigError
from traits_agent.schema import RESOURCES

ENDPOINTS = {
    "production": "https://api.12traits.com",
    "sandbox": "https://sandbox.api.12traits.com",
}
FSYNC_POLICIES = ("always", "interval", "never")
ON_FULL_POLICIES = ("drop_oldest", "drop_newest")
FORWARD_PROCESS = ("auto", "always", "never")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
API_ITEM_LIMIT = 1000


class Secret(str):
    """A string that never shows itself in repr/logs (the API key)."""

    def __repr__(self) -> str:
        return "Secret('***')"


@dataclass(frozen=True)
class ApiConfig:
    endpoint: str = "sandbox"
    key_file: str = ""
    #: seconds for connecting / for a whole request
    connect_timeout_s: float = 5.0
    timeout_s: float = 30.0
    #: upper bound on concurrent requests across resources (each resource has at most one,
    #: PlayFab up to 8 single-event requests)
    max_in_flight: int = 4
    #: post PlayFab events as JSON arrays; only for accounts that enabled PlayFab's "Post
    #: multiple events in JSON array" (the default, like PlayFab's webhook: one per request)
    playfab_arrays: bool = False

    @property
    def base_url(self) -> str:
        return ENDPOINTS.get(self.endpoint, self.endpoint).rstrip("/")


@dataclass(frozen=True)
class ListenConfig:
    unix: str = field(default_factory=lambda: str(paths.runtime_dir() / paths.SOCKET_NAME))
    udp: str = "127.0.0.1:24225"
    forward_unix: str = field(
        default_factory=lambda: str(paths.runtime_dir() / paths.FORWARD_SOCKET_NAME)
    )
    forward: str = ""
    #: the Forward shared-key handshake (Fluentd's <security>), per listener: "" = none.
    #: `*_users` maps usernames to passwords (user authentication on top of the key)
    #: (secrets: kept out of the config's repr)
    forward_shared_key: str = field(default="", repr=False)
    forward_users: dict = field(default_factory=dict, repr=False)
    forward_unix_shared_key: str = field(default="", repr=False)
    forward_unix_users: dict = field(default_factory=dict, repr=False)
    #: a non-loopback UDP/TCP bind address is refused unless this is true
    allow_remote: bool = False
    #: permissions of the Unix sockets (game servers in the socket's group may write)
    unix_mode: int = 0o660
    #: SO_RCVBUF asked for on datagram sockets; the kernel may grant less (logged)
    receive_buffer: int = 8 * 1024 * 1024
    #: the Forward listeners in a process of their own (a second core for decoding):
    #: "auto" (when the agent may use two CPUs or more), "always", "never"
    forward_process: str = "auto"


@dataclass(frozen=True)
class QueueConfig:
    dir: str = field(default_factory=lambda: str(paths.state_dir() / "queue"))
    max_bytes: int = 1024**3
    fsync: str = "interval"
    fsync_interval_ms: int = 100
    on_full: str = "drop_oldest"
    segment_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class BatchConfig:
    max_items: int = API_ITEM_LIMIT
    linger_ms: int = 1000
    #: bound on the JSON body of one request
    max_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class RetryConfig:
    initial_backoff_ms: int = 500
    max_backoff_ms: int = 300_000


@dataclass(frozen=True)
class LogConfig:
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""


@dataclass(frozen=True)
class ControlConfig:
    socket: str = field(
        default_factory=lambda: str(paths.runtime_dir() / paths.CONTROL_SOCKET_NAME)
    )


@dataclass(frozen=True)
class Config:
    api: ApiConfig = field(default_factory=ApiConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    #: where the config came from (None: built-in defaults), for `status` and errors
    source: str | None = None

    def private_directories(self) -> list[tuple[str, Path]]:
        """(config key, directory) for each directory the agent keeps state or a socket in:
        the queue directory and each configured Unix socket's parent. The agent creates and
        checks them at start (`agent.prepare_directories`) and `doctor` judges the same list,
        so the two cannot disagree about which directories must be private."""
        wanted = [("queue.dir", Path(self.queue.dir))]
        for key, value in (
            ("listen.unix", self.listen.unix),
            ("listen.forward_unix", self.listen.forward_unix),
            ("control.socket", self.control.socket),
        ):
            if value:
                wanted.append((key, Path(value).parent))
        return wanted


# -- loading -----------------------------------------------------------------------------------


def find_config_file(flag: str | None, env: Mapping[str, str] = os.environ) -> Path | None:
    """`--config`, else `$TRAITS_AGENT_CONFIG`, else the platform (user) file, else the
    package's `/etc/traits-agent/agent.toml` — so a sysadmin's plain `traits-agent status`
    talks to the service — else None (built-in defaults)."""
    if flag:
        return Path(flag)
    if env.get("TRAITS_AGENT_CONFIG"):
        return Path(env["TRAITS_AGENT_CONFIG"])
    for candidate in (paths.default_config_path(), paths.SYSTEM_CONFIG_PATH):
        if candidate.is_file():
            return candidate
    return None


#: the keys that hold file-system paths: absolute, or relative to the config file's directory
PATH_KEYS = (
    ("api", "key_file"),
    ("listen", "unix"),
    ("listen", "forward_unix"),
    ("queue", "dir"),
    ("control", "socket"),
)


def load_config(path: Path | None) -> Config:
    """Read and validate the TOML file at `path` (None: defaults only).

    A relative path in the file is resolved against the file's own directory (never the
    working directory, which differs between a shell, cron and systemd)."""
    if path is None:
        return validate(Config())
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("--config", f"no such file: {path}") from None
    except PermissionError:
        raise ConfigError("--config", f"cannot read {path}: permission denied") from None
    except OSError as e:  # a directory, an I/O error, a name too long...
        raise ConfigError("--config", f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(str(path), f"larger than {MAX_CONFIG_BYTES} bytes: not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            str(path), f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {_one_line(str(e))}") from None
    except RecursionError:
        raise ConfigError(str(path), "not valid TOML: nested too deeply") from None
    return from_mapping(data, source=str(path), base=Path(os.path.abspath(path)).parent)


def _one_line(text: str) -> str:
    return " ".join(text.split())


#: an agent.toml is a few KiB; a bigger "config" is the wrong file (and parsing it costs)
MAX_CONFIG_BYTES = 1024 * 1024


def from_mapping(
    data: Mapping[str, Any], *, source: str | None = None, base: Path | None = None
) -> Config:
    """Build a Config from parsed TOML, naming the first wrong key precisely.

    `base`: the directory relative paths are resolved against (the config file's); without
    one, a relative path is an error."""
    sections = {f.name: f for f in fields(Config) if f.name != "source"}
    built: dict[str, Any] = {}
    for name, value in data.items():
        if name not in sections:
            raise ConfigError(name, f"unknown section (known: {', '.join(sections)})")
        if not isinstance(value, Mapping):
            raise ConfigError(name, "must be a table, e.g. [" + name + "]")
        section_type: Any = sections[name].default_factory
        built[name] = _build_section(name, section_type, _resolve_paths(name, value, base))
    return validate(Config(**built, source=source))


def _resolve_paths(section: str, values: Mapping[str, Any], base: Path | None) -> Mapping[str, Any]:
    """`values` with every path key made absolute: `~` expanded, a relative path joined to
    `base`. A placeholder copied from the docs (`<state dir>/queue`) is an error: it would
    otherwise create a directory literally named `<state dir>`."""
    out = dict(values)
    for sec, key in PATH_KEYS:
        value = out.get(key) if sec == section else None
        if not isinstance(value, str) or not value:
            continue
        dotted = f"{section}.{key}"
        if "<" in value and ">" in value:
            raise ConfigError(
                dotted,
                f"{value!r} contains a placeholder: write a real path, or delete the line to "
                "use the default",
            )
        path = Path(value).expanduser()
        if not path.is_absolute():
            if base is None:
                raise ConfigError(dotted, f"must be an absolute path (got {value!r})")
            path = base / path
        out[key] = os.path.normpath(path)
    return out


def _build_section(section: str, factory: Callable[[], Any], values: Mapping[str, Any]) -> Any:
    default = factory()
    known = {f.name: type(getattr(default, f.name)) for f in fields(default)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        if key not in known:
            raise ConfigError(dotted, f"unknown key (known: {', '.join(known)})")
        want = known[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not want:
            raise ConfigError(
                dotted,
                f"must be {_type_name(want)}, got {_type_name(type(value))} {_short(value)}",
            )
        if isinstance(value, str) and "\x00" in value:
            raise ConfigError(dotted, "must not contain a NUL character")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(dotted, f"must be a finite number (got {value})")
        changes[key] = value
    return replace(default, **changes)


_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxstring = 60
_REPR.maxother = 60


def _short(value: Any) -> str:
    """A bounded, one-line repr of a wrong value (a 1,000-deep array must not recurse)."""
    return _one_line(_REPR.repr(value))


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        t, t.__name__
    )


def validate(config: Config) -> Config:
    """Check values and cross-field rules; return the config unchanged or raise ConfigError."""
    _check_endpoint(config.api.endpoint)
    _check_positive("api.connect_timeout_s", config.api.connect_timeout_s)
    _check_positive("api.timeout_s", config.api.timeout_s)
    _check_range("api.max_in_flight", config.api.max_in_flight, 1, 64)
    if config.listen.udp:
        _check_host_port("listen.udp", config.listen.udp, config.listen.allow_remote)
    if config.listen.forward:
        _check_host_port("listen.forward", config.listen.forward, config.listen.allow_remote)
    for listener in ("forward", "forward_unix"):
        _check_security(config.listen, listener)
    _check_range("listen.unix_mode", config.listen.unix_mode, 0, 0o777)
    _check_range("listen.receive_buffer", config.listen.receive_buffer, 0, 1 << 30)
    _check_choice("listen.forward_process", config.listen.forward_process, FORWARD_PROCESS)
    _check_choice("queue.fsync", config.queue.fsync, FSYNC_POLICIES)
    _check_choice("queue.on_full", config.queue.on_full, ON_FULL_POLICIES)
    _check_range("queue.fsync_interval_ms", config.queue.fsync_interval_ms, 1, 60_000)
    _check_range("queue.segment_bytes", config.queue.segment_bytes, 64 * 1024, 1 << 30)
    # every resource's queue keeps at least two segments (see quota.py)
    _check_range(
        "queue.max_bytes",
        config.queue.max_bytes,
        2 * config.queue.segment_bytes * len(RESOURCES),
        1 << 50,
    )
    _check_range("batch.max_items", config.batch.max_items, 1, API_ITEM_LIMIT)
    _check_range("batch.linger_ms", config.batch.linger_ms, 0, 3_600_000)
    _check_range("batch.max_bytes", config.batch.max_bytes, 65536, 256 * 1024 * 1024)
    _check_range("retry.initial_backoff_ms", config.retry.initial_backoff_ms, 1, 3_600_000)
    _check_range(
        "retry.max_backoff_ms",
        config.retry.max_backoff_ms,
        config.retry.initial_backoff_ms,
        24 * 3_600_000,
    )
    _check_choice("log.format", config.log.format, LOG_FORMATS)
    _check_choice("log.level", config.log.level, LOG_LEVELS)
    if config.metrics.listen:
        _check_host_port("metrics.listen", config.metrics.listen, config.listen.allow_remote)
    return config


def _check_security(listen: ListenConfig, listener: str) -> None:
    key = getattr(listen, f"{listener}_shared_key")
    users = getattr(listen, f"{listener}_users")
    for name, password in users.items():
        if not isinstance(password, str) or not name:
            raise ConfigError(f"listen.{listener}_users", "must map user names to password strings")
    if users and not key:
        raise ConfigError(
            f"listen.{listener}_users",
            f"user authentication needs a shared key too (listen.{listener}_shared_key)",
        )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)} (got {value!r})")


def _check_range(key: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low} and {high} (got {value})")


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(key, f"must be greater than 0 (got {value})")


def is_loopback_host(host: str) -> bool:
    """True for localhost and any address in 127.0.0.0/8 or ::1."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_host_port(value: str) -> tuple[str, int]:
    """'127.0.0.1:24225' / '[::1]:24225' → (host, port); ValueError when malformed."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"must be HOST:PORT (got {value!r})")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535 (got {port})")
    return host.strip("[]"), port


def _check_host_port(key: str, value: str, allow_remote: bool) -> None:
    try:
        host, _ = parse_host_port(value)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None
    if not allow_remote and not is_loopback_host(host):
        raise ConfigError(
            key,
            f"{host} is not a loopback address; set listen.allow_remote = true to accept "
            "events from the network",
        )


def _check_endpoint(endpoint: str) -> None:
    if endpoint in ENDPOINTS:
        return
    try:
        url = urlsplit(endpoint)
        _ = url.port  # raises for a port that is not a number or out of range
    except ValueError as e:
        raise ConfigError(
            "api.endpoint", f"not a valid URL: {e} (got {_short(endpoint)})"
        ) from None
    if url.scheme not in ("https", "http") or not url.hostname:
        raise ConfigError(
            "api.endpoint", f"must be production, sandbox or an https:// URL (got {endpoint!r})"
        )
    if url.scheme == "http" and not is_loopback_host(url.hostname):
        raise ConfigError(
            "api.endpoint",
            f"plain http:// is allowed only to loopback hosts (got {url.hostname}); use https://",
        )


# -- the API key -------------------------------------------------------------------------------


def resolve_api_key(config: Config, env: Mapping[str, str] = os.environ) -> Secret | None:
    """`$TRAITS_API_KEY`, else `[api] key_file`, else `$CREDENTIALS_DIRECTORY/api_key`."""
    if env.get("TRAITS_API_KEY"):
        return _checked_key("$TRAITS_API_KEY", env["TRAITS_API_KEY"].strip())
    candidates = []
    if config.api.key_file:
        candidates.append(("api.key_file", Path(config.api.key_file)))
    if env.get("CREDENTIALS_DIRECTORY"):
        candidates.append(
            ("$CREDENTIALS_DIRECTORY", Path(env["CREDENTIALS_DIRECTORY"]) / "api_key")
        )
    for key, path in candidates:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            if key == "api.key_file":
                raise ConfigError(key, f"no such file: {path}") from None
            continue
        except OSError as e:
            raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
        if not text:
            raise ConfigError(key, f"{path} is empty")
        return _checked_key(key, text)
    return None


def _checked_key(source: str, text: str) -> Secret:
    """An API key goes into an HTTP header: printable ASCII only (a stray UTF-8 BOM or a
    pasted non-breaking space would otherwise fail every request, forever)."""
    if not (text.isascii() and text.isprintable()) or " " in text:
        raise ConfigError(source, "the API key has characters an HTTP header cannot carry")
    return Secret(text)
