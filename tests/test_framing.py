"""FastFraming against wsproto itself: same messages, same control events, same states, same bytes.

The reference is what trio-websocket makes of wsproto's events: a message is the join of its
parts, delivered when its last part arrives. Each test drives a plain wsproto connection and a
FastFraming one with the same chunks, the way trio-websocket's reader does (drain the events,
answer pings and closes, feed the next chunk).
"""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import XorMaskerSimple

from bridge.net import framing as wsframing
from bridge.net.framing import FastFraming, frame_text, unmask

LIMIT = 4096


def _open(role: ConnectionType, *, trailing: bytes = b"") -> WSConnection:
    """A wsproto connection of ``role``, through a real handshake with a wsproto peer."""
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="example.com", target="/media-stream/x")))
    assert isinstance(next(server.events()), Request)
    response = server.send(AcceptConnection())
    if role is ConnectionType.SERVER:
        server.receive_data(trailing) if trailing else None
        return server
    client.receive_data(response + trailing)
    return client


def _frame(opcode: int, payload: bytes, *, masked: bool, fin: bool = True, rsv: int = 0, wide: bool = False) -> bytes:
    first = (0x80 if fin else 0) | rsv | opcode
    size = len(payload)
    bit = 0x80 if masked else 0
    if size < 126 and not wide:
        head = bytes((first, bit | size))
    elif size <= 0xFFFF:
        head = bytes((first, bit | 126)) + struct.pack("!H", size)
    else:
        head = bytes((first, bit | 127)) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(XorMaskerSimple(bytearray(key)).process(bytearray(payload)))


class Reader:
    """trio-websocket's reader loop, on either connection: normalised events and the bytes sent."""

    def __init__(self, conn: WSConnection | FastFraming) -> None:
        self.conn = conn
        self.delivered: list[object] = []
        self.sent: list[bytes] = []
        self._parts: list[str | bytes] = []

    def feed(self, chunk: bytes) -> None:
        if self.conn.state is not ConnectionState.CLOSED:
            self.conn.receive_data(chunk)
        self.drain()

    def drain(self) -> None:
        for event in self.conn.events():
            self._handle(event)

    def _handle(self, event: Event) -> None:
        if isinstance(event, Message):
            self._parts.append(event.data)
            if event.message_finished:
                joined = b"".join(self._parts) if isinstance(event, BytesMessage) else "".join(self._parts)  # type: ignore[arg-type]
                self.delivered.append((type(event).__name__, joined))
                self._parts = []
        elif isinstance(event, Ping):
            self.delivered.append(event)
            self.sent.append(self.conn.send(event.response()))
        elif isinstance(event, CloseConnection):
            self.delivered.append(event)
            if self.conn.state is ConnectionState.REMOTE_CLOSING:
                self.sent.append(self.conn.send(event.response()))
        else:
            self.delivered.append(event)


def _pair(role: ConnectionType, trailing: bytes = b"") -> tuple[Reader, Reader]:
    fast = FastFraming(_open(role, trailing=trailing), max_message_bytes=LIMIT)
    return Reader(_open(role, trailing=trailing)), Reader(fast)


def _warm_pair(role: ConnectionType) -> tuple[Reader, Reader]:
    """A pair past its first read (which FastFraming leaves to wsproto): the fast path is on."""
    plain, fast = _pair(role)
    first = _frame(0x1, b'{"event":"connected"}', masked=role is ConnectionType.SERVER)
    plain.feed(first)
    fast.feed(first)
    assert fast.conn._fast  # type: ignore[union-attr]
    return plain, fast


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


GOOD_FRAMES = st.one_of(
    st.text(max_size=300).map(lambda t: ("text", t.encode())),
    st.text(min_size=126, max_size=2000).map(lambda t: ("text", t.encode())),
    st.binary(max_size=200).map(lambda b: ("binary", b)),
    st.binary(max_size=125).map(lambda b: ("ping", b)),
    st.binary(max_size=125).map(lambda b: ("pong", b)),
    st.lists(st.text(max_size=50), min_size=2, max_size=4).map(lambda ps: ("fragments", ps)),
)
BAD_FRAMES = st.sampled_from(
    [
        ("raw_text", b"\xff\xfe"),  # invalid UTF-8
        ("rsv", b"x"),
        ("wrong_mask", b"hello"),
        ("non_minimal", b"short"),
        ("too_big", b"y" * (LIMIT + 1)),
        ("opcode", b"z"),
        ("close", b""),
    ]
)


