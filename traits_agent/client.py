"""The game-server client, as `traits_agent.client` (its home is `clients/python/`).

The same module ships alone as the `traits-agent-client` wheel (`traits_agent_client`), which
needs only msgpack; the agent's own package includes it so this import keeps working. See
`traits_agent_client` for the rules. This module only re-exports the client's public names
(its `__all__`), so the two cannot drift apart.
"""

from traits_agent_client import *  # noqa: F403  (the names are the client's __all__)
from traits_agent_client import __all__ as __all__
