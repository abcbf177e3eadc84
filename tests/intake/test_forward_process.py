"""The agent's side of the Forward intake process (`forward_process.ForwardProcess`) in this
process, with a real child process, real queues (the Forward tests' `Rig`) and a real TCP
listener. The end-to-end behaviour (the daemon as a subprocess) is in
tests/e2e/test_forward_process.py."""

from __future__ import annotations

import msgpack
import trio


async def test_a_failure_to_store_replaces_the_intake_process_not_the_agent(
    tmp_path, monkeypatch
) -> None:
    """An exception while the agent stores a message from the intake process (a bug of ours,
    injected here) does not end `ForwardProcess.run`, and nothing of that message is acked:
    it is counted (`internal_error`), logged with its traceback, the process is replaced,
    and the client's chunk sent again to the new one is stored and acked."""
    from structlog.testing import capture_logs

    from tests.intake.test_forward import Rig, pack
    from traits_agent.intake.forward import bind_forward_tcp
    from traits_agent.intake.forward_process import ForwardProcess, Listener

    rig = Rig(tmp_path)
    real = rig.ingest.store_runs
    calls = 0

    def fails_once(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(rig.ingest, "store_runs", fails_once)
    monkeypatch.setattr("traits_agent.intake.forward_process.BACKOFF_FIRST_S", 0.01)
    sock = bind_forward_tcp("127.0.0.1", 0)
    host, port = sock.getsockname()
    process = ForwardProcess(
        rig.ingest,
        rig.durability,
        [Listener("forward", sock, None)],
        log_level="warning",
        log_format="json",
        secrets=[],
    )
    chunk = pack(["level_ups", [[1.7e9, {"user_id": "u1", "level": 3}]], {"chunk": "c1"}])
    try:
        with capture_logs() as logs, trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rig.autosync)
                await nursery.start(process.run)
                answers = []
                while not answers:
                    stream = await trio.open_tcp_stream(host, port)
                    async with stream:
                        await stream.send_all(chunk)
                        unpacker = msgpack.Unpacker(raw=False)
                        try:
                            while not answers:
                                data = await stream.receive_some(4096)
                                if not data:
                                    break  # the first process was killed: send it again
                                unpacker.feed(data)
                                answers += list(unpacker)
                        except trio.BrokenResourceError:
                            pass
                nursery.cancel_scope.cancel()
        assert answers == [{"ack": "c1"}]
        assert [i["user_id"] for i in rig.items("level_ups")] == ["u1"]  # stored once
        assert rig.counters.get("rejected_events", reason="internal_error") == 1
        assert rig.counters.total("forward_intake_restarts") == 1
        assert [e for e in logs if e["event"] == "forward_intake_store_failed"]
    finally:
        sock.close()
        rig.close()


async def restarts_of(tmp_path, monkeypatch, after_ready: str) -> list[dict]:
    """Run the real supervisor with a stand-in for the intake process (a real process: it
    reads the hello, says `ready`, then runs `after_ready`, Python source with the link as
    `s`) until it has been replaced twice; the log lines of the run."""
    import sys

    from structlog.testing import capture_logs

    from tests.intake.test_forward import Rig
    from traits_agent.intake import forward_process
    from traits_agent.intake.forward import bind_forward_tcp
    from traits_agent.intake.link import frame

    stand_in = (
        "import socket, sys, time\n"
        "s = socket.socket(fileno=int(sys.argv[1]))\n"
        "s.recv(1 << 20)\n"  # the hello (unread, a close would reset the agent's side)
        f"s.sendall({frame(['ready', 1])!r})\n" + after_ready
    )
    monkeypatch.setattr(
        forward_process, "worker_command", lambda fd: [sys.executable, "-c", stand_in, str(fd)]
    )
    monkeypatch.setattr(forward_process, "BACKOFF_FIRST_S", 0.01)
    rig = Rig(tmp_path)
    sock = bind_forward_tcp("127.0.0.1", 0)
    process = forward_process.ForwardProcess(
        rig.ingest,
        rig.durability,
        [forward_process.Listener("forward", sock, None)],
        log_level="warning",
        log_format="json",
        secrets=[],
    )
    try:
        with capture_logs() as logs, trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(process.run)
                while rig.counters.total("forward_intake_restarts") < 2:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    finally:
        sock.close()
        rig.close()
    return logs


async def test_a_process_that_exits_on_its_own_is_replaced_not_stopped(
    tmp_path, monkeypatch
) -> None:
    """A process that closes the link and exits by itself (here: a stand-in that says ready,
    closes the link, and takes 0.3 s more to exit, as an interpreter's teardown does) is
    logged `forward_intake_exited` with its status and replaced: the agent does not take it
    for one it is stopping (no `forward_intake_stopped`)."""
    logs = await restarts_of(tmp_path, monkeypatch, "s.close()\ntime.sleep(0.3)\n")
    exited = [e for e in logs if e["event"] == "forward_intake_exited"]
    assert len(exited) >= 2 and all(e["status"] == 0 for e in exited), exited
    # (the agent's own stop, at the end, may stop the last one)
    assert not [e for e in logs if e["event"] == "forward_intake_stopped"][:-1]


async def test_a_broken_link_is_logged_once_and_its_process_killed_not_stopped(
    tmp_path, monkeypatch
) -> None:
    """A process that sends bytes that are not a message (here: a stand-in that says ready,
    then a frame that is not msgpack, and stays alive) breaks the link: that is one
    `forward_intake_link_broken` per process, the process is killed and replaced. It used to
    be stopped as well, as if the agent were shutting down: `stop` sent down the broken link,
    the same garbage read again, and a second `forward_intake_link_broken` and a
    `forward_intake_stopped` logged for a process nobody stopped (and, when that happened
    during a real stop, the process was waited for through the whole stop grace)."""
    import struct

    garbage = struct.pack(">I", 1) + b"\xc1"  # 0xc1: a byte msgpack never uses
    logs = await restarts_of(tmp_path, monkeypatch, f"s.sendall({garbage!r})\ntime.sleep(60)\n")
    broken = [e["pid"] for e in logs if e["event"] == "forward_intake_link_broken"]
    exited = [e for e in logs if e["event"] == "forward_intake_exited"]
    assert len(exited) >= 2 and all(e["status"] == -9 for e in exited), exited
    assert len(broken) >= 2 and len(set(broken)) == len(broken), broken
    # (the last one may have been starting when the test stopped the agent: that one is
    # stopped, and its link breaks during the stop)
    stopped = {e["pid"] for e in logs if e["event"] == "forward_intake_stopped"}
    assert not stopped & set(broken[:-1]), (stopped, broken)
