"""Where the agent listens: the one rule the Python client and `traits-agent send` share.

Standard library only, so the client wheel can use it without the agent installed.

1. `$TRAITS_AGENT_SOCKET`, when set: a path, or `@name` for the Linux abstract namespace.
2. A socket the caller was configured with (the CLI passes its config file's `[listen] unix`).
3. The system service's socket, `/run/traits-agent/events.sock`, when it exists.
4. The per-user default, where `traits-agent run` without a config file listens:
   `$XDG_RUNTIME_DIR/traits-agent/events.sock`, else `/run/user/<uid>/traits-agent/...` when
   that directory exists, else `<tmp>/runtime-<uid>/traits-agent/...`: platformdirs' rule,
   which the agent uses, without its checks of ownership and mode (a test compares the two);
   macOS: `~/Library/Caches/TemporaryItems/traits-agent/...`.

`$RUNTIME_DIRECTORY` is deliberately not read here: under systemd it names the runtime
directory of the unit that runs *this* process — a game server's own, not the agent's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

ENV_VAR = "TRAITS_AGENT_SOCKET"
SYSTEM_SOCKET = "/run/traits-agent/events.sock"
APP_NAME = "traits-agent"
SOCKET_NAME = "events.sock"


def user_runtime_dir(env: Mapping[str, str] = os.environ) -> str:
    """The per-user runtime directory of the agent (platformdirs' rule, without creating it)."""
    if sys.platform == "darwin":
        return os.path.join(os.path.expanduser("~/Library/Caches/TemporaryItems"), APP_NAME)
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return os.path.join(xdg, APP_NAME)
    uid = os.geteuid() if hasattr(os, "geteuid") else 0
    run_user = f"/run/user/{uid}"
    if os.path.isdir(run_user):
        return os.path.join(run_user, APP_NAME)
    import tempfile  # only here: it pulls in shutil, random, ... at import

    return os.path.join(tempfile.gettempdir(), f"runtime-{uid}", APP_NAME)


def user_socket(env: Mapping[str, str] = os.environ) -> str:
    """The per-user default socket (step 4)."""
    return os.path.join(user_runtime_dir(env), SOCKET_NAME)


def agent_socket(configured: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """The agent's Unix datagram socket by the rule in the module docstring.

    `configured`: what a config file says (`""` when it turns the socket off); None when
    there is no config file, as for a game server.
    """
    from_env = env.get(ENV_VAR, "")
    if from_env:
        return from_env
    if configured is not None:
        return configured
    if os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    return user_socket(env)
