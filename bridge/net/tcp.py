"""A TCP stream with the two scheduling passes per message taken out (both legs of a call).

``trio.SocketStream`` tries ``recv`` before it waits (on a live call the socket is almost never
readable yet, so that is a failed syscall per message) and yields to the scheduler after every
successful ``send``. trio-websocket already yields once per message (its send lock), so here a
send that the kernel takes whole returns at once, and a receive waits for readability first.
Cancellation still works: both paths check it, and a blocked send or receive waits in Trio.
"""

from __future__ import annotations

import errno
import os

import trio

DEFAULT_RECEIVE_BYTES = 65536
_GONE_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


class DirectSocketStream(trio.abc.HalfCloseableStream):
    """A ``trio.SocketStream`` whose ``send_all``/``receive_some`` call the socket directly."""

    __slots__ = ("_fd", "_inner")

    def __init__(self, inner: trio.SocketStream) -> None:
        self._inner = inner
        self._fd = inner.socket.fileno()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        fd = self._check_open()
        view = memoryview(data)
        while view:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)  # the kernel's buffer is full: wait in Trio
                fd = self._check_open()
                continue
            except OSError as exc:
                raise _translate(exc) from exc
            view = view[sent:]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = DEFAULT_RECEIVE_BYTES if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        while True:
            fd = self._check_open()
            try:
                await trio.lowlevel.wait_readable(fd)
            except OSError as exc:  # closed by another task while we waited
                raise _translate(exc) from exc
            fd = self._check_open()
            try:
                return os.read(fd, size)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise _translate(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()

    def _check_open(self) -> int:
        if self._inner.socket.fileno() == -1:
            raise trio.ClosedResourceError("the socket was closed")
        return self._fd


def _translate(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno in _GONE_ERRNOS:
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")
