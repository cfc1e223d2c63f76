"""A faithful, standalone fake of the AssemblyAI Voice Agent API WebSocket server.

It speaks the wire protocol of ``/work/shared/reference/voice-agent-api.md`` (§9 is the
checklist): JSON text frames, ``session.update``/``session.resume`` first, strict first-update
validation, ``session.updated`` + ``session.ready``, greeting and reply audio in the session's
output encoding, energy-VAD or scripted user turns, barge-in, client-side tools, resume within
a grace window, and injectable faults (:class:`FaultPlan`).

Used three ways:

- as a library in tests: ``FakeAgent(config)``; ``await nursery.start(agent.serve)`` for a real
  socket, or ``agent.handle_stream(stream)`` on an in-memory stream (works with
  ``autojump_clock``), plus scripted triggers (:meth:`FakeAgent.user_turn`, ...);
- by the offline demo: ``python -m tools.fake_agent``;
- by the load benchmark: ``python -m tools.fake_agent --echo`` (every ``input.audio`` is echoed
  back at once as ``reply.audio`` with the identical base64 string).

Word timings: every reply with audio and a transcript gets one ``transcript.agent.delta`` per
word (``reply_id``, ``item_id``, ``delta``, int ``start_ms``/``end_ms`` in ms against the reply
audio, its leading silence included), sent in one burst before ``transcript.agent``
(``FakeAgentConfig.word_deltas`` moves or disables it). The times are measured, not guessed,
for the tools/audio clips spoken with their own words: make_clips.sh asks libespeak-ng for the
word events of the very synthesis the CLI writes (tools/audio/clip_words.py, words.json). Any
other text or audio gets an estimate: the clip's speech span (after its leading silence) split
across the words in proportion to their length in characters. A barge-in cuts
``transcript.agent`` to the words that end within the reply audio sent so far, by the same times.

Concurrency: one nursery per connection holding one reader, one writer (the only task that
sends on the socket), one speaker (plays replies into the writer's outbox) and short-lived
timers. Nothing outlives :meth:`FakeAgent.serve`; a dead client never crashes the server.
"""

from __future__ import annotations

import argparse
import binascii
import logging
import secrets
import signal
import socket
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import orjson
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.utilities import LocalProtocolError

from tools.fake_agent_audio import (
    PCM,
    SAMPLE_RATE_HZ,
    EnergyVad,
    VadEvent,
    WordTiming,
    duration_ms,
    mean_abs_level,
    proportional_words,
    reply_chunks_b64,
    spoken_words,
)

logger = logging.getLogger("tools.fake_agent")

#: Docs snapshot (mid-2026) of the voice catalogue, reference §6. Default voice ``ivy``.
DOCS_VOICES: frozenset[str] = frozenset(
    {
        "ivy", "james", "tyler", "winter", "bella", "david", "kyle", "helen", "martha",
        "river", "emma", "victor", "eleanor",
        "arjun", "dmitri", "pierre", "giulia", "luca", "lucia", "mateo", "diego",
    }
)  # fmt: skip
AUDIO_DIR = Path(__file__).resolve().parent / "audio"
WS_PATHS = ("/v1/ws", "/v1/realtime")
DEFAULT_CALLER_TEXT = "Hi, can you pick a random number between one and ten?"
DEFAULT_REPLY_TEXT = "Sure. Your random number is seven."
APOLOGY_TEXT = "Sorry, that is taking longer than expected. Is there anything else I can do?"
#: The answer after a tool result: tools/audio/number_<n>.ulaw says "... is <word>." for
#: n in 1..10 (what generate_random_number returns in the demo); anything else gets FOUND_TEXT.
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMBER_TEXT = "Sure. Your random number is {word}."
FOUND_TEXT = "Here is what I found."

# A client gets this long to finish the HTTP upgrade; mirrors trio-websocket's default.
_CONNECT_TIMEOUT_S = 60.0
# A client that stopped reading never answers our close frame; don't wait on it forever.
_CLOSE_HANDSHAKE_S = 2.0
# Outbox bound: 256 frames is ~9.6 s of 37.5 ms agent chunks, enough to never block a paced
# reply, small enough that a client that stops reading holds bounded memory.
_OUTBOX_HIGH_WATER_FRAMES = 256

_TOP_KEYS = frozenset({"agent_id", "system_prompt", "greeting", "tools", "llm", "input", "output"})
_INPUT_KEYS = frozenset(
    {
        "type", "format", "keyterms", "transcription_mode", "transcription_prompt",
        "language_codes", "voice_focus", "voice_focus_threshold", "turn_detection",
    }
)  # fmt: skip
_OUTPUT_KEYS = frozenset({"type", "voice", "format", "volume"})
_FORMAT_KEYS = frozenset({"encoding", "sample_rate"})
_TURN_KEYS = frozenset(
    {
        "vad_threshold", "min_silence", "max_silence", "interrupt_response",
        "interruption_delay", "type", "uninterruptible_turns",
    }
)  # fmt: skip


@dataclass
class FaultPlan:
    """Faults to inject. After-ready faults fire on a session's first connection only."""

    reject_first_n: int = 0  # first N connections: upgrade, session.error{reject_code}, 1008
    reject_code: str = "at_capacity"
    unauthorized: bool = False  # every connection: session.error{unauthorized}, 1008
    never_ready: bool = False  # read session.update, never answer
    close_1011_after_s: float | None = None  # after ready: close 1011, no session.ended
    drop_tcp_after_s: float | None = None  # after ready: reset TCP, no close frame
    stop_reading: bool = False  # after ready: stop reading the socket (client backpressure)
    stop_reading_s: float | None = None  # how long to stop; None = until the socket ends
    garbage_after_ready: bool = False  # non-JSON, binary, typeless error, unknown types
    tool_args_key: str = "arguments"  # "args" emits the legacy key
    session_cap_s: float | None = None  # session_expired, session.ended, close 1008
    # Every session.resume: session_not_found + close 1008, even within the grace window (as an
    # operator saw live, reference §8b). The session itself is left as it was.
    refuse_resume: bool = False


