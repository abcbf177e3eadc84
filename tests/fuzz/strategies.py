"""Hypothesis strategies for what peers send: msgpack values of any shape, Forward entries
that are nearly right, and byte mutations of real captures."""

from __future__ import annotations

import gzip
import struct

import msgpack
from hypothesis import strategies as st

from traits_agent.schema import RESOURCES

TAGS = [*RESOURCES, "game.level_ups", "level-ups", "unknown", "", "a" * 2000]
FIELDS = sorted({f.name for r in RESOURCES.values() for f in r.fields})

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.one_of(st.text(max_size=12), ints), inner, max_size=6),
    ),
    max_leaves=30,
)


@st.composite
def nested(draw) -> list:
    """A list nested up to 1,000 deep (msgpack's decoder allows 1,024)."""
    value: object = draw(scalars)
    for _ in range(draw(st.integers(0, 1000))):
        value = [value]
    return value


event_times = st.one_of(
    st.integers(min_value=0, max_value=2**32),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.builds(
        lambda s, ns: msgpack.ExtType(0, struct.pack(">II", s, ns)),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
    ),
)
records = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(scalars, values), max_size=8),
    values,
    nested(),
)
options = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "chunk": st.one_of(st.text(max_size=24), values),
            "compressed": st.sampled_from(["gzip", "text", "zstd", 3]),
            "size": ints,
        },
    ),
)


@st.composite
def entries(draw) -> object:
    """A Forward-protocol entry in one of its forms, or something close to one."""
    tag = draw(st.one_of(st.sampled_from(TAGS), st.text(max_size=20), values))
    pairs = draw(st.lists(st.tuples(event_times, records).map(list), max_size=5))
    option = draw(options)
    form = draw(st.sampled_from(["message", "forward", "packed", "gzip", "junk"]))
    if form == "message":
        entry = [tag, draw(event_times), draw(records)]
    elif form == "forward":
        entry = [tag, pairs]
    elif form in ("packed", "gzip"):
        blob = b"".join(msgpack.packb(p, use_bin_type=True) for p in pairs)
        if form == "gzip":
            blob = gzip.compress(blob)
            option = {**(option or {}), "compressed": "gzip"}
        entry = [tag, blob]
    else:
        return draw(values)
    if option is not None:
        entry.append(option)
    return entry


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@st.composite
def mutated(draw, base: bytes) -> bytes:
    """`base` with a few bytes flipped, cut, inserted or repeated."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 32))]
    return bytes(data)
