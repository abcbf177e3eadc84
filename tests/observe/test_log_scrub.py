"""The log's secret scrubbing: the API key never reaches a log line, as a value or as a key."""

from __future__ import annotations

import io
import json

import pytest

from traits_agent.observe import log

KEY = "sk-live-0123456789abcdef"


@pytest.fixture(autouse=True)
def _secret():
    log.add_secret(KEY)
    yield
    log._secrets.remove(KEY)


def test_scrub_cleans_dict_keys_at_every_depth():
    """`{"errors": {"<KEY>": ...}}` (an answer naming the field by its value) loses the key."""
    answer = {"message": "bad", "errors": {KEY: ["unknown field"], "x": [{KEY + "-2": KEY}]}}
    cleaned = log.scrub(answer)
    assert KEY not in json.dumps(cleaned)
    assert cleaned["errors"]["***"] == ["unknown field"]
    assert cleaned["errors"]["x"] == [{"***-2": "***"}]


def test_scrub_keeps_both_values_when_two_keys_collide():
    cleaned = log.scrub({"***": 1, KEY: 2})
    assert sorted(cleaned.values()) == [1, 2]
    assert KEY not in json.dumps(cleaned)


def test_rendered_log_line_has_no_key_in_keys():
    out = io.StringIO()
    log.setup("info", "json", stream=out)
    import structlog

    structlog.get_logger("t").error("batch_rejected", errors={KEY: "unknown"}, **{KEY: 1})
    line = out.getvalue()
    assert KEY not in line
    assert json.loads(line)["event"] == "batch_rejected"
