"""End to end failure semantics: rejected items, a full quota, a full disk.

Each failure has a count in `status`, a specific log line, and loses nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

from tests.e2e.harness import AgentProcess, write_config
from tests.e2e.test_pipeline import EVENT_TIME, send_blocking, start_agent
from traits_agent.fakeapi import Fault
from traits_agent.intake.wire import encode_event, encode_forward

GUARD_S = 60


async def wait_status(agent: AgentProcess, predicate) -> dict:
    """Poll `status` until predicate(status) holds (a hang guard bounds it)."""
    with trio.fail_after(GUARD_S):
        while True:
            status = agent.status()
            if predicate(status):
                return status
            await trio.sleep(0.05)


def cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "traits_agent", *args, "--config", str(agent.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_rejected_items_dead_lettered_and_replayed(workdir, api):
    """400 naming a field: the other items are delivered, the bad ones dead-lettered with the
    API's message; after the API is fixed, `dead-letters replay` delivers them."""
    api.inject(Fault(reject_field="user_id", reject_value="bad", times=None))
    agent = await start_agent(workdir, api)
    users = [str(i) if i % 5 else "bad" for i in range(1, 21)]  # 4 bad in 20
    datagrams = [encode_event("level_ups", {"user_id": u, "level": 3}, EVENT_TIME) for u in users]
    await trio.to_thread.run_sync(send_blocking, agent.unix_socket, datagrams)
    status = await wait_status(
        agent,
        lambda s: (
            s["resources"]["level_ups"]["dead_lettered"] == 4
            and s["resources"]["level_ups"]["queued_items"] == 0
        ),
    )
    assert status["resources"]["level_ups"]["delivered"] == 16
    assert [i["user_id"] for i in api.received["level_ups"]] == [u for u in users if u != "bad"]
    listed = await trio.to_thread.run_sync(cli, agent, "dead-letters", "list")
    assert listed.stdout.split() == ["level_ups", "4"]
    shown = await trio.to_thread.run_sync(cli, agent, "dead-letters", "show", "level_ups")
    letters = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [d["status"] for d in letters] == [400] * 4
    assert all("user_id" in d["errors"] and d["item"]["user_id"] == "bad" for d in letters)
    assert any(e.get("event") == "dead_lettered" for e in agent.log_events())

    api.clear_faults()
    replay = await trio.to_thread.run_sync(cli, agent, "dead-letters", "replay", "level_ups")
    assert replay.returncode == 0, replay.stderr
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(20, "level_ups")
    assert [i["user_id"] for i in api.received["level_ups"]][-4:] == ["bad"] * 4
    listed = await trio.to_thread.run_sync(cli, agent, "dead-letters", "list")
    assert listed.stdout.startswith("no dead letters")  # replay emptied the file
    assert await agent.terminate() == 0


@pytest.mark.parametrize("on_full", ["drop_newest", "drop_oldest"])
async def test_quota_drops_are_counted_and_logged(workdir, api, on_full):
    """With the API down, one resource may fill the shared quota (not just its share of it);
    past it every drop is counted by reason and logged, another resource's events are not
    evicted, and what was kept is delivered once the API is back."""
    api.inject(Fault(status=503, times=None))
    quota = 8 * 131072  # the smallest allowed: 2 segments of 64 KiB per resource
    agent = await start_agent(
        workdir,
        api,
        queue={"max_bytes": quota, "segment_bytes": 65536, "on_full": on_full},
    )
    actions = [
        encode_event(
            "actions", {"user_id": str(i), "action_id": "1", "action_name": "a"}, EVENT_TIME
        )
        for i in range(100)
    ]
    await trio.to_thread.run_sync(send_blocking, agent.unix_socket, actions)
    n = 25000  # past the quota, however compactly the queue frames them
    await trio.to_thread.run_sync(send_blocking, agent.unix_socket, level_up_datagrams(n))
    # received is counted before the events reach the queue: wait until every level-up is
    # either queued or counted as dropped, so `kept` below is final
    status = await wait_status(
        agent,
        lambda s: (
            s["received"]["events"] == n + 100
            and s["resources"]["level_ups"]["queued_items"]
            + sum(s["resources"]["level_ups"]["dropped"].values())
            == n
        ),
    )
    res = status["resources"]["level_ups"]
    dropped = res["dropped"].get(on_full, 0)
    assert dropped > 0
    total = sum(r["queued_bytes"] for r in status["resources"].values())
    assert total <= quota
    assert res["queued_bytes"] > quota // 2  # far more than an eighth of it
    assert res["accepted"] + res["dropped"].get("drop_newest", 0) == n
    assert status["resources"]["actions"]["queued_items"] == 100
    assert any(
        e.get("event") == "events_dropped" and e.get("reason") == on_full.removeprefix("drop_")
        for e in agent.log_events()
    )
    api.clear_faults()
    kept = res["queued_items"]
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(kept, "level_ups")
        await api.wait_for_items(100, "actions")
    final = await wait_status(
        agent,
        lambda s: (
            s["resources"]["level_ups"]["queued_items"] == 0
            and s["resources"]["level_ups"]["delivered"]
            + s["resources"]["level_ups"]["dropped"].get(on_full, 0)
            == n
        ),
    )
    ids = [i["user_id"] for i in api.received["level_ups"]]
    # A batch the lane was retrying when drop_oldest removed its segment is still delivered
    # once the API is back; it leaves the dropped count then (never counted twice). So what
    # arrives is what was queued plus that batch, and each event is delivered or dropped.
    final_dropped = final["resources"]["level_ups"]["dropped"].get(on_full, 0)
    overtaken = dropped - final_dropped
    assert 0 <= overtaken <= res["in_flight"]
    assert len(ids) == kept + overtaken == n - final_dropped
    assert final["resources"]["level_ups"]["delivered"] == len(ids)
    assert ids == sorted(ids)  # order kept
    if on_full == "drop_newest":
        assert overtaken == 0
        assert ids == [f"{i:06d}" for i in range(kept)]  # the oldest were kept
    else:
        assert ids[-1] == f"{n - 1:06d}"  # the newest were kept
    assert await agent.terminate() == 0


