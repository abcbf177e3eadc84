"""Fuzz targets (hypothesis): bounded in the default suite, longer with one variable.

    .venv/bin/pytest -q tests/fuzz                                  # the default: seconds
    HYPOTHESIS_PROFILE=fuzz .venv/bin/pytest -q tests/fuzz          # ~50x the examples

No example database is written (`database=None`): the suite leaves the tree as it found it,
and a failure prints the example to reproduce (`@reproduce_failure`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from traits_agent.queue import DiskQueue
from traits_agent.schema import RESOURCES

_COMMON = {
    "database": None,
    "deadline": None,
    "suppress_health_check": [
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
}
settings.register_profile("default", max_examples=60, **_COMMON)
settings.register_profile("fuzz", max_examples=3000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

CORPUS = Path(__file__).parent / "corpus"


@pytest.fixture(scope="module")
def queues():
    """Real queues, one per resource, shared by a module's examples (opening them costs
    ~0.2 s; the examples only append)."""
    with tempfile.TemporaryDirectory(prefix="ta-fuzz-") as tmp:
        opened = {name: DiskQueue.open(Path(tmp) / name, fsync="never") for name in RESOURCES}
        try:
            yield opened
        finally:
            for queue in opened.values():
                queue.close()


class Lane:
    """What Ingest needs of a lane: the queue and a wake-up call."""

    def __init__(self, queue: DiskQueue) -> None:
        self.queue = queue

    def notify(self) -> None:
        pass
