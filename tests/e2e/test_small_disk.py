"""A queue filesystem smaller than one segment (issue 7, item 15), end to end.

Default 8 MiB segments on a 4 MiB tmpfs, the API down: the active segment fills the disk,
the rest waits in memory. Before: once the API was back, what was on disk was delivered,
but the segment could be neither rotated nor deleted, the disk stayed 100 % used and the
events in memory were never stored. Now the drained segment gives its space back.
"""

from __future__ import annotations

import shutil

import trio

from tests.e2e.test_failures import GUARD_S, level_up_datagrams, tmpfs_queue, wait_status
from tests.e2e.test_pipeline import send_blocking, start_agent
from traits_agent.fakeapi import Fault

__all__ = ["tmpfs_queue"]  # the fixture, used by name below


async def test_disk_smaller_than_a_segment_gives_space_back(workdir, api, tmpfs_queue):
    api.inject(Fault(status=503, times=None))
    agent = await start_agent(workdir, api)  # segment_bytes: the default 8 MiB
    n = 60_000  # ~5.6 MiB of queue: more than the 4 MiB disk holds
    await trio.to_thread.run_sync(send_blocking, agent.unix_socket, level_up_datagrams(n))
    await wait_status(agent, lambda s: s["resources"]["level_ups"]["accepted"] == n)
    await wait_status(
        agent, lambda s: any(e.get("event") == "queue_write_failed" for e in agent.log_events())
    )
    api.clear_faults()
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(n, "level_ups")
    ids = [i["user_id"] for i in api.received["level_ups"]]
    assert ids == [f"{i:06d}" for i in range(n)]
    status = await wait_status(agent, lambda s: s["resources"]["level_ups"]["queued_items"] == 0)
    assert not status["resources"]["level_ups"]["dropped"]
    assert status["resources"]["level_ups"]["queue_error"] is None
    usage = shutil.disk_usage(tmpfs_queue)
    assert usage.used < usage.total // 2, usage  # the delivered records' space came back
    assert await agent.terminate() == 0
