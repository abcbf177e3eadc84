"""Fixtures for command tests: a short work directory, and no agent left behind."""

from __future__ import annotations

import pytest

from tests.e2e.harness import kill_leftovers, remove_tree, short_tmpdir


@pytest.fixture
def workdir():
    path = short_tmpdir()
    yield path
    kill_leftovers()
    remove_tree(path)
