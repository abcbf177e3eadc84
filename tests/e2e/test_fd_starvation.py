"""The agent cannot open files while it delivers a backlog (issue 7, item 2), end to end.

The reported case: a backlog of more than 9 segments, the agent briefly unable to make a
descriptor (EMFILE: here its RLIMIT_NOFILE set to 0 from outside with prlimit(2), the way
`prlimit --pid` does) while it delivers 6,000 events. Before: the reader took "cannot open"
for "unreadable", skipped the segments, committed past them and deleted them: 4,534 of
6,000 lost, none counted, and a phantom backlog after restart.
"""

from __future__ import annotations

import resource

import trio

from tests.e2e.test_failures import wait_status
from tests.e2e.test_pipeline import EVENT_TIME, send_blocking, start_agent
from traits_agent.fakeapi import Fault
from traits_agent.intake.wire import encode_forward

N = 6000


def _datagrams() -> list[bytes]:
    pad = "x" * 40  # bigger events: more segments for the same count
    return [
        encode_forward(
            "level_ups",
            [(EVENT_TIME, {"user_id": f"{i:06d}-{pad}", "level": 4}) for i in range(s, s + 50)],
        )
        for s in range(0, N, 50)
    ]


async def test_no_descriptors_while_delivering_loses_nothing(workdir, api):
    api.inject(Fault(status=503, times=None))  # the backlog builds up
    agent = await start_agent(workdir, api, queue={"segment_bytes": 65536})
    await trio.to_thread.run_sync(send_blocking, agent.unix_socket, _datagrams())
    await wait_status(
        agent,
        lambda s: (
            s["resources"]["level_ups"]["accepted"] == N
            and s["resources"]["level_ups"]["unsynced_items"] == 0
        ),
    )
    segments = list((workdir / "queue" / "level_ups").glob("*.seg"))
    assert len(segments) > 9

    pid = agent.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    # 1, not 0: poll(2) on one fd still works (nfds <= limit), but fd 0 is taken, so no new
    # descriptor can be made from now on
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (1, hard))
    try:
        api.clear_faults()
        # it delivers what it can reach without a new descriptor (the first batch, then the
        # rest of the segment it has open) and runs into EMFILE at the next segment. Before
        # the fix it skipped that segment and every later one instead (1,014 of 6,000 were
        # delivered, a phantom "queued 423" stayed) and never said so: the hang guard ends
        # the wait then, and the old agent died soon after (the CSV spool's scandir, item 3)
        with trio.move_on_after(10):  # a hang guard, not a timing assertion
            # another process's log file: no event to wait on
            while not any(e.get("event") == "queue_read_failed" for e in agent.log_events()):  # noqa: ASYNC110
                await trio.sleep(0.02)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert agent.proc.poll() is None
    status = await wait_status(agent, lambda s: s["resources"]["level_ups"]["queued_items"] == 0)
    ids = {i["user_id"][:6] for i in api.received["level_ups"]}
    assert len(ids) == N, f"{N - len(ids)} of {N} events lost"  # re-delivery allowed, loss not
    assert ids == {f"{i:06d}" for i in range(N)}
    res = status["resources"]["level_ups"]
    assert res["corrupt_skipped"] == 0 and not res["dropped"]
    assert res["read_retries"] > 0
    assert any(e.get("event") == "queue_read_failed" for e in agent.log_events())
    assert await agent.terminate() == 0

    agent = await start_agent(workdir, api)  # no phantom backlog after a restart
    status = agent.status()
    assert status["resources"]["level_ups"]["queued_items"] == 0
    assert await agent.terminate() == 0
