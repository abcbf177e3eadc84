"""The game-server client, as `traits_agent.client` (its home is `clients/python/`).

The same module ships alone as the `traits-agent-client` wheel (`traits_agent_client`), which
needs only msgpack; the agent's own package includes it so this import keeps working. See
`traits_agent_client` for the rules.
"""

from traits_agent_client import (
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_BUFFER,
    DEFAULT_UDP_DATAGRAM,
    DEFAULT_UNIX_DATAGRAM,
    ENV_VAR,
    RESOURCES,
    SYSTEM_SOCKET,
    Client,
    agent_socket,
    pack_time,
    resolve_resource,
)

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_MAX_BUFFER",
    "DEFAULT_UDP_DATAGRAM",
    "DEFAULT_UNIX_DATAGRAM",
    "ENV_VAR",
    "RESOURCES",
    "SYSTEM_SOCKET",
    "Client",
    "agent_socket",
    "pack_time",
    "resolve_resource",
]