def _encode(kind: str, value: object, masked: bool) -> bytes:
    if kind == "text" or kind == "raw_text":
        return _frame(0x1, value, masked=masked)  # type: ignore[arg-type]
    if kind == "binary":
        return _frame(0x2, value, masked=masked)  # type: ignore[arg-type]
    if kind == "ping":
        return _frame(0x9, value, masked=masked)  # type: ignore[arg-type]
    if kind == "pong":
        return _frame(0xA, value, masked=masked)  # type: ignore[arg-type]
    if kind == "fragments":
        parts = [p.encode() for p in value]  # type: ignore[attr-defined]
        out = _frame(0x1, parts[0], masked=masked, fin=False)
        for part in parts[1:-1]:
            out += _frame(0x0, part, masked=masked, fin=False)
        return out + _frame(0x0, parts[-1], masked=masked)
    if kind == "rsv":
        return _frame(0x1, value, masked=masked, rsv=0x40)  # type: ignore[arg-type]
    if kind == "wrong_mask":
        return _frame(0x1, value, masked=not masked)  # type: ignore[arg-type]
    if kind == "non_minimal":
        return _frame(0x1, value, masked=masked, wide=True)  # type: ignore[arg-type]
    if kind == "too_big":
        return _frame(0x1, value, masked=masked)  # type: ignore[arg-type]
    if kind == "opcode":
        return _frame(0x3, value, masked=masked)  # type: ignore[arg-type]
    if kind == "close":
        return _frame(0x8, struct.pack("!H", 1000) + b"bye", masked=masked)
    raise AssertionError(kind)


ROLES = st.sampled_from([ConnectionType.SERVER, ConnectionType.CLIENT])