@pytest.fixture
async def tmpfs_queue(workdir):
    """`workdir/queue` on its own 4 MiB tmpfs (root only), so a test can fill it or make it
    read-only under a running agent."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    qdir = workdir / "queue"
    qdir.mkdir()
    mounted = await trio.run_process(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(qdir)],
        check=False,
        capture_stderr=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {mounted.stderr!r}")
    try:
        yield qdir
    finally:
        await trio.run_process(["umount", "-l", str(qdir)], check=False)


def level_up_datagrams(n: int) -> list[bytes]:
    return [
        encode_forward(
            "level_ups",
            [(EVENT_TIME, {"user_id": f"{i:06d}", "level": 4}) for i in range(s, s + 50)],
        )
        for s in range(0, n, 50)
    ]


async def test_full_disk_loses_nothing_and_recovers(workdir, api, tmpfs_queue):
    """The queue's filesystem fills up: the agent keeps running, counts and logs the write
    errors, holds events in memory, and by itself writes and delivers them all once space
    returns (no new event needed to trigger it)."""
    api.inject(Fault(status=503, times=None))
    agent = await start_agent(
        workdir, api, queue={"segment_bytes": 65536, "max_bytes": 8 * 1024 * 1024}
    )
    filler = tmpfs_queue / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    n = 2000
    await trio.to_thread.run_sync(send_blocking, agent.unix_socket, level_up_datagrams(n))
    await wait_status(agent, lambda s: s["received"]["events"] == n)
    assert any(e.get("event") == "queue_write_failed" for e in agent.log_events())
    filler.unlink()
    api.clear_faults()
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(n, "level_ups")
    ids = [i["user_id"] for i in api.received["level_ups"]]
    assert ids == [f"{i:06d}" for i in range(n)]
    assert await agent.terminate() == 0


async def test_api_key_from_key_file(workdir, api):
    """[api] key_file works when $TRAITS_API_KEY is not set (the key never reaches the log)."""
    key_file = workdir / "key"
    key_file.write_text("test-key\n")
    os.chmod(key_file, 0o600)
    agent = AgentProcess(
        workdir, write_config(workdir, api.url, api={"key_file": str(key_file)}), api_key=""
    )
    await agent.start()
    await trio.to_thread.run_sync(
        send_blocking,
        agent.unix_socket,
        [encode_event("level_ups", {"user_id": "1", "level": 1}, EVENT_TIME)],
    )
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(1)
    assert await agent.terminate() == 0


async def test_csv_upload_through_the_running_agent(workdir, api):
    """`traits-agent upload kpis FILE` returns at once; the agent posts it as multipart
    `file`, retrying a 503, and `status` shows nothing pending afterwards."""
    api.inject(Fault(status=503, path="/v1/kpis/csv", times=1))
    agent = await start_agent(workdir, api)
    csv = workdir / "2019-09-23.csv"
    csv.write_bytes(b"timestamp,user_id,kpi_id,value\n2019-09-23 00:00:00,1001,ltv,2.5\n")
    done = await trio.to_thread.run_sync(cli, agent, "upload", "kpis", str(csv))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"spooled {csv} for upload to /v1/kpis/csv")
    with trio.fail_after(GUARD_S):
        await api.wait_until(lambda: api.csv_uploads)
    (upload,) = api.csv_uploads
    assert upload.kind == "kpis" and upload.data == csv.read_bytes()
    assert upload.filename.endswith("2019-09-23.csv")
    await wait_status(agent, lambda s: s["csv"]["pending_files"] == 0)
    bad = await trio.to_thread.run_sync(cli, agent, "upload", "nope", str(csv))
    assert bad.returncode == 2 and "KIND" in bad.stderr
    assert await agent.terminate() == 0
