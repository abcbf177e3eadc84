"""CSV spool: `spool_file`/`upload_command` (the CLI side) on real files, and `CsvSpool` (the
agent side) against the real fake API on loopback through a real httpx client.

Retry timing runs on trio's MockClock (`autojump_clock`) and is asserted as exact virtual
times. The big-file and 413 tests use the real clock: they measure bytes, not time.
"""

from __future__ import annotations

import json
import os
import random
import stat
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from traits_agent.cli.upload import upload_command
from traits_agent.config import Config, ControlConfig, QueueConfig
from traits_agent.delivery import spool
from traits_agent.delivery.backoff import Backoff
from traits_agent.delivery.policy import USER_AGENT
from traits_agent.delivery.spool import (
    CsvSpool,
    SpoolError,
    is_temp_name,
    receive_upload,
    sanitize_name,
    scan,
    spool_dir_for,
    spool_file,
)
from traits_agent.fakeapi import FakeAPI, Fault
from traits_agent.httpserver import serve_http
from traits_agent.observe.control import serve_control
from traits_agent.observe.metrics import Counters

KEY = "test-key"
CSV = b"date,user_id,revenue\n2026-11-28,1001,4.99\n2026-11-28,1002,0\n"


def _permissions_bypassed() -> bool:
    """True for root (or CAP_DAC_OVERRIDE): mode bits do not stop this process."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe"
        probe.write_bytes(b"x")
        probe.chmod(0)
        try:
            probe.read_bytes()
        except PermissionError:
            return False
        return True


PERMS_BYPASSED = _permissions_bypassed()


def write(path: Path, data: bytes = CSV) -> Path:
    path.write_bytes(data)
    return path


def dir_names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


# -- spool_file ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("2019-09-23.csv", "2019-09-23.csv"),
        ("KPIs 2026 (final).CSV", "KPIs_2026_final.csv"),
        ("../../etc/passwd", "passwd.csv"),
        ("...hidden.csv", "hidden.csv"),
        ("données.csv", "donn_es.csv"),
        ("data.txt", "data.txt.csv"),
        ("***.csv", "upload.csv"),
        ("a" * 300 + ".csv", "a" * spool.MAX_NAME + ".csv"),
    ],
)
def test_sanitize_name(name, expected):
    assert sanitize_name(name) == expected


def test_spool_file_copies_durably(tmp_path):
    source = write(tmp_path / "2019-09-23.csv")
    root = tmp_path / "spool"
    spooled = spool_file(root, "kpis", source)
    assert spooled.parent == root / "kpis"
    stamp, _, rest = spooled.name.partition("-")
    assert len(stamp) == 20 and stamp.isdigit()
    assert rest == "2019-09-23.csv"
    assert spooled.read_bytes() == CSV
    assert stat.S_IMODE(spooled.stat().st_mode) == 0o600
    assert dir_names(root / "kpis") == [spooled.name]  # no temporary file left
    assert source.read_bytes() == CSV  # the source is untouched


def test_spool_file_never_replaces_and_keeps_order(tmp_path):
    source = write(tmp_path / "same.csv")
    first = spool_file(tmp_path / "spool", "survey-data", source)
    write(source, b"a,b\n1,2\n")
    second = spool_file(tmp_path / "spool", "survey-data", source)
    assert first != second
    assert [s.path for s in scan(tmp_path / "spool" / "survey-data", "survey-data")] == [
        first,
        second,
    ]
    assert first.read_bytes() == CSV


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing.csv", "no such file"),
        (lambda d: (d / "adir").mkdir() or d / "adir", "is a directory"),
        (lambda d: write(d / "empty.csv", b""), "is empty"),
        (lambda d: write(d / "big.csv", b"x" * 1001), "more than the 1000 bytes limit"),
        (lambda d: write(d / "book.xlsx", b"PK\x03\x04\x00\x00"), "holds NUL bytes"),
        (lambda d: os.mkfifo(d / "fifo") or d / "fifo", "not a regular file"),
    ],
)
def test_spool_file_refuses_bad_sources(tmp_path, setup, message):
    source = setup(tmp_path)
    with pytest.raises(SpoolError, match=message) as info:
        spool_file(tmp_path / "spool", "kpis", source, max_bytes=1000)
    assert str(source) in str(info.value)
    assert dir_names(tmp_path / "spool" / "kpis") == []


def test_spool_file_refuses_unknown_kind(tmp_path):
    with pytest.raises(SpoolError, match="KIND: must be one of kpis, survey-data"):
        spool_file(tmp_path / "spool", "actions", write(tmp_path / "a.csv"))
    assert not (tmp_path / "spool").exists()


@pytest.mark.skipif(PERMS_BYPASSED, reason="root reads every file")
def test_spool_file_refuses_unreadable_source(tmp_path):
    source = write(tmp_path / "secret.csv")
    source.chmod(0)
    with pytest.raises(SpoolError, match="cannot read: Permission denied"):
        spool_file(tmp_path / "spool", "kpis", source)


def test_spool_file_is_invisible_until_complete(tmp_path, monkeypatch):
    """At the moment the final name is made, the data is complete and fsynced; before it, the
    agent's scan sees nothing (the temporary name is ignored)."""
    source = write(tmp_path / "k.csv", CSV * 1000)
    directory = tmp_path / "spool" / "kpis"
    seen = []
    synced = []
    real_link, real_fsync = os.link, os.fsync

    def fsync(fd):
        synced.append(fd)
        real_fsync(fd)

    def link(src, dst):
        temps = [n for n in os.listdir(directory) if is_temp_name(n)]
        assert len(temps) == 1 and Path(src).read_bytes() == CSV * 1000
        seen.append((temps, list(scan(directory, "kpis")), len(synced)))
        real_link(src, dst)

    monkeypatch.setattr(spool.os, "link", link)
    monkeypatch.setattr(spool.os, "fsync", fsync)
    spooled = spool_file(tmp_path / "spool", "kpis", source)
    [(_temps, visible, synced_before)] = seen
    assert visible == []  # a temp file exists and the scan ignores it
    assert synced_before == 1  # the file was fsynced before it got its name
    assert len(synced) == 2  # ... and the directory after
    assert [s.path for s in scan(directory, "kpis")] == [spooled]


