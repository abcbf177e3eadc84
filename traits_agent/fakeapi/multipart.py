"""A minimal multipart/form-data reader, enough for the fake API's CSV uploads.

Whole body in memory, no nested multiparts, no transfer encodings: what curl ``-F`` and httpx
``files=`` send. Raises ``ValueError`` on anything it cannot read.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def _header_params(value: str) -> Message:
    msg = Message()
    msg["content-type"] = value
    return msg


def parse_form_data(content_type: str, body: bytes) -> list[Part]:
    """Split a ``multipart/form-data`` body into its parts, in order."""
    header = _header_params(content_type)
    if header.get_content_type() != "multipart/form-data":
        raise ValueError("content type is not multipart/form-data")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ValueError("multipart boundary missing")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    chunks = (b"\r\n" + body).split(delimiter)
    parts: list[Part] = []
    closed = False
    for chunk in chunks[1:]:  # chunks[0] is the preamble
        if chunk.startswith(b"--"):
            closed = True
            break
        # the rest of the delimiter line: optional whitespace, then CRLF
        line_end = chunk.find(b"\r\n")
        if line_end < 0 or chunk[:line_end].strip():
            raise ValueError("malformed multipart delimiter line")
        rest = chunk[line_end + 2 :]
        if rest.startswith(b"\r\n"):  # a part without headers
            head, data = b"", rest[2:]
        else:
            head, sep, data = rest.partition(b"\r\n\r\n")
            if not sep:
                raise ValueError("multipart part without a header end")
        parts.append(_part(head, data))
    if not closed:
        raise ValueError("multipart body not terminated")
    return parts


def _part(head: bytes, data: bytes) -> Part:
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").split("\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"malformed multipart header: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    disposition = headers.get("content-disposition")
    if disposition is None:
        raise ValueError("multipart part without Content-Disposition")
    # Message parses the parameters (quoting, RFC 2231) for any header it is handed.
    params = Message()
    params["content-disposition"] = disposition
    param: object = params.get_param("name", header="content-disposition")
    filename = params.get_param("filename", header="content-disposition")
    if not isinstance(param, str):
        raise ValueError("multipart part without a name")
    return Part(
        name=param,
        filename=filename if isinstance(filename, str) else None,
        content_type=headers.get("content-type"),
        data=data,
    )
