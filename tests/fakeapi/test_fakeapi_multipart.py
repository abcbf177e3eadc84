"""The minimal multipart/form-data reader behind the CSV endpoints."""

from __future__ import annotations

import httpx
import pytest

from traits_agent.fakeapi.multipart import parse_form_data


def encode(files: dict, data: dict | None = None) -> tuple[str, bytes]:
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.headers["content-type"], request.read()


def test_reads_what_httpx_sends():
    """Fields and files come back with name, filename, content type and exact bytes."""
    payload = b"a,b\r\n1,2\r\n--not-a-boundary\r\n\x00\xff"
    content_type, body = encode({"file": ("x.csv", payload, "text/csv")}, {"note": "hi"})
    parts = parse_form_data(content_type, body)
    assert [(p.name, p.filename) for p in parts] == [("note", None), ("file", "x.csv")]
    assert parts[0].data == b"hi"
    assert parts[1].data == payload
    assert parts[1].content_type == "text/csv"


def test_reads_curl_style_quoted_boundary():
    """A quoted boundary parameter and a preamble are handled."""
    body = (
        b"preamble\r\n--XyZ\r\n"
        b'Content-Disposition: form-data; name="file"; filename="2019-09-23.csv"\r\n'
        b"Content-Type: text/csv\r\n\r\n"
        b"kpi,value\n1,2\n\r\n--XyZ--\r\n"
    )
    [part] = parse_form_data('multipart/form-data; boundary="XyZ"', body)
    assert (part.name, part.filename, part.data) == ("file", "2019-09-23.csv", b"kpi,value\n1,2\n")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"{}"),
        ("multipart/form-data", b"--x\r\n\r\n--x--"),
        ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data\r\n\r\nz"),
        ("multipart/form-data; boundary=x", b"--x\r\nno-colon\r\n\r\nz\r\n--x--"),
        ("multipart/form-data; boundary=x", b"--x\r\n\r\nz\r\n--x--"),
    ],
    ids=["not-multipart", "no-boundary", "unterminated", "bad-header", "no-disposition"],
)
def test_malformed_forms_raise_value_error(content_type, body):
    """Anything unreadable raises ValueError (the fake turns it into 400)."""
    with pytest.raises(ValueError):
        parse_form_data(content_type, body)