def test_spool_file_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    source = write(tmp_path / "k.csv")

    def fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool.os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        spool_file(tmp_path / "spool", "kpis", source)
    assert dir_names(tmp_path / "spool" / "kpis") == []


def test_spool_file_without_hard_links_renames(tmp_path, monkeypatch):
    def link(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(spool.os, "link", link)
    spooled = spool_file(tmp_path / "spool", "kpis", write(tmp_path / "k.csv"))
    assert dir_names(tmp_path / "spool" / "kpis") == [spooled.name]
    assert spooled.read_bytes() == CSV


def test_scan_ignores_temps_others_and_orders_oldest_first(tmp_path):
    d = tmp_path / "kpis"
    d.mkdir()
    write(d / "00000000000000000002-b.csv")
    write(d / "00000000000000000001-z.csv")
    write(d / ".00000000000000000000-a.csv.0011aabbccdd.tmp")
    write(d / ".hidden.csv")
    write(d / "notes.txt")
    (d / "rejected").mkdir()
    write(d / "rejected" / "00000000000000000000-r.csv")
    by_hand = write(d / "2019-09-23.csv")  # dropped in by an operator: ordered by mtime
    os.utime(by_hand, ns=(10**18, 10**18))
    found = scan(d, "kpis")
    assert [f.name for f in found] == [
        "00000000000000000001-z.csv",
        "00000000000000000002-b.csv",
        "2019-09-23.csv",
    ]
    assert [f.original for f in found] == ["z.csv", "b.csv", "2019-09-23.csv"]
    assert found[0].size == len(CSV)
    assert scan(tmp_path / "absent", "kpis") == []


# -- upload_command -----------------------------------------------------------------------------


def config_for(tmp_path: Path) -> Config:
    return Config(
        queue=QueueConfig(dir=str(tmp_path / "queue")),
        control=ControlConfig(socket=str(tmp_path / "control.sock")),
    )


async def test_upload_command_hands_the_file_to_the_running_agent(tmp_path, capsys, nursery):
    """With an agent answering on the control socket, the CLI passes the open file (SCM_RIGHTS)
    and the agent spools it; one line on stdout, nothing on stderr."""
    source = write(tmp_path / "2019-09-23.csv")
    config = config_for(tmp_path)
    spool_dir = spool_dir_for(config)
    await nursery.start(
        partial(
            serve_control,
            Path(config.control.socket),
            dict,
            upload=partial(receive_upload, spool_dir),
        )
    )
    code = await trio.to_thread.run_sync(upload_command, config, "kpis", str(source))
    assert code == 0
    out, err = capsys.readouterr()
    # (the agent's own csv_spooled log line lands in the same captured stdout here)
    assert f"spooled {source} for upload to /v1/kpis/csv ({len(CSV)} bytes)" in out.splitlines()
    assert err == ""
    [spooled] = scan(spool_dir / "kpis", "kpis")
    assert spooled.path.read_bytes() == CSV
    assert spooled.original == "2019-09-23.csv"
    bad = await trio.to_thread.run_sync(upload_command, config, "kpis", str(tmp_path))
    assert bad == 2


def test_upload_command_notes_when_no_agent_runs(tmp_path, capsys):
    source = write(tmp_path / "s.csv")
    assert upload_command(config_for(tmp_path), "survey-data", source) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"spooled {source} for upload to /v1/survey-data/csv (")
    assert "no agent is running" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("kind", "name", "message"),
    [
        ("events", "a.csv", "traits-agent: KIND: must be one of kpis, survey-data (got 'events')"),
        ("kpis", "missing.csv", "missing.csv: no such file"),
    ],
)
def test_upload_command_bad_usage_exits_2(tmp_path, capsys, kind, name, message):
    write(tmp_path / "a.csv")
    assert upload_command(config_for(tmp_path), kind, tmp_path / name) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(PERMS_BYPASSED, reason="root writes everywhere")
