"""Tests of the fake Voice Agent API server (tools/fake_agent.py) against reference §9.

Most tests drive the fake over an in-memory stream pair with a real trio-websocket client,
so `autojump_clock` makes timers (grace window, tool timeout, pacing) instant and exact.
A few use real loopback sockets: auth headers/paths, TCP reset, backpressure, echo, the CLI.
"""

from __future__ import annotations

import base64
import copy
import math
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import trio
import trio.testing
import trio_websocket
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

from tools.fake_agent import (
    APOLOGY_TEXT,
    DEFAULT_REPLY_TEXT,
    FOUND_TEXT,
    FakeAgent,
    FakeAgentConfig,
    FaultPlan,
    tool_answer,
    word_timings,
)
from tools.fake_agent_audio import (
    PCMU,
    EnergyVad,
    VadEvent,
    WordTiming,
    mean_abs_level,
    proportional_words,
    speech_span_ms,
    spoken_words,
)

REPO = Path(__file__).resolve().parents[1]
WORDS: dict[str, Any] = orjson.loads((REPO / "tools" / "audio" / "words.json").read_bytes())
CALLER_ULAW = (REPO / "tools" / "audio" / "caller.ulaw").read_bytes()
GREETING_ULAW = (REPO / "tools" / "audio" / "greeting.ulaw").read_bytes()
AUTH = [(b"Authorization", b"Bearer test-key")]
TOOL = ("generate_random_number", {"min": 1, "max": 10})
BASE_SESSION: dict[str, Any] = {
    "system_prompt": "You are a phone assistant. Reply briefly.",
    "input": {"format": {"encoding": "audio/pcmu"}},
    "output": {"voice": "ivy", "format": {"encoding": "audio/pcmu"}},
    "tools": [{"type": "function", "name": "generate_random_number", "parameters": {}}],
}


def update(**fields: Any) -> dict[str, Any]:
    session = copy.deepcopy(BASE_SESSION)
    session.update(fields)
    return {"type": "session.update", "session": session}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- client helpers ------------------------------------------------------------------------


@asynccontextmanager
async def connect_stream(
    agent: FakeAgent, path: str = "/v1/ws", headers: list[tuple[bytes, bytes]] = AUTH
) -> AsyncIterator[tuple[WebSocketConnection, trio.abc.Stream]]:
    """A trio-websocket client wired to `agent` through an in-memory stream pair."""
    server_side, client_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.handle_stream, server_side)
        ws = await trio_websocket.wrap_client_stream(
            nursery, client_side, "localhost", path, extra_headers=list(headers)
        )
        try:
            yield ws, client_side
        finally:
            await ws.aclose()


