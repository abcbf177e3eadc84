"""Fixtures for end-to-end tests: the agent as a process (the fake API is tests/conftest.py's)."""

from __future__ import annotations

import pytest

from tests.e2e.harness import kill_leftovers, remove_tree, short_tmpdir


@pytest.fixture
def workdir():
    path = short_tmpdir()
    yield path
    kill_leftovers()
    remove_tree(path)
