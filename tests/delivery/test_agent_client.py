"""The agent's HTTP client (delivery/client.py) and the requests the uploader builds with it,
against real servers on loopback: the short path to the lean transport puts the same bytes on
the wire as httpx's own `send` and `build_request`, keeps no cookies, and leaves every case it
does not cover to httpx."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from tests.delivery.test_transport import CREATED, Peer, Server, keep_answering, lean, post
from traits_agent.delivery.backoff import Backoff
from traits_agent.delivery.client import AgentClient, NoCookies
from traits_agent.delivery.deadletter import DeadLetters
from traits_agent.delivery.policy import USER_AGENT
from traits_agent.delivery.transport import LeanTransport
from traits_agent.delivery.uploader import Uploader, build_body
from traits_agent.observe.metrics import Counters
from traits_agent.schema import RESOURCES

KEY = "k-123"
PAYLOADS = [b'{"user_id":"u%d","action_id":"a","action_name":"n"}' % i for i in range(3)]


class Recorder:
    """Answers every request 201 and keeps each request's head and body as they came."""

    def __init__(self, answer: bytes = CREATED) -> None:
        self.answer = answer
        self.requests: list[tuple[bytes, bytes]] = []

    async def __call__(self, peer: Peer) -> None:
        while (head := await peer.request()) is not None:
            self.requests.append((head, peer.body))
            await peer.answer(self.answer)


def uploader(client: httpx.AsyncClient, tmp_path: Path) -> Uploader:
    return Uploader(
        client,
        api_key=KEY,
        counters=Counters(),
        dead_letters=DeadLetters(tmp_path / "dead"),
        backoff=Backoff(),
        agent_id="test",
    )


@pytest.mark.parametrize("resource", ["actions", "playfab"])
async def test_the_uploaders_request_is_the_one_httpx_builds_and_sends(
    nursery, tmp_path, resource
) -> None:
    """Byte for byte: the uploader's POST (its shared head made once, sent by the short path)
    against `client.build_request` with the same headers, sent by httpx's own `send`, on
    the same connection. The query (playfab's key) and the header order included."""
    recorder = Recorder()
    url = await Server(recorder).start(nursery)
    r = RESOURCES[resource]
    async with lean(url) as client:
        up = uploader(client, tmp_path)
        up.playfab_arrays = True  # one request for the three events
        await up.deliver(r, PAYLOADS, 7)
        sent_head, sent_body = recorder.requests[-1]
        key = sent_head.lower().split(b"idempotency-key: ")[1].split(b"\r\n")[0].decode()
        headers = {
            "Authorization": f"Bearer {KEY}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Idempotency-Key": key,
        }
        params = {"api_key": KEY} if r.payload_key is None else None
        body = build_body(r, PAYLOADS, True)
        request = client.build_request("POST", r.path, content=body, headers=headers, params=params)
        response = await httpx.AsyncClient.send(client, request, stream=True)  # httpx's path
        await response.aclose()
    assert recorder.requests[-1] == (sent_head, sent_body)
    assert sent_body == body
    assert sent_head.startswith(b"POST " + r.path.encode())
    assert (b"?api_key=" + KEY.encode() in sent_head) is (r.payload_key is None)


async def test_no_cookie_is_kept_or_sent(nursery) -> None:
    """An upstream that sets a new cookie on every answer grows nothing in the agent, and no
    request carries one back (on the short path and on httpx's)."""
    setting = b"HTTP/1.1 201 Created\r\nSet-Cookie: c%d=%s; Path=/\r\nContent-Length: 2\r\n\r\n{}"
    heads: list[bytes] = []

    async def handler(peer: Peer) -> None:
        n = 0
        while (head := await peer.request()) is not None:
            heads.append(head)
            n += 1
            await peer.answer(setting % (n, b"x" * 1000))

    url = await Server(handler).start(nursery)
    async with lean(url) as client:
        for _ in range(20):
            assert (await post(client))[0] == 201
        request = client.build_request("POST", "/v1/actions", content=b"{}")
        await httpx.AsyncClient.send(client, request)
        assert len(client.cookies.jar) == 0
    assert len(heads) == 21
    assert not any(b"cookie" in head.lower() for head in heads)
    assert isinstance(client.cookies.jar, NoCookies)


async def test_a_non_streamed_send_reads_the_answer(nursery) -> None:
    """`client.post` (send without stream=True) on the short path returns the answer read."""
    url = await Server(keep_answering).start(nursery)
    async with lean(url) as client:
        response = await client.post("/v1/actions", content=b"{}")
        assert (response.status_code, response.content) == (201, b"{}")
        assert response.request.url == httpx.URL(url + "/v1/actions")


async def test_a_request_with_its_own_timeouts_keeps_them(autojump_clock, nursery) -> None:
    """The client's timeouts apply unless the request carries its own (as in httpx): here
    a request's 2 s read timeout trips on a server that never answers, under the client's
    30 s."""

    async def silent(peer: Peer) -> None:
        await peer.request()
        await trio.sleep_forever()

    url = await Server(silent).start(nursery)
    async with lean(url, timeout=30) as client:
        request = client.build_request("POST", "/v1/actions", content=b"{}", timeout=2)
        started = trio.current_time()
        with pytest.raises(httpx.ReadTimeout):
            await client.send(request, stream=True)
        assert trio.current_time() - started == pytest.approx(2)


async def test_what_the_short_path_does_not_cover_goes_through_httpx(nursery) -> None:
    """Credentials in the URL (httpx sends them as Basic auth), an explicit `auth=` (per
    request and per client), event hooks, and a client without the lean transport: httpx's
    `send`, unchanged."""
    recorder = Recorder()
    url = await Server(recorder).start(nursery)
    with_user = url.replace("http://", "http://user:pw@")
    async with lean(with_user) as client:
        await client.post("/v1/actions", content=b"{}")
        await client.post("/v1/actions", content=b"{}", auth=("other", "secret"))
    async with AgentClient(base_url=url, transport=None, trust_env=False) as plain:
        await plain.post("/v1/actions", content=b"{}")
    async with AgentClient(
        base_url=url, transport=LeanTransport(), auth=("client", "wide")
    ) as with_auth:
        await with_auth.post("/v1/actions", content=b"{}")
    hooked: list[str] = []

    async def hook(request: httpx.Request) -> None:
        hooked.append(request.url.path)

    async with lean(url) as client:
        client.event_hooks = {"request": [hook], "response": []}
        await client.post("/v1/actions", content=b"{}")
    heads = [head.lower() for head, _ in recorder.requests]
    assert b"authorization: basic dxnlcjpwdw==" in heads[0]  # user:pw
    assert b"authorization: basic b3rozxi6c2vjcmv0" in heads[1]  # other:secret
    assert b"authorization" not in heads[2]
    assert b"authorization: basic y2xpzw50ondpzgu=" in heads[3]  # client:wide
    assert hooked == ["/v1/actions"]
    assert len(heads) == 5
