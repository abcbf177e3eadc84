"""A local stand-in of the 12traits Ingestion API, for tests, demos and integrators.

``FakeAPI`` serves the documented endpoints on loopback, checks the key and the items like the
reference describes, records what it accepted, and fails on demand (``Fault``). ``run_fake_api``
is what ``traits-agent fake-api`` runs.
"""

from traits_agent.fakeapi.faults import Fault
from traits_agent.fakeapi.server import CsvUpload, FakeAPI, RecordedRequest, run_fake_api

__all__ = ["CsvUpload", "FakeAPI", "Fault", "RecordedRequest", "run_fake_api"]