def test_upload_command_unwritable_spool_exits_1(tmp_path, capsys):
    (tmp_path / "queue").mkdir()
    (tmp_path / "queue").chmod(0o500)
    try:
        code = upload_command(config_for(tmp_path), "kpis", write(tmp_path / "a.csv"))
    finally:
        (tmp_path / "queue").chmod(0o700)
    assert code == 1
    _, err = capsys.readouterr()
    assert "cannot write to the spool" in err and "permission denied" in err


# -- CsvSpool against the fake API --------------------------------------------------------------


def make_spool(tmp_path, client, *, api_key=KEY, seed=1, max_s=8.0) -> CsvSpool:
    return CsvSpool(
        tmp_path / "spool",
        client,
        api_key=api_key,
        counters=Counters(),
        backoff=Backoff(initial_s=0.5, max_s=max_s, rng=random.Random(seed)),
        agent_id="test",
    )


def delays(seed: int, n: int, max_s: float = 8.0) -> list[float]:
    """The backoff draws a spool seeded with `seed` makes."""
    b = Backoff(initial_s=0.5, max_s=max_s, rng=random.Random(seed))
    return [b.delay(i) for i in range(n)]


async def drained(csv: CsvSpool) -> None:
    # virtual time: polling costs nothing real
    while csv.status()["pending_files"] or any(csv.uploading.values()):  # noqa: ASYNC110
        await trio.sleep(0.001)


