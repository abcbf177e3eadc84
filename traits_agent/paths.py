"""Where the agent keeps its sockets, state and config.

Precedence, highest first: an explicit config value, systemd's `$RUNTIME_DIRECTORY` /
`$STATE_DIRECTORY` (set by `RuntimeDirectory=` / `StateDirectory=`), then platformdirs' per-user
directories. systemd may pass several colon-separated directories; the first is ours.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import platformdirs

APP_NAME = "traits-agent"
CONFIG_FILE_NAME = "agent.toml"
SOCKET_NAME = "events.sock"
FORWARD_SOCKET_NAME = "forward.sock"
CONTROL_SOCKET_NAME = "control.sock"
#: where the Debian package puts the service's config
SYSTEM_CONFIG_PATH = Path("/etc/traits-agent/agent.toml")


def _first_env_dir(name: str) -> Path | None:
    value = os.environ.get(name, "")
    first = value.split(":", 1)[0]
    return Path(first) if first else None


def runtime_dir() -> Path:
    """Directory for sockets: systemd's RuntimeDirectory, else the user runtime dir.

    Without $XDG_RUNTIME_DIR (cron, su, containers) platformdirs falls back to a /tmp path
    and warns on stderr; the fallback is fine for us, the warning would only confuse `send`.
    """
    found = _first_env_dir("RUNTIME_DIRECTORY")
    if found:
        return found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir(APP_NAME))


def state_dir() -> Path:
    """Directory for the queue and dead letters: systemd's StateDirectory, else user data dir."""
    return _first_env_dir("STATE_DIRECTORY") or Path(platformdirs.user_data_dir(APP_NAME))


def default_config_path() -> Path:
    """The platform config file (may not exist: built-in defaults apply then)."""
    return Path(platformdirs.user_config_dir(APP_NAME)) / CONFIG_FILE_NAME


def default_socket_path() -> Path:
    """The Unix datagram socket game servers send to when nothing is configured."""
    return runtime_dir() / SOCKET_NAME