@dataclass
class FakeAgentConfig:
    """How the fake behaves. Defaults match the live service as observed (reference §5, §9)."""

    api_key: str | None = None  # None accepts any key; else Bearer, raw key or ?token=
    voices: frozenset[str] = DOCS_VOICES
    default_voice: str = "ivy"
    speed: float | None = None  # None: no pacing; 1.0: real time; 10.0: ten times faster
    chunk_bytes: int = 300  # G.711 output chunk: 37.5 ms, as observed live
    pcm_chunk_bytes: int = 480  # 24 kHz PCM output chunk: 10 ms, as observed live
    leading_silence_ms: int = 200
    greeting_audio: bytes | None = None  # None: tools/audio/greeting.ulaw (8 kHz mu-law)
    reply_audio: bytes | None = None  # None: tools/audio/reply.ulaw
    reply_text: str = DEFAULT_REPLY_TEXT
    mode: Literal["conversation", "echo"] = "conversation"
    echo_barge_in_every_n: int | None = None  # echo: input.speech.started before every Nth echo
    echo_greeting: bool = False  # echo mode skips the greeting unless this is set
    grace_s: float = 30.0
    ready_order: Literal["ready", "updated_then_ready"] = "updated_then_ready"
    ready_delay_s: float = 0.0  # session.update -> session.ready latency (audio in it is counted)
    vad: bool = True
    vad_level: float = 300.0  # mean |sample| (16-bit) that counts as speech at vad_threshold 0.5
    vad_onset_ms: float = 100.0
    vad_hangover_ms: float = 500.0  # overridden by turn_detection.min_silence
    vad_transcript: str = DEFAULT_CALLER_TEXT  # what the fake "hears" in a VAD-detected turn
    turn_transcripts: dict[int, str] = field(default_factory=dict)  # user turn N (1-based): instead of that
    tool_on_turn: dict[int, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    tool_timeout_s: float = 120.0  # overridden by a tool's timeout_seconds
    tool_preamble_s: float = 0.0  # time between tool.call and the pre-amble's reply.done
    # Tool name -> (pre-amble clip, answer clip) in tools/audio: the reply carrying the tool.call
    # speaks the first (e.g. asking for digits), the answer after its result the second.
    tool_clips: dict[str, tuple[str, str]] = field(default_factory=dict)
    # reply.create{instructions}: the first key found in the instructions (in insertion order)
    # picks the reply's clip, tools/audio/<value>.ulaw, and its words (words.json) as the text.
    # No match: the text is the instructions themselves, over the reply clip.
    instruction_clips: dict[str, str] = field(default_factory=dict)
    agent_ids: frozenset[str] = frozenset()  # stored agents that exist
    record_audio: bool = True  # keep input_audio/audio_sent (turn off for long benchmarks)
    # transcript.agent.delta, one per word of every reply with audio and a transcript (see
    # "Word timings" in the module docstring): "after_audio" = the burst after the last audio
    # chunk, right before transcript.agent (reference §3 turn order); "first_audio" = the burst
    # right after the first chunk (so interrupted replies have them too); "off" = none.
    word_deltas: Literal["after_audio", "first_audio", "off"] = "after_audio"
    delta_leading_space: bool = False  # True: every word but the first is sent as " word"
    # start_ms/end_ms against the reply audio as sent (leading silence included), or against
    # the clip (0 = the clip's first sample, as if the service did not count its silence).
    word_times_from: Literal["reply_audio", "clip"] = "reply_audio"
    faults: FaultPlan = field(default_factory=FaultPlan)


@dataclass(eq=False)
class FakeSession:
    """One Voice Agent session as the fake sees it; survives a drop until resumed or expired."""

    session_id: str
    config: dict[str, Any]
    resume_token: str
    expires_at: int
    started_at: float  # trio clock
    received: list[dict[str, Any]] = field(default_factory=list)
    input_audio: list[str] = field(default_factory=list)
    audio_before_ready: int = 0
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    replies_sent: list[str] = field(default_factory=list)
    audio_sent: list[str] = field(default_factory=list)
    ended: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event = field(default_factory=trio.Event)  # replaced on resume
    errors_sent: list[str] = field(default_factory=list)
    user_turns: int = 0
    was_ready: bool = False
    dead: bool = False  # ended or expired: resume gives session_not_found
    dropped_at: float | None = None
    pending_calls: dict[str, _PendingCall] = field(default_factory=dict)
    conn: _Connection | None = field(default=None, repr=False)


@dataclass(slots=True)
class _PendingCall:
    name: str
    arguments: dict[str, Any]
    timeout_s: float
    answer_audio: bytes | None
    preamble_done: bool = False
    result: str | None = None


@dataclass(slots=True)
class _ReplyJob:
    text: str
    audio: bytes | None  # None: silent
    show_transcript: bool = True
    call: tuple[str, str, dict[str, Any]] | None = None  # (call_id, name, arguments)


@dataclass(slots=True)
class _Playing:
    reply_id: str
    item_id: str
    text: str
    total_chunks: int
    call_id: str | None
    words: tuple[WordTiming, ...] = ()  # against the reply audio (leading silence included)
    chunk_ms: float = 0.0
    chunks_sent: int = 0
    interrupted: bool = False
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass(slots=True)
class _Frame:
    payload: str | bytes
    reply_id: str | None = None
    audio: str | None = None  # the reply.audio data, for FakeSession.audio_sent


@dataclass(slots=True)
class _Close:
    code: int


class _Outbox:
    """FIFO between state-machine code (sync producers) and the connection's writer task."""

    def __init__(self, high_water_frames: int) -> None:
        self._items: deque[_Frame | _Close] = deque()
        self._high_water = high_water_frames
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._room_lot = trio.lowlevel.ParkingLot()
        self.closing = False

    def put(self, item: _Frame) -> None:
        """Queue a frame; frames queued after a close are dropped."""
        if not self.closing:
            self._items.append(item)
            self._writer_lot.unpark_all()

    def put_close(self, code: int) -> None:
        """Queue the close frame; it is the last item the writer handles."""
        if not self.closing:
            self.closing = True
            self._items.append(_Close(code))
            self._writer_lot.unpark_all()

    def purge_audio(self, reply_id: str) -> None:
        """Drop queued, unsent ``reply.audio`` frames of `reply_id` (barge-in)."""
        self._items = deque(
            i for i in self._items if not (isinstance(i, _Frame) and i.reply_id == reply_id)
        )

    async def get(self) -> _Frame | _Close:
        """Next item, waiting if empty. Cancellation loses nothing."""
        while not self._items:
            await self._writer_lot.park()
        item = self._items.popleft()
        if len(self._items) < self._high_water:
            self._room_lot.unpark_all()
        return item

    async def wait_room(self) -> None:
        """Checkpoint, then wait while the outbox is at its high-water mark."""
        await trio.lowlevel.checkpoint()
        while len(self._items) >= self._high_water:
            await self._room_lot.park()


def tool_answer(result: str) -> tuple[str, str]:
    """What the fake says after a ``tool.result``: ``(text, clip name in tools/audio)``.

    `result` is the JSON string the client sent. ``{"result": n, ...}`` (or a bare ``n``) with
    an int n in 1..10 gives the clip that says that number; anything else (an error, another
    shape, not JSON) gives the generic "Here is what I found." Pure.
    """
    try:
        value = orjson.loads(result)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        value = value.get("result")
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= len(NUMBER_WORDS):
        return NUMBER_TEXT.format(word=NUMBER_WORDS[value - 1]), f"number_{value}"
    return FOUND_TEXT, "found"


@lru_cache(maxsize=1)
def _measured_clips() -> dict[bytes, tuple[str, tuple[WordTiming, ...]]]:
    """tools/audio clips by content -> (their text, their measured word timings), from
    words.json (made by make_clips.sh). Read once per process; immutable afterwards."""
    table = orjson.loads((AUDIO_DIR / "words.json").read_bytes())
    return {
        (AUDIO_DIR / f"{name}.ulaw").read_bytes(): (
            entry["text"],
            tuple(WordTiming(w, start, end) for w, start, end in entry["words"]),
        )
        for name, entry in table.items()
    }


def word_timings(text: str, ulaw: bytes) -> tuple[WordTiming, ...]:
    """The words of `text` and when `ulaw` speaks them, in ms from the clip's first sample.

    A tools/audio clip spoken with its own words has measured timings (espeak-ng's word
    events); any other text or audio gets :func:`~tools.fake_agent_audio.proportional_words`.
    """
    measured = _measured_clips().get(ulaw)
    if measured is not None and measured[0].split() == text.split():
        return measured[1]
    return proportional_words(text, ulaw)


def _new_id(prefix: str, nbytes: int = 16) -> str:
    return prefix + secrets.token_hex(nbytes)


def _event_json(type_: str, fields: dict[str, Any]) -> str:
    return orjson.dumps({"type": type_, **fields, "timestamp": time.time()}).decode()


def _audio_json(reply_id: str, data: str) -> str:
    # Built around the payload, not re-encoded: the hot path of echo mode and of playback.
    return (
        '{"type":"reply.audio","reply_id":"'
        + reply_id
        + '","data":"'
        + data
        + '","timestamp":'
        + repr(time.time())
        + "}"
    )


# --- first-update validation (pure) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Problem:
    code: str
    message: str
    param: str | None = None


def _check_format(side: str, fmt: Any) -> _Problem | None:
    if not isinstance(fmt, dict):
        return _Problem("invalid_format", f"{side}.format must be an object", f"{side}.format")
    for key in fmt.keys() - _FORMAT_KEYS:
        param = f"{side}.format.{key}"
        return _Problem("invalid_format", f"Unknown field {param}", param)
    encoding = fmt.get("encoding", PCM)
    if encoding not in SAMPLE_RATE_HZ:
        return _Problem(
            "invalid_value",
            f"Unsupported encoding {encoding!r}; use one of {', '.join(sorted(SAMPLE_RATE_HZ))}",
            f"{side}.format.encoding",
        )
    rate = fmt.get("sample_rate")
    if rate is not None and rate != SAMPLE_RATE_HZ[encoding]:
        return _Problem(
            "invalid_value",
            f"{encoding} requires sample_rate {SAMPLE_RATE_HZ[encoding]}",
            f"{side}.format.sample_rate",
        )
    return None


def _check_block(side: str, block: Any, allowed: frozenset[str]) -> _Problem | None:
    if not isinstance(block, dict):
        return _Problem("invalid_format", f"{side} must be an object", side)
    for key in block.keys() - allowed:
        return _Problem("invalid_format", f"Unknown field {side}.{key}", f"{side}.{key}")
    if "format" in block and (problem := _check_format(side, block["format"])):
        return problem
    turn = block.get("turn_detection")
    if turn is not None:
        if not isinstance(turn, dict):
            param = "input.turn_detection"
            return _Problem("invalid_format", f"{param} must be an object", param)
        for key in turn.keys() - _TURN_KEYS:
            param = f"input.turn_detection.{key}"
            return _Problem("invalid_format", f"Unknown field {param}", param)
        if not isinstance(turn.get("interrupt_response", True), bool):
            param = "input.turn_detection.interrupt_response"
            return _Problem("invalid_format", "interrupt_response must be a boolean", param)
    volume = block.get("volume")
    if volume is not None and (not isinstance(volume, int | float) or not 0 <= volume <= 100):
        return _Problem("invalid_value", "volume must be between 0 and 100", "output.volume")
    return None


def _check_tools(tools: Any) -> _Problem | None:
    if not isinstance(tools, list):
        return _Problem("invalid_format", "tools must be an array", "tools")
    for i, tool in enumerate(tools):
        ok = isinstance(tool, dict) and tool.get("type") == "function"
        if not ok or not isinstance(tool.get("name"), str):
            message = f"tools[{i}] needs type 'function' and a name"
            return _Problem("invalid_format", message, "tools")
    return None


def validate_session(session: Any, *, first: bool, voices: frozenset[str]) -> _Problem | None:
    """Check a ``session.update`` payload; None if acceptable. Pure (reference §4, §9.3)."""
    if not isinstance(session, dict):
        return _Problem("invalid_format", "session must be an object", "session")
    for key in session.keys() - _TOP_KEYS:
        return _Problem("invalid_format", f"Unknown field {key}", key)
    if "llm" in session:
        return _Problem("invalid_value", "llm can only be configured on stored agents", "llm")
    if "agent_id" in session:
        if not first:
            message = "agent_id is only allowed in the first update"
            return _Problem("agent_id_not_first", message, "agent_id")
        if len(session) > 1:
            msg = "agent_id and inline session configuration are mutually exclusive"
            return _Problem("invalid_value", msg, "agent_id")
    for key in ("greeting", "system_prompt"):
        if key in session and not isinstance(session[key], str):
            return _Problem("invalid_format", f"{key} must be a string", key)
    if "tools" in session and (problem := _check_tools(session["tools"])):
        return problem
    for side, allowed in (("input", _INPUT_KEYS), ("output", _OUTPUT_KEYS)):
        if side in session and (problem := _check_block(side, session[side], allowed)):
            return problem
    voice = session.get("output", {}).get("voice")
    if first and voice is not None and voice not in voices:
        msg = f"Invalid voice {voice!r}. Valid voices: {', '.join(sorted(voices))}"
        return _Problem("invalid_value", msg, "output.voice")
    return None


def _resolved_format(fmt: dict[str, Any] | None) -> dict[str, Any]:
    encoding = (fmt or {}).get("encoding", PCM)
    return {"encoding": encoding, "sample_rate": SAMPLE_RATE_HZ[encoding]}


def resolve_config(session: dict[str, Any], default_voice: str) -> dict[str, Any]:
    """The full config ``session.ready`` echoes: defaults filled, ``sample_rate`` explicit."""
    inp = dict(session.get("input", {}))
    out = dict(session.get("output", {}))
    config: dict[str, Any] = {}
    for key in ("agent_id", "system_prompt", "greeting"):
        if key in session:
            config[key] = session[key]
    config["input"] = {
        **inp,
        "type": "audio",
        "format": _resolved_format(inp.get("format")),
        "transcription_mode": inp.get("transcription_mode", "balanced"),
        "turn_detection": {
            "vad_threshold": 0.5,
            "interrupt_response": True,
            **inp.get("turn_detection", {}),
        },
    }
    config["output"] = {
        **out,
        "type": "audio",
        "voice": out.get("voice", default_voice),
        "format": _resolved_format(out.get("format")),
    }
    config["tools"] = list(session.get("tools", []))
    return config


def immutable_changes(session: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Params of immutable fields a later update tries to change (reference §4)."""
    changed = []
    if "greeting" in session and session["greeting"] != config.get("greeting"):
        changed.append("greeting")
    out = session.get("output", {})
    if "voice" in out and out["voice"] != config["output"]["voice"]:
        changed.append("output.voice")
    if "format" in out and _resolved_format(out["format"]) != config["output"]["format"]:
        changed.append("output.format")
    return changed


def apply_mutable(session: dict[str, Any], config: dict[str, Any]) -> None:
    """Apply the mutable part of a later update to `config` in place; `tools` replaces."""
    if "system_prompt" in session:
        config["system_prompt"] = session["system_prompt"]
    if "tools" in session:
        config["tools"] = list(session["tools"])
    inp = session.get("input", {})
    for key, value in inp.items():
        if key == "turn_detection":
            config["input"]["turn_detection"].update(value)
        elif key == "format":
            config["input"]["format"] = _resolved_format(value)
        elif key != "type":
            config["input"][key] = value
    if "volume" in session.get("output", {}):
        config["output"]["volume"] = session["output"]["volume"]


# --- one connection -------------------------------------------------------------------------


_Headers = list[tuple[bytes, bytes]]
_Query = dict[str, list[str]]


class _Connection:
    """State and tasks of one client socket. State changes are synchronous; only the writer
    task awaits the socket, so an event burst is never split by another task's frame."""

    def __init__(self, agent: FakeAgent, ws: WebSocketConnection, stream: trio.abc.Stream) -> None:
        self.agent = agent
        self.cfg = agent.config
        self.ws = ws
        self.stream = stream
        self.outbox = _Outbox(_OUTBOX_HIGH_WATER_FRAMES)
        self.session: FakeSession | None = None
        self.ready = False
        self.resumed = False
        self.nursery: trio.Nursery | None = None
        self.jobs: deque[_ReplyJob] = deque()
        self._jobs_lot = trio.lowlevel.ParkingLot()
        self.playing: _Playing | None = None
        self.user_speaking = False
        self.vad = EnergyVad(self.cfg.vad_level, self.cfg.vad_onset_ms, self.cfg.vad_hangover_ms)
        self.echo_reply_id: str | None = None
        self.echo_frames = 0
        self.pause_reading = False

    # -- tasks --

    async def run(self, index: int, headers: _Headers, query: _Query) -> None:
        """Serve the socket until it closes. Cancellation stops every task of this connection;
        the caller closes the stream."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._speaker)
                self._admit(index, headers, query)
                await self._reader()
        finally:
            self._detach()

    async def _reader(self) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                if not self.outbox.closing:
                    self._cancel()
                # else: the writer is finishing our close handshake and ends the connection.
                return
            self._on_message(message)
            if self.cfg.mode == "echo":
                # Backpressure: a client that stops reading stops being read.
                await self.outbox.wait_room()
            if self.pause_reading:
                self.pause_reading = False
                await self._stop_reading()

    async def _stop_reading(self) -> None:
        # trio-websocket buffers one message, so not calling get_message() stalls TCP.
        stop_s = self.cfg.faults.stop_reading_s
        if stop_s is None:
            # trio-websocket exposes no close event; polling is the only way to notice.
            while self.ws.closed is None:  # noqa: ASYNC110
                await trio.sleep(0.05)
        else:
            await trio.sleep(stop_s)

    async def _writer(self) -> None:
        while True:
            item = await self.outbox.get()
            if isinstance(item, _Close):
                with trio.move_on_after(_CLOSE_HANDSHAKE_S):
                    await self.ws.aclose(item.code)
                self._cancel()
                return
            try:
                await self.ws.send_message(item.payload)
            except ConnectionClosed:
                self._cancel()
                return
            if item.audio is not None and self.session is not None and self.cfg.record_audio:
                self.session.audio_sent.append(item.audio)

    async def _speaker(self) -> None:
        while True:
            while not self.jobs:
                await self._jobs_lot.park()
            await self._play(self.jobs.popleft())

    async def _play(self, job: _ReplyJob) -> None:
        session = self._session()
        encoding = session.config["output"]["format"]["encoding"]
        chunks: tuple[str, ...] = ()
        chunk_s = 0.0
        words: tuple[WordTiming, ...] = ()
        if job.audio is not None:
            chunk_bytes = self.cfg.pcm_chunk_bytes if encoding == PCM else self.cfg.chunk_bytes
            chunks = reply_chunks_b64(job.audio, encoding, chunk_bytes, self.cfg.leading_silence_ms)
            chunk_s = duration_ms(chunk_bytes, encoding) / 1000.0
            if job.show_transcript:
                silence_ms = self.cfg.leading_silence_ms
                words = tuple(w.shifted(silence_ms) for w in word_timings(job.text, job.audio))
        call_id = job.call[0] if job.call else None
        reply_id, item_id = _new_id("resp_", 12), _new_id("item_", 12)
        playing = _Playing(reply_id, item_id, job.text, len(chunks), call_id, words, chunk_s * 1000)
        self.playing = playing
        session.replies_sent.append(playing.reply_id)
        self._emit("reply.started", reply_id=playing.reply_id, item_id=playing.item_id)
        if job.call:
            self._emit_tool_call(*job.call)
        with playing.scope:
            start = trio.current_time()
            for i, data in enumerate(chunks):
                if self.cfg.speed:
                    await trio.sleep_until(start + i * chunk_s / self.cfg.speed)
                else:
                    await self.outbox.wait_room()
                playing.chunks_sent += 1
                self.outbox.put(_Frame(_audio_json(playing.reply_id, data), playing.reply_id, data))
                if i == 0 and self.cfg.word_deltas == "first_audio":
                    self._emit_word_deltas(playing)
            if job.call and self.cfg.tool_preamble_s:
                await trio.sleep(self.cfg.tool_preamble_s)
        if self.playing is playing:
            self.playing = None
        if playing.interrupted:
            return
        if self.cfg.word_deltas == "after_audio":
            self._emit_word_deltas(playing)
        if job.show_transcript:
            self._emit(
                "transcript.agent",
                reply_id=playing.reply_id,
                item_id=playing.item_id,
                text=job.text,
                interrupted=False,
            )
        self._emit("reply.done", reply_id=playing.reply_id, status="completed")
        if call_id is not None:
            self._preamble_done(call_id)

    def _emit_word_deltas(self, playing: _Playing) -> None:
        # One burst, as live (reference §3): the writer sends queued frames back to back.
        offset_ms = self.cfg.leading_silence_ms if self.cfg.word_times_from == "clip" else 0
        for i, word in enumerate(playing.words):
            self._emit(
                "transcript.agent.delta",
                reply_id=playing.reply_id,
                item_id=playing.item_id,
                delta=" " + word.word if self.cfg.delta_leading_space and i else word.word,
                start_ms=word.start_ms - offset_ms,
                end_ms=word.end_ms - offset_ms,
            )

    async def _after_ready_fault(self, delay_s: float, action: str) -> None:
        await trio.sleep(delay_s)
        if action == "close_1011":
            self.outbox.put_close(1011)
        elif action == "drop_tcp":
            await self._drop_tcp()
        elif action == "session_cap":
            self._expire()

    async def _drop_tcp(self) -> None:
        sock = getattr(self.stream, "socket", None)
        if sock is not None:
            # SO_LINGER 0 makes close() send RST: the client sees a reset, not a FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.outbox.closing = True
        with trio.CancelScope(shield=True):
            await self.stream.aclose()
        self._cancel()

    async def _ready_later(self) -> None:
        await trio.sleep(self.cfg.ready_delay_s)
        self._become_ready()

    async def _tool_timeout(self, call_id: str, timeout_s: float) -> None:
        await trio.sleep(timeout_s)
        session = self._session()
        pending = session.pending_calls.get(call_id)
        if pending is not None and pending.result is None:
            del session.pending_calls[call_id]
            self._queue(_ReplyJob(APOLOGY_TEXT, self.agent.reply_audio))

    # -- helpers --

    def _session(self) -> FakeSession:
        assert self.session is not None
        return self.session

    def _cancel(self) -> None:
        self.outbox.closing = True
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def _detach(self) -> None:
        session = self.session
        if session is not None and session.conn is self:
            session.conn = None
            session.closed.set()
            if not session.dead:
                session.dropped_at = trio.current_time()

    def _emit(self, type_: str, **fields: Any) -> None:
        self.outbox.put(_Frame(_event_json(type_, fields)))

    def _error(self, code: str, message: str, param: str | None = None) -> None:
        fields: dict[str, Any] = {"code": code, "message": message}
        if param is not None:
            fields["param"] = param
        if self.session is not None:
            fields["session_id"] = self.session.session_id
            self.session.errors_sent.append(code)
        self.agent.errors_sent.append(code)
        self._emit("session.error", **fields)

    def _fatal(self, code: str, message: str, param: str | None = None) -> None:
        self._error(code, message, param)
        self.outbox.put_close(1008)

    def _queue(self, job: _ReplyJob) -> None:
        self.jobs.append(job)
        self._jobs_lot.unpark_all()

    def _interrupt_allowed(self) -> bool:
        turn = self._session().config["input"]["turn_detection"]
        return turn.get("interrupt_response", True) is not False

    # -- admission, first frame, ready --

    def _admit(self, index: int, headers: _Headers, query: _Query) -> None:
        faults = self.cfg.faults
        if index <= faults.reject_first_n:
            self._fatal(faults.reject_code, "The service is at capacity, retry with backoff")
        elif faults.unauthorized or not self._authorized(headers, query):
            self._fatal("unauthorized", "Invalid or missing API key")

    def _authorized(self, headers: _Headers, query: _Query) -> bool:
        if self.cfg.api_key is None:
            return True
        offered = set(query.get("token", []))
        for name, value in headers:
            if name.lower() == b"authorization":
                text = value.decode("latin-1").strip()
                offered.add(text)
                if text[:7].lower() == "bearer ":
                    offered.add(text[7:].strip())
        valid = {self.cfg.api_key} | {s.resume_token for s in self.agent.sessions.values()}
        return bool(offered & valid)

    def _on_first(self, event: dict[str, Any]) -> None:
        if event["type"] == "session.update":
            self._on_first_update(event)
        elif event["type"] == "session.resume":
            self._on_resume(event)
        else:
            message = "The first message must be session.update or session.resume"
            self._fatal("invalid_format", message, "type")

    def _on_first_update(self, event: dict[str, Any]) -> None:
        extra = event.keys() - {"type", "session"}
        if extra:
            self._fatal("invalid_format", f"Unknown field {sorted(extra)[0]}", sorted(extra)[0])
            return
        payload = event.get("session", {})
        problem = validate_session(payload, first=True, voices=self.cfg.voices)
        if problem is not None:
            self._fatal(problem.code, problem.message, problem.param)
            return
        if "agent_id" in payload and payload["agent_id"] not in self.cfg.agent_ids:
            self._fatal("agent_not_found", f"Agent {payload['agent_id']!r} not found", "agent_id")
            return
        session = FakeSession(
            session_id=_new_id("sess_"),
            config=resolve_config(payload, self.cfg.default_voice),
            resume_token=secrets.token_urlsafe(24),
            expires_at=int(time.time()) + 3600,
            started_at=trio.current_time(),
        )
        session.received.append(event)
        session.conn = self
        self.session = session
        self.agent.sessions[session.session_id] = session
        self.agent.system_prompts.append(payload.get("system_prompt"))
        if self.cfg.faults.never_ready:
            return
        if self.cfg.ready_delay_s > 0:
            assert self.nursery is not None
            self.nursery.start_soon(self._ready_later)
        else:
            self._become_ready()

    def _on_resume(self, event: dict[str, Any]) -> None:
        session_id = event.get("session_id")
        if not isinstance(session_id, str):
            self._fatal("invalid_format", "session.resume requires session_id", "session_id")
            return
        if self.cfg.faults.refuse_resume:
            self._fatal("session_not_found", f"Session {session_id!r} not found or expired", "session_id")
            return
        session = self.agent.sessions.get(session_id)
        now = trio.current_time()
        dropped_at = session.dropped_at if session is not None else None
        if session is not None and dropped_at is not None and now - dropped_at > self.cfg.grace_s:
            session.dead = True
        if session is None or session.dead or not session.was_ready:
            message = f"Session {session_id!r} not found or expired"
            self._fatal("session_not_found", message, "session_id")
            return
        old = session.conn
        if old is not None:
            # The client saw a drop before we did: the new socket takes the session over.
            old._cancel()
            session.closed.set()
        session.closed = trio.Event()
        session.conn = self
        session.dropped_at = None
        session.received.append(event)
        self.session = session
        self.resumed = True
        self._become_ready()

    def _become_ready(self) -> None:
        session = self._session()
        if self.outbox.closing:
            return
        if self.cfg.ready_order == "updated_then_ready" and not self.resumed:
            self._emit("session.updated", config=session.config)
        self._emit(
            "session.ready",
            session_id=session.session_id,
            config=session.config,
            expires_at=session.expires_at,
            resume_token=session.resume_token,
        )
        self.ready = True
        if not self.resumed:
            session.was_ready = True
            self.agent._note_ready(session)
            self._start_faults()
        elif self.cfg.faults.session_cap_s is not None:
            remaining = session.started_at + self.cfg.faults.session_cap_s - trio.current_time()
            self._spawn(self._after_ready_fault, max(remaining, 0.0), "session_cap")
        greeting = session.config.get("greeting")
        if greeting and not self.resumed and (self.cfg.mode != "echo" or self.cfg.echo_greeting):
            self._queue(_ReplyJob(greeting, self.agent.greeting_audio))

    def _spawn(self, fn: Any, *args: Any) -> None:
        assert self.nursery is not None
        self.nursery.start_soon(fn, *args)

    def _start_faults(self) -> None:
        faults = self.cfg.faults
        if faults.garbage_after_ready:
            self._send_garbage()
        if faults.close_1011_after_s is not None:
            self._spawn(self._after_ready_fault, faults.close_1011_after_s, "close_1011")
        if faults.drop_tcp_after_s is not None:
            self._spawn(self._after_ready_fault, faults.drop_tcp_after_s, "drop_tcp")
        if faults.session_cap_s is not None:
            self._spawn(self._after_ready_fault, faults.session_cap_s, "session_cap")
        if faults.stop_reading:
            self.pause_reading = True

    def _send_garbage(self) -> None:
        now = time.time()
        self.outbox.put(_Frame("this is not json {"))
        self.outbox.put(_Frame(b"\x00\x01binary"))
        typeless = {"code": "server_error", "message": "error without type", "timestamp": now}
        self.outbox.put(_Frame(orjson.dumps(typeless).decode()))
        self._emit(
            "transcript.agent.delta",
            reply_id="resp_0",
            item_id="item_0",
            delta="hi",
            start_ms=0,
            end_ms=None,
        )
        self._emit("reply.error", reply_id="resp_0", message="unknown event the client must ignore")

    def _expire(self) -> None:
        # Sources differ on error vs ended at the cap (reference §9.15): send both, no warning.
        self._error("session_expired", "Maximum session duration reached")
        self._end_session(close_code=1008)

    def _end_session(self, close_code: int = 1000) -> None:
        session = self._session()
        session.dead = True
        duration_s = round(trio.current_time() - session.started_at, 3)
        self._emit(
            "session.ended", session_duration_seconds=duration_s, audio_duration_seconds=None
        )
        session.ended.set()
        self.outbox.put_close(close_code)

    # -- client events --

    def _on_message(self, message: str | bytes) -> None:
        if self.outbox.closing:
            return
        first = self.session is None
        event = self._parse(message)
        if event is None:
            if first:
                self.outbox.put_close(1008)
            return
        if first:
            self._on_first(event)
            return
        session = self._session()
        kind = event["type"]
        if kind != "input.audio" or self.cfg.record_audio:
            session.received.append(event)
        if not self.ready:
            if kind == "input.audio":
                session.audio_before_ready += 1
            elif kind == "session.end":
                self._end_session()
            return
        handler = self._HANDLERS.get(kind)
        if handler is None:
            self._error("invalid_format", f"Unknown event type {kind!r}", "type")
        else:
            handler(self, event)

    def _parse(self, message: str | bytes) -> dict[str, Any] | None:
        if isinstance(message, bytes):
            self._error("invalid_format", "Binary frames are not supported; send JSON text")
            return None
        try:
            event = orjson.loads(message)
        except orjson.JSONDecodeError:
            self._error("invalid_format", "Message is not valid JSON")
            return None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self._error("invalid_format", "Message must be an object with a string type", "type")
            return None
        return event

    def _on_input_audio(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str) or not audio:
            self._error("invalid_format", "input.audio requires a base64 audio string", "audio")
            return
        try:
            raw = binascii.a2b_base64(audio, strict_mode=True)
        except (binascii.Error, ValueError):
            self._error("invalid_audio", "audio is not valid base64", "audio")
            return
        session = self._session()
        if self.cfg.record_audio:
            session.input_audio.append(audio)
        if self.cfg.mode == "echo":
            self._echo(audio)
        elif self.cfg.vad:
            self._feed_vad(raw)

    def _echo(self, audio: str) -> None:
        self.echo_frames += 1
        every = self.cfg.echo_barge_in_every_n
        if every and self.echo_frames % every == 0:
            self._emit("input.speech.started")
        if self.echo_reply_id is None:
            self.echo_reply_id = _new_id("resp_", 12)
            self._session().replies_sent.append(self.echo_reply_id)
            self._emit("reply.started", reply_id=self.echo_reply_id, item_id=_new_id("item_", 12))
        rid = self.echo_reply_id
        self.outbox.put(_Frame(_audio_json(rid, audio), rid, audio))

    def _feed_vad(self, raw: bytes) -> None:
        config = self._session().config
        encoding = config["input"]["format"]["encoding"]
        turn = config["input"]["turn_detection"]
        self.vad.threshold = self.cfg.vad_level * float(turn.get("vad_threshold", 0.5)) / 0.5
        self.vad.hangover_ms = float(turn.get("min_silence", self.cfg.vad_hangover_ms))
        edge = self.vad.feed(mean_abs_level(raw, encoding), duration_ms(len(raw), encoding))
        if edge is VadEvent.SPEECH_STARTED:
            self.speech_started()
        elif edge is VadEvent.SPEECH_STOPPED:
            turn = self._session().user_turns + 1
            self.finish_user_turn(self.cfg.turn_transcripts.get(turn, self.cfg.vad_transcript), None)

    def _on_session_update(self, event: dict[str, Any]) -> None:
        payload = event.get("session")
        session = self._session()
        extra = event.keys() - {"type", "session"}
        problem = validate_session(payload, first=False, voices=self.cfg.voices)
        if extra:
            self._error("invalid_format", f"Unknown field {sorted(extra)[0]}", sorted(extra)[0])
            return
        if problem is not None:
            self._error(problem.code, problem.message, problem.param)
            return
        assert isinstance(payload, dict)
        self.agent.system_prompts.append(payload.get("system_prompt"))
        changed = immutable_changes(payload, session.config)
        for param in changed:
            self._error("immutable_field", f"{param} cannot change after session.ready", param)
        apply_mutable(payload, session.config)
        output_rest = payload.get("output", {}).keys() - {"voice", "format", "type"}
        if not changed or output_rest or payload.keys() - {"greeting", "output"}:
            self._emit("session.updated", config=session.config)

    def _on_tool_result(self, event: dict[str, Any]) -> None:
        session = self._session()
        call_id, result = event.get("call_id"), event.get("result")
        pending = session.pending_calls.get(call_id) if isinstance(call_id, str) else None
        if not isinstance(call_id, str):
            self._error("invalid_format", "tool.result requires call_id", "call_id")
        elif not isinstance(result, str):
            self._error("invalid_format", "result must be a string (JSON-encode objects)", "result")
        elif not isinstance(event.get("is_error", False), bool):
            self._error("invalid_format", "is_error must be a boolean", "is_error")
        elif pending is None or pending.result is not None:
            self._error("invalid_value", f"Unknown call_id {call_id!r}", "call_id")
        else:
            session.tool_results.append(event)
            pending.result = result
            if pending.preamble_done:
                self._answer_tool(call_id)

    def _on_reply_create(self, event: dict[str, Any]) -> None:
        instructions = event.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            self._error("invalid_format", "instructions must be a string", "instructions")
            return
        self.agent.reply_instructions.append(instructions)
        for key, clip in self.cfg.instruction_clips.items():
            if instructions and key in instructions:
                self._queue(_ReplyJob(self.agent.clip_text(clip), self.agent.clip(clip)))
                return
        # Scripted output that says what it was told, so tests can see which instructions won.
        self._queue(_ReplyJob(instructions or self.cfg.reply_text, self.agent.reply_audio))

    def _on_conversation_message(self, event: dict[str, Any]) -> None:
        if event.get("role") not in ("user", "system") or not isinstance(event.get("content"), str):
            self._error("invalid_format", "conversation.message needs role user|system and content")

    def _on_session_end(self, event: dict[str, Any]) -> None:
        self._end_session()

    def _on_late_resume(self, event: dict[str, Any]) -> None:
        self._error("invalid_format", "session.resume must be the first message", "type")

    _HANDLERS: dict[str, Any] = {
        "input.audio": _on_input_audio,
        "session.update": _on_session_update,
        "session.resume": _on_late_resume,
        "tool.result": _on_tool_result,
        "reply.create": _on_reply_create,
        "conversation.message": _on_conversation_message,
        "session.end": _on_session_end,
    }

    # -- turns, barge-in, tools (also driven by FakeAgent's scripted triggers) --

    def speech_started(self) -> None:
        """User speech began: ``input.speech.started``, and barge-in if a reply is playing."""
        self.user_speaking = True
        self._emit("input.speech.started")
        playing = self.playing
        if playing is None or playing.interrupted or not self._interrupt_allowed():
            return
        playing.interrupted = True
        playing.scope.cancel()
        self.playing = None
        self.outbox.purge_audio(playing.reply_id)
        # What was spoken: the words that end within the reply audio sent so far, by the same
        # timings as the word deltas.
        heard = spoken_words(playing.words, playing.chunks_sent * playing.chunk_ms)
        self._emit(
            "transcript.agent",
            reply_id=playing.reply_id,
            item_id=playing.item_id,
            text=" ".join(w.word for w in heard),
            interrupted=True,
        )
        self._emit("reply.done", reply_id=playing.reply_id, status="interrupted")
        if playing.call_id is not None:
            self._session().pending_calls.pop(playing.call_id, None)
        self.jobs.clear()

    def finish_user_turn(self, text: str, reply_audio: bytes | None) -> None:
        """End of a user turn: deltas, ``input.speech.stopped``, ``transcript.user``, reply."""
        if not self.user_speaking:
            self.speech_started()
        self.user_speaking = False
        session = self._session()
        session.user_turns += 1
        item_id = _new_id("item_", 12)
        words = text.split() or [text]
        for i in range(1, len(words) + 1):
            self._emit("transcript.user.delta", item_id=item_id, text=" ".join(words[:i]))
        self._emit("input.speech.stopped")
        self._emit("transcript.user", item_id=item_id, text=text)
        tool = self.cfg.tool_on_turn.get(session.user_turns)
        if tool is not None:
            self.queue_tool_call(_new_id("chatcmpl-tool-"), tool[0], tool[1], reply_audio)
        else:
            self._queue(_ReplyJob(self.cfg.reply_text, reply_audio or self.agent.reply_audio))

    def queue_tool_call(
        self, call_id: str, name: str, arguments: dict[str, Any], answer_audio: bytes | None
    ) -> None:
        """Queue a silent pre-amble reply carrying ``tool.call``; the answer follows the result."""
        timeout_s = self.cfg.tool_timeout_s
        for tool in self._session().config["tools"]:
            if tool.get("name") == name and "timeout_seconds" in tool:
                timeout_s = float(tool["timeout_seconds"])
        pending = _PendingCall(name, arguments, timeout_s, answer_audio)
        self._session().pending_calls[call_id] = pending
        if name in self.cfg.tool_clips:
            clip = self.cfg.tool_clips[name][0]
            self._queue(_ReplyJob(self.agent.clip_text(clip), self.agent.clip(clip), call=(call_id, name, arguments)))
            return
        self._queue(_ReplyJob("", None, show_transcript=False, call=(call_id, name, arguments)))

    def _emit_tool_call(self, call_id: str, name: str, arguments: dict[str, Any]) -> None:
        fields = {"call_id": call_id, "name": name, self.cfg.faults.tool_args_key: arguments}
        self._emit("tool.call", **fields)

    def _preamble_done(self, call_id: str) -> None:
        pending = self._session().pending_calls.get(call_id)
        if pending is None:
            return
        pending.preamble_done = True
        if pending.result is not None:
            self._answer_tool(call_id)
        else:
            self._spawn(self._tool_timeout, call_id, pending.timeout_s)

    def _answer_tool(self, call_id: str) -> None:
        pending = self._session().pending_calls.pop(call_id)
        if pending.answer_audio is not None or self.cfg.reply_audio is not None:
            # A clip the test chose: it knows what it says.
            audio = pending.answer_audio or self.agent.reply_audio
            self._queue(_ReplyJob(self.cfg.reply_text, audio))
            return
        # The answer agrees with the result, as the live model's would (issue 12 #4).
        assert pending.result is not None
        text, clip = tool_answer(pending.result)
        if pending.name in self.cfg.tool_clips:
            clip = self.cfg.tool_clips[pending.name][1]
            text = self.agent.clip_text(clip)
        self._queue(_ReplyJob(text, self.agent.clip(clip)))

    def end_from_server(self) -> None:
        """``session.ended`` then close 1000, as on a clean server-side end."""
        if not self.outbox.closing:
            self._end_session()


class _EofWatchStream(trio.abc.Stream):
    """Delegating stream that flags EOF or a broken peer. trio-websocket waits for an upgrade
    request until its timeout even after the peer left (a port probe); this lets us stop."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.peer_gone = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.peer_gone.set()
            raise
        if not data:
            self.peer_gone.set()
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- the server -----------------------------------------------------------------------------


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class FakeAgent:
    """The fake Voice Agent API server. See the module docstring."""

    def __init__(self, config: FakeAgentConfig | None = None) -> None:
        self.config = config or FakeAgentConfig()
        self.url = ""
        self.port = 0
        self.connections_open = 0
        self.connections_total = 0
        self.sessions: dict[str, FakeSession] = {}
        self.errors_sent: list[str] = []  # every session.error code, sessions or not
        # Every accepted session.update's system_prompt (None: the update had none), first
        # updates and later ones, in arrival order across sessions.
        self.system_prompts: list[str | None] = []
        # Every valid reply.create's instructions (None: it had none), in arrival order.
        self.reply_instructions: list[str | None] = []
        self._ready_sessions: list[FakeSession] = []
        self._ready_lot = trio.lowlevel.ParkingLot()
        self._greeting_audio = self.config.greeting_audio
        self._reply_audio = self.config.reply_audio
        self._clips: dict[str, bytes] = {}

    @property
    def greeting_audio(self) -> bytes:
        """Greeting clip (8 kHz mu-law), loaded from tools/audio on first use."""
        if self._greeting_audio is None:
            self._greeting_audio = (AUDIO_DIR / "greeting.ulaw").read_bytes()
        return self._greeting_audio

    @property
    def reply_audio(self) -> bytes:
        """Reply clip (8 kHz mu-law), loaded from tools/audio on first use."""
        if self._reply_audio is None:
            self._reply_audio = (AUDIO_DIR / "reply.ulaw").read_bytes()
        return self._reply_audio

    def clip(self, name: str) -> bytes:
        """The clip tools/audio/<name>.ulaw (8 kHz mu-law), read once and kept.

        Raises FileNotFoundError for an unknown name.
        """
        audio = self._clips.get(name)
        if audio is None:
            audio = self._clips[name] = (AUDIO_DIR / f"{name}.ulaw").read_bytes()
        return audio

    def clip_text(self, name: str) -> str:
        """What tools/audio/<name>.ulaw says (its text in words.json). Raises KeyError."""
        text: str = orjson.loads((AUDIO_DIR / "words.json").read_bytes())[name]["text"]
        return text

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `host`:`port` (0 picks a free port) and serve until cancelled.

        Calls ``task_status.started(port)`` once listening and sets :attr:`url`. Cancellation
        cancels every connection and closes every socket before returning.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"ws://{shown}:{self.port}/v1/ws"
        task_status.started(self.port)
        await trio.serve_listeners(self.handle_stream, listeners)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one client on an already-connected byte stream (TCP or in-memory).

        Returns when the connection is over; the stream is closed on every path, including
        cancellation.
        """
        self.connections_total += 1
        self.connections_open += 1
        index = self.connections_total
        try:
            async with trio.open_nursery() as ws_nursery:
                await self._serve_ws(ws_nursery, stream, index)
                ws_nursery.cancel_scope.cancel()
        except* LocalProtocolError:
            # trio-websocket's reader answers every ping, and wsproto refuses the pong of one
            # that crossed our Close (LOCAL_CLOSING): its reader raises at the end of a
            # connection that is over anyway. Not the bridge's doing; not a fault to report.
            logger.debug("fake agent: a ping crossed our close (trio-websocket's reader raised)")
        finally:
            self.connections_open -= 1
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    async def _serve_ws(
        self, ws_nursery: trio.Nursery, stream: trio.abc.Stream, index: int
    ) -> None:
        watched = _EofWatchStream(stream)
        with trio.move_on_after(_CONNECT_TIMEOUT_S) as upgrade:
            ws_nursery.start_soon(_cancel_when_set, watched.peer_gone, upgrade)
            try:
                request = await trio_websocket.wrap_server_stream(ws_nursery, watched)
                url = urlsplit(request.path)
                if url.path not in WS_PATHS:
                    await request.reject(404, body=b"Not Found")
                    return
                ws = await request.accept()
            except ConnectionClosed:
                return
        if upgrade.cancelled_caught:
            return
        conn = _Connection(self, ws, stream)
        await conn.run(index, request.headers, parse_qs(url.query))

    def _note_ready(self, session: FakeSession) -> None:
        self._ready_sessions.append(session)
        self._ready_lot.unpark_all()

    async def wait_for_session(self, n: int = 1) -> FakeSession:
        """Wait until the `n`-th session (1-based, in order of ``session.ready``) is ready.

        Resumes do not count. Cancellation just stops the wait.
        """
        while len(self._ready_sessions) < n:
            await self._ready_lot.park()
        return self._ready_sessions[n - 1]

    def _live(self, session_id: str) -> _Connection:
        conn = self.sessions[session_id].conn
        if conn is None or not conn.ready or conn.outbox.closing:
            raise LookupError(f"session {session_id} has no live, ready connection")
        return conn

    async def user_turn(
        self, session_id: str, text: str = DEFAULT_CALLER_TEXT, reply_audio: bytes | None = None
    ) -> None:
        """Script a user turn: speech start (barge-in if a reply plays), cumulative
        ``transcript.user.delta``s, ``input.speech.stopped``, ``transcript.user``, then a reply
        (or the tool flow, per ``tool_on_turn``). Returns once the events are queued.

        Raises LookupError if the session has no live, ready connection.
        """
        self._live(session_id).finish_user_turn(text, reply_audio)
        await trio.lowlevel.checkpoint()

    async def barge_in(self, session_id: str) -> None:
        """Script user speech onset. If a reply plays (and ``interrupt_response`` is not false):
        ``input.speech.started``, ``transcript.agent{interrupted}``, ``reply.done{interrupted}``
        in one burst, and no later audio of that reply. Follow with :meth:`user_turn` to finish."""
        self._live(session_id).speech_started()
        await trio.lowlevel.checkpoint()

    async def tool_call(self, session_id: str, name: str, arguments: dict[str, Any]) -> str:
        """Queue a silent pre-amble reply with ``tool.call``; returns the ``call_id``. The
        answer reply starts when the matching ``tool.result`` arrives (early ones included)."""
        call_id = _new_id("chatcmpl-tool-")
        self._live(session_id).queue_tool_call(call_id, name, arguments, None)
        await trio.lowlevel.checkpoint()
        return call_id

    async def drop_connection(self, session_id: str) -> None:
        """Reset the TCP stream of the session's live connection (no close frame, no
        ``session.ended``): a network drop on demand. The session stays for ``grace_s``."""
        conn = self._live(session_id)
        conn._spawn(conn._drop_tcp)
        await trio.lowlevel.checkpoint()

    async def end_from_server(self, session_id: str) -> None:
        """Send ``session.ended`` then close 1000; the session cannot be resumed."""
        self._live(session_id).end_from_server()
        await trio.lowlevel.checkpoint()


# --- CLI ------------------------------------------------------------------------------------


def _parse_tool_on_turn(specs: list[str]) -> dict[int, tuple[str, dict[str, Any]]]:
    out: dict[int, tuple[str, dict[str, Any]]] = {}
    for spec in specs:
        turn, name, *rest = spec.split(":", 2)
        arguments = orjson.loads(rest[0]) if rest else {}
        if not isinstance(arguments, dict):
            raise argparse.ArgumentTypeError(f"tool arguments must be a JSON object: {spec}")
        out[int(turn)] = (name, arguments)
    return out


def _parse_turn_transcripts(specs: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for spec in specs:
        turn, sep, text = spec.partition(":")
        if not sep or not turn.isdigit() or not text:
            raise argparse.ArgumentTypeError(f"expected N:TEXT, got {spec!r}")
        out[int(turn)] = text
    return out


def _parse_tool_clips(specs: list[str]) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for spec in specs:
        parts = spec.split(":")
        if len(parts) != 3 or not all(parts) or not all((AUDIO_DIR / f"{p}.ulaw").is_file() for p in parts[1:]):
            raise argparse.ArgumentTypeError(f"expected NAME:ASK:ANSWER with clips in tools/audio, got {spec!r}")
        out[parts[0]] = (parts[1], parts[2])
    return out


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.fake_agent", description="Fake AssemblyAI Voice Agent API server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--echo", action="store_true", help="echo input.audio as reply.audio")
    parser.add_argument("--echo-barge-in-every", type=int, default=None, metavar="N")
    parser.add_argument("--speed", type=float, default=None, help="1.0 = real-time pacing")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--voices", default=None, help="comma-separated allow-list")
    parser.add_argument("--grace-s", type=float, default=30.0)
    parser.add_argument("--tool-on-turn", action="append", default=[], metavar="N:NAME:JSON")
    parser.add_argument("--turn-transcript", action="append", default=[], metavar="N:TEXT",
                        help="what the fake hears in user turn N (default: the demo caller's question)")
    parser.add_argument("--tool-clips", action="append", default=[], metavar="NAME:ASK:ANSWER",
                        help="tools/audio clips the tool's pre-amble and its answer speak")
    parser.add_argument("--refuse-resume", action="store_true", help="every session.resume: session_not_found")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> FakeAgentConfig:
    """Build the server config from parsed CLI arguments."""
    voices = frozenset(v.strip() for v in args.voices.split(",")) if args.voices else DOCS_VOICES
    return FakeAgentConfig(
        api_key=args.api_key,
        voices=voices,
        speed=args.speed,
        mode="echo" if args.echo else "conversation",
        echo_barge_in_every_n=args.echo_barge_in_every,
        grace_s=args.grace_s,
        tool_on_turn=_parse_tool_on_turn(args.tool_on_turn),
        turn_transcripts=_parse_turn_transcripts(args.turn_transcript),
        tool_clips=_parse_tool_clips(args.tool_clips),
        faults=FaultPlan(refuse_resume=args.refuse_resume),
        record_audio=False,  # nobody reads the recordings of a CLI server; keep memory flat
    )


async def _run_cli(agent: FakeAgent, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.serve, host, port)
            print(f"Fake Voice Agent listening on {agent.url}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGINT/SIGTERM, then exit 0."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    agent = FakeAgent(config_from_args(args))
    trio.run(_run_cli, agent, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
