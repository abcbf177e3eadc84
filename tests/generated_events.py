"""Generated events for the differential tests of the fast paths (seeded: every run the same).

Each record starts from the API reference's example of its resource and has a few fields
replaced, removed or added, from pools that mix what `schema.normalize` takes (plainly or
leniently) with what it rejects, concentrated on the edges of every rule: string sizes in
characters and in bytes, 64-bit bounds, integral floats, NaN, bool, bytes, nil, impossible
dates, case, `action_params` shapes, unknown and bytes keys.
"""

from __future__ import annotations

import contextlib
import copy
import random
import struct
from collections.abc import Iterator
from typing import Any

import msgpack

from tests.reference_examples import EXAMPLES
from traits_agent.schema import DATE, FLOAT, INT, PARAMS, RESOURCES, TIMESTAMP, Field

_MISSING = object()

_STRINGS: list[Any] = [
    "x",
    "",
    "1001",
    "é" * 10,
    "a" * 2048,
    "a" * 2049,
    "a" * 8192,
    "a" * 8193,
    "é" * 2048,
    "é" * 4096,
    "é" * 4097,
    "€" * 2048,
    "€" * 2730,
    "€" * 2731,
    "😀" * 2048,
    "😀" * 2049,
    "\x00\n",
    "\udc80",
    7,
    -3,
    2**70,
    True,
    1.5,
    10.0,
    b"bytes",
    b"\xff",
    None,
    [],
    {},
]
_INTS: list[Any] = [
    0,
    10,
    -1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64 - 1,
    True,
    10.0,
    10.5,
    float("nan"),
    "10",
    None,
]
_FLOATS: list[Any] = [
    25.5,
    0.0,
    -1e300,
    1e20,
    25,
    2**63,
    2**64 - 1,
    float("nan"),
    float("inf"),
    -float("inf"),
    False,
    "25.5",
    None,
]
_TIMESTAMPS: list[Any] = [
    "2019-01-01 15:04:05",
    "2020-02-29 23:59:59",
    "2019-02-29 00:00:00",
    "2019-01-01 24:00:00",
    "2019-01-01 15:04:60",
    "2019-01-01T15:04:05",
    "2019-01-01 15:04:05\n",
    "0000-01-01 00:00:00",
    "",
    1546355045,
    b"2019-01-01 15:04:05",
    None,
]
_DATES: list[Any] = ["2018-11-14", "2018-02-30", "2018-11-14 ", "18-11-14", "", 20181114, None]
_COUNTRIES: list[Any] = ["US", "de", "dE", "DEU", "D", "d1", "é1", "ÉÉ", "us\n", "", 12, None]
_CHOICES: list[Any] = ["linked", "unlinked", "unllinked", "friend", "party", "LINKED", "", 1]
_PARAMS: list[Any] = [
    [],
    [{"key": "k", "value": "v"}],
    [{"key": "k", "value": "v"}, {"key": "", "value": ""}],
    [{"key": "k", "value": 3}],
    [{"key": "k", "value": 2.5}],
    [{"key": "k", "value": float("nan")}],
    [{"key": "k", "value": True}],
    [{"key": "k", "value": None}],
    [{"key": "k"}],
    [{"value": "v"}],
    [{"key": "k", "value": "v", "extra": 1}],
    [{"key": "k" * 2049, "value": "v"}],
    [{"key": "k", "value": "é" * 4097}],
    [{"key": "k", "value": "€" * 2731}],
    [{b"key": "k", "value": "v"}],
    [["k", "v"]],
    {"item_id": "3003"},
    {"n": 1},
    "k=v",
    None,
]
_UNKNOWN: list[tuple[Any, Any]] = [("extra", 1), ("Timestamp", "x"), (b"user_id", "9"), (7, 1)]


def _pool(f: Field) -> list[Any]:
    if f.type == PARAMS:
        return _PARAMS
    if f.type == INT:
        return _INTS
    if f.type == FLOAT:
        return _FLOATS
    if f.type == TIMESTAMP:
        return _TIMESTAMPS
    if f.type == DATE:
        return _DATES
    if f.alpha2:
        return _COUNTRIES
    if f.choices:
        return _CHOICES
    return _STRINGS


