"""The human `status`: what the README promises, and a last error only while it matters."""

from __future__ import annotations

from traits_agent.cli.status import format_status


def snapshot(upstream: str, **level_ups) -> dict:
    return {
        "version": "0.1.0",
        "pid": 7,
        "uptime_s": 3725.0,
        "endpoint": "https://sandbox.api.12traits.com",
        "upstream": upstream,
        "last_error": "HTTP 503 busy",
        "received": {"events": 10, "datagrams": 4, "accepted": 9},
        "rejected": {"missing_field": 1},
        "resources": {
            "level_ups": {
                "queued_items": 9,
                "queued_bytes": 3 * 1024 * 1024,
                "oldest_age_s": 95.0,
                "delivered": 0,
                "dead_lettered": 0,
                "dropped": {},
                "upstream": upstream,
                **level_ups,
            }
        },
    }


def test_queued_bytes_oldest_age_and_next_retry_are_shown():
    text = format_status(snapshot("retrying", next_retry_in_s=4.5))
    row = next(line for line in text.splitlines() if line.startswith("level_ups"))
    assert row.split()[:4] == ["level_ups", "9", "3.0MiB", "1m35s"]
    assert row.endswith("retrying (retry in 4.5s)")
    assert "up 1h02m" in text


def test_the_last_error_shows_while_upstream_is_not_ok_and_clears_after():
    assert "last error: HTTP 503 busy" in format_status(snapshot("retrying"))
    assert "last error" not in format_status(snapshot("ok"))


def test_a_snapshot_with_missing_keys_still_renders():
    """The status model may change: the view reads keys defensively."""
    text = format_status({"resources": {"actions": {}}})
    assert "actions" in text


def test_the_forward_intake_process_shows_only_when_it_died():
    """Quiet while its first process runs; a line once it was replaced or while it is down."""
    healthy = {**snapshot("ok"), "forward_process": {"pid": 42, "state": "running", "restarts": 0}}
    assert "intake" not in format_status(healthy)
    idle = {**snapshot("ok"), "forward_process": {"pid": None, "state": "waiting", "restarts": 0}}
    assert "intake" not in format_status(idle)
    replaced = {**snapshot("ok"), "forward_process": {"pid": 43, "state": "running", "restarts": 2}}
    assert "forward intake process: pid 43, restarted 2 times" in format_status(replaced)
    down = {
        **snapshot("ok"),
        "forward_process": {"pid": None, "state": "restarting", "restarts": 3},
    }
    assert "not running (restarting), restarted 3 times" in format_status(down)
    assert "intake" not in format_status({**snapshot("ok"), "forward_process": None})
