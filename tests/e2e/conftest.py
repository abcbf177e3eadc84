"""Fixtures for end-to-end tests: a real fake API in the test process, the agent as a process."""

from __future__ import annotations

import pytest
import trio

from tests.e2e.harness import kill_leftovers, remove_tree, short_tmpdir
from traits_agent.fakeapi import FakeAPI


@pytest.fixture
def workdir():
    path = short_tmpdir()
    yield path
    kill_leftovers()
    remove_tree(path)


@pytest.fixture
async def api(nursery: trio.Nursery) -> FakeAPI:
    fake = FakeAPI("test-key")
    await nursery.start(fake.serve)
    return fake
