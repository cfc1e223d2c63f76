"""In-memory sockets and scripted peers for session tests (deterministic, no network)."""

from __future__ import annotations

import base64
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
import trio

from bridge.call.ports import SocketClosed

STREAM_SID = "MZ" + "5d3c0f9a2b7e4c1d8f6a0b3e9c2d7f41"
CALL_SID = "CA" + "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d"
ACCOUNT_SID = "AC" + "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


class MemorySocket:
    """The bridge's end of an in-memory WebSocket: the whole socket port
    (``bridge.call.ports.MessageSocket``). Pings are answered at once unless ``answer_pings``
    is cleared (a peer that stopped answering); ``abort`` cuts it like a dropped TCP stream."""

    def __init__(self, incoming: trio.MemoryReceiveChannel[str | bytes], outgoing: trio.MemorySendChannel[str]):
        self._incoming = incoming
        self._outgoing = outgoing
        self.closed = False
        self.aborted = False
        self.close_code: int | None = None
        self.answer_pings = True
        self.pings = 0

    async def receive(self) -> str | bytes | None:
        try:
            return await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None

    async def send(self, text: str) -> None:
        if self.closed:
            raise SocketClosed("closed")
        try:
            await self._outgoing.send(text)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise SocketClosed("peer gone") from exc

    async def aclose(self, code: int = 1000) -> None:
        if not self.closed:
            self.closed = True
            self.close_code = code
            self._outgoing.close()
            self._incoming.close()

    async def ping(self) -> None:
        if self.closed:
            raise SocketClosed("closed")
        self.pings += 1
        if not self.answer_pings:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        if not self.closed:
            self.aborted = True
            await self.aclose(1006)

    def describe_close(self) -> str:
        return "connection lost" if self.aborted else "closed"


@dataclass
class Peer:
    """The far end of a MemorySocket, driven by a test."""

    to_bridge: trio.MemorySendChannel[str | bytes]
    from_bridge: trio.MemoryReceiveChannel[str]
    received: list[str] = field(default_factory=list)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await self.to_bridge.send(message if isinstance(message, (str, bytes)) else orjson.dumps(message).decode())

    async def receive(self) -> dict[str, Any] | None:
        try:
            text = await self.from_bridge.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None
        self.received.append(text)
        return dict(orjson.loads(text))

    def close(self) -> None:
        self.to_bridge.close()


def socket_pair(buffer: int = 1000) -> tuple[MemorySocket, Peer]:
    to_bridge_send, to_bridge_recv = trio.open_memory_channel[str | bytes](buffer)
    from_bridge_send, from_bridge_recv = trio.open_memory_channel[str](buffer)
    return MemorySocket(to_bridge_recv, from_bridge_send), Peer(to_bridge_send, from_bridge_recv)


def payload(n: int, size: int = 160) -> str:
    """A unique base64 mu-law payload (frame n)."""
    raw = n.to_bytes(4, "big") + bytes([0xFF]) * (size - 4)
    return base64.b64encode(raw).decode()


class TwilioScript:
    """Builds Twilio Media Streams messages with the reference's field types."""

    def __init__(self, stream_sid: str = STREAM_SID, call_sid: str = CALL_SID) -> None:
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self._seq = itertools.count(1)
        self._chunk = itertools.count(1)

    def connected(self) -> dict[str, Any]:
        return {"event": "connected", "protocol": "Call", "version": "1.0.0"}

    def start(self, **custom: str) -> dict[str, Any]:
        return {
            "event": "start",
            "sequenceNumber": str(next(self._seq)),
            "streamSid": self.stream_sid,
            "start": {
                "accountSid": ACCOUNT_SID,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": custom or {"From": "+14155550123", "To": "+14155550100"},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }

    def media(self, data: str) -> dict[str, Any]:
        chunk = next(self._chunk)
        return {
            "event": "media",
            "sequenceNumber": str(next(self._seq)),
            "streamSid": self.stream_sid,
            "media": {"track": "inbound", "chunk": str(chunk), "timestamp": str(chunk * 20), "payload": data},
        }

    def mark(self, name: str) -> dict[str, Any]:
        return {
            "event": "mark",
            "sequenceNumber": str(next(self._seq)),
            "streamSid": self.stream_sid,
            "mark": {"name": name},
        }

    def dtmf(self, digit: str) -> dict[str, Any]:
        return {
            "event": "dtmf",
            "sequenceNumber": str(next(self._seq)),
            "streamSid": self.stream_sid,
            "dtmf": {"track": "inbound_track", "digit": digit},
        }

    def stop(self) -> dict[str, Any]:
        return {
            "event": "stop",
            "sequenceNumber": str(next(self._seq)),
            "streamSid": self.stream_sid,
            "stop": {"accountSid": ACCOUNT_SID, "callSid": self.call_sid},
        }


class AgentConnector:
    """Hands the session in-memory upstream sockets; the test gets the peer ends."""

    def __init__(self) -> None:
        self.peers: list[Peer] = []
        self.sockets: list[MemorySocket] = []
        self.connected = trio.Event()
        self.fail_with: BaseException | None = None

    async def __call__(self, nursery: trio.Nursery) -> MemorySocket:
        if self.fail_with is not None:
            raise self.fail_with
        sock, peer = socket_pair()
        self.sockets.append(sock)
        self.peers.append(peer)
        self.connected.set()
        return sock

    async def peer(self) -> Peer:
        await self.connected.wait()
        return self.peers[-1]


def ev(kind: str, **fields: Any) -> dict[str, Any]:
    """A Voice Agent server event with the float timestamp every event carries."""
    return {"type": kind, "timestamp": 1790210400.12, **fields}


def ready(session_id: str = "sess_" + "a" * 32) -> dict[str, Any]:
    return ev(
        "session.ready",
        session_id=session_id,
        expires_at=1790214000,
        resume_token="rt",
        config={"output": {"voice": "ivy", "format": {"encoding": "audio/pcmu", "sample_rate": 8000}}},
    )


class FakeRecorder:
    """A call recorder (``bridge.call.ports.CallRecorderPort``) that keeps what it is told."""

    def __init__(self, fail_in: str = "") -> None:
        self.phone_events: list[Any] = []
        self.agent_events: list[Any] = []
        self.facts: list[Any] = []
        self.finished: list[float] = []
        self.audio: Any = None  # no RECORD_AUDIO here
        self._fail_in = fail_in  # the method that raises, to test that a recorder bug costs no call

    def _maybe_fail(self, method: str) -> None:
        if method == self._fail_in:
            raise RuntimeError(f"recorder bug in {method}")

    def phone(self, event: Any, now: float) -> None:
        self._maybe_fail("phone")
        self.phone_events.append(event)

    def agent(self, event: Any, now: float) -> None:
        self._maybe_fail("agent")
        self.agent_events.append(event)

    def fact(self, fact: Any) -> None:
        self._maybe_fail("fact")
        self.facts.append(fact)

    def snapshot(self, now: float) -> dict[str, Any]:
        self._maybe_fail("snapshot")
        return {}  # no record: the call core's own history is used

    def finish(self, now: float) -> None:
        self._maybe_fail("finish")
        self.finished.append(now)
