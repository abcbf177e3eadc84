"""Shared test data: the reference's example items, and a batch builder."""

from __future__ import annotations

import copy
from typing import Any

API_KEY = "s3cret-test-key-4711"

# The request bodies of the reference's curl examples: resource → (path, payload key, item).
EXAMPLES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "actions": (
        "/v1/actions",
        "actions",
        {
            "timestamp": "2019-01-01 15:04:05",
            "user_id": "1001",
            "action_id": "2002",
            "action_name": "buy_item",
            "action_params": [{"key": "item_id", "value": "3003"}],
        },
    ),
    "logins": (
        "/v1/logins",
        "users",
        {
            "timestamp": "2019-01-01 15:04:05",
            "user_id": "1001",
            "clan_id": "2002",
            "level": 10,
            "device": "iPhone X",
            "country": "US",
            "language": "en-US",
            "platform": "Apple",
            "register_date": "2018-11-14",
            "last_login_timestamp": "2019-01-01 11:10:06",
        },
    ),
    "purchases": (
        "/v1/purchases",
        "purchases",
        {
            "timestamp": "2019-01-01 15:04:05",
            "user_id": "1001",
            "item_id": "2002",
            "count": 1,
            "price": 25.50,
            "platform": "Steam",
        },
    ),
    "virtual_purchases": (
        "/v1/virtual-purchases",
        "virtual_purchases",
        {
            "timestamp": "2019-01-01 15:04:05",
            "user_id": "1001",
            "item_id": "2002",
            "count": 1,
            "virtual_price": 25.50,
            "currency": "gold",
        },
    ),
    "level_ups": (
        "/v1/level-ups",
        "level_ups",
        {"timestamp": "2019-01-01 15:04:05", "user_id": "1001", "level": 10},
    ),
    "items": (
        "/v1/items",
        "items",
        {"item_id": "1001", "price": 25.50, "currency": "USD", "name": "Axe", "type": "weapon"},
    ),
    "social_dynamics": (
        "/v1/social-dynamics",
        "social_dynamics",
        {
            "timestamp": "2019-01-01 15:04:05",
            "user_id": "1001",
            "target_user_id": "1002",
            "connection": "linked",
            "interaction": "friend",
        },
    ),
}


def batch(resource: str, n: int = 1, **changes: Any) -> tuple[str, dict[str, Any]]:
    """``(path, body)`` holding ``n`` copies of the reference's example item for ``resource``."""
    path, key, item = EXAMPLES[resource]
    items = [{**copy.deepcopy(item), **changes} for _ in range(n)]
    return path, {key: items}