async def test_spooled_before_start_is_uploaded_at_start(
    autojump_clock, nursery, api, client, tmp_path
):
    source = write(tmp_path / "2019-09-23.csv")
    spooled = spool_file(tmp_path / "spool", "kpis", source)
    csv = make_spool(tmp_path, client)
    t0 = trio.current_time()
    await nursery.start(csv.run)
    await api.wait_until(lambda: len(api.csv_uploads) == 1)
    await drained(csv)
    [upload] = api.csv_uploads
    assert upload.kind == "kpis"
    assert upload.data == CSV  # byte-identical
    assert upload.filename == "2019-09-23.csv"
    assert upload.content_type == "text/csv"
    [request] = api.requests
    assert request.time == t0
    assert request.path == "/v1/kpis/csv"
    assert request.headers["user-agent"] == USER_AGENT
    assert request.headers["authorization"] == "<redacted>"
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert request.idempotency_key == spool.idempotency_key("test", "kpis", spooled.name)
    assert not spooled.exists()
    assert csv.counters.get("csv_uploaded_files", kind="kpis") == 1
    assert csv.counters.get("csv_uploaded_bytes", kind="kpis") == len(CSV)
    status = csv.status()
    assert status["state"] == "ok" and status["pending_files"] == 0
    assert status["kinds"]["kpis"]["uploaded_files"] == 1


async def test_new_file_is_found_by_the_next_poll_or_at_once_on_wake(
    autojump_clock, nursery, api, client, tmp_path
):
    csv = make_spool(tmp_path, client)
    t0 = trio.current_time()
    await nursery.start(csv.run)
    await trio.sleep(0.3)
    spool_file(tmp_path / "spool", "survey-data", write(tmp_path / "s.csv"))
    assert csv.status()["kinds"]["survey-data"]["pending_files"] == 1
    await api.wait_until(lambda: len(api.csv_uploads) == 1)
    assert api.requests[0].time == pytest.approx(t0 + 1.0)  # the poll after the file came

    await trio.sleep(0.25)
    t1 = trio.current_time()
    spool_file(tmp_path / "spool", "survey-data", write(tmp_path / "t.csv", b"x,y\n"))
    csv.wake("survey-data")
    await api.wait_until(lambda: len(api.csv_uploads) == 2)
    assert api.requests[1].time == t1
    assert [u.filename for u in api.csv_uploads] == ["s.csv", "t.csv"]


async def test_503_twice_then_201_uploads_once(autojump_clock, nursery, api, client, tmp_path):
    api.inject(Fault(path="/v1/kpis/csv", status=503, times=2))
    spooled = spool_file(tmp_path / "spool", "kpis", write(tmp_path / "k.csv"))
    csv = make_spool(tmp_path, client, seed=7)
    t0 = trio.current_time()
    await nursery.start(csv.run)
    await api.wait_until(lambda: len(api.csv_uploads) == 1)
    await drained(csv)
    d = delays(7, 2)
    assert [r.status for r in api.requests] == [503, 503, 201]
    assert [r.time for r in api.requests] == pytest.approx([t0, t0 + d[0], t0 + d[0] + d[1]])
    assert len({r.idempotency_key for r in api.requests}) == 1  # stable across retries
    assert len(api.csv_uploads) == 1 and api.csv_uploads[0].data == CSV
    assert not spooled.exists()
    assert csv.counters.get("upload_retries", resource="csv_kpis", reason="503") == 2
    assert csv.states["kpis"].state == "ok"


async def test_retry_after_is_honoured(autojump_clock, nursery, api, client, tmp_path):
    api.inject(Fault(path="/v1/survey-data/csv", status=429, retry_after="7"))
    spool_file(tmp_path / "spool", "survey-data", write(tmp_path / "s.csv"))
    csv = make_spool(tmp_path, client)
    t0 = trio.current_time()
    await nursery.start(csv.run)
    await trio.sleep(1)
    status = csv.status()["kinds"]["survey-data"]
    assert status["state"] == "retrying" and status["next_retry_in_s"] == 6.0
    assert status["last_error"] == "HTTP 429 too many requests"
    await api.wait_until(lambda: len(api.csv_uploads) == 1)
    assert [r.time for r in api.requests] == [t0, t0 + 7]


