"""The interfaces a call session is driven through: its two sockets and the recorder.

Pure (no trio): the real implementations live with their legs (``agent/connection.py``,
``phone/stream.py``), the tests' in-memory fakes in ``tests/fakes.py``; every one implements
every method, so the session never asks a socket what it can do.
"""

from __future__ import annotations

from typing import Any, Protocol

from bridge.agent import events as ag
from bridge.errors import BridgeError
from bridge.phone import media as tw
from bridge.records import facts


class SocketClosed(BridgeError):
    """Sending on (or pinging) a socket whose peer has gone. The session takes it as the end of
    that socket, not as a failure of the call: the reader sees the close and decides."""


class MessageSocket(Protocol):
    """A WebSocket as the session sees it: one reader task, one writer task, nothing else.

    Library errors never cross this interface: a closed socket is ``None`` from ``receive`` and
    :class:`SocketClosed` from ``send``/``ping``. No method has a deadline of its own; the
    session owns them.
    """

    async def receive(self) -> str | bytes | None:
        """Next message; ``None`` once the socket is closed (``describe_close`` says how)."""

    async def send(self, text: str) -> None:
        """Send one text message; raises :class:`SocketClosed` when the peer is gone."""

    async def ping(self) -> None:
        """Ping and wait for the pong; raises :class:`SocketClosed` when the peer is gone."""

    async def abort(self) -> None:
        """Drop the connection at once, without a close handshake (a peer that stopped reading)."""

    async def aclose(self, code: int = 1000) -> None:
        """Close politely; idempotent. The caller bounds it (``move_on_after``)."""

    def describe_close(self) -> str:
        """How the socket closed, for logs and the call's end reason (``close 1011 reason``)."""


class AudioRecorderPort(Protocol):
    """``RECORD_AUDIO=on``: the call's audio for its stereo WAV (``bridge/records/recording.py``).

    Cost rule: called per frame, so each method only appends what it is given (no decoding, no
    I/O) and must not raise; the session stops recording the audio of a call whose port raised.
    """

    def caller(self, event: tw.Media) -> None:
        """Every Twilio media frame, as parsed."""

    def played(self, frame: str, now: float) -> None:
        """A ``media`` message written to Twilio at ``now``, as sent (agent audio, or silence
        before the first reply); audio dropped before it was written never reaches it."""


class CallRecorderPort(Protocol):
    """Builds the record of one call from what the session sees (``bridge/records/recorder.py``).

    Cost rule: nothing per media frame or audio chunk reaches it (marks come at most every
    250 ms of agent audio, ``AudioWritten`` once per reply). Every method only updates memory
    (no serialisation, no I/O) and must not raise; the session stops recording a call whose
    recorder raised, and the call goes on.
    """

    @property
    def audio(self) -> AudioRecorderPort | None:
        """The call's audio recorder, or None (``RECORD_AUDIO=off``: no per-frame work)."""

    def phone(self, event: tw.TwilioEvent, now: float) -> None:
        """Every parsed Twilio event except ``Media``."""

    def agent(self, event: ag.AgentEvent, now: float) -> None:
        """Every parsed agent event except ``ReplyAudio``."""

    def fact(self, fact: facts.Fact) -> None:
        """A fact only the call core knows (marks heard or flushed, clears, tools, upstream time)."""

    def snapshot(self, now: float) -> dict[str, Any]:
        """The record so far (``records/record.py``'s ``build``): a fresh session after a refused
        resume is told the conversation as the caller heard it from here. Rare: not per frame."""

    def finish(self, now: float) -> None:
        """The call is over (after ``CallEnded``): hand the record to the store's bounded queue."""
