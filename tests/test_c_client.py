"""The single-header C client (clients/c/traits_agent.h), compiled with the system compiler as
C99 and as C++, against real sockets and the real agent. Skips where there is no compiler."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.e2e.harness import AgentProcess, write_config
from tests.e2e.test_client_burst import needs_netns, netns_prefix, received_events
from traits_agent.fakeapi import FakeAPI
from traits_agent.intake.wire import decode_datagram

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "clients" / "c" / "traits_agent.h"
EXAMPLE = ROOT / "clients" / "c" / "example.c"
DRIVER = ROOT / "tests" / "c" / "driver.c"
GUARD_S = 60
C_FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2"]
CXX_FLAGS = ["-x", "c++", "-std=c++11", "-Wall", "-Wextra", "-Werror", "-O2"]

CC = shutil.which(os.environ.get("CC", "cc"))
CXX = shutil.which(os.environ.get("CXX", "c++"))
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc)")


def compile_program(compiler: str, flags: list[str], source: Path, out: Path) -> Path:
    done = subprocess.run(
        [compiler, *flags, "-o", str(out), str(source)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def build_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ta-c-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def driver(build_dir: Path) -> Path:
    if CC is None:
        pytest.skip("no C compiler (cc)")
    return compile_program(CC, C_FLAGS, DRIVER, build_dir / "driver")


def run(program: Path, *args: str, socket_path: str, **env: str) -> dict[str, int]:
    """Run a client program against `socket_path`; its last line of key=value counts."""
    done = subprocess.run(
        [str(program), *args],
        env={**os.environ, "TRAITS_AGENT_SOCKET": socket_path, **env},
        capture_output=True,
        text=True,
        timeout=GUARD_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    return {k: int(v) for k, v in (item.split("=") for item in last.split())}


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    directory = Path(tempfile.mkdtemp(prefix="ta-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(directory / "events.sock"))
    sock.setblocking(False)
    yield sock
    sock.close()
    shutil.rmtree(directory, ignore_errors=True)


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(70_000))
        except BlockingIOError:
            return out


# --------------------------------------------------------------------------- compiling


@needs_cc
@pytest.mark.parametrize("source", [EXAMPLE, DRIVER], ids=["example", "driver"])
def test_compiles_as_c99_without_warnings(build_dir: Path, source: Path) -> None:
    """-std=c99 -Wall -Wextra -Werror -pedantic, and nothing to link but libc."""
    assert CC is not None
    compile_program(CC, C_FLAGS, source, build_dir / f"{source.stem}-c99")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("source", [EXAMPLE, DRIVER], ids=["example", "driver"])
def test_compiles_as_cxx_without_warnings(build_dir: Path, source: Path) -> None:
    """The same header and programs build as C++ (extern "C", no C-only constructs)."""
    assert CXX is not None
    compile_program(CXX, CXX_FLAGS, source, build_dir / f"{source.stem}-cxx")


@needs_cc
def test_header_alone_declares_only(build_dir: Path) -> None:
    """Included without TRAITS_AGENT_IMPLEMENTATION, the header only declares: two files can
    include it and one implements it."""
    assert CC is not None
    user = build_dir / "user.c"
    user.write_text(
        f'#include "{HEADER}"\nint use(ta_client *c) {{ return ta_level_up(c, "u", 1); }}\n'
    )
    done = subprocess.run(
        [CC, *C_FLAGS, "-c", "-o", str(build_dir / "user.o"), str(user)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- the encoding


def test_every_value_kind_decodes_as_the_agent_reads_it(
    driver: Path, receiver: socket.socket
) -> None:
    """The hand-written msgpack encoder: ints of every width, floats, bools, nil, str8/16,
    UTF-8, nested arrays and maps, EventTime, resource aliases; unknown resource and too-large
    events are dropped and counted."""
    counts = run(driver, "types", socket_path=receiver.getsockname())
    datagrams = drain(receiver)
    entries = []
    for data in datagrams:
        result = decode_datagram(data)
        assert result.errors == []
        entries += result.entries
    # one Forward entry per resource, in the header's resource order
    assert sorted(e.tag for e in entries) == ["actions", "level_ups"]
    by_tag = {e.tag: e for e in entries}
    first, second = by_tag["level_ups"], by_tag["actions"]
    assert first.time == 1546355045.5 and second.time == 7.0
    assert first.record == {
        "user_id": "u1",
        "level": 10,
        "zero": 0,
        "i8": -100,
        "i16": -30000,
        "i32": -2000000000,
        "i64": -(2**63),
        "u8": 200,
        "u16": 60000,
        "u32": 4000000000,
        "u64": 2**63 - 1,
        "neg": -5,
        "price": 25.5,
        "yes": True,
        "no": False,
        "nothing": None,
        "null_string": None,
        "s8": "x" * 100,
        "s16": "x" * 1000,
        "utf8": "café",
        "params": [{"key": "item_id", "value": 3003}, "plain"],
        "empty": {},
    }
    assert second.record == {}
    assert counts == {
        "emitted": 4,
        "sent": 2,
        "dropped": 2,
        "agent_down": 0,
        "queue_full": 0,
        "too_large": 1,
        "unknown_resource": 1,
        "no_memory": 0,
        "send_error": 0,
        "pending": 0,
    }


def test_packs_events_per_resource(driver: Path, receiver: socket.socket) -> None:
    """A burst leaves in few datagrams of Forward entries, none over max_datagram, every
    event in order (the receiver reads while the program runs: the host's queue may be 10)."""
    proc = subprocess.Popen(
        [str(driver), "burst", "3000", "4096"],
        env={**os.environ, "TRAITS_AGENT_SOCKET": receiver.getsockname()},
        stdout=subprocess.PIPE,
        text=True,
    )
    datagrams: list[bytes] = []
    receiver.settimeout(GUARD_S)
    try:
        while sum(len(decode_datagram(d).entries) for d in datagrams) < 3000:
            datagrams.append(receiver.recv(70_000))
    finally:
        out, _ = proc.communicate(timeout=GUARD_S)
    assert all(len(d) <= 4096 for d in datagrams)
    assert len(datagrams) < 3000 // 50
    levels = [e.record["level"] for d in datagrams for e in decode_datagram(d).entries]
    assert levels == [i % 100 + 1 for i in range(3000)]
    assert "sent=3000 dropped=0" in out


def test_agent_down_is_counted(driver: Path, tmp_path: Path) -> None:
    """No agent: the program runs to the end, every event dropped as agent_down."""
    counts = run(driver, "burst", "1000", socket_path=str(tmp_path / "missing.sock"))
    assert (counts["sent"], counts["dropped"], counts["agent_down"]) == (0, 1000, 1000)


def test_full_queue_holds_bounded_and_counts(driver: Path, receiver: socket.socket) -> None:
    """A receiver that never reads: the program neither blocks nor aborts; what did not fit
    is counted (queue_full), and sent + dropped is every event."""
    counts = run(
        driver, "burst", "200000", "2048", socket_path=receiver.getsockname(), DRIVER_CLOSE_MS="0"
    )
    assert counts["sent"] + counts["dropped"] == 200_000
    assert counts["queue_full"] == counts["dropped"] > 0
    received = sum(len(decode_datagram(d).entries) for d in drain(receiver))
    assert received == counts["sent"]


def test_tick_sends_after_flush_interval(driver: Path, receiver: socket.socket) -> None:
    """A partial datagram leaves on a ta_tick() once flush_interval has passed, with no
    flush and no further event."""
    done = subprocess.run(
        [str(driver), "interval"],
        env={**os.environ, "TRAITS_AGENT_SOCKET": receiver.getsockname()},
        capture_output=True,
        text=True,
        timeout=GUARD_S,
    )
    assert done.returncode == 0, done.stderr
    first = dict(item.split("=") for item in done.stdout.splitlines()[0].split())
    assert first["sent_before_close"] == "1"
    assert len(drain(receiver)) == 1


def test_fork_child_starts_empty(driver: Path, receiver: socket.socket) -> None:
    """After fork() the child sends only its own event, the parent only its own."""
    counts = run(driver, "fork", socket_path=receiver.getsockname())
    users = sorted(e.record["user_id"] for d in drain(receiver) for e in decode_datagram(d).entries)
    assert users == ["child", "parent"]
    assert (counts["sent"], counts["dropped"]) == (1, 0)


# --------------------------------------------------------------------------- through the agent


@needs_cc
async def test_example_end_to_end(workdir: Path, api: FakeAPI, build_dir: Path) -> None:
    """The example program's events reach the API as the reference expects them."""
    assert CC is not None
    example = compile_program(CC, C_FLAGS, EXAMPLE, build_dir / "example")
    agent = AgentProcess(workdir, write_config(workdir, api.url))
    await agent.start()
    done = await trio.run_process(
        [str(example), "3"],
        env={**os.environ, "TRAITS_AGENT_SOCKET": agent.unix_socket},
        capture_stdout=True,
    )
    assert b"emitted 9 sent 9 dropped 0" in done.stdout
    wanted = ["level_ups", "actions", "purchases", "virtual_purchases", "logins", "items"]
    with trio.fail_after(GUARD_S):
        await api.wait_until(
            lambda: (
                len(api.received["level_ups"]) == 3
                and all(api.received[n] for n in [*wanted, "social_dynamics"])
            )
        )
    (action,) = api.received["actions"]
    assert action == {
        "user_id": "c-1",
        "action_id": "2002",
        "action_name": "buy_item",
        "action_params": [{"key": "item_id", "value": "3003"}],
        "timestamp": "2019-01-01 15:04:05",
    }
    assert [u["level"] for u in api.received["level_ups"]] == [1, 2, 3]
    assert api.received["purchases"][0]["price"] == 25.5
    assert math.isclose(api.received["virtual_purchases"][0]["virtual_price"], 25.5)
    await agent.terminate()


@needs_netns
@pytest.mark.parametrize(
    ("qlen", "max_datagram"),
    [(10, "0"), (512, "0"), (10, "2048")],
    ids=["qlen10", "qlen512", "qlen10-small-datagrams"],
)
async def test_burst_is_delivered_whole(
    workdir: Path, driver: Path, qlen: int, max_datagram: str
) -> None:
    """20,000 events in a tight loop reach the agent, at both kernel queue lengths."""
    config = write_config(workdir, "http://127.0.0.1:9", listen={"udp": ""})
    agent = AgentProcess(workdir, config, prefix=netns_prefix(qlen))
    await agent.start()
    counts = await trio.to_thread.run_sync(
        lambda: run(driver, "burst", "20000", max_datagram, socket_path=agent.unix_socket)
    )
    assert (counts["sent"], counts["dropped"]) == (20_000, 0)
    assert await received_events(agent, 20_000) == 20_000
    assert agent.status()["received"]["accepted"] == 20_000
    await agent.terminate()


async def test_agent_killed_mid_run(workdir: Path, driver: Path) -> None:
    """The agent dies while the program emits: it finishes, and sent + dropped is exact."""
    config = write_config(workdir, "http://127.0.0.1:9", listen={"udp": ""})
    agent = AgentProcess(workdir, config)
    await agent.start()
    proc = await trio.lowlevel.open_process(
        [str(driver), "ticks", "50", "2000"],
        env={**os.environ, "TRAITS_AGENT_SOCKET": agent.unix_socket},
        stdout=subprocess.PIPE,
    )
    await received_events(agent, 1)
    await agent.kill()
    with trio.fail_after(GUARD_S):
        assert await proc.wait() == 0
    assert proc.stdout is not None
    out = (await proc.stdout.receive_some(65536)).decode()
    counts = {k: int(v) for k, v in (item.split("=") for item in out.split())}
    assert counts["emitted"] == 100_000
    assert counts["sent"] + counts["dropped"] == 100_000
    assert counts["agent_down"] > 0