def records(seed: int, count: int) -> Iterator[tuple[str, Any]]:
    """(resource name, record) pairs: about a third unchanged examples, the rest mutated."""
    rng = random.Random(seed)
    names = [n for n, r in RESOURCES.items() if not r.passthrough]
    for _ in range(count):
        name = rng.choice(names)
        record = copy.deepcopy(EXAMPLES[name])
        if rng.random() < 0.3:
            yield name, record
            continue
        fields = RESOURCES[name].fields
        for _ in range(rng.randint(1, 3)):
            f = rng.choice(fields)
            roll = rng.random()
            if roll < 0.15:
                record.pop(f.name, None)
            elif roll < 0.25:
                key, value = rng.choice(_UNKNOWN)
                record[key] = value
            else:
                record[f.name] = copy.deepcopy(rng.choice(_pool(f)))
        if rng.random() < 0.03:
            record = rng.choice([[record], "record", None, 5])
        yield name, record


_TAGS = {
    "actions": ["actions", "12traits.actions", "ACTIONS", "game.actions"],
    "logins": ["logins", "users", "a.b.Logins"],
    "level_ups": ["level_ups", "level-ups", "x.LEVEL-UPS"],
    "social_dynamics": ["social_dynamics", "social-dynamics"],
}


def tag_for(rng: random.Random, name: str) -> str:
    return rng.choice(_TAGS.get(name, [name]))


def _time(rng: random.Random) -> Any:
    return rng.choice(
        [
            1546355045,
            1546355045.75,
            None,
            msgpack.ExtType(0, struct.pack(">II", 1546355045, 750_000_000)),
            msgpack.ExtType(0, struct.pack(">II", 1546355045, 1_000_000_000)),
            msgpack.ExtType(0, b"short"),
            msgpack.ExtType(5, struct.pack(">II", 1, 2)),
            msgpack.Timestamp(1546355045, 5),
            float("nan"),
            -5.0,
            1e300,
            True,
            "1546355045",
        ]
        if rng.random() < 0.4
        else [1546355045, 1546355045.75, None]
    )


def datagrams(seed: int, count: int) -> Iterator[bytes]:
    """Datagrams as game servers send them, and broken in the ways a datagram can be."""
    rng = random.Random(seed)
    gen = records(seed + 1, count * 4)
    pack = msgpack.packb
    for _ in range(count):
        name, record = next(gen)
        tag = tag_for(rng, name) if rng.random() < 0.95 else rng.choice(["nope", "", "é" * 300])
        roll = rng.random()
        if roll < 0.4:
            value: Any = [tag, _time(rng), record]
        elif roll < 0.8:
            events = [[_time(rng), record]]
            for _ in range(rng.randint(0, 4)):
                other_name, other = next(gen)
                events.append([_time(rng), other if other_name == name else copy.deepcopy(record)])
            value = [tag, events]
        else:
            value = rng.choice(
                [
                    [tag, _time(rng), record, None],
                    [tag, _time(rng), record, {"chunk": "x"}],
                    [tag, _time(rng), record, 5],
                    [tag, [[_time(rng), record]], {"chunk": "x"}],
                    [tag, [[_time(rng), record, 1]]],
                    [tag, [[[_time(rng), {}], record]]],
                    [tag, [_time(rng)]],
                    [tag, _time(rng)],
                    [tag],
                    [7, _time(rng), record],
                    {"tag": tag, "record": record},
                    None,
                ]
            )
        try:
            data = pack(value, use_bin_type=True)
        except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
            continue  # not representable in msgpack (a lone surrogate, an int past 64 bits)
        roll = rng.random()
        if roll < 0.05:
            data += pack([tag, 1, {}])
        elif roll < 0.25:  # as the buffered client sends: another resource's entry after
            other_name, other = next(gen)
            with contextlib.suppress(TypeError, ValueError, OverflowError, UnicodeEncodeError):
                data += pack([tag_for(rng, other_name), [[_time(rng), other]]], use_bin_type=True)
        elif roll < 0.08:
            data = data[: rng.randrange(len(data))]
        elif roll < 0.10:
            data += b"\xc1"
        yield data
