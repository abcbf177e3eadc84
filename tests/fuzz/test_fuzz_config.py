"""Bad configs never escape the one-line exit 2 (issue 7 item 12).

A fuzzer (hypothesis) throws arbitrary bytes, TOML built from the real sections and keys with
hostile values, and mutations of a valid file at `load_config`: each input must load or raise
`ConfigError` with a one-line message; anything else is what used to print a traceback
(`endpoint = "http://[::1"` raised ValueError, a non-UTF-8 file UnicodeDecodeError). The CI
run is bounded; a longer one: `HYPOTHESIS_PROFILE=fuzz .venv/bin/pytest -q tests/fuzz`
(profiles: tests/fuzz/conftest.py).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest
from hypothesis import given
from hypothesis import strategies as st

from traits_agent.config import Config, ConfigError, load_config

SECTIONS = {
    f.name: [g.name for g in fields(f.default_factory())]  # type: ignore[misc]
    for f in fields(Config)
    if f.name != "source"
}
VALID = """\
[api]
endpoint = "http://127.0.0.1:8080"
timeout_s = 30
[listen]
udp = "127.0.0.1:24225"
unix_mode = 0o660
[queue]
fsync = "interval"
max_bytes = 1073741824
[batch]
linger_ms = 1000
"""

HOSTILE_STRINGS = [
    "http://[::1",
    "http://[::1]:99999/",
    "https://h:port/",
    "http://127.0.0.1:8080",
    "https://",
    "\\u0000",
    "/tmp/x\\u0000y",
    "[::1]:0",
    "::1:0",
    "host:-1",
    "x" * 300,
    "\\ud7ff\\ue000",
    "1e999",
    "production",
]
toml_value = st.recursive(
    st.one_of(
        st.sampled_from(HOSTILE_STRINGS).map(lambda s: f'"{s}"'),
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.sampled_from(["nan", "inf", "-inf", "0.0", "1e308", "-0.5", "true", "false"]),
        st.sampled_from(["0o777", "0x7fffffffffffffff", "1979-05-27T07:32:00Z", "07:32:00"]),
        st.text(max_size=20).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', "") + '"'),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(st.sampled_from(["a", "b", "unix"]), inner), max_size=2).map(
            lambda kv: "{" + ", ".join(f"{k} = {v}" for k, v in dict(kv).items()) + "}"
        ),
    ),
    max_leaves=8,
)


@st.composite
def toml_documents(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from([*SECTIONS, "bogus", "api.sub"]))
        lines.append(f"[{section}]")
        keys = [*SECTIONS.get(section, ["x"]), "nope"]
        for _ in range(draw(st.integers(0, 4))):
            lines.append(f"{draw(st.sampled_from(keys))} = {draw(toml_value)}")
    return ("\n".join(lines) + "\n").encode()


@st.composite
def mutated_valid(draw) -> bytes:
    data = bytearray(VALID.encode())
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.integers(0, 255))
        if action == "insert":
            data[i:i] = bytes([byte])
        elif i < len(data):
            if action == "delete":
                del data[i]
            else:
                data[i] = byte
    return bytes(data)


def loads_or_one_line_error(tmp_path, data: bytes) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message and len(message) < 1000, message


@given(data=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(tmp_path, data):
    loads_or_one_line_error(tmp_path, data)


@given(data=toml_documents())
def test_fuzz_sections_keys_and_hostile_values(tmp_path, data):
    loads_or_one_line_error(tmp_path, data)


@given(data=mutated_valid())
def test_fuzz_mutations_of_a_valid_config(tmp_path, data):
    loads_or_one_line_error(tmp_path, data)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'[api]\nendpoint = "http://[::1"\n', "api.endpoint: not a valid URL"),
        (b'[api]\nendpoint = "http://127.0.0.1:99999/"\n', "api.endpoint: not a valid URL"),
        (b'[queue]\nfsync = "\xff\xfe"\n', "not UTF-8 text (byte 0xff at offset 17)"),
        (b"[api]\nendpoint = " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
        (b'[listen]\nunix = "/tmp/a\\u0000b"\n', "listen.unix: must not contain a NUL"),
        (b"[api]\ntimeout_s = inf\n", "api.timeout_s: must be a finite number"),
        (b"[batch]\nlinger_ms = [" + b"[" * 200 + b"1" + b"]" * 200 + b"]\n", "batch.linger_ms"),
    ],
    ids=["ipv6", "port", "utf8", "deep", "nul", "inf", "deep_repr"],
)
def test_escapes_found_by_fuzzing_exit_2_in_one_line(tmp_path, content, fragment):
    """Each of these printed a traceback (ValueError, UnicodeDecodeError, RecursionError) or
    passed a value nothing downstream could use."""
    path = tmp_path / "agent.toml"
    path.write_bytes(content)
    proc = subprocess.run(
        [sys.executable, "-m", "traits_agent", "status", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and fragment in lines[0], lines


def test_a_directory_as_config_exits_2_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)
