"""Fixtures: a real FakeAPI on loopback and an httpx client pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from fakeapi_examples import API_KEY

from traits_agent.fakeapi import FakeAPI


@pytest.fixture
async def api(nursery: trio.Nursery) -> FakeAPI:
    fake = FakeAPI(API_KEY)
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def client(api: FakeAPI) -> AsyncIterator[httpx.AsyncClient]:
    assert api.url is not None
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=30) as http:
        yield http
