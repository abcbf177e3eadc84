"""traits-agent: a local sidecar that gets game analytics events to the 12traits Ingestion API.

Game servers hand events, fire-and-forget, to the agent over a Unix datagram socket or
loopback UDP; the agent validates them, stores them in a disk-backed queue and delivers them
in batches over HTTPS with retry. See README.md for the tour and interface.md for the contract.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from traits_agent.errors import TraitsAgentError

if TYPE_CHECKING:
    from traits_agent.client import Client

__all__ = ["Client", "TraitsAgentError", "__version__"]


def __getattr__(name: str) -> object:
    """`traits_agent.Client` is imported on first use: the CLI's `send` and every other command
    start without loading the client module (and msgpack) they do not need."""
    if name == "Client":
        from traits_agent.client import Client

        return Client
    raise AttributeError(f"module 'traits_agent' has no attribute {name!r}")