@settings(max_examples=300)
@given(role=ROLES, frames=st.lists(GOOD_FRAMES, max_size=12), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_valid_streams_give_the_same_events_at_the_same_chunk(
    role: ConnectionType, frames: list[tuple[str, object]], cuts: list[int]
) -> None:
    masked = role is ConnectionType.SERVER  # frames from a client are masked
    data = b"".join(_encode(kind, value, masked) for kind, value in frames)
    plain, fast = _warm_pair(role)
    for chunk in _split(data, cuts):
        plain.feed(chunk)
        fast.feed(chunk)
        assert fast.delivered == plain.delivered  # no message later, none earlier, same order
        assert fast.conn.state is plain.conn.state
    if role is ConnectionType.SERVER:
        assert fast.sent == plain.sent  # pongs: byte for byte (servers do not mask)
    else:
        assert len(fast.sent) == len(plain.sent)


@settings(max_examples=400)
@given(
    role=ROLES,
    before=st.lists(GOOD_FRAMES, max_size=5),
    bad=BAD_FRAMES,
    after=st.lists(GOOD_FRAMES, max_size=4),
    cuts=st.lists(st.integers(0, 20_000), max_size=8),
)
def test_anything_unusual_ends_the_same_way(
    role: ConnectionType,
    before: list[tuple[str, object]],
    bad: tuple[str, bytes],
    after: list[tuple[str, object]],
    cuts: list[int],
) -> None:
    """Protocol errors, closes, oversized frames: wsproto decides, so the outcome is its own."""
    masked = role is ConnectionType.SERVER
    frames = [*before, bad, *after]
    data = b"".join(_encode(kind, value, masked) for kind, value in frames)
    plain, fast = _warm_pair(role)
    for chunk in _split(data, cuts):
        plain.feed(chunk)
        fast.feed(chunk)
    assert fast.delivered == plain.delivered
    assert fast.conn.state is plain.conn.state
    if role is ConnectionType.SERVER:
        assert fast.sent == plain.sent


@pytest.mark.parametrize("role", [ConnectionType.SERVER, ConnectionType.CLIENT])
def test_frames_behind_the_handshake_are_not_lost(role: ConnectionType) -> None:
    """Frames in the same read as the handshake sit in wsproto: the fast path waits for them."""
    masked = role is ConnectionType.SERVER
    first = _frame(0x1, b'{"event":"connected"}', masked=masked)
    half = _frame(0x1, b'{"event":"start"}', masked=masked)
    plain, fast = _pair(role, trailing=first + half[:5])
    for reader in (plain, fast):
        reader.drain()
        reader.feed(half[5:] + _frame(0x1, b"third", masked=masked))
    assert fast.delivered == plain.delivered
    assert [d for d in fast.delivered if isinstance(d, tuple)] == [
        ("TextMessage", '{"event":"connected"}'),
        ("TextMessage", '{"event":"start"}'),
        ("TextMessage", "third"),
    ]


def test_simple_text_frames_never_reach_wsproto_and_control_frames_do() -> None:
    """The fast path is really taken (else this module would only cost time)."""
    ws = _open(ConnectionType.SERVER)
    fed: list[bytes] = []
    original = ws.receive_data

    def spy(data: bytes | None) -> None:
        fed.append(b"" if data is None else data)
        original(data)

    ws.receive_data = spy  # type: ignore[method-assign]
    reader = Reader(FastFraming(ws, max_message_bytes=LIMIT))
    ping = _frame(0x9, b"p", masked=True)
    reader.feed(_frame(0x1, b"zero", masked=True))  # the first read after the handshake: wsproto's
    fed.clear()
    reader.feed(_frame(0x1, b"one", masked=True) + _frame(0x1, b"two" * 100, masked=True))
    assert fed == []
    reader.feed(ping + _frame(0x1, b"three", masked=True))
    assert fed[0] == ping  # the ping, whole; "three" went to wsproto too, behind it, to keep the order
    assert reader.delivered[:3] == [("TextMessage", "zero"), ("TextMessage", "one"), ("TextMessage", "two" * 100)]
    assert reader.delivered[4] == ("TextMessage", "three")
    fed.clear()
    reader.feed(_frame(0x1, b"four", masked=True))
    assert fed == []  # and back on the fast path after it
    assert reader.delivered[-1] == ("TextMessage", "four")


def test_a_fragmented_message_hands_the_stream_to_wsproto_for_good() -> None:
    ws = _open(ConnectionType.SERVER)
    fast = FastFraming(ws, max_message_bytes=LIMIT)
    reader = Reader(fast)
    reader.feed(_frame(0x1, b"zero", masked=True))
    reader.feed(_frame(0x1, b"ab", masked=True, fin=False) + _frame(0x0, b"cd", masked=True))
    reader.feed(_frame(0x1, b"ef", masked=True))
    assert reader.delivered == [("TextMessage", "zero"), ("TextMessage", "abcd"), ("TextMessage", "ef")]
    assert fast._given_up


def test_the_wsproto_layout_the_fast_path_relies_on_is_still_there() -> None:
    """wsproto is pinned; if an upgrade moved its internals, FastFraming would silently stay slow."""
    ws = _open(ConnectionType.SERVER)
    assert wsframing._at_frame_boundary(ws)
    frame = _frame(0x1, b"hello", masked=True)
    ws.receive_data(frame[:4])
    list(ws.events())
    assert not wsframing._at_frame_boundary(ws)  # half a frame buffered
    ws.receive_data(frame[4:])
    assert [e.data for e in ws.events() if isinstance(e, TextMessage)] == ["hello"]
    assert wsframing._at_frame_boundary(ws)
    ws.receive_data(_frame(0x1, b"part", masked=True, fin=False))
    list(ws.events())
    assert not wsframing._at_frame_boundary(ws)  # a message in progress


@pytest.mark.parametrize("role", [ConnectionType.SERVER, ConnectionType.CLIENT])
@pytest.mark.parametrize("size", [0, 1, 125, 126, 380, 65535, 65536, 70000])
def test_sent_text_frames_read_back_as_wsproto_reads_them(role: ConnectionType, size: int) -> None:
    text = ("é" * size)[: size // 2] + "x" * (size - size // 2 * 2)  # multi-byte characters too
    fast = FastFraming(_open(role), max_message_bytes=LIMIT)
    wire = fast.send(TextMessage(data=text))
    peer_role = ConnectionType.CLIENT if role is ConnectionType.SERVER else ConnectionType.SERVER
    peer = Reader(_open(peer_role))
    peer.feed(wire)
    assert [d for d in peer.delivered if isinstance(d, tuple)] == [("TextMessage", text)]
    if role is ConnectionType.SERVER:
        assert wire == _open(role).send(TextMessage(data=text))  # byte for byte


def test_client_frames_get_a_fresh_mask_each_time() -> None:
    fast = FastFraming(_open(ConnectionType.CLIENT), max_message_bytes=LIMIT)
    keys = {fast.send(TextMessage(data="same"))[2:6] for _ in range(2000)}
    assert len(keys) > 1990  # 32-bit random keys: a repeat in 2000 is rare, many repeats never


def test_other_events_and_fragments_are_framed_by_wsproto() -> None:
    fast = FastFraming(_open(ConnectionType.SERVER), max_message_bytes=LIMIT)
    plain = _open(ConnectionType.SERVER)
    for event in (BytesMessage(data=b"\x00\x01"), Ping(payload=b"k"), TextMessage(data="a", message_finished=False)):
        assert fast.send(event) == plain.send(event)
    # once a message is sent in parts, wsproto frames every message (continuation opcodes)
    assert fast.send(TextMessage(data="b")) == plain.send(TextMessage(data="b"))
    assert fast.send(CloseConnection(code=1000)) == plain.send(CloseConnection(code=1000))
    assert fast.state is ConnectionState.LOCAL_CLOSING


@given(st.binary(max_size=600), st.binary(min_size=4, max_size=4))
def test_unmask_is_wsprotos_xor(payload: bytes, key: bytes) -> None:
    assert unmask(payload, key) == bytes(XorMaskerSimple(bytearray(key)).process(bytearray(payload)))
    assert unmask(unmask(payload, key), key) == payload


def test_frame_text_lengths() -> None:
    assert frame_text(b"ab", masked=False) == b"\x81\x02ab"
    assert frame_text(b"a" * 126, masked=False)[:4] == b"\x81\x7e\x00\x7e"
    assert frame_text(b"a" * 65536, masked=False)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")
    masked = frame_text(b"ab", masked=True)
    assert masked[:2] == b"\x81\x82" and unmask(masked[6:], masked[2:6]) == b"ab"
