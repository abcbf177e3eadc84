"""Shared test data: the reference's example items, and a batch builder."""

from __future__ import annotations

import copy
from typing import Any

from tests.reference_examples import EXAMPLES as REFERENCE_EXAMPLES
from traits_agent.schema import RESOURCES

API_KEY = "s3cret-test-key-4711"

# The request bodies of the reference's curl examples: resource → (path, payload key, item).
EXAMPLES: dict[str, tuple[str, str, dict[str, Any]]] = {
    name: (RESOURCES[name].path, str(RESOURCES[name].payload_key), item)
    for name, item in REFERENCE_EXAMPLES.items()
}


def batch(resource: str, n: int = 1, **changes: Any) -> tuple[str, dict[str, Any]]:
    """``(path, body)`` holding ``n`` copies of the reference's example item for ``resource``."""
    path, key, item = EXAMPLES[resource]
    items = [{**copy.deepcopy(item), **changes} for _ in range(n)]
    return path, {key: items}