async def test_connection_drop_is_retried(autojump_clock, nursery, api, client, tmp_path):
    api.inject(Fault(path="/v1/kpis/csv", drop=True))
    spool_file(tmp_path / "spool", "kpis", write(tmp_path / "k.csv"))
    csv = make_spool(tmp_path, client, seed=3)
    t0 = trio.current_time()
    await nursery.start(csv.run)
    await api.wait_until(lambda: len(api.csv_uploads) == 1)
    assert [r.status for r in api.requests] == [None, 201]
    assert api.requests[1].time == pytest.approx(t0 + delays(3, 1)[0])
    assert csv.counters.get("upload_retries", resource="csv_kpis", reason="transport") == 1


async def test_400_moves_the_file_to_rejected_with_a_sidecar(
    autojump_clock, nursery, api, client, tmp_path
):
    body = {"code": 400, "message": "bad request", "errors": {"file": "unknown column 'rev'"}}
    api.inject(Fault(path="/v1/kpis/csv", status=400, body=body))
    bad = spool_file(tmp_path / "spool", "kpis", write(tmp_path / "bad.csv", b"rev\n1\n"))
    good = spool_file(tmp_path / "spool", "kpis", write(tmp_path / "good.csv"))
    csv = make_spool(tmp_path, client)
    await nursery.start(csv.run)
    await api.wait_until(lambda: len(api.csv_uploads) == 1)
    await drained(csv)
    assert [r.status for r in api.requests] == [400, 201]  # rejected once, never retried
    assert api.csv_uploads[0].filename == "good.csv"
    rejected = tmp_path / "spool" / "kpis" / "rejected"
    assert dir_names(rejected) == [bad.name, bad.name + ".json"]
    assert (rejected / bad.name).read_bytes() == b"rev\n1\n"
    sidecar = json.loads((rejected / (bad.name + ".json")).read_text())
    assert sidecar["status"] == 400
    assert sidecar["message"] == "bad request"
    assert sidecar["errors"] == {"file": "unknown column 'rev'"}
    assert sidecar["file"] == "bad.csv" and sidecar["spooled_as"] == bad.name
    assert sidecar["endpoint"] == "/v1/kpis/csv" and sidecar["reason"] == "rejected"
    assert not bad.exists() and not good.exists()
    assert csv.counters.get("csv_rejected_files", kind="kpis", reason="rejected") == 1
    status = csv.status()
    assert status["rejected_files"] == 1 and status["kinds"]["kpis"]["rejected_files"] == 1
    assert status["state"] == "ok"


async def test_401_holds_and_keeps_the_file(autojump_clock, nursery, api, client, tmp_path):
    spooled = spool_file(tmp_path / "spool", "kpis", write(tmp_path / "k.csv"))
    # max_s=4: every backoff draw is under HOLD_PROBE_MIN_S, so probes are exactly 5 s apart
    csv = make_spool(tmp_path, client, api_key="wrong-key", max_s=4.0)
    t0 = trio.current_time()
    await nursery.start(csv.run)
    await trio.sleep(12)
    assert [r.status for r in api.requests] == [401, 401, 401]
    assert [r.time for r in api.requests] == [t0, t0 + 5, t0 + 10]
    assert spooled.read_bytes() == CSV  # nothing deleted, nothing moved aside
    status = csv.status()
    assert status["state"] == "auth_failed"
    assert status["kinds"]["kpis"]["pending_files"] == 1
    assert "401" in status["last_error"]
    assert not (tmp_path / "spool" / "kpis" / "rejected").exists()

    csv.api_key = KEY  # the operator fixes the key; the next probe goes through
    await api.wait_until(lambda: len(api.csv_uploads) == 1)
    assert api.requests[-1].time == t0 + 15
    await drained(csv)
    assert not spooled.exists()
    assert csv.status()["state"] == "ok"


