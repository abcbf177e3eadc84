"""The request examples of the API reference (../shared/seeds), verbatim: one item per JSON
resource. Shared by the resource, fake API and end-to-end tests."""

from __future__ import annotations

from typing import Any

EXAMPLES: dict[str, dict[str, Any]] = {
    "actions": {
        "timestamp": "2019-01-01 15:04:05",
        "user_id": "1001",
        "action_id": "2002",
        "action_name": "buy_item",
        "action_params": [{"key": "item_id", "value": "3003"}],
    },
    "logins": {
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
    "purchases": {
        "timestamp": "2019-01-01 15:04:05",
        "user_id": "1001",
        "item_id": "2002",
        "count": 1,
        "price": 25.50,
        "platform": "Steam",
    },
    "virtual_purchases": {
        "timestamp": "2019-01-01 15:04:05",
        "user_id": "1001",
        "item_id": "2002",
        "count": 1,
        "virtual_price": 25.50,
        "currency": "gold",
    },
    "level_ups": {"timestamp": "2019-01-01 15:04:05", "user_id": "1001", "level": 10},
    "items": {
        "item_id": "1001",
        "price": 25.50,
        "currency": "USD",
        "name": "Axe",
        "type": "weapon",
    },
    "social_dynamics": {
        "timestamp": "2019-01-01 15:04:05",
        "user_id": "1001",
        "target_user_id": "1002",
        "connection": "linked",
        "interaction": "friend",
    },
}
