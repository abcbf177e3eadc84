"""The link between the agent and its Forward intake process: framed msgpack over a socketpair.

Each message is a 4-byte big-endian length and one msgpack value (an array whose first item
is its kind). Both ends are ours, but the reader still bounds what it accepts
(`MAX_MESSAGE_BYTES`): a process that sends a longer length is broken, and the link is
closed rather than followed into unbounded memory.

The writer side is synchronous (`LinkWriter.send` only appends to a buffer, so it can be
called where the Forward server stores events, between two socket reads) and a task
(`LinkWriter.run`) writes the buffer out. `LinkWriter.room` is the back-pressure: a caller
that waits on it stops reading its peers while the buffer is over `BUFFER_BYTES`.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

import msgpack
import trio

#: the largest message either end accepts; the intake process sends far smaller ones
#: (`forward_worker.MESSAGE_BYTES`), so this bounds a broken peer, not normal traffic
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: bytes waiting to be written past which `room()` waits (the peer is slow)
BUFFER_BYTES = 4 * 1024 * 1024
#: bytes read from the socket at once
READ_BYTES = 1024 * 1024
#: bytes of queued messages joined for one write (not the whole buffer: that copy would
#: double the memory of a process whose buffer a large Forward message has filled)
WRITE_BYTES = 1024 * 1024

_LENGTH = struct.Struct(">I")


class LinkClosed(Exception):
    """The other end closed the link, or sent something that is not a framed message."""


def frame(value: Any) -> bytes:
    """`value` as one framed message."""
    body = msgpack.packb(value, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


class LinkWriter:
    """Buffers framed messages and writes them out in order (`run`)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._out: deque[bytes] = deque()
        self._size = 0
        self._more = trio.Event()
        self._drained = trio.Event()
        self._closed = False
        self._closing = False

    @property
    def buffered(self) -> int:
        """Bytes queued or being written."""
        return self._size

    def send(self, value: Any) -> None:
        """Queue `value` (never blocks; `room` bounds the buffer). Dropped once the link is
        closed: nobody will read it (the process is on its way out)."""
        if self._closed:
            return
        data = frame(value)
        self._out.append(data)
        self._size += len(data)
        self._more.set()

    async def room(self) -> None:
        """Return once the buffer is under `BUFFER_BYTES` (at once if it is)."""
        while self._size > BUFFER_BYTES and not self._closed:
            await self._drained.wait()

    def close(self) -> None:
        """No more messages: `run` returns once everything queued is written."""
        self._closing = True
        self._more.set()

    async def run(self) -> None:
        """Write everything queued, in order, until `close` (or cancelled); raises LinkClosed
        when the other end is gone."""
        try:
            while True:
                if not self._out:
                    if self._closing:
                        return
                    await self._more.wait()
                    self._more = trio.Event()
                    continue
                data = self._take()
                await self._write(data)
                self._size -= len(data)  # counted until written: `room` bounds it too
                event, self._drained = self._drained, trio.Event()
                event.set()
        finally:
            self._closed = True
            self._drained.set()

    def _take(self) -> bytes:
        """The next queued messages, about `WRITE_BYTES` of them (at least one), joined."""
        out = self._out
        first = out.popleft()
        if len(first) >= WRITE_BYTES or not out:
            return first
        parts = [first]
        size = len(first)
        while out and size < WRITE_BYTES:
            parts.append(out.popleft())
            size += len(parts[-1])
        return b"".join(parts)

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                sent = await self.sock.send(view)
                view = view[sent:]
        except OSError as e:
            raise LinkClosed(f"link write failed: {e}") from e


class MessageReader:
    """Reads framed messages from `sock`. The partial message read so far is kept in the
    object, so a caller cancelled while waiting (the agent shutting down) can go on reading
    the same link afterwards without losing a byte."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._ready: list[Any] = []

    async def next(self) -> Any | None:
        """The next message, or None once the other end has closed the link. Raises
        LinkClosed for a length over `MAX_MESSAGE_BYTES`, a message cut short by the end of
        the stream, or bytes that are not msgpack."""
        while not self._ready:
            try:
                data = await self.sock.recv(READ_BYTES)
            except OSError as e:
                raise LinkClosed(f"link read failed: {e}") from e
            if not data:
                if self._buffer:
                    raise LinkClosed(f"the link ended inside a message ({len(self._buffer)} bytes)")
                return None
            self._buffer += data
            self._split()
        return self._ready.pop(0)

    def _split(self) -> None:
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= 4:
            (size,) = _LENGTH.unpack_from(buffer, start)
            if size > MAX_MESSAGE_BYTES:
                raise LinkClosed(f"a message of {size} bytes is over {MAX_MESSAGE_BYTES}")
            end = start + 4 + size
            if end > len(buffer):
                break
            try:
                value = msgpack.unpackb(
                    buffer[start + 4 : end], raw=False, strict_map_key=False, use_list=True
                )
            except (ValueError, msgpack.UnpackException) as e:
                raise LinkClosed(f"a message that is not msgpack: {e}") from e
            self._ready.append(value)
            start = end
        del buffer[:start]