async def test_404_holds_one_kind_while_the_other_uploads(
    autojump_clock, nursery, api, client, tmp_path
):
    api.inject(Fault(path="/v1/kpis/csv", status=404, times=2))
    kpis = spool_file(tmp_path / "spool", "kpis", write(tmp_path / "k.csv"))
    spool_file(tmp_path / "spool", "survey-data", write(tmp_path / "s.csv", b"q,a\n1,2\n"))
    csv = make_spool(tmp_path, client, max_s=4.0)
    t0 = trio.current_time()
    await nursery.start(csv.run)
    await trio.sleep(1)
    assert [u.kind for u in api.csv_uploads] == ["survey-data"]
    assert csv.status()["kinds"]["kpis"]["state"] == "endpoint_error"
    assert csv.status()["state"] == "endpoint_error"
    assert kpis.exists()
    await api.wait_until(lambda: len(api.csv_uploads) == 2)
    kpi_times = [r.time for r in api.requests if r.path == "/v1/kpis/csv"]
    assert kpi_times == [t0, t0 + 5, t0 + 10]
    await drained(csv)
    assert csv.status()["state"] == "ok"


async def test_stop_abandons_a_retry_wait_and_keeps_the_file(
    autojump_clock, nursery, api, client, tmp_path
):
    api.inject(Fault(status=503, retry_after="600", times=None))
    spooled = spool_file(tmp_path / "spool", "kpis", write(tmp_path / "k.csv"))
    csv = make_spool(tmp_path, client)
    done = trio.Event()

    async def run_then_mark():
        await csv.run()
        done.set()

    nursery.start_soon(run_then_mark)
    await trio.sleep(10)
    t = trio.current_time()
    csv.stop()
    await done.wait()
    assert trio.current_time() == t
    assert len(api.requests) == 1 and spooled.exists()


async def test_stale_temp_files_are_removed_at_start(autojump_clock, client, tmp_path):
    directory = tmp_path / "spool" / "kpis"
    directory.mkdir(parents=True)
    stale = write(directory / ".old.csv.0011aabbccdd.tmp")
    fresh = write(directory / ".new.csv.0011aabbccee.tmp")
    old = os.stat(stale).st_mtime - spool.STALE_TEMP_S - 10
    os.utime(stale, (old, old))
    csv = make_spool(tmp_path, client)
    async with trio.open_nursery() as nursery:
        await nursery.start(csv.run)
        csv.stop()
    assert not stale.exists() and fresh.exists()


@pytest.mark.skipif(PERMS_BYPASSED, reason="root reads every file")
async def test_unreadable_spooled_file_is_set_aside_without_a_request(
    autojump_clock, nursery, api, client, tmp_path
):
    spooled = spool_file(tmp_path / "spool", "kpis", write(tmp_path / "k.csv"))
    spooled.chmod(0)
    csv = make_spool(tmp_path, client)
    await nursery.start(csv.run)
    await drained(csv)
    rejected = tmp_path / "spool" / "kpis" / "rejected"
    sidecar = json.loads((rejected / (spooled.name + ".json")).read_text())
    assert sidecar["status"] is None and sidecar["reason"] == "unreadable"
    assert "Permission denied" in sidecar["message"]
    assert api.requests == []


# -- real clock: sizes, not times ---------------------------------------------------------------


async def serve_fake(nursery, api: FakeAPI, max_body_size: int) -> str:
    host, port = await nursery.start(
        partial(serve_http, api.handle, "127.0.0.1", 0, max_body_size=max_body_size)
    )
    return f"http://{host}:{port}"


