"""Fixtures shared by the suites: the fake 12traits API on loopback and a client for it, and
a short work directory for tests that run the agent as a process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.e2e.harness import kill_leftovers, remove_tree, short_tmpdir
from traits_agent.delivery.policy import make_client
from traits_agent.fakeapi import FakeAPI

#: the key the shared fake API accepts (tests/fakeapi uses its own)
API_KEY = "test-key"


@pytest.fixture
async def api(nursery: trio.Nursery) -> FakeAPI:
    """A real FakeAPI serving on 127.0.0.1, port chosen by the OS."""
    fake = FakeAPI(API_KEY)
    await nursery.start(fake.serve)
    return fake


def agent_client(base_url: str) -> httpx.AsyncClient:
    """The agent's own client (`make_client`: its transport, limits, no redirects) for
    `base_url`, with timeouts that never fire on MockClock's virtual time."""
    return make_client(base_url, connect_timeout=1e6, timeout=1e6, max_in_flight=4)


@pytest.fixture
async def client(api: FakeAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The agent's client for `api` (`agent_client`)."""
    async with agent_client(api.url) as c:
        yield c


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory with a short path (for Unix sockets); on the way out no agent the test
    started is left running and the directory is gone."""
    path = short_tmpdir()
    yield path
    kill_leftovers()
    remove_tree(path)
