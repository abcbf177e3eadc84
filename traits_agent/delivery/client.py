"""The agent's HTTP client: httpx's `AsyncClient`, keeping no cookies, and sending straight to
the lean transport (`transport.py`) when it has one.

Why a subclass: per POST of a 1000-item batch, httpx's client layers around the transport cost
the agent about a quarter of its delivery CPU (`bench/bench_upload.py`, under cProfile: the
cookie jar's bookkeeping on every answer 12 %, the auth and redirect machinery and the
stream wrapper ~5 %), for features the agent does not use. `send` keeps httpx's API and
exceptions; only the path between them is shorter.

Cookies: the agent authenticates with its key on every request and never needs a cookie
back. A jar that kept what the upstream sets would also be memory a hostile or broken
upstream could grow without bound (one new cookie name per answer, each sent back on every
later request, until requests outgrow the server's header limit). `NoCookies` keeps none.
"""

from __future__ import annotations

from http.cookiejar import Cookie, CookieJar
from typing import Any

import httpx

from traits_agent.delivery.transport import LeanTransport


class NoCookies(CookieJar):
    """A cookie jar that keeps nothing: the agent sends no cookie and stores none."""

    def set_cookie(self, cookie: Cookie) -> None:
        return

    def extract_cookies(self, response: Any, request: Any) -> None:
        return


class AgentClient(httpx.AsyncClient):
    """`httpx.AsyncClient` whose `send` hands a request straight to its `LeanTransport`.

    What httpx's `send` does around the transport, and why the short path may leave it out:
    auth (the agent sets its own `Authorization`), redirects (never followed:
    `follow_redirects=False`, a 3xx is returned as it came), event hooks (none), cookies
    (`NoCookies`), and the stream wrapper that times the answer (`response.elapsed` is not
    used). A client or request that asks for any of them (auth, credentials in the URL,
    redirects, hooks) takes httpx's own `send`. The request's timeouts are the client's unless
    it carries its own, as in httpx. A client without a `LeanTransport` (a proxy from the
    environment) is httpx's client unchanged."""

    def __init__(self, *, transport: httpx.AsyncBaseTransport | None, **kwargs: Any) -> None:
        super().__init__(transport=transport, cookies=NoCookies(), **kwargs)
        self._lean = transport if isinstance(transport, LeanTransport) else None

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        lean = self._lean
        if (
            lean is None
            or auth is not httpx.USE_CLIENT_DEFAULT
            or follow_redirects is not httpx.USE_CLIENT_DEFAULT
            or self.follow_redirects
            or self.auth is not None
            or any(self.event_hooks.values())
            or request.url.userinfo
        ):
            return await super().send(
                request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        if "timeout" not in request.extensions:
            request.extensions = {**request.extensions, "timeout": self.timeout.as_dict()}
        response = await lean.handle_async_request(request)
        response.request = request
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response
