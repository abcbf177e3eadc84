"""The queue directory deleted under a running agent (issue 7, item 13), end to end.

Before: it was never made again; events went into deleted files or waited in memory while
`status` said ok and /healthz 200, and were lost at stop. Now the next flush makes it again
(0700), events go on being stored and delivered, and the loss (what only the deleted files
held) is counted in `status` and logged as `queue_dir_recreated`.
"""

from __future__ import annotations

import shutil
import stat

import trio

from tests.e2e.test_failures import GUARD_S, level_up_datagrams, wait_status
from tests.e2e.test_pipeline import send_blocking, start_agent
from traits_agent.fakeapi import Fault


def _ids(n: int, start: int) -> list[str]:
    return [f"{i:06d}" for i in range(start, start + n)]


async def test_queue_dir_deleted_while_running(workdir, api):
    api.inject(Fault(status=503, times=None))  # the first events stay queued
    agent = await start_agent(workdir, api, queue={"fsync": "always"})
    before = level_up_datagrams(500)  # ids 000000..000499, 50 per datagram
    await trio.to_thread.run_sync(send_blocking, agent.unix_socket, before)
    await wait_status(agent, lambda s: s["resources"]["level_ups"]["accepted"] == 500)
    await wait_status(agent, lambda s: s["resources"]["level_ups"]["unsynced_items"] == 0)
    queue_root = workdir / "queue"
    shutil.rmtree(queue_root)

    after = level_up_datagrams_from(1000, 700)  # ids 001000..001699
    await trio.to_thread.run_sync(send_blocking, agent.unix_socket, after)
    status = await wait_status(agent, lambda s: s["resources"]["level_ups"]["accepted"] == 1200)
    res = status["resources"]["level_ups"]
    assert res["dropped"].get("dir_deleted") == 500  # fsynced, undelivered: only on disk
    assert res["queued_items"] == 700
    assert res["queue_error"] is None
    assert stat.S_IMODE((queue_root / "level_ups").stat().st_mode) == 0o700
    assert stat.S_IMODE(queue_root.stat().st_mode) == 0o700
    events = [e for e in agent.log_events() if e.get("event") == "queue_dir_recreated"]
    assert events and events[0]["lost_items"] == 500 and events[0]["resource"] == "level_ups"

    api.clear_faults()
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(700, "level_ups")
    await wait_status(agent, lambda s: s["resources"]["level_ups"]["queued_items"] == 0)
    got = [i["user_id"] for i in api.received["level_ups"]]
    # the batch the lane was retrying when the files went is in its memory: it may still be
    # delivered (its commit is then a no-op); everything sent after the deletion must be
    assert got[-700:] == _ids(700, 1000)
    assert got[:-700] in ([], _ids(500, 0))
    assert await agent.terminate() == 0

    agent = await start_agent(workdir, api)  # nothing phantom after a restart
    status = agent.status()
    assert all(r["queued_items"] == 0 for r in status["resources"].values())
    assert await agent.terminate() == 0


def level_up_datagrams_from(start: int, n: int) -> list[bytes]:
    from tests.e2e.test_pipeline import EVENT_TIME
    from traits_agent.intake.wire import encode_forward

    return [
        encode_forward(
            "level_ups",
            [(EVENT_TIME, {"user_id": f"{i:06d}", "level": 4}) for i in range(s, s + 50)],
        )
        for s in range(start, start + n, 50)
    ]
