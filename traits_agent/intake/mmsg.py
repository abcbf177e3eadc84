"""Many datagrams per system call: `recvmmsg(2)` through ctypes, where the C library has it.

Why: on this machine class the kernel's own part of receiving one small datagram is ~0.8 µs,
and `sock.recv(65537)` costs ~2.2 µs in all (a 64 KiB bytes object allocated, then shrunk, per
datagram). `recvmmsg` fills up to `BATCH` preallocated slots in one call and each datagram is
copied out at its own size: ~1.1 µs a datagram in all (bench/bench_intake.py --drain prints
both). Under a UDP flood that is what decides how much of one core is left for the rest.

The slots are `MAX_DATAGRAM + 1` bytes each (one more than we accept, to detect truncation, as
`recv` did), in one anonymous mmap: its pages are faulted in only where datagrams land, so a
source that only sees small datagrams keeps `BATCH` pages resident; at most `BATCH` x 64 KiB
(4 MiB) once large ones arrived. Where `recvmmsg` is not available (not Linux, no C library
found), `Reader` reads with `recv`, one datagram per call: same answers, more CPU.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import sys

#: the largest datagram we accept (interface: at most 64 KiB); one more byte detects truncation
MAX_DATAGRAM = 65536
_SLOT = MAX_DATAGRAM + 1
#: datagrams one `recvmmsg` call may return (the kernel's cost per datagram flattens out at ~64)
BATCH = 64
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint))


def _load_recvmmsg():  # -> ctypes function or None
    """libc's `recvmmsg`, or None where there is none (the layout above is Linux's)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).recvmmsg
    except (OSError, AttributeError):
        return None
    fn.argtypes = (
        ctypes.c_int,
        ctypes.POINTER(_Mmsghdr),
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_void_p,
    )
    fn.restype = ctypes.c_int
    return fn


_recvmmsg = _load_recvmmsg()
#: whether `Reader` uses recvmmsg on this host
AVAILABLE = _recvmmsg is not None


class Reader:
    """Reads the datagrams a non-blocking socket holds, `BATCH` per system call with
    `recvmmsg` (or one per `recv` where it is missing or `batch=False`)."""

    def __init__(self, sock: socket.socket, *, batch: bool = True) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self.batched = batch and _recvmmsg is not None
        #: an error `recv` raised after some datagrams of a call (the kernel reports it
        #: once): raised by the next call, after those datagrams were handed over
        self._deferred: OSError | None = None
        if not self.batched:
            return
        # lazily faulted, never zero-filled by us: see the module docstring
        self._slots = mmap.mmap(-1, _SLOT * BATCH)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._slots))
        self._iovecs = (_Iovec * BATCH)()
        self._msgs = (_Mmsghdr * BATCH)()
        for i in range(BATCH):
            self._iovecs[i].iov_base = base + i * _SLOT
            self._iovecs[i].iov_len = _SLOT
            self._msgs[i].msg_hdr.msg_iov = ctypes.pointer(self._iovecs[i])
            self._msgs[i].msg_hdr.msg_iovlen = 1
        self._view = memoryview(self._slots)
        # msg_len of message i, read without a ctypes object per message: the array as u32s
        stride = ctypes.sizeof(_Mmsghdr)
        self._lens = memoryview(self._msgs).cast("B").cast("I")
        self._len_at = _Mmsghdr.msg_len.offset // 4
        self._len_step = stride // 4
        self._offsets = range(0, _SLOT * BATCH, _SLOT)

    def read(self, limit: int) -> tuple[list[bytes], int]:
        """Up to `limit` datagrams (fewer: the socket held fewer, or one `recvmmsg` call's
        worth), and how many more were read but thrown away as larger than `MAX_DATAGRAM`.
        ([], 0): the socket is empty. Raises OSError for any other receive error."""
        if not self.batched:
            return self._read_each(limit)
        n = _recvmmsg(self._fd, self._msgs, min(limit, BATCH), _MSG_DONTWAIT, None)
        if n <= 0:
            code = ctypes.get_errno()
            if n == 0 or code in _RETRY:
                return [], 0
            raise OSError(code, os.strerror(code))
        at, step = self._len_at, self._len_step
        sizes = self._lens[at : at + step * n : step].tolist()
        view = self._view
        out = [view[o : o + s].tobytes() for o, s in zip(self._offsets, sizes, strict=False)]
        if max(sizes) <= MAX_DATAGRAM:
            return out, 0
        kept = [d for d in out if len(d) <= MAX_DATAGRAM]
        return kept, len(out) - len(kept)

    def _read_each(self, limit: int) -> tuple[list[bytes], int]:
        """`read` with one `recv` per datagram, up to `limit` (one list for all of them: the
        caller's per-read costs are paid once, as for a `recvmmsg` call)."""
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        out: list[bytes] = []
        too_large = 0
        recv = self._sock.recv
        for _ in range(min(limit, BATCH)):
            try:
                data = recv(_SLOT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if out or too_large:  # hand over what was read; the next call raises it
                    self._deferred = e
                    break
                raise
            if len(data) > MAX_DATAGRAM:
                too_large += 1
            else:
                out.append(data)
        return out, too_large

    def close(self) -> None:
        """Release the slots (the socket is the caller's)."""
        if self.batched:
            self._lens.release()
            self._view.release()
            self._slots.close()