@asynccontextmanager
async def connect(agent: FakeAgent, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    async with connect_stream(agent, **kwargs) as (ws, _):
        yield ws


@asynccontextmanager
async def tcp_client(
    url: str, headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[WebSocketConnection]:
    """A loopback client that owns its TCP stream (trio-websocket leaves it open after 1006)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, parts.hostname, resource, extra_headers=headers
            )
            try:
                yield ws
            finally:
                await ws.aclose()
    finally:
        await stream.aclose()


async def send(ws: WebSocketConnection, event: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(event).decode())


async def recv(ws: WebSocketConnection) -> dict[str, Any]:
    event = orjson.loads(await ws.get_message())
    assert isinstance(event["timestamp"], float)
    return event


async def recv_until(ws: WebSocketConnection, type_: str) -> list[dict[str, Any]]:
    events = []
    while True:
        events.append(await recv(ws))
        if events[-1]["type"] == type_:
            return events


async def drain(ws: WebSocketConnection) -> tuple[list[dict[str, Any]], int]:
    """Every event until the server closes, and the close code."""
    events = []
    while True:
        try:
            events.append(orjson.loads(await ws.get_message()))
        except ConnectionClosed as exc:
            assert exc.reason is not None
            return events, exc.reason.code


async def start(ws: WebSocketConnection, event: dict[str, Any] | None = None) -> dict[str, Any]:
    await send(ws, event or update())
    return (await recv_until(ws, "session.ready"))[-1]


async def nothing_within(ws: WebSocketConnection, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        await ws.get_message()
        return False
    return True


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


# --- connect, auth, first frame, validation, ready ------------------------------------------


async def test_auth_bearer_raw_token_and_alias_path_accepted() -> None:
    agent = FakeAgent(FakeAgentConfig(api_key="k"))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        base = agent.url.removesuffix("/v1/ws")
        variants = [
            (agent.url, [(b"Authorization", b"Bearer k")]),
            (agent.url, [(b"Authorization", b"k")]),
            (agent.url + "?token=k", []),
            (base + "/v1/realtime", [(b"Authorization", b"Bearer k")]),
        ]
        for url, headers in variants:
            async with tcp_client(url, headers) as ws:
                assert (await start(ws))["type"] == "session.ready"
                await send(ws, {"type": "session.end"})
                events, code = await drain(ws)
                assert (types(events), code) == (["session.ended"], 1000)
        with pytest.RaisesGroup(ConnectionRejected, flatten_subgroups=True):
            async with tcp_client(base + "/v1/nope"):
                pass
        nursery.cancel_scope.cancel()
    assert agent.connections_open == 0
    assert agent.connections_total == 5


async def test_peer_leaving_before_upgrade_ends_connection_at_once() -> None:
    agent = FakeAgent()
    server_side, client_side = trio.testing.memory_stream_pair()
    await client_side.send_all(b"GET /v1/ws HTTP/1.1\r\n")  # a probe that gives up mid-request
    await client_side.aclose()
    with trio.fail_after(1):  # not the 60 s upgrade timeout
        await agent.handle_stream(server_side)
    assert (agent.connections_open, agent.connections_total) == (0, 1)


@pytest.mark.parametrize(
    "headers", [[], [(b"Authorization", b"Bearer wrong")], [(b"Authorization", b"Bearer")]]
)
async def test_bad_key_upgrades_then_unauthorized_and_1008(
    headers: list[tuple[bytes, bytes]],
) -> None:
    agent = FakeAgent(FakeAgentConfig(api_key="k"))
    async with connect(agent, headers=headers) as ws:
        events, code = await drain(ws)
    assert code == 1008
    assert [(e["type"], e["code"]) for e in events] == [("session.error", "unauthorized")]
    assert agent.connections_open == 0


async def test_server_sends_nothing_until_client_speaks(autojump_clock: Any) -> None:
    agent = FakeAgent(FakeAgentConfig(api_key="test-key"))
    async with connect(agent) as ws:
        assert await nothing_within(ws, 60)
        assert (await start(ws, update(greeting="Hi!")))["type"] == "session.ready"


@pytest.mark.parametrize(
    "first",
    [
        '{"type":"input.audio","audio":"//8="}',
        '{"type":"reply.create"}',
        "not json",
        '{"audio":"//8="}',
    ],
)
async def test_first_frame_must_be_update_or_resume_fatal(first: str) -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await ws.send_message(first)
        events, code = await drain(ws)
    # Fatal by our choice (reference §9.2 leaves it open).
    assert code == 1008
    assert [(e["type"], e["code"]) for e in events] == [("session.error", "invalid_format")]


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        (update(bogus=1), "invalid_format", "bogus"),
        ({**update(), "extra": 1}, "invalid_format", "extra"),
        (update(greeting=None), "invalid_format", "greeting"),
        (update(input={"format": {"encoding": "audio/opus"}}), "invalid_value", "input.format.encoding"),
        (
            update(input={"format": {"encoding": "audio/pcm", "sample_rate": 16000}}),
            "invalid_value",
            "input.format.sample_rate",
        ),
        (update(output={"format": {"encoding": "audio/pcmu", "sample_rate": 24000}}),
         "invalid_value", "output.format.sample_rate"),
        (update(input={"nope": 1}), "invalid_format", "input.nope"),
        (update(llm={"provider": "x"}), "invalid_value", "llm"),
        (update(agent_id="agent_" + "0" * 32), "invalid_value", "agent_id"),
        ({"type": "session.update", "session": {"agent_id": "agent_" + "1" * 32}},
         "agent_not_found", "agent_id"),
    ],
)  # fmt: skip
async def test_first_update_strict_validation_is_fatal(
    event: dict[str, Any], code: str, param: str
) -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await send(ws, event)
        events, close_code = await drain(ws)
    assert close_code == 1008
    assert len(events) == 1
    assert (events[0]["type"], events[0]["code"], events[0]["param"]) == ("session.error", code, param)
    assert agent.sessions == {}


async def test_bad_voice_is_invalid_value_listing_valid_voices_then_1008() -> None:
    agent = FakeAgent(FakeAgentConfig(voices=frozenset({"alba", "vera"})))
    async with connect(agent) as ws:
        await send(ws, update(output={"voice": "ivy"}))
        events, code = await drain(ws)
    assert code == 1008
    [error] = events
    assert (error["code"], error["param"]) == ("invalid_value", "output.voice")
    assert "alba" in error["message"] and "vera" in error["message"]


async def test_stored_agent_alone_is_accepted() -> None:
    agent_id = "agent_" + "a" * 32
    agent = FakeAgent(FakeAgentConfig(agent_ids=frozenset({agent_id})))
    async with connect(agent) as ws:
        ready = await start(ws, {"type": "session.update", "session": {"agent_id": agent_id}})
        assert ready["config"]["agent_id"] == agent_id


@pytest.mark.parametrize(
    ("order", "expected"),
    [("updated_then_ready", ["session.updated", "session.ready"]), ("ready", ["session.ready"])],
)
async def test_ready_order_and_fields(order: Any, expected: list[str]) -> None:
    agent = FakeAgent(FakeAgentConfig(ready_order=order))
    async with connect(agent) as ws:
        await send(ws, update())
        events = await recv_until(ws, "session.ready")
        assert types(events) == expected
        ready = events[-1]
        assert re.fullmatch(r"sess_[0-9a-f]{32}", ready["session_id"])
        assert isinstance(ready["expires_at"], int)
        assert isinstance(ready["resume_token"], str) and ready["resume_token"]
        config = ready["config"]
        assert config["input"]["format"] == {"encoding": "audio/pcmu", "sample_rate": 8000}
        assert config["output"]["format"] == {"encoding": "audio/pcmu", "sample_rate": 8000}
        assert config["output"]["voice"] == "ivy"
        assert config["input"]["turn_detection"]["interrupt_response"] is True
        assert config["tools"] == BASE_SESSION["tools"]
        session = await agent.wait_for_session()
        assert session.session_id == ready["session_id"]
        assert session.config == config


async def test_default_formats_are_pcm_24k() -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        ready = await start(ws, {"type": "session.update", "session": {}})
    pcm = {"encoding": "audio/pcm", "sample_rate": 24000}
    assert ready["config"]["input"]["format"] == ready["config"]["output"]["format"] == pcm


async def test_audio_before_ready_is_counted_and_dropped(autojump_clock: Any) -> None:
    agent = FakeAgent(FakeAgentConfig(ready_delay_s=0.5))
    async with connect(agent) as ws:
        await send(ws, update())
        for _ in range(3):
            await send(ws, {"type": "input.audio", "audio": b64(b"\xff" * 160)})
        await recv_until(ws, "session.ready")
        late = b64(b"\x7f" * 160)
        await send(ws, {"type": "input.audio", "audio": late})
        await send(ws, {"type": "session.end"})
        await drain(ws)
    [session] = agent.sessions.values()
    assert session.audio_before_ready == 3
    assert session.input_audio == [late]


# --- greeting, turns, barge-in -----------------------------------------------------------


async def test_greeting_reply_with_leading_silence() -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await start(ws, update(greeting="Hi, thanks for calling. How can I help?"))
        events = await recv_until(ws, "reply.done")
        session = await agent.wait_for_session()
    kinds = types(events)
    n_audio = math.ceil((1600 + len(GREETING_ULAW)) / 300)
    n_words = 8  # Hi, thanks for calling. How can I help?
    assert kinds == (
        ["reply.started"] + ["reply.audio"] * n_audio + ["transcript.agent.delta"] * n_words
        + ["transcript.agent", "reply.done"]
    )  # fmt: skip
    reply_id = events[0]["reply_id"]
    assert all(e["reply_id"] == reply_id for e in events)
    chunks = [base64.b64decode(e["data"]) for e in events[1 : 1 + n_audio]]
    assert chunks[0] == b"\xff" * 300
    assert b"".join(chunks) == b"\xff" * 1600 + GREETING_ULAW
    assert events[-2]["text"] == "Hi, thanks for calling. How can I help?"
    assert events[-2]["interrupted"] is False
    assert events[-1]["status"] == "completed"
    assert session.audio_sent == [e["data"] for e in events[1 : 1 + n_audio]]
    assert session.replies_sent == [reply_id]
    deltas = events[1 + n_audio : -2]
    measured = WORDS["greeting"]["words"]  # espeak-ng's own word times, + 200 ms of silence
    assert [(d["delta"], d["start_ms"], d["end_ms"]) for d in deltas] == [
        (w, start + 200, end + 200) for w, start, end in measured
    ]
    assert all(d["item_id"] == events[-2]["item_id"] for d in deltas)


async def test_greeting_is_converted_to_pcm_output() -> None:
    agent = FakeAgent(FakeAgentConfig(leading_silence_ms=0))
    async with connect(agent) as ws:
        await start(ws, update(greeting="Hi", output={"format": {"encoding": "audio/pcm"}}))
        events = await recv_until(ws, "reply.done")
    audio = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "reply.audio")
    assert len(audio) == len(GREETING_ULAW) * 6  # 8 kHz mu-law -> 24 kHz 16-bit
    sizes = [len(base64.b64decode(e["data"])) for e in events if e["type"] == "reply.audio"]
    assert set(sizes[:-1]) == {480}


async def test_no_greeting_stays_silent(autojump_clock: Any) -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await start(ws)
        assert await nothing_within(ws, 30)


async def test_scripted_user_turn_sequence_with_cumulative_deltas() -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await start(ws)
        session = await agent.wait_for_session()
        await agent.user_turn(session.session_id, "pick a number")
        events = await recv_until(ws, "reply.done")
    kinds = types(events)
    assert kinds[:7] == [
        "input.speech.started",
        "transcript.user.delta",
        "transcript.user.delta",
        "transcript.user.delta",
        "input.speech.stopped",
        "transcript.user",
        "reply.started",
    ]
    assert [e["text"] for e in events[1:4]] == ["pick", "pick a", "pick a number"]
    assert len({e["item_id"] for e in events[1:4]} | {events[5]["item_id"]}) == 1
    assert events[5]["text"] == "pick a number"
    assert kinds[-2:] == ["transcript.agent", "reply.done"]
    assert events[-2]["text"] == DEFAULT_REPLY_TEXT
    assert session.user_turns == 1


async def test_energy_vad_detects_caller_clip_and_replies() -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await start(ws)
        frames = [CALLER_ULAW[i : i + 160] for i in range(0, len(CALLER_ULAW), 160)]
        frames += [b"\xff" * 160] * 40  # 800 ms of silence ends the turn
        for frame in frames:
            await send(ws, {"type": "input.audio", "audio": b64(frame)})
        events = await recv_until(ws, "reply.done")
        session = await agent.wait_for_session()
    kinds = types(events)
    assert kinds[0] == "input.speech.started"
    assert kinds.count("input.speech.started") == 1
    stop = kinds.index("input.speech.stopped")
    assert set(kinds[1:stop]) == {"transcript.user.delta"}
    assert kinds[stop + 1 : stop + 3] == ["transcript.user", "reply.started"]
    assert events[-1]["status"] == "completed"
    assert session.input_audio == [b64(f) for f in frames]


async def test_barge_in_burst_and_no_later_audio_for_that_reply(autojump_clock: Any) -> None:
    agent = FakeAgent(FakeAgentConfig(speed=1.0))
    greeting = "Hello there, thanks for calling, how can I help you today?"
    async with connect(agent) as ws:
        await start(ws, update(greeting=greeting))
        session = await agent.wait_for_session()
        started = await recv(ws)
        assert started["type"] == "reply.started"
        for _ in range(10):
            assert (await recv(ws))["type"] == "reply.audio"
        t0 = trio.current_time()
        await agent.barge_in(session.session_id)
        burst = await recv_until(ws, "reply.done")
        assert trio.current_time() == t0  # one burst, no pacing delay
        assert types(burst)[-3:] == ["input.speech.started", "transcript.agent", "reply.done"]
        assert set(types(burst)[:-3]) <= {"reply.audio"}
        transcript, done = burst[-2:]
        assert transcript["interrupted"] is True
        assert greeting.startswith(transcript["text"]) and transcript["text"] != greeting
        assert (done["reply_id"], done["status"]) == (started["reply_id"], "interrupted")
        await agent.user_turn(session.session_id, "wait")
        after = await recv_until(ws, "reply.done")
        await send(ws, {"type": "session.end"})
        rest, _ = await drain(ws)
    assert "input.speech.started" not in types(after)  # speech already started at barge-in
    late = [e for e in after + rest if e.get("reply_id") == started["reply_id"]]
    assert late == []
    sent_for_greeting = 10 + types(burst).count("reply.audio")
    assert len(session.audio_sent) == sent_for_greeting + types(after).count("reply.audio")


async def test_interrupt_response_false_disables_barge_in(autojump_clock: Any) -> None:
    agent = FakeAgent(FakeAgentConfig(speed=1.0))
    event = update(greeting="Hi there", input={
        "format": {"encoding": "audio/pcmu"},
        "turn_detection": {"interrupt_response": False},
    })  # fmt: skip
    async with connect(agent) as ws:
        await start(ws, event)
        session = await agent.wait_for_session()
        await recv(ws)
        await agent.barge_in(session.session_id)
        events = await recv_until(ws, "reply.done")
    assert types(events).count("input.speech.started") == 1
    assert events[-1]["status"] == "completed"
    assert events[-2]["interrupted"] is False


# --- word timings (transcript.agent.delta) ------------------------------------------------


@pytest.mark.parametrize("name", sorted(WORDS))
def test_measured_word_times_fit_each_clip(name: str) -> None:
    """words.json (espeak-ng's word events, via make_clips.sh) against the committed clip."""
    clip = (REPO / "tools" / "audio" / f"{name}.ulaw").read_bytes()
    entry = WORDS[name]
    words = [WordTiming(*w) for w in entry["words"]]
    assert [w.word for w in words] == entry["text"].split()
    assert word_timings(entry["text"], clip) == tuple(words)
    assert words[0].start_ms >= 0 and words[-1].end_ms <= len(clip) // 8
    for w, nxt in zip(words, [*words[1:], None], strict=True):
        assert w.start_ms < w.end_ms and (nxt is None or w.end_ms <= nxt.start_ms)
        assert mean_abs_level(clip[w.start_ms * 8 : w.end_ms * 8], PCMU) > 300  # speech inside
    lo, hi = speech_span_ms(clip)
    assert abs(lo - words[0].start_ms) <= 10 and abs(hi - words[-1].end_ms) <= 10


@pytest.mark.parametrize("name", ["reply", "number_5", "caller"])
def test_words_json_is_what_clip_words_measures_now(name: str, tmp_path: Path) -> None:
    """words.json is not stale: espeak-ng (installed by .ci/run) measures the same times again."""
    voice = "en-us+m3" if name == "caller" else "en-us"
    wav = tmp_path / f"{name}.wav"
    text = WORDS[name]["text"]
    subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "-w", str(wav), text], check=True)
    script = REPO / "tools" / "audio" / "clip_words.py"
    out = subprocess.run([sys.executable, str(script), name, voice, text, str(wav)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    assert orjson.loads(out) == {"name": name, **WORDS[name]}


@pytest.mark.parametrize(
    ("text", "silence_ms", "speech_ms", "expected"),
    [
        ("a bbb", 100, 400, [("a", 100, 200), ("bbb", 200, 500)]),
        ("one", 0, 250, [("one", 0, 250)]),
        ("xx yy", 50, 100, [("xx", 50, 100), ("yy", 100, 150)]),
        ("", 100, 400, []),
    ],
)
def test_proportional_words_split_the_speech_span_by_length(
    text: str, silence_ms: int, speech_ms: int, expected: list[tuple[str, int, int]]
) -> None:
    ulaw = b"\xff" * (silence_ms * 8) + b"\x10" * (speech_ms * 8) + b"\xff" * 800
    assert proportional_words(text, ulaw) == tuple(WordTiming(*e) for e in expected)


def test_other_text_over_a_measured_clip_is_estimated() -> None:
    lo, hi = speech_span_ms(GREETING_ULAW)
    words = word_timings("Hello there", GREETING_ULAW)  # not the clip's own words
    assert words == (WordTiming("Hello", lo, lo + (hi - lo) * 5 // 10), WordTiming("there", lo + (hi - lo) // 2, hi))


def test_spoken_words_are_those_ending_within_the_audio_heard() -> None:
    words = (WordTiming("a", 200, 400), WordTiming("b", 400, 700))
    assert [spoken_words(words, ms) for ms in (0, 399, 400, 699, 700, 1e9)] == [
        (), (), words[:1], words[:1], words, words
    ]


async def _default_reply(config: FakeAgentConfig) -> list[dict[str, Any]]:
    agent = FakeAgent(config)
    async with connect(agent) as ws:
        await start(ws)
        session = await agent.wait_for_session()
        await agent.user_turn(session.session_id, "pick a number")
        await recv_until(ws, "reply.started")
        return await recv_until(ws, "reply.done")


REPLY_WORDS = [(w, start + 200, end + 200) for w, start, end in WORDS["reply"]["words"]]


async def test_word_deltas_after_the_audio_match_the_audio() -> None:
    events = await _default_reply(FakeAgentConfig())
    kinds = types(events)
    first_delta = kinds.index("transcript.agent.delta")
    assert set(kinds[:first_delta]) == {"reply.audio"}
    assert kinds[first_delta:] == ["transcript.agent.delta"] * 6 + ["transcript.agent", "reply.done"]
    deltas = events[first_delta:-2]
    assert [(d["delta"], d["start_ms"], d["end_ms"]) for d in deltas] == REPLY_WORDS
    assert " ".join(d["delta"] for d in deltas) == events[-2]["text"] == DEFAULT_REPLY_TEXT
    reply_id, item_id = events[-1]["reply_id"], events[-2]["item_id"]
    assert all((d["reply_id"], d["item_id"]) == (reply_id, item_id) for d in deltas)
    assert all(type(d["start_ms"]) is int and type(d["end_ms"]) is int for d in deltas)
    audio = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "reply.audio")
    assert mean_abs_level(audio[: deltas[0]["start_ms"] * 8], PCMU) < 5  # before: (near) silence
    for d in deltas:  # each word's span of the reply audio as sent holds speech
        assert mean_abs_level(audio[d["start_ms"] * 8 : d["end_ms"] * 8], PCMU) > 300


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (FakeAgentConfig(word_deltas="off"), []),
        (FakeAgentConfig(delta_leading_space=True),
         [(w if i == 0 else " " + w, s, e) for i, (w, s, e) in enumerate(REPLY_WORDS)]),
        (FakeAgentConfig(word_times_from="clip"), [(w, s - 200, e - 200) for w, s, e in REPLY_WORDS]),
        (FakeAgentConfig(leading_silence_ms=500), [(w, s + 300, e + 300) for w, s, e in REPLY_WORDS]),
        (FakeAgentConfig(leading_silence_ms=500, word_times_from="clip"),
         [(w, s - 200, e - 200) for w, s, e in REPLY_WORDS]),
    ],
)  # fmt: skip
async def test_word_delta_options(config: FakeAgentConfig, expected: list[tuple[str, int, int]]) -> None:
    events = await _default_reply(config)
    deltas = [e for e in events if e["type"] == "transcript.agent.delta"]
    assert [(d["delta"], d["start_ms"], d["end_ms"]) for d in deltas] == expected
    assert events[-2]["text"] == DEFAULT_REPLY_TEXT


async def test_word_deltas_first_audio_come_right_after_the_first_chunk() -> None:
    events = await _default_reply(FakeAgentConfig(word_deltas="first_audio"))
    kinds = types(events)
    assert kinds[:8] == ["reply.audio"] + ["transcript.agent.delta"] * 6 + ["reply.audio"]
    assert kinds.count("transcript.agent.delta") == 6
    assert kinds[-3:] == ["reply.audio", "transcript.agent", "reply.done"]


async def test_silent_tool_preamble_has_no_word_deltas() -> None:
    agent = FakeAgent(FakeAgentConfig(tool_on_turn={1: TOOL}))
    async with connect(agent) as ws:
        _, events = await _tool_preamble(ws, agent)
        rest = await recv_until(ws, "reply.done")
    assert types(rest) == ["reply.done"] and "transcript.agent.delta" not in types(events)


@pytest.mark.parametrize(
    ("chunks", "text"),
    [
        # 37.5 ms chunks; "Sure." ends at 638 ms of reply audio, "Your" at 1160, "random" at 1559.
        (1, ""),
        (17, ""),  # 637.5 ms sent: "Sure." not yet wholly spoken
        (18, "Sure."),  # 675 ms
        (31, "Sure. Your"),  # 1162.5 ms
        (41, "Sure. Your"),  # 1537.5 ms: "random" is cut
        (42, "Sure. Your random"),  # 1575 ms
    ],
)
async def test_barge_in_truncates_transcript_by_word_times(autojump_clock: Any, chunks: int, text: str) -> None:
    agent = FakeAgent(FakeAgentConfig(speed=1.0))
    async with connect(agent) as ws:
        await start(ws)
        session = await agent.wait_for_session()
        await agent.user_turn(session.session_id, "pick a number")
        await recv_until(ws, "reply.started")
        for _ in range(chunks):
            assert (await recv(ws))["type"] == "reply.audio"
        await agent.barge_in(session.session_id)
        burst = await recv_until(ws, "reply.done")
    assert types(burst) == ["input.speech.started", "transcript.agent", "reply.done"]  # no deltas
    assert (burst[1]["text"], burst[1]["interrupted"], burst[2]["status"]) == (text, True, "interrupted")


async def test_barge_in_after_first_audio_deltas_keeps_them_and_truncates(autojump_clock: Any) -> None:
    agent = FakeAgent(FakeAgentConfig(speed=1.0, word_deltas="first_audio"))
    async with connect(agent) as ws:
        await start(ws)
        session = await agent.wait_for_session()
        await agent.user_turn(session.session_id, "pick a number")
        await recv_until(ws, "reply.started")
        events = [await recv(ws) for _ in range(1 + 6)]
        await agent.barge_in(session.session_id)
        burst = await recv_until(ws, "reply.done")
    assert types(events) == ["reply.audio"] + ["transcript.agent.delta"] * 6
    assert [e["type"] for e in burst if e["type"] != "reply.audio"] == [
        "input.speech.started", "transcript.agent", "reply.done"
    ]
    assert burst[-2]["text"] == "" and burst[-2]["interrupted"] is True


# --- tools ----------------------------------------------------------------------------------


async def _tool_preamble(ws: WebSocketConnection, agent: FakeAgent) -> tuple[str, list[Any]]:
    await start(ws)
    session = await agent.wait_for_session()
    await agent.user_turn(session.session_id, "random number please")
    events = await recv_until(ws, "tool.call")
    return session.session_id, events


async def test_tool_flow_late_result() -> None:
    agent = FakeAgent(FakeAgentConfig(tool_on_turn={1: TOOL}))
    async with connect(agent) as ws:
        _, events = await _tool_preamble(ws, agent)
        preamble_id = events[-2]["reply_id"]
        call = events[-1]
        assert types(events[-2:]) == ["reply.started", "tool.call"]
        assert (call["name"], call["arguments"]) == TOOL
        assert call["call_id"].startswith("chatcmpl-tool-")
        done = await recv(ws)
        assert (done["type"], done["reply_id"], done["status"]) == ("reply.done", preamble_id, "completed")
        await send(ws, {"type": "tool.result", "call_id": call["call_id"], "result": '{"n": 7}'})
        answer = await recv_until(ws, "reply.done")
    assert answer[0]["type"] == "reply.started"
    assert answer[0]["reply_id"] != preamble_id
    assert answer[-1]["status"] == "completed"
    [session] = agent.sessions.values()
    assert [r["result"] for r in session.tool_results] == ['{"n": 7}']


async def test_tool_flow_early_result_is_accepted(autojump_clock: Any) -> None:
    agent = FakeAgent(FakeAgentConfig(tool_on_turn={1: TOOL}, tool_preamble_s=1.0))
    async with connect(agent) as ws:
        _, events = await _tool_preamble(ws, agent)
        call_id = events[-1]["call_id"]
        await send(ws, {"type": "tool.result", "call_id": call_id, "result": "7"})
        following = await recv_until(ws, "reply.started")
        answer = await recv_until(ws, "reply.done")
    assert types(following) == ["reply.done", "reply.started"]
    assert following[0]["reply_id"] == events[-2]["reply_id"]
    assert following[1]["reply_id"] != events[-2]["reply_id"]
    assert answer[-1]["status"] == "completed"


async def test_tool_result_errors_are_non_fatal() -> None:
    agent = FakeAgent(FakeAgentConfig(tool_on_turn={1: TOOL}))
    async with connect(agent) as ws:
        _, events = await _tool_preamble(ws, agent)
        call_id = events[-1]["call_id"]
        await recv_until(ws, "reply.done")
        await send(ws, {"type": "tool.result", "call_id": call_id, "result": {"n": 7}})
        await send(ws, {"type": "tool.result", "call_id": "chatcmpl-tool-nope", "result": "7"})
        errors = [await recv(ws), await recv(ws)]
        await send(ws, {"type": "tool.result", "call_id": call_id, "result": "7"})
        answer = await recv_until(ws, "reply.done")
    assert [(e["code"], e["param"]) for e in errors] == [
        ("invalid_format", "result"),
        ("invalid_value", "call_id"),
    ]
    assert answer[0]["type"] == "reply.started"


async def test_tool_timeout_gives_apology_reply(autojump_clock: Any) -> None:
    agent = FakeAgent(FakeAgentConfig(tool_on_turn={1: TOOL}, tool_timeout_s=120.0))
    async with connect(agent) as ws:
        await _tool_preamble(ws, agent)
        await recv_until(ws, "reply.done")
        t0 = trio.current_time()
        apology = await recv_until(ws, "reply.done")
        assert trio.current_time() - t0 == pytest.approx(120.0)
    assert [e["text"] for e in apology if e["type"] == "transcript.agent"] == [APOLOGY_TEXT]


@pytest.mark.parametrize(
    ("result", "text", "clip"),
    [
        ('{"result":5,"min":1,"max":10}', "Sure. Your random number is five.", "number_5"),
        ('{"result":1}', "Sure. Your random number is one.", "number_1"),
        ('{"result":10,"min":1,"max":10}', "Sure. Your random number is ten.", "number_10"),
        ("7", "Sure. Your random number is seven.", "number_7"),
        ('{"result":0}', FOUND_TEXT, "found"),
        ('{"result":11}', FOUND_TEXT, "found"),
        ('{"result":true}', FOUND_TEXT, "found"),
        ('{"result":5.0}', FOUND_TEXT, "found"),
        ('{"result":"5"}', FOUND_TEXT, "found"),
        ('{"error":"min must not be greater than max"}', FOUND_TEXT, "found"),
        ('{"n": 7}', FOUND_TEXT, "found"),
        ("not json", FOUND_TEXT, "found"),
        ("[5]", FOUND_TEXT, "found"),
    ],
)
def test_tool_answer_names_the_number_the_tool_returned(result: str, text: str, clip: str) -> None:
    assert tool_answer(result) == (text, clip)
    assert (REPO / "tools" / "audio" / f"{clip}.ulaw").is_file()


@pytest.mark.parametrize("n", [3, 5, 10])
async def test_tool_answer_audio_and_transcript_agree_with_the_result(n: int) -> None:
    agent = FakeAgent(FakeAgentConfig(tool_on_turn={1: TOOL}))
    async with connect(agent) as ws:
        _, events = await _tool_preamble(ws, agent)
        await recv_until(ws, "reply.done")
        result = orjson.dumps({"result": n, "min": 1, "max": 10}).decode()
        await send(ws, {"type": "tool.result", "call_id": events[-1]["call_id"], "result": result})
        answer = await recv_until(ws, "reply.done")
    audio = b"".join(base64.b64decode(e["data"]) for e in answer if e["type"] == "reply.audio")
    clip = (REPO / "tools" / "audio" / f"number_{n}.ulaw").read_bytes()
    assert audio == b"\xff" * 1600 + clip  # 200 ms of leading silence, then the clip
    [transcript] = [e for e in answer if e["type"] == "transcript.agent"]
    assert transcript["text"] == tool_answer(result)[0]
    assert transcript["text"].endswith(("one", "two", "three", "four", "five", "six", "seven",
                                        "eight", "nine", "ten")[n - 1] + ".")


async def test_tool_answer_with_an_error_result_is_the_generic_clip() -> None:
    agent = FakeAgent(FakeAgentConfig(tool_on_turn={1: TOOL}))
    async with connect(agent) as ws:
        _, events = await _tool_preamble(ws, agent)
        await recv_until(ws, "reply.done")
        result = '{"error":"min must not be greater than max"}'
        event = {"type": "tool.result", "call_id": events[-1]["call_id"], "result": result, "is_error": True}
        await send(ws, event)
        answer = await recv_until(ws, "reply.done")
    audio = b"".join(base64.b64decode(e["data"]) for e in answer if e["type"] == "reply.audio")
    assert audio.endswith((REPO / "tools" / "audio" / "found.ulaw").read_bytes())
    assert [e["text"] for e in answer if e["type"] == "transcript.agent"] == [FOUND_TEXT]


async def test_scripted_tool_call_and_legacy_args_key() -> None:
    agent = FakeAgent(FakeAgentConfig(faults=FaultPlan(tool_args_key="args")))
    async with connect(agent) as ws:
        await start(ws)
        session = await agent.wait_for_session()
        call_id = await agent.tool_call(session.session_id, "lookup", {"q": "x"})
        events = await recv_until(ws, "reply.done")
        await send(ws, {"type": "tool.result", "call_id": call_id, "result": "ok"})
        answer = await recv_until(ws, "reply.done")
    assert types(events) == ["reply.started", "tool.call", "reply.done"]
    assert events[1]["args"] == {"q": "x"} and "arguments" not in events[1]
    assert events[1]["call_id"] == call_id
    assert answer[0]["reply_id"] != events[0]["reply_id"]


# --- mid-session, non-fatal errors, reply.create, end ---------------------------------------


async def test_mid_session_update_mutable_and_immutable() -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await start(ws, update(greeting="Hi"))
        await recv_until(ws, "reply.done")
        new_tools = [{"type": "function", "name": "end_call"}]
        await send(ws, {"type": "session.update", "session": {"tools": new_tools}})
        updated = await recv(ws)
        await send(ws, {"type": "session.update", "session": {"output": {"voice": "james"}}})
        await send(ws, {"type": "session.update", "session": {"output": {"voice": "nobody"}}})
        await send(ws, {"type": "session.update", "session": {"greeting": "Hello"}})
        errors = [await recv(ws) for _ in range(3)]
        await send(ws, {"type": "session.end"})
        rest, code = await drain(ws)
    assert updated["type"] == "session.updated"
    assert updated["config"]["tools"] == new_tools
    assert [(e["code"], e["param"]) for e in errors] == [
        ("immutable_field", "output.voice"),
        ("immutable_field", "output.voice"),
        ("immutable_field", "greeting"),
    ]
    assert (types(rest), code) == (["session.ended"], 1000)
    [session] = agent.sessions.values()
    assert session.config["output"]["voice"] == "ivy"


async def test_non_fatal_errors_keep_session_open() -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await start(ws)
        await ws.send_message("{nope")
        await send(ws, {"type": "made.up"})
        await send(ws, {"type": "input.audio"})
        await send(ws, {"type": "input.audio", "audio": "!!not base64!!"})
        await ws.send_message(b"\x00binary")
        errors = [await recv(ws) for _ in range(5)]
        await send(ws, {"type": "session.end"})
        rest, code = await drain(ws)
    codes = ["invalid_format", "invalid_format", "invalid_format", "invalid_audio", "invalid_format"]
    assert [e["code"] for e in errors] == codes
    assert all(e["type"] == "session.error" and e["session_id"] for e in errors)
    assert (types(rest), code) == (["session.ended"], 1000)
    [session] = agent.sessions.values()
    assert session.errors_sent == codes


async def test_reply_create_honours_instructions() -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await start(ws)
        await send(ws, {"type": "reply.create", "instructions": "Say you are still here."})
        events = await recv_until(ws, "reply.done")
    assert events[0]["type"] == "reply.started"
    assert [e["text"] for e in events if e["type"] == "transcript.agent"] == [
        "Say you are still here."
    ]


async def test_session_end_closes_1000_and_refuses_resume(autojump_clock: Any) -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await start(ws)
        await trio.sleep(2.5)
        await send(ws, {"type": "session.end"})
        events, code = await drain(ws)
    [ended] = events
    assert (ended["type"], code) == ("session.ended", 1000)
    assert ended["session_duration_seconds"] == pytest.approx(2.5)
    assert ended["audio_duration_seconds"] is None
    [session] = agent.sessions.values()
    assert session.ended.is_set() and session.closed.is_set()
    async with connect(agent) as ws:
        await send(ws, {"type": "session.resume", "session_id": session.session_id})
        events, code = await drain(ws)
    assert [(e["type"], e["code"]) for e in events] == [("session.error", "session_not_found")]
    assert code == 1008
    assert agent.connections_open == 0


async def test_end_from_server() -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await start(ws)
        session = await agent.wait_for_session()
        await agent.end_from_server(session.session_id)
        events, code = await drain(ws)
    assert (types(events), code) == (["session.ended"], 1000)


# --- drop and resume ------------------------------------------------------------------------


async def test_drop_then_resume_within_grace_keeps_session_id(autojump_clock: Any) -> None:
    agent = FakeAgent(FakeAgentConfig(grace_s=30.0))
    async with connect_stream(agent) as (ws, stream):
        ready = await start(ws, update(greeting="Hi"))
        await recv_until(ws, "reply.done")
        session = await agent.wait_for_session()
        await stream.aclose()  # no close frame: a network drop
        await session.closed.wait()
    assert not session.dead and not session.ended.is_set()
    await trio.sleep(29.0)
    async with connect(agent) as ws:
        await send(ws, {"type": "session.resume", "session_id": ready["session_id"]})
        resumed = await recv(ws)
        assert resumed["type"] == "session.ready"  # no session.updated, no greeting replay
        assert resumed["session_id"] == ready["session_id"]
        assert resumed["config"] == ready["config"]
        await agent.user_turn(session.session_id, "still there?")
        events = await recv_until(ws, "reply.done")
        assert events[0]["type"] == "input.speech.started"
    assert session.user_turns == 1
    assert agent.connections_open == 0


async def test_resume_after_grace_is_session_not_found(autojump_clock: Any) -> None:
    agent = FakeAgent(FakeAgentConfig(grace_s=30.0))
    async with connect_stream(agent) as (ws, stream):
        ready = await start(ws)
        session = await agent.wait_for_session()
        await stream.aclose()
        await session.closed.wait()
    await trio.sleep(31.0)
    async with connect(agent) as ws:
        await send(ws, {"type": "session.resume", "session_id": ready["session_id"]})
        events, code = await drain(ws)
    assert ([e["code"] for e in events], code) == (["session_not_found"], 1008)


async def test_resume_unknown_id_is_session_not_found() -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await send(ws, {"type": "session.resume", "session_id": "sess_" + "0" * 32})
        events, code = await drain(ws)
    assert ([e["code"] for e in events], code) == (["session_not_found"], 1008)


# --- conversation recovery hooks: refused resume, instructions, prompts ---------------------


@pytest.mark.parametrize("wait_s", [0.0, 1.0, 15.0, 29.0])
async def test_fault_refuse_resume_even_within_grace(autojump_clock: Any, wait_s: float) -> None:
    agent = FakeAgent(FakeAgentConfig(grace_s=30.0, faults=FaultPlan(refuse_resume=True)))
    async with connect_stream(agent) as (ws, stream):
        ready = await start(ws)
        session = await agent.wait_for_session()
        await stream.aclose()  # a network drop
        await session.closed.wait()
    await trio.sleep(wait_s)
    async with connect(agent) as ws:
        await send(ws, {"type": "session.resume", "session_id": ready["session_id"]})
        events, code = await drain(ws)
    assert ([(e["type"], e["code"], e["param"]) for e in events], code) == (
        [("session.error", "session_not_found", "session_id")], 1008
    )
    async with connect(agent) as ws:  # the next step: a fresh session carrying the conversation
        fresh = await start(ws, update(system_prompt="Conversation so far: caller asked for a number."))
        assert fresh["session_id"] != ready["session_id"]
        assert await nothing_within(ws, 30)  # no greeting in the update: silent
    assert agent.system_prompts == [BASE_SESSION["system_prompt"], "Conversation so far: caller asked for a number."]
    assert agent.errors_sent == ["session_not_found"]


def test_cli_refuse_resume_flag() -> None:
    from tools.fake_agent import _build_parser, config_from_args

    assert config_from_args(_build_parser().parse_args(["--refuse-resume"])).faults.refuse_resume is True
    assert config_from_args(_build_parser().parse_args([])).faults.refuse_resume is False


async def test_resume_without_the_fault_still_works(autojump_clock: Any) -> None:
    agent = FakeAgent(FakeAgentConfig(faults=FaultPlan(refuse_resume=False)))
    async with connect_stream(agent) as (ws, stream):
        ready = await start(ws)
        session = await agent.wait_for_session()
        await stream.aclose()
        await session.closed.wait()
    async with connect(agent) as ws:
        await send(ws, {"type": "session.resume", "session_id": ready["session_id"]})
        resumed = await recv(ws)
    assert (resumed["type"], resumed["session_id"]) == ("session.ready", ready["session_id"])


@pytest.mark.parametrize(
    ("clips", "instructions", "text", "clip"),
    [
        ({}, "Tell the caller you are back.", "Tell the caller you are back.", "reply"),
        ({}, None, DEFAULT_REPLY_TEXT, "reply"),
        ({"goodbye": "goodbye"}, "Say goodbye and hang up.", "Thanks for calling, goodbye!", "goodbye"),
        ({"number": "number_3", "goodbye": "goodbye"}, "Read the number 3 back, then say goodbye",
         "Sure. Your random number is three.", "number_3"),  # the first key that matches wins
        ({"nothing matches": "goodbye"}, "Carry on.", "Carry on.", "reply"),
        ({"goodbye": "goodbye"}, None, DEFAULT_REPLY_TEXT, "reply"),
    ],
)  # fmt: skip
async def test_reply_create_instructions_pick_text_and_clip(
    clips: dict[str, str], instructions: str | None, text: str, clip: str
) -> None:
    agent = FakeAgent(FakeAgentConfig(instruction_clips=clips))
    async with connect(agent) as ws:
        await start(ws)
        event: dict[str, Any] = {"type": "reply.create"}
        if instructions is not None:
            event["instructions"] = instructions
        await send(ws, event)
        events = await recv_until(ws, "reply.done")
    audio = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "reply.audio")
    assert audio == b"\xff" * 1600 + (REPO / "tools" / "audio" / f"{clip}.ulaw").read_bytes()
    assert [e["text"] for e in events if e["type"] == "transcript.agent"] == [text]
    deltas = [e["delta"] for e in events if e["type"] == "transcript.agent.delta"]
    assert deltas == text.split()
    assert agent.reply_instructions == [instructions]


async def test_prompts_and_instructions_are_recorded_in_order() -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await start(ws)
        await send(ws, {"type": "reply.create", "instructions": "first"})
        await send(ws, {"type": "session.update", "session": {"system_prompt": "second prompt"}})
        await send(ws, {"type": "session.update", "session": {"tools": []}})
        await send(ws, {"type": "session.update", "session": {"system_prompt": 5}})  # rejected
        await send(ws, {"type": "reply.create", "instructions": 5})  # rejected
        await send(ws, {"type": "reply.create"})
        await send(ws, {"type": "session.end"})
        await drain(ws)
    async with connect(agent) as ws:
        await start(ws, {"type": "session.update", "session": {}})
    assert agent.system_prompts == [BASE_SESSION["system_prompt"], "second prompt", None, None]
    assert agent.reply_instructions == ["first", None]
    assert agent.errors_sent == ["invalid_format", "invalid_format"]


async def test_mid_session_update_without_greeting_stays_silent(autojump_clock: Any) -> None:
    agent = FakeAgent()
    async with connect(agent) as ws:
        await start(ws)
        await send(ws, {"type": "session.update", "session": {"system_prompt": "New context."}})
        assert (await recv(ws))["type"] == "session.updated"
        assert await nothing_within(ws, 30)


# --- echo mode ------------------------------------------------------------------------------


async def test_echo_mode_returns_identical_payloads() -> None:
    agent = FakeAgent(FakeAgentConfig(mode="echo", echo_barge_in_every_n=5))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        async with tcp_client(agent.url) as ws:
            await start(ws, update(greeting="Hi"))  # greeting is skipped in echo mode
            payloads = [b64(bytes([i]) * 160) for i in range(20)]
            for payload in payloads:
                await send(ws, {"type": "input.audio", "audio": payload})
            raw = [await ws.get_message() for _ in range(1 + 20 + 4)]
        nursery.cancel_scope.cancel()
    events = [orjson.loads(r) for r in raw]
    assert events[0]["type"] == "reply.started"
    reply_id = events[0]["reply_id"]
    echoes = [e for e in events if e["type"] == "reply.audio"]
    assert [e["data"] for e in echoes] == payloads
    assert all(e["reply_id"] == reply_id and isinstance(e["timestamp"], float) for e in echoes)
    kinds = types(events[1:])
    assert kinds.count("input.speech.started") == 4
    assert kinds[kinds.index("input.speech.started") + 1] == "reply.audio"
    assert kinds.index("input.speech.started") == 4  # right before the 5th echo
    assert agent.connections_open == 0


# --- faults ---------------------------------------------------------------------------------


async def test_fault_reject_first_n_then_accept() -> None:
    agent = FakeAgent(FakeAgentConfig(faults=FaultPlan(reject_first_n=2)))
    for _ in range(2):
        async with connect(agent) as ws:
            events, code = await drain(ws)
        assert ([e["code"] for e in events], code) == (["at_capacity"], 1008)
    async with connect(agent) as ws:
        assert (await start(ws))["type"] == "session.ready"
    assert agent.connections_total == 3


async def test_fault_unauthorized() -> None:
    agent = FakeAgent(FakeAgentConfig(faults=FaultPlan(unauthorized=True)))
    async with connect(agent) as ws:
        events, code = await drain(ws)
    assert ([e["code"] for e in events], code) == (["unauthorized"], 1008)


async def test_fault_never_ready(autojump_clock: Any) -> None:
    agent = FakeAgent(FakeAgentConfig(faults=FaultPlan(never_ready=True)))
    async with connect(agent) as ws:
        await send(ws, update(greeting="Hi"))
        await send(ws, {"type": "input.audio", "audio": b64(b"\xff" * 160)})
        assert await nothing_within(ws, 60)
    [session] = agent.sessions.values()
    assert not session.was_ready
    assert session.audio_before_ready == 1


async def test_fault_close_1011_without_session_ended_then_resume(autojump_clock: Any) -> None:
    agent = FakeAgent(FakeAgentConfig(faults=FaultPlan(close_1011_after_s=5.0)))
    async with connect(agent) as ws:
        ready = await start(ws)
        t0 = trio.current_time()
        events, code = await drain(ws)
        assert trio.current_time() - t0 == pytest.approx(5.0)
    assert (events, code) == ([], 1011)
    async with connect(agent) as ws:
        await send(ws, {"type": "session.resume", "session_id": ready["session_id"]})
        assert (await recv(ws))["session_id"] == ready["session_id"]
        assert await nothing_within(ws, 10)  # the fault fires on the first connection only


async def test_fault_drop_tcp_resets_without_close_frame() -> None:
    agent = FakeAgent(FakeAgentConfig(faults=FaultPlan(drop_tcp_after_s=0.05)))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        async with tcp_client(agent.url) as ws:
            ready = await start(ws)
            events, code = await drain(ws)
        assert (events, code) == ([], 1006)
        async with tcp_client(agent.url) as ws:
            await send(ws, {"type": "session.resume", "session_id": ready["session_id"]})
            assert (await recv(ws))["session_id"] == ready["session_id"]
        nursery.cancel_scope.cancel()
    assert agent.connections_open == 0


async def test_fault_stop_reading_backpressures_the_client() -> None:
    agent = FakeAgent(FakeAgentConfig(faults=FaultPlan(stop_reading=True)))
    frame = orjson.dumps({"type": "input.audio", "audio": b64(b"\xff" * 48000)}).decode()
    blocked = False
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        async with tcp_client(agent.url) as ws:
            await start(ws)
            for _ in range(2000):  # loopback buffers hold a few MB at most
                with trio.move_on_after(0.2) as scope:
                    await ws.send_message(frame)
                if scope.cancelled_caught:
                    blocked = True
                    break
            nursery.cancel_scope.cancel()
    assert blocked
    [session] = agent.sessions.values()
    assert session.input_audio == []
    assert agent.connections_open == 0


async def test_fault_garbage_after_ready() -> None:
    agent = FakeAgent(FakeAgentConfig(faults=FaultPlan(garbage_after_ready=True)))
    async with connect(agent) as ws:
        await start(ws)
        frames = [await ws.get_message() for _ in range(5)]
    assert frames[0] == "this is not json {"
    assert isinstance(frames[1], bytes)
    typeless = orjson.loads(frames[2])
    assert "type" not in typeless and typeless["code"] == "server_error"
    assert [orjson.loads(f)["type"] for f in frames[3:]] == ["transcript.agent.delta", "reply.error"]


async def test_fault_session_cap(autojump_clock: Any) -> None:
    agent = FakeAgent(FakeAgentConfig(faults=FaultPlan(session_cap_s=60.0)))
    async with connect(agent) as ws:
        await start(ws)
        events, code = await drain(ws)
        assert trio.current_time() == pytest.approx(60.0)
    assert [(e["type"], e.get("code")) for e in events] == [
        ("session.error", "session_expired"),
        ("session.ended", None),
    ]
    assert code == 1008
    [session] = agent.sessions.values()
    assert session.dead and session.ended.is_set()


# --- pure VAD and the CLI -------------------------------------------------------------------


def test_energy_vad_onset_and_hangover() -> None:
    vad = EnergyVad(threshold=300.0, onset_ms=100.0, hangover_ms=500.0)
    loud, quiet = 2000.0, 0.0
    assert [vad.feed(loud, 20.0) for _ in range(5)] == [None] * 4 + [VadEvent.SPEECH_STARTED]
    assert [vad.feed(quiet, 20.0) for _ in range(24)] == [None] * 24
    assert vad.feed(loud, 20.0) is None  # a short pause does not end the turn
    assert [vad.feed(quiet, 100.0) for _ in range(5)] == [None] * 4 + [VadEvent.SPEECH_STOPPED]
    assert [vad.feed(loud, 20.0) for _ in range(4)] == [None] * 4  # 80 ms blip: no onset


async def test_cli_prints_url_serves_and_exits_0_on_sigint() -> None:
    with trio.fail_after(15):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tools.fake_agent", "--port", "0", "--echo"],
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
            match = re.fullmatch(rb"Fake Voice Agent listening on (ws://127\.0\.0\.1:\d+/v1/ws)\n", line)
            assert match, line
            async with tcp_client(match[1].decode()) as ws:
                await start(ws)
                await send(ws, {"type": "input.audio", "audio": "//8="})
                assert (await recv(ws))["type"] == "reply.started"
                assert (await recv(ws))["data"] == "//8="
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
