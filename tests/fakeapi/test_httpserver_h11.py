"""traits_agent.httpserver: a small HTTP/1.1 server that a client cannot take down."""

from __future__ import annotations

from functools import partial

import httpx
import pytest
import structlog
import trio

from traits_agent.httpserver import (
    DropConnection,
    Request,
    Response,
    json_response,
    serve_http,
)


async def echo(request: Request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    if request.path == "/drop":
        raise DropConnection
    return json_response(
        200,
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": request.headers,
            "body": request.body.decode(),
        },
        {"x-echo": "1"},
    )


async def start(nursery: trio.Nursery, **kwargs) -> str:
    host, port = await nursery.start(partial(serve_http, echo, **kwargs))
    return f"http://{host}:{port}"


async def read_until_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def test_request_fields_and_response(nursery):
    """The handler sees method, path, parsed query, lower-cased headers and the body."""
    url = await start(nursery)
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.put("/a/b?x=1&y=two&x=3", content=b"hello", headers={"X-Thing": "v"})
    assert response.status_code == 200
    assert response.headers["x-echo"] == "1"
    assert response.headers["content-type"] == "application/json"
    seen = response.json()
    assert (seen["method"], seen["path"], seen["body"]) == ("PUT", "/a/b", "hello")
    assert seen["query"] == {"x": "3", "y": "two"}
    assert seen["headers"]["x-thing"] == "v"


async def test_port_zero_reports_bound_address(nursery):
    """Port 0 binds an OS-chosen port and nursery.start returns it."""
    host, port = await nursery.start(serve_http, echo)
    assert host == "127.0.0.1"
    assert port > 0


async def test_keep_alive_reuses_one_connection(nursery):
    """Several requests from one client travel over a single connection."""
    url = await start(nursery)
    async with httpx.AsyncClient(base_url=url) as http:
        ports = set()
        for i in range(5):
            response = await http.post("/n", content=str(i).encode())
            assert response.json()["body"] == str(i)
            ports.add(response.extensions["network_stream"].get_extra_info("client_addr"))
    assert len(ports) == 1


async def test_two_requests_on_a_raw_socket(nursery):
    """Keep-alive at the byte level: two requests, two answers, then close on request."""
    host, port = await nursery.start(serve_http, echo)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        await stream.send_all(b"GET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await read_until_eof(stream)
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert b'"path":"/one"' in data and b'"path":"/two"' in data


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: banana\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
    ],
)
async def test_malformed_request_gets_400_and_server_lives(nursery, garbage):
    """Malformed bytes get a 400 and a closed connection; the server keeps serving."""
    host, port = await nursery.start(serve_http, echo)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(garbage)
        data = await read_until_eof(stream)
    assert data.startswith(b"HTTP/1.1 400 ")
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"http://{host}:{port}/ok")).status_code == 200


async def test_handler_exception_is_500_and_logged(nursery):
    """A failing handler gives 500 and one log line; the connection and server carry on."""
    url = await start(nursery)
    with structlog.testing.capture_logs() as logs:
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/boom")).status_code == 500
            assert (await http.get("/fine")).status_code == 200
    [line] = [e for e in logs if e["event"] == "http_handler_failed"]
    assert line["path"] == "/boom"
    assert line["log_level"] == "error"


async def test_drop_connection_closes_without_answer(nursery):
    """DropConnection from the handler closes the socket with no response bytes."""
    host, port = await nursery.start(serve_http, echo)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(b"GET /drop HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await read_until_eof(stream) == b""


async def test_body_over_limit_is_413(nursery):
    """A body over max_body_size gets 413 (declared or chunked), and the server lives on."""
    url = await start(nursery, max_body_size=1000)
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.post("/x", content=b"a" * 1000)).status_code == 200
        assert (await http.post("/x", content=b"a" * 5000)).status_code == 413

        async def chunks():
            for _ in range(10):
                yield b"b" * 500

        assert (await http.post("/x", content=chunks())).status_code == 413
        assert (await http.get("/ok")).status_code == 200


async def test_idle_connection_is_closed_after_timeout(nursery, autojump_clock):
    """A connection that sends nothing is closed after idle_timeout (trio's clock)."""
    host, port = await nursery.start(partial(serve_http, echo, idle_timeout=5))
    stream = await trio.open_tcp_stream(host, port)
    start_time = trio.current_time()
    async with stream:
        assert await read_until_eof(stream) == b""
    assert trio.current_time() - start_time == pytest.approx(5)


async def test_slow_request_is_cut_by_idle_timeout(nursery, autojump_clock):
    """A request that starts but never finishes is cut off too (slowloris)."""
    host, port = await nursery.start(partial(serve_http, echo, idle_timeout=5))
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        with trio.fail_after(60):
            await read_until_eof(stream)


async def test_handler_time_does_not_count_as_idle(nursery, autojump_clock):
    """A handler slower than idle_timeout still gets its answer out."""

    async def slow(request: Request) -> Response:
        await trio.sleep(30)
        return Response(204)

    host, port = await nursery.start(partial(serve_http, slow, idle_timeout=5))
    async with httpx.AsyncClient(timeout=100) as http:
        response = await http.get(f"http://{host}:{port}/")
    assert response.status_code == 204


async def test_cancelling_the_nursery_stops_the_server():
    """Cancelling the surrounding scope stops the listener and open connections."""
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_http, echo)
        stream = await trio.open_tcp_stream(host, port)  # an idle keep-alive connection
        nursery.cancel_scope.cancel()
    await stream.aclose()
    with pytest.raises(OSError):
        await trio.open_tcp_stream(host, port)


async def test_head_request_has_no_body(nursery):
    """HEAD gets the headers, no body bytes."""
    url = await start(nursery)
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.head("/x")
    assert response.status_code == 200
    assert response.content == b""
