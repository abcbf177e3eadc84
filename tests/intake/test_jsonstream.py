"""JSON Forward entries as a byte stream: split anywhere, bounded, garbage refused."""

from __future__ import annotations

import json
import random

import pytest

from traits_agent.intake.jsonstream import MAX_DEPTH, JsonStream, JsonStreamError, starts_json

ENTRIES = [
    ["game.level-ups", 1600000000, {"level": 3, "user_id": "g-0"}, {}],
    ["t", [[1, {"s": 'a "quoted" ] } [ { \\ string'}]], {"chunk": "c\\"}],
    {"not": ["an", "entry"]},  # objects come out too; the listener decides
    ["u", 1.5, {"emoji": "\u00e9\U0001f600", "esc": "\\u005d"}],
]
TEXT = "".join(json.dumps(e) + ("\n" if i % 2 else "") for i, e in enumerate(ENTRIES)).encode()


def test_every_split_of_the_stream_gives_the_same_values() -> None:
    """Values come out whole however the bytes are cut, escapes and brackets in strings
    included."""
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(TEXT)), rng.randint(1, 12)))
        stream = JsonStream(1 << 16)
        got = []
        for a, b in zip([0, *cuts], [*cuts, len(TEXT)], strict=True):
            got.extend(stream.values(TEXT[a:b]))
        assert got == ENTRIES
    one_by_one = JsonStream(1 << 16)
    assert [v for i in range(len(TEXT)) for v in one_by_one.values(TEXT[i : i + 1])] == ENTRIES


def test_first_byte_rule() -> None:
    assert starts_json(ord("[")) and starts_json(ord("{"))
    assert not starts_json(0x93) and not starts_json(0x81) and not starts_json(ord(" "))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'["t", 1, {"a": NaN}]', "not_json"),
        (b'["t", 1, {"a": 1,}]', "not_json"),
        (b'["t", "\xff"]', "not_json"),
        (b"[" * (MAX_DEPTH + 1), "not_json"),
        (b'["t", 1, {}] 42', "not_an_entry"),
        (b'["t", 1, {}] "x"', "not_an_entry"),
    ],
)
def test_garbage_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(JsonStreamError) as caught:
        list(JsonStream(1 << 16).values(data))
    assert caught.value.reason == reason


def test_an_unfinished_value_is_bounded() -> None:
    stream = JsonStream(100)
    assert list(stream.values(b'["t", 1, {"a": "' + b"x" * 50)) == []
    with pytest.raises(JsonStreamError) as caught:
        list(stream.values(b"x" * 60))
    assert caught.value.reason == "too_large"
