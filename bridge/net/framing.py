"""WebSocket framing with a fast path for the one kind of message a call is made of (both legs).

wsproto frames and parses every message through a general state machine: about 9 µs to parse and
3-6 µs to build one 380-byte text message on this machine, a sixth of the bridge's CPU on a live
call. Nearly every message on both legs is the same simple kind: one final, unfragmented text
frame, well under 64 KiB, with no extension. :class:`FastFraming` frames and parses exactly that
kind itself, and gives everything else to the ``wsproto.WSConnection`` it wraps, always as whole
frames and in stream order: the handshake, control frames (ping, pong, close), binary and
fragmented messages, reserved bits or opcodes, a wrong mask bit, non-minimal lengths, invalid
UTF-8, frames over the size limit, and anything after the connection stopped being open. So
wsproto still decides every protocol error and every state change, and trio-websocket's
behaviour (the 1009 for an oversized message, close handshakes, pings) is unchanged.

Sans-IO: bytes in, events out; tested against wsproto itself (``tests/test_framing.py``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator

from wsproto import WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Event, Message, TextMessage

_OPEN = ConnectionState.OPEN
_FIN_TEXT = 0x81  # FIN, no reserved bits, opcode 1 (text)
_FINAL_FRAME_OPCODES = frozenset({0x81, 0x82, 0x88, 0x89, 0x8A})  # FIN + text, binary, close, ping, pong
_TWO_BYTE_MAX = 0xFFFF
_WSPROTO = object()  # a mark in the event queue: wsproto's events come here


class FastFraming:
    """Stands in for a ``wsproto.WSConnection`` (what trio-websocket uses of it: ``client``,
    ``state``, ``send``, ``receive_data``, ``events``), taking the simple text frames off it.

    Until the connection is open and wsproto has no partial frame, everything goes to wsproto.
    From then on frames are parsed here; a frame of another kind is handed to wsproto whole, with
    every frame after it in the same read (so events keep stream order). A frame wsproto would
    have to see in pieces (fragmented, over the limit, ...) hands the rest of the stream to
    wsproto for good.
    """

    __slots__ = ("_buffer", "_fast", "_fed", "_given_up", "_max", "_out_fragments", "_queue", "_ws", "client")

    def __init__(self, ws: WSConnection, *, max_message_bytes: int) -> None:
        self._ws = ws
        self.client = ws.client
        self._max = min(max_message_bytes, _TWO_BYTE_MAX)  # larger frames go to wsproto
        self._buffer = b""  # the start of a frame not complete yet
        self._queue: deque[object] = deque()  # events parsed here, and _WSPROTO marks
        self._fast = False  # frames are parsed here
        self._fed = False  # wsproto holds whole frames of this read: its events come next
        self._given_up = False  # wsproto has the rest of the stream
        self._out_fragments = False  # a fragmented message was sent: wsproto frames every message

    @property
    def state(self) -> ConnectionState:
        return self._ws.state

    def send(self, event: Event) -> bytes:
        """Bytes for ``event``: built here for a whole text message on an open connection."""
        if type(event) is TextMessage and self._ws.state is _OPEN and not self._out_fragments:
            if event.message_finished:
                return frame_text(event.data.encode(), masked=self.client)
            self._out_fragments = True
        elif isinstance(event, Message) and not event.message_finished:
            self._out_fragments = True
        return self._ws.send(event)

    def receive_data(self, data: bytes | None) -> None:
        """Feed bytes from the network (``None``: the peer closed the TCP stream)."""
        if not self._fast:
            if self._given_up or data is None or not self._can_go_fast():
                self._ws.receive_data(data)
                return
            # From here on frames are parsed here; this read's still go to wsproto, behind any
            # event it has not handed out yet (the handshake's, say).
            self._fast = self._fed = True
            self._queue.append(_WSPROTO)
        if data is None:
            self._give_up(self._buffer)
            self._ws.receive_data(None)
            return
        buf = self._buffer + data if self._buffer else data
        end = len(buf)
        pos = 0
        queue, ws, client, limit = self._queue, self._ws, self.client, self._max
        while end - pos >= 2:
            first = buf[pos]
            second = buf[pos + 1]
            size = second & 0x7F
            head = 2
            if size == 126:
                if end - pos < 4:
                    break
                size = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
                if size < 126:  # not minimal: wsproto rejects it
                    self._give_up(buf[pos:])
                    return
            elif size == 127:
                self._give_up(buf[pos:])
                return
            if size > limit:
                self._give_up(buf[pos:])
                return
            masked = second & 0x80
            if masked:
                head += 4
            stop = pos + head + size
            if stop > end:
                break  # wait for the rest of the frame
            if first == _FIN_TEXT and (not masked) is client and not self._fed and ws.state is _OPEN:
                payload = buf[pos + head : stop]
                if masked:
                    payload = unmask(payload, buf[pos + head - 4 : pos + head])
                try:
                    text = payload.decode()
                except UnicodeDecodeError:  # wsproto closes with 1007
                    self._give_up(buf[pos:])
                    return
                queue.append(TextMessage(data=text))
            elif first in _FINAL_FRAME_OPCODES:
                ws.receive_data(buf[pos:stop])  # a whole frame: wsproto stays at a frame boundary
                if not self._fed:
                    self._fed = True
                    queue.append(_WSPROTO)
            else:  # fragmented, continuation, reserved bits or opcodes
                self._give_up(buf[pos:])
                return
            pos = stop
        self._buffer = buf[pos:] if pos < end else b""

    def events(self) -> Iterator[Event]:
        """Events so far, in stream order."""
        queue = self._queue
        while queue:
            item = queue.popleft()
            if item is _WSPROTO:
                self._fed = False
                for event in self._ws.events():
                    if type(event) is CloseConnection:  # a close frame, or wsproto found an error
                        self._stop()
                    yield event
            else:
                yield item  # type: ignore[misc]
        if not self._fast:
            yield from self._ws.events()

    def _stop(self) -> None:
        """After a close (received, or wsproto's verdict on an error) wsproto has the rest."""
        if self._fast:
            self._fast = False
            self._given_up = True
            rest, self._buffer = self._buffer, b""
            if rest and self._ws.state is not ConnectionState.CLOSED:
                self._ws.receive_data(rest)

    def _give_up(self, rest: bytes) -> None:
        self._fast = False
        self._given_up = True
        self._buffer = b""
        if rest:
            self._ws.receive_data(rest)
        if not self._fed:
            self._fed = True
            self._queue.append(_WSPROTO)

    def _can_go_fast(self) -> bool:
        return self._ws.state is _OPEN and _at_frame_boundary(self._ws)


def frame_text(payload: bytes, *, masked: bool) -> bytes:
    """One final text frame (RFC 6455 §5.2); a client masks it with a fresh random key."""
    size = len(payload)
    bit = 0x80 if masked else 0
    if size < 126:
        head = bytes((_FIN_TEXT, bit | size))
    elif size <= _TWO_BYTE_MAX:
        head = bytes((_FIN_TEXT, bit | 126, size >> 8, size & 0xFF))
    else:
        head = bytes((_FIN_TEXT, bit | 127)) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = _mask_key()
    return head + key + unmask(payload, key)


def unmask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` repeated (masking and unmasking are the same)."""
    size = len(payload)
    if not size:
        return b""
    mask = (key * ((size >> 2) + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")).to_bytes(size, "little")


class _KeyPool:
    """Masking keys from the kernel's CSPRNG, read 1024 at a time (one syscall, not one per frame).
    RFC 6455 §5.3 asks for an unpredictable key per frame from a strong source: each key is still
    four fresh bytes of ``os.urandom``, never reused."""

    __slots__ = ("_at", "_bytes")

    def __init__(self) -> None:
        self._bytes = b""
        self._at = 0

    def take(self) -> bytes:
        at = self._at
        if at + 4 > len(self._bytes):
            self._bytes = os.urandom(4096)
            at = 0
        self._at = at + 4
        return self._bytes[at : at + 4]


_mask_key = _KeyPool().take


def _at_frame_boundary(ws: WSConnection) -> bool:
    """True when wsproto holds no partial frame or message and no event (the next byte it would
    get starts a frame).

    Reads wsproto's private state (1.3, pinned; ``tests/test_framing.py`` checks it still works):
    if the layout ever changes this says False and everything simply stays with wsproto.
    """
    try:
        connection = ws.connection
        proto = connection._proto  # type: ignore[union-attr]
        decoder = proto._frame_decoder
        return (
            decoder.header is None
            and len(decoder.buffer) == 0
            and proto._message_decoder.opcode is None
            and not connection._events  # type: ignore[union-attr]
        )
    except AttributeError:
        return False
