"""The Forward protocol's shared-key handshake (HELO / PING / PONG), as Fluentd's `<security>`.

A listener configured with a shared key greets every connection with
`["HELO", {"nonce": bin, "auth": bin, "keepalive": true}]`; the client answers
`["PING", client_hostname, shared_key_salt, sha512_hex(salt + client_hostname + nonce + key),
username, sha512_hex(auth + username + password)]` and the agent replies
`["PONG", true, "", server_hostname, sha512_hex(salt + server_hostname + nonce + key)]` (the
client checks that digest: it proves the agent knows the key too) or
`["PONG", false, reason, "", ""]` and closes. Only then do entries flow.

This follows Fluentd's in_forward (`generate_helo`, `check_ping`, `generate_pong`), which is what
Fluent Bit's and Fluentd's `out_forward` are tested against: the `auth` salt is always sent, and
the username/password digest is checked only when users are configured. The key is a shared
secret of the listener, not a per-client one (Fluentd's `<client>` sections are not supported).

Our hostname in PONG is `traits-agent.<host>`, never the bare host name: Fluentd's out_forward
refuses a PONG carrying its own hostname ("same hostname between input and output"), and the
agent runs on the same host as its clients.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PING = "PING"


def _hostname() -> str:
    return f"traits-agent.{socket.gethostname()}"


@dataclass(frozen=True)
class Security:
    """A listener's handshake settings: the shared key and, optionally, users."""

    shared_key: str
    #: username -> password; empty: no user authentication
    users: Mapping[str, str] = field(default_factory=dict)
    hostname: str = field(default_factory=_hostname)

    def secrets(self) -> list[str]:
        """The key and the passwords (for the log's redaction)."""
        return [self.shared_key, *self.users.values()]

    def __repr__(self) -> str:  # never show the secrets in a log or a traceback
        return f"Security(shared_key='***', users={sorted(self.users)}, hostname={self.hostname!r})"


@dataclass
class Session:
    """One connection's handshake state: the nonce and salt its HELO carried."""

    security: Security
    nonce: bytes = field(default_factory=lambda: os.urandom(16))
    auth_salt: bytes = field(default_factory=lambda: os.urandom(16))

    def helo(self) -> list[Any]:
        return ["HELO", {"nonce": self.nonce, "auth": self.auth_salt, "keepalive": True}]

    def answer(self, ping: Any) -> tuple[list[Any], str | None]:
        """The PONG for a client's PING, and None when it passed or the reason it failed."""
        failure, salt = self._check(ping)
        if failure is not None:
            return ["PONG", False, failure, "", ""], failure
        host = self.security.hostname
        digest = _sha512_hex(salt, host, self.nonce, self.security.shared_key)
        return ["PONG", True, "", host, digest], None

    def _check(self, ping: Any) -> tuple[str | None, bytes]:
        if not is_ping(ping):
            return "invalid ping message", b""
        _, hostname, salt, digest, username, password_digest = ping
        if not all(isinstance(v, (str, bytes)) for v in ping[1:]):
            return "invalid ping message", b""
        expected = _sha512_hex(salt, hostname, self.nonce, self.security.shared_key)
        if not hmac.compare_digest(_text(digest), expected):
            return "shared_key mismatch", b""
        users = self.security.users
        if users:
            name = _text(username)
            password = users.get(name)
            wanted = "" if password is None else _sha512_hex(self.auth_salt, name, password)
            if password is None or not hmac.compare_digest(_text(password_digest), wanted):
                return "username/password mismatch", b""
        return None, _bytes(salt)


def is_ping(value: Any) -> bool:
    """A PING message, as a Forward-protocol value (so a keyless listener can name it)."""
    return type(value) is list and len(value) == 6 and value[0] in (PING, PING.encode())


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _sha512_hex(*parts: str | bytes) -> str:
    h = hashlib.sha512()
    for part in parts:
        h.update(_bytes(part))
    return h.hexdigest()