class ReadRecorder:
    """A file object that records the size of every read."""

    reads: list[int]

    def __init__(self, *args, **kwargs):
        self._f = open(*args, **kwargs)  # noqa: SIM115 (closed by __exit__)
        ReadRecorder.reads = []

    def read(self, n=-1):
        data = self._f.read(n)
        ReadRecorder.reads.append(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


async def test_large_file_is_streamed(nursery, tmp_path, monkeypatch):
    """20 MiB go out in 64 KiB reads with a Content-Length, and arrive byte-identical."""
    api = FakeAPI(KEY)
    url = await serve_fake(nursery, api, max_body_size=64 * 1024 * 1024)
    row = b"2026-11-28,%07d,12.50,level_%03d\n"
    data = b"".join(row % (i, i % 997) for i in range(20 * 1024 * 1024 // 32))
    assert len(data) >= 20 * 1024 * 1024
    spooled = spool_file(tmp_path / "spool", "kpis", write(tmp_path / "big.csv", data))
    monkeypatch.setattr(spool, "open", ReadRecorder, raising=False)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        csv = make_spool(tmp_path, client)
        await nursery.start(csv.run)
        with trio.fail_after(60):
            await api.wait_until(lambda: len(api.csv_uploads) == 1)
            await drained(csv)
        csv.stop()
    assert api.csv_uploads[0].data == data
    assert int(api.requests[0].headers["content-length"]) > len(data)
    assert "transfer-encoding" not in api.requests[0].headers
    assert max(ReadRecorder.reads) <= 64 * 1024
    assert sum(ReadRecorder.reads) == len(data)
    assert not spooled.exists()
    assert csv.counters.get("csv_uploaded_bytes", kind="kpis") == len(data)


async def test_413_moves_the_file_to_rejected(nursery, tmp_path):
    api = FakeAPI(KEY)
    url = await serve_fake(nursery, api, max_body_size=16 * 1024)
    spooled = spool_file(tmp_path / "spool", "kpis", write(tmp_path / "k.csv", CSV * 2000))
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        csv = make_spool(tmp_path, client)
        await nursery.start(csv.run)
        with trio.fail_after(30):
            await drained(csv)
        csv.stop()
    rejected = tmp_path / "spool" / "kpis" / "rejected"
    sidecar = json.loads((rejected / (spooled.name + ".json")).read_text())
    assert sidecar["status"] == 413 and sidecar["reason"] == "too_large"
    assert (rejected / spooled.name).read_bytes() == CSV * 2000
    assert csv.counters.get("csv_rejected_files", kind="kpis", reason="too_large") == 1


# -- the answer is bounded in time and memory (issue 7 item 8; the policy in policy.py) ---------


async def test_a_huge_answer_body_is_not_read_whole(autojump_clock, nursery, api, client, tmp_path):
    """A 64 MiB answer to a CSV upload: the spool reads at most 64 KiB of it, hangs up, and
    counts the 201 as uploaded (before, `response.content` read it all: a 1 GiB body took
    7.3 GB of RSS)."""
    huge = api.inject(Fault(path="/v1/kpis/csv", status=201, body_size=64 * 1024 * 1024))
    spooled = spool_file(tmp_path / "spool", "kpis", write(tmp_path / "k.csv"))
    csv = make_spool(tmp_path, client)
    await nursery.start(csv.run)
    await api.wait_until(lambda: len(api.requests) == 1)
    await drained(csv)
    assert not spooled.exists()
    assert csv.counters.get("csv_uploaded_files", kind="kpis") == 1
    # what the fake got onto the wire before the agent hung up: the 64 KiB read plus what
    # the loopback socket buffers took, far from the whole body
    assert huge.body_sent < 16 * 1024 * 1024


async def test_a_trickling_answer_is_abandoned_at_the_deadline(
    autojump_clock, nursery, api, client, tmp_path
):
    """An answer sent one byte a second (httpx's per-read timeout never fires): the CSV
    request is abandoned at its deadline (60 s + time for the file's size), retried after
    the backoff, and the file uploads (before, the upload hung until the server finished)."""
    api.inject(Fault(path="/v1/kpis/csv", status=201, trickle=1.0, body_size=600))
    spooled = spool_file(tmp_path / "spool", "kpis", write(tmp_path / "k.csv"))
    csv = make_spool(tmp_path, client, seed=5)
    t0 = trio.current_time()
    await nursery.start(csv.run)
    with trio.fail_after(3600):  # virtual: a hang fails the test instead of blocking it
        await api.wait_until(lambda: len(api.csv_uploads) == 1)
        await drained(csv)
    deadline = 60.0 + len(CSV) / spool.MIN_UPLOAD_RATE
    assert [r.time for r in api.requests] == pytest.approx([t0, t0 + deadline + delays(5, 1)[0]])
    assert csv.counters.get("upload_retries", resource="csv_kpis", reason="transport") == 1
    assert csv.states["kpis"].last_error == f"no answer within {deadline:g} s"
    assert not spooled.exists()
