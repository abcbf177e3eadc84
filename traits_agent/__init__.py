"""traits-agent: a local sidecar that gets game analytics events to the 12traits Ingestion API.

Game servers hand events, fire-and-forget, to the agent over a Unix datagram socket or
loopback UDP; the agent validates them, stores them in a disk-backed queue and delivers them
in batches over HTTPS with retry. See README.md for the tour and interface.md for the contract.
"""

__version__ = "0.1.0"
