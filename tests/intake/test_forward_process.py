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
