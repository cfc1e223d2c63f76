"""CallState decisions as tables of (event, now) -> actions, including duplicated, reordered and late
messages. Events are built from wire frames shaped as in ../shared/reference/ and parsed by the real
codecs, so the state machine sees exactly what it sees in production.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.agent import events as ag
from bridge.call.actions import Fact
from bridge.call.state import (
    Action,
    CallPolicy,
    CallState,
    ConnectAgent,
    EndCall,
    HangUp,
    Log,
    Outcome,
    Phase,
    RunTool,
    SendAgent,
    SendPhone,
    Transfer,
    TransferOutcome,
)
from bridge.phone import media as tw
from bridge.records.facts import AudioWritten, ClearSent, DtmfPressed, MarkPlayed, ToolFinished, ToolStarted

STREAM_SID = "MZ5d3c0f9a2b7e4c1d8f6a0b3e9c2d7f41"
CALL_SID = "CA9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d"
ACCOUNT_SID = "AC0f1e2d3c4b5a69788796a5b4c3d2e1f0"
FRAME = base64.b64encode(b"\xff" * 160).decode()  # 20 ms of mu-law silence, 216 chars
AGENT_AUDIO = base64.b64encode(b"\x7e" * 300).decode()  # 37.5 ms, as the service sends


# --- wire helpers --------------------------------------------------------------------------------

_seq = iter(range(2, 10**9))


def _tw(msg: dict[str, Any]) -> tw.TwilioEvent | tw.InvalidFrame:
    return tw.parse(orjson.dumps(msg).decode())


def start(call_sid: str = CALL_SID, stream_sid: str = STREAM_SID) -> tw.TwilioEvent | tw.InvalidFrame:
    return _tw(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": stream_sid,
            "start": {
                "accountSid": ACCOUNT_SID,
                "streamSid": stream_sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": {"session": "s-7f3a"},
            },
        }
    )


def media(payload: str = FRAME, stream_sid: str = STREAM_SID, chunk: int = 1) -> tw.TwilioEvent | tw.InvalidFrame:
    return _tw(
        {
            "event": "media",
            "sequenceNumber": str(next(_seq)),
            "streamSid": stream_sid,
            "media": {"track": "inbound", "chunk": str(chunk), "timestamp": str(chunk * 20), "payload": payload},
        }
    )


def mark(name: str, stream_sid: str = STREAM_SID) -> tw.TwilioEvent | tw.InvalidFrame:
    return _tw({"event": "mark", "sequenceNumber": str(next(_seq)), "streamSid": stream_sid, "mark": {"name": name}})


def stop(stream_sid: str = STREAM_SID) -> tw.TwilioEvent | tw.InvalidFrame:
    return _tw(
        {
            "event": "stop",
            "sequenceNumber": str(next(_seq)),
            "streamSid": stream_sid,
            "stop": {"accountSid": ACCOUNT_SID, "callSid": CALL_SID},
        }
    )


def _ag(msg: dict[str, Any]) -> ag.AgentEvent | ag.InvalidEvent:
    return ag.parse(orjson.dumps({**msg, "timestamp": 1790210400.12}).decode())


def ready(session_id: str = "sess_7a1e") -> ag.AgentEvent | ag.InvalidEvent:
    return _ag(
        {
            "type": "session.ready",
            "session_id": session_id,
            "expires_at": 1790214000,
            "resume_token": "rt",
            "config": {},
        }
    )


def speech_started() -> ag.AgentEvent | ag.InvalidEvent:
    return _ag({"type": "input.speech.started"})


def reply_started(reply_id: str) -> ag.AgentEvent | ag.InvalidEvent:
    return _ag({"type": "reply.started", "reply_id": reply_id, "item_id": "item_" + reply_id})


def reply_audio(reply_id: str, data: str = AGENT_AUDIO) -> ag.AgentEvent | ag.InvalidEvent:
    return _ag({"type": "reply.audio", "reply_id": reply_id, "data": data})


def reply_done(reply_id: str, status: str = "completed") -> ag.AgentEvent | ag.InvalidEvent:
    return _ag({"type": "reply.done", "reply_id": reply_id, "status": status})


def tool_call(call_id: str, name: str, arguments: Any = None) -> ag.AgentEvent | ag.InvalidEvent:
    return _ag(
        {"type": "tool.call", "call_id": call_id, "name": name, "arguments": {} if arguments is None else arguments}
    )


def error(code: str, message: str = "m", param: str | None = None) -> ag.AgentEvent | ag.InvalidEvent:
    msg: dict[str, Any] = {"type": "session.error", "code": code, "message": message}
    if param is not None:
        msg["param"] = param
    return _ag(msg)


def session_ended() -> ag.AgentEvent | ag.InvalidEvent:
    return _ag({"type": "session.ended", "session_duration_seconds": 35.28, "audio_duration_seconds": None})


# Expected wire text, written out rather than built with the code under test.
def to_agent(payload: str = FRAME) -> SendAgent:
    return SendAgent('{"type":"input.audio","audio":"' + payload + '"}', True)


def phone_audio(data: str = AGENT_AUDIO, epoch: int = 0) -> SendPhone:
    return SendPhone('{"event":"media","streamSid":"' + STREAM_SID + '","media":{"payload":"' + data + '"}}', epoch)


CLEAR = SendPhone('{"event":"clear","streamSid":"' + STREAM_SID + '"}')


def goodbye_mark(n: int = 1) -> SendPhone:
    return SendPhone('{"event":"mark","streamSid":"' + STREAM_SID + '","mark":{"name":"goodbye-' + str(n) + '"}}')


def played_mark(n: int) -> SendPhone:
    return SendPhone('{"event":"mark","streamSid":"' + STREAM_SID + '","mark":{"name":"played-' + str(n) + '"}}')


def result(call_id: str, text: str, is_error: bool = False) -> SendAgent:
    return SendAgent(
        orjson.dumps({"type": "tool.result", "call_id": call_id, "result": text, "is_error": is_error}).decode()
    )


END_CALL_OK = '{"ok":true,"note":"the call ends after your goodbye"}'


# --- steps -----------------------------------------------------------------------------------------

Step = Callable[[CallState], list[Action]]


def P(event: Any, now: float) -> Step:  # reads as a table column
    return lambda s: s.on_phone(event, now)


def A(event: Any, now: float) -> Step:
    return lambda s: s.on_agent(event, now)


def tick(now: float) -> Step:
    return lambda s: s.on_tick(now)


def done(call_id: str, text: str, now: float, is_error: bool = False) -> Step:
    return lambda s: s.on_tool_done(call_id, text, is_error, now)


def phone_closed(now: float) -> Step:
    return lambda s: s.on_phone_closed(now)


def agent_closed(now: float) -> Step:
    return lambda s: s.on_agent_closed(now, "1006")


def transfer_started() -> Step:
    return lambda s: (s.on_transfer_started(), [])[1]


def transfer_failed() -> Step:
    return lambda s: s.on_transfer_result("c1", TransferOutcome.FAILED, 0.0)


LIVE = [P(start(), 0.0), A(ready(), 0.5)]


def quiet(actions: Sequence[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, Log)]


def logs(actions: Sequence[Action]) -> list[Log]:
    return [a for a in actions if isinstance(a, Log)]


def run(steps: Sequence[Step], policy: CallPolicy | None = None, **kw: Any) -> tuple[CallState, list[list[Action]]]:
    # These tables jump minutes between Twilio messages; silence has its own tests below.
    policy = policy or CallPolicy()
    if policy.twilio_silence_s == CallPolicy().twilio_silence_s:
        policy = dataclasses.replace(policy, twilio_silence_s=1e9)
    state = CallState(policy, **kw)
    return state, [step(state) for step in steps]


# --- the decision table ----------------------------------------------------------------------------

TABLE: list[Any] = [
    # start
    ("start connects the agent", [], P(start(), 0.0), [ConnectAgent()]),
    ("second start is ignored", [P(start(), 0.0)], P(start(), 1.0), []),
    ("duplicated start after ready is ignored", LIVE, P(start(), 1.0), []),
    # caller media
    ("media before start is refused", [], P(media(), 0.0), []),
    ("media before ready is dropped", [P(start(), 0.0)], P(media(), 0.02), []),
    ("media after ready is forwarded byte-identical", LIVE, P(media(), 0.52), [to_agent()]),
    ("media for another streamSid is refused", LIVE, P(media(stream_sid="MZother"), 0.52), []),
    ("media after ending is dropped", [*LIVE, P(stop(), 1.0)], P(media(), 1.02), []),
    ("invalid frame is only logged", LIVE, P(tw.InvalidFrame("not JSON"), 1.0), []),
    # agent audio and barge-in
    (
        "agent audio goes to Twilio with the epoch",
        [*LIVE, A(reply_started("r1"), 1.0)],
        A(reply_audio("r1"), 1.1),
        [phone_audio()],
    ),
    (
        "speech.started clears playback",
        [*LIVE, A(reply_started("r1"), 1.0), A(reply_audio("r1"), 1.1)],
        A(speech_started(), 2.0),
        [CLEAR],
    ),
    (
        "interrupted reply's later audio is dropped",
        [*LIVE, A(reply_started("r1"), 1.0), A(reply_audio("r1"), 1.1), A(speech_started(), 2.0)],
        A(reply_audio("r1"), 2.1),
        [],
    ),
    (
        "next reply's audio carries the new epoch",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(reply_audio("r1"), 1.1),
            A(speech_started(), 2.0),
            A(reply_done("r1", "interrupted"), 2.1),
            A(reply_started("r2"), 3.0),
        ],
        A(reply_audio("r2"), 3.1),
        [phone_audio(epoch=2)],
    ),
    (
        "reply.done interrupted clears again",
        [*LIVE, A(reply_started("r1"), 1.0), A(reply_audio("r1"), 1.1), A(speech_started(), 2.0)],
        A(reply_done("r1", "interrupted"), 2.1),
        [CLEAR],
    ),
    (
        "reply.done completed marks the end of playback, no clear",
        [*LIVE, A(reply_started("r1"), 1.0), A(reply_audio("r1"), 1.1)],
        A(reply_done("r1"), 2.0),
        [played_mark(1)],
    ),
    (
        "reply.done completed without audio sends no mark",
        [*LIVE, A(reply_started("r1"), 1.0)],
        A(reply_done("r1"), 2.0),
        [],
    ),
    (
        "playback mark echo is quiet",
        [*LIVE, A(reply_started("r1"), 1.0), A(reply_audio("r1"), 1.1), A(reply_done("r1"), 2.0)],
        P(mark("played-1"), 3.0),
        [],
    ),
    (
        "speech after the reply was heard still clears",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(reply_audio("r1"), 1.1),
            A(reply_done("r1"), 2.0),
            P(mark("played-1"), 3.0),
        ],
        A(speech_started(), 4.0),
        [CLEAR],
    ),
    (
        "reply.audio after ending is dropped",
        [*LIVE, A(reply_started("r1"), 1.0), P(stop(), 2.0)],
        A(reply_audio("r1"), 2.1),
        [],
    ),
    ("reply.audio before start is dropped", [], A(reply_audio("r1"), 0.1), []),
    # marks
    ("mark echo for an unknown name is ignored", LIVE, P(mark("resp3-seg12"), 1.0), []),
    (
        "goodbye mark played hangs up",
        [*LIVE, A(reply_started("r1"), 1.0), A(tool_call("c1", "end_call"), 1.1), A(reply_done("r1"), 1.2)],
        P(mark("goodbye-1"), 4.0),
        [HangUp("the goodbye was played")],
    ),
    (
        "goodbye mark echoed twice hangs up once",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "end_call"), 1.1),
            A(reply_done("r1"), 1.2),
            P(mark("goodbye-1"), 4.0),
        ],
        P(mark("goodbye-1"), 4.1),
        [],
    ),
    (
        "goodbye mark flushed by a clear does not hang up",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "end_call"), 1.1),
            A(reply_done("r1"), 1.2),
            A(speech_started(), 2.0),
        ],
        P(mark("goodbye-1"), 2.01),
        [],
    ),
    (
        "goodbye deadline hangs up on tick",
        [*LIVE, A(reply_started("r1"), 1.0), A(tool_call("c1", "end_call"), 1.1), A(reply_done("r1"), 1.2)],
        tick(16.2),
        [HangUp("the goodbye mark did not come back in time")],
    ),
    (
        "goodbye deadline not yet reached",
        [*LIVE, A(reply_started("r1"), 1.0), A(tool_call("c1", "end_call"), 1.1), A(reply_done("r1"), 1.2)],
        tick(16.19),
        [],
    ),
    (
        "goodbye deadline cancelled by a clear",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "end_call"), 1.1),
            A(reply_done("r1"), 1.2),
            A(speech_started(), 2.0),
        ],
        tick(100.0),
        [],
    ),
    # stop, close, ending
    (
        "stop ends the call and the upstream session",
        LIVE,
        P(stop(), 5.0),
        [EndCall("caller hung up (stop)", Outcome.CALLER_HUNG_UP, True)],
    ),
    (
        "stop while connecting ends the upstream session too",
        [P(start(), 0.0)],
        P(stop(), 1.0),
        [EndCall("caller hung up (stop)", Outcome.CALLER_HUNG_UP, True)],
    ),
    (
        "stop before start has no upstream to end",
        [],
        P(stop(), 1.0),
        [EndCall("caller hung up (stop)", Outcome.CALLER_HUNG_UP, False)],
    ),
    ("stop for another streamSid is ignored", LIVE, P(stop("MZother"), 5.0), []),
    ("duplicated stop ends once", [*LIVE, P(stop(), 5.0)], P(stop(), 5.1), []),
    ("close after stop ends once", [*LIVE, P(stop(), 5.0)], phone_closed(5.1), []),
    (
        "close without stop is a hang-up",
        LIVE,
        phone_closed(5.0),
        [EndCall("Twilio closed the stream", Outcome.CALLER_HUNG_UP, True)],
    ),
    (
        "stop while transferring is the transfer",
        [*LIVE, transfer_started()],
        P(stop(), 5.0),
        [EndCall("Twilio stopped the stream for the transfer", Outcome.TRANSFERRED, True)],
    ),
    (
        "close while transferring is the transfer",
        [*LIVE, transfer_started()],
        phone_closed(5.0),
        [EndCall("Twilio closed the stream for the transfer", Outcome.TRANSFERRED, True)],
    ),
    (
        "stop after a failed transfer is a hang-up",
        [*LIVE, transfer_started(), transfer_failed()],
        P(stop(), 5.0),
        [EndCall("caller hung up (stop)", Outcome.CALLER_HUNG_UP, True)],
    ),
    (
        "stop after hanging up is the agent's ending",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "end_call"), 1.1),
            A(reply_done("r1"), 1.2),
            P(mark("goodbye-1"), 4.0),
        ],
        P(stop(), 4.5),
        [EndCall("call hung up after the goodbye", Outcome.AGENT_ENDED, True)],
    ),
    (
        "close after hanging up is the agent's ending",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "end_call"), 1.1),
            A(reply_done("r1"), 1.2),
            P(mark("goodbye-1"), 4.0),
        ],
        phone_closed(4.5),
        [EndCall("call hung up after the goodbye", Outcome.AGENT_ENDED, True)],
    ),
    (
        "agent drop while connecting is a failure",
        [P(start(), 0.0)],
        agent_closed(5.0),
        [EndCall("Voice Agent connection lost (1006)", Outcome.UPSTREAM_FAILED, False)],
    ),
    (
        "agent drop while live resumes the session",
        LIVE,
        agent_closed(5.0),
        [ConnectAgent(resume_session_id="sess_7a1e", attempt=1)],
    ),
    ("caller audio during a resume is dropped, never burst later", [*LIVE, agent_closed(5.0)], P(media(), 5.02), []),
    (
        "resumed session forwards audio again",
        [*LIVE, agent_closed(5.0), A(ready(), 6.0)],
        P(media(), 6.02),
        [to_agent()],
    ),
    (
        "second drop inside the window retries",
        [*LIVE, agent_closed(5.0)],
        agent_closed(6.0),
        [ConnectAgent(resume_session_id="sess_7a1e", attempt=2)],
    ),
    (
        "drop after the resume window ends the call",
        [*LIVE, agent_closed(5.0)],
        agent_closed(30.0),
        [EndCall("Voice Agent connection lost (1006)", Outcome.UPSTREAM_FAILED, False)],
    ),
    (
        "resume window expires on tick",
        [*LIVE, agent_closed(5.0)],
        tick(30.0),
        [EndCall("could not resume the Voice Agent session within 25 s", Outcome.UPSTREAM_FAILED, False)],
    ),
    ("resume window not yet expired", [*LIVE, agent_closed(5.0)], tick(29.99), []),
    ("resume window gone once resumed", [*LIVE, agent_closed(5.0), A(ready(), 6.0)], tick(31.0), []),
    (
        "failed resume connect ends the call",
        [*LIVE, agent_closed(5.0)],
        lambda s: s.on_agent_connect_failed(6.0, "HTTP 503"),
        [EndCall("could not resume the Voice Agent session: HTTP 503", Outcome.UPSTREAM_FAILED, False)],
    ),
    (
        "any error while resuming is fatal",
        [*LIVE, agent_closed(5.0)],
        A(error("session_not_found"), 6.0),
        [EndCall("Voice Agent error session_not_found: m", Outcome.UPSTREAM_FAILED, False)],
    ),
    (
        "session.ended ends the call",
        LIVE,
        A(session_ended(), 5.0),
        [EndCall("the Voice Agent ended the session", Outcome.UPSTREAM_FAILED, False)],
    ),
    ("agent close after session.ended is quiet", [*LIVE, A(session_ended(), 5.0)], agent_closed(5.1), []),
    ("session.ended after stop is quiet", [*LIVE, P(stop(), 5.0)], A(session_ended(), 5.1), []),
    ("late ready after ending is ignored", [P(start(), 0.0), P(stop(), 1.0)], A(ready(), 1.1), []),
    (
        "connect failure ends the call",
        [P(start(), 0.0)],
        lambda s: s.on_agent_connect_failed(1.0, "HTTP 503"),
        [EndCall("could not open the Voice Agent session: HTTP 503", Outcome.UPSTREAM_FAILED, False)],
    ),
    (
        "end_now ends the call",
        LIVE,
        lambda s: s.end_now("shutting down", Outcome.SERVER_SHUTDOWN),
        [EndCall("shutting down", Outcome.SERVER_SHUTDOWN, True)],
    ),
    (
        "end_now after ending is a no-op",
        [*LIVE, P(stop(), 1.0)],
        lambda s: s.end_now("shutting down", Outcome.SERVER_SHUTDOWN),
        [],
    ),
    # upstream errors
    (
        "fatal error ends the call",
        LIVE,
        A(error("session_expired"), 5.0),
        [EndCall("Voice Agent error session_expired: m", Outcome.UPSTREAM_FAILED, False)],
    ),
    (
        "upper-case fatal error ends the call",
        LIVE,
        A(error("INTERNAL_ERROR"), 5.0),
        [EndCall("Voice Agent error internal_error: m", Outcome.UPSTREAM_FAILED, False)],
    ),
    ("non-fatal error is only logged", LIVE, A(error("invalid_value"), 5.0), []),
    (
        "any error while connecting is fatal",
        [P(start(), 0.0)],
        A(error("invalid_value"), 0.3),
        [EndCall("Voice Agent error invalid_value: m", Outcome.UPSTREAM_FAILED, False)],
    ),
    ("error after ending is quiet", [*LIVE, P(stop(), 1.0)], A(error("unauthorized"), 1.1), []),
    # deadlines
    (
        "no ready within the deadline",
        [P(start(), 100.0)],
        tick(110.0),
        [EndCall("no session.ready within 10 s", Outcome.UPSTREAM_FAILED, True)],
    ),
    ("ready deadline not yet reached", [P(start(), 100.0)], tick(109.999), []),
    ("ready deadline is gone once ready", [P(start(), 100.0), A(ready(), 105.0)], tick(110.0), []),
    (
        "MAX_CALL_SECONDS ends the call",
        [P(start(), 100.0), A(ready(), 101.0)],
        tick(3700.0),
        [EndCall("call reached MAX_CALL_SECONDS=3600", Outcome.TIME_LIMIT, True)],
    ),
    ("MAX_CALL_SECONDS not yet reached", [P(start(), 100.0), A(ready(), 101.0)], tick(3699.999), []),
    ("tick after ending is quiet", [P(start(), 100.0), P(stop(), 101.0)], tick(10_000.0), []),
    # tool results (reference §7)
    (
        "tool result held while the asking reply is open",
        [*LIVE, A(reply_started("r1"), 1.0), A(tool_call("c1", "lookup"), 1.1)],
        done("c1", "42", 1.2),
        [],
    ),
    (
        "held tool result flushed on reply.done completed",
        [*LIVE, A(reply_started("r1"), 1.0), A(tool_call("c1", "lookup"), 1.1), done("c1", "42", 1.2)],
        A(reply_done("r1"), 1.3),
        [result("c1", "42")],
    ),
    (
        "tool result sent at once when reply.done is the latest event",
        [*LIVE, A(reply_started("r1"), 1.0), A(tool_call("c1", "lookup"), 1.1), A(reply_done("r1"), 1.3)],
        done("c1", "42", 2.0),
        [result("c1", "42")],
    ),
    (
        "tool result held after input.speech.started",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "lookup"), 1.1),
            A(reply_done("r1"), 1.3),
            A(speech_started(), 1.5),
        ],
        done("c1", "42", 2.0),
        [],
    ),
    (
        "tool result held after a new reply.started",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "lookup"), 1.1),
            A(reply_done("r1"), 1.3),
            A(reply_started("r2"), 1.5),
        ],
        done("c1", "42", 2.0),
        [],
    ),
    (
        "result held after speech flushed on the next completed reply",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "lookup"), 1.1),
            A(reply_done("r1"), 1.3),
            A(speech_started(), 1.5),
            done("c1", "42", 2.0),
            A(reply_started("r2"), 2.5),
        ],
        A(reply_done("r2"), 3.0),
        [result("c1", "42")],
    ),
    (
        "held result discarded when the asking reply is interrupted",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "lookup"), 1.1),
            done("c1", "42", 1.2),
            A(speech_started(), 1.3),
            A(reply_done("r1", "interrupted"), 1.4),
            A(reply_started("r2"), 2.0),
        ],
        A(reply_done("r2"), 3.0),
        [],
    ),
    (
        "late result of an interrupted reply is discarded",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "lookup"), 1.1),
            A(reply_done("r1", "interrupted"), 1.4),
            A(reply_started("r2"), 2.0),
            A(reply_done("r2"), 3.0),
        ],
        done("c1", "42", 3.5),
        [],
    ),
    (
        "held result flushed after tool_hold_max_s",
        [*LIVE, A(reply_started("r1"), 1.0), A(tool_call("c1", "lookup"), 1.1), done("c1", "42", 10.0)],
        tick(15.0),
        [result("c1", "42")],
    ),
    (
        "held result kept until tool_hold_max_s",
        [*LIVE, A(reply_started("r1"), 1.0), A(tool_call("c1", "lookup"), 1.1), done("c1", "42", 10.0)],
        tick(14.99),
        [],
    ),
    (
        "tool done twice sends once",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "lookup"), 1.1),
            A(reply_done("r1"), 1.3),
            done("c1", "42", 2.0),
        ],
        done("c1", "43", 2.1),
        [],
    ),
    ("tool done for an unknown call is ignored", LIVE, done("nope", "42", 2.0), []),
    (
        "tool done after ending is dropped",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "lookup"), 1.1),
            A(reply_done("r1"), 1.3),
            P(stop(), 1.5),
        ],
        done("c1", "42", 2.0),
        [],
    ),
    (
        "tool call runs the tool",
        [*LIVE, A(reply_started("r1"), 1.0)],
        A(tool_call("c1", "lookup", {"order": "A1"}), 1.1),
        [RunTool("c1", "lookup", {"order": "A1"})],
    ),
    (
        "duplicate tool.call is ignored",
        [*LIVE, A(reply_started("r1"), 1.0), A(tool_call("c1", "lookup"), 1.1)],
        A(tool_call("c1", "lookup"), 1.2),
        [],
    ),
    (
        "unreadable arguments give an error result, no tool run",
        [*LIVE, A(reply_started("r1"), 1.0), A(tool_call("c1", "lookup", "{oops"), 1.1)],
        A(reply_done("r1"), 1.3),
        [result("c1", '{"error":"arguments is not valid JSON"}', True)],
    ),
    # end_call
    (
        "end_call inside a reply waits for reply.done, then marks after the result",
        [*LIVE, A(reply_started("r1"), 1.0), A(tool_call("c1", "end_call"), 1.1)],
        A(reply_done("r1"), 1.2),
        [result("c1", END_CALL_OK), goodbye_mark()],
    ),
    (
        "end_call outside a reply marks at once",
        [*LIVE, A(reply_done("r0"), 1.0)],
        A(tool_call("c1", "end_call"), 1.1),
        [goodbye_mark()],
    ),
    (
        "end_call cancelled when the goodbye is interrupted",
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "end_call"), 1.1),
            A(speech_started(), 1.15),
            A(reply_done("r1", "interrupted"), 1.2),
            A(reply_started("r2"), 2.0),
        ],
        A(reply_done("r2"), 3.0),
        [],
    ),
]


@pytest.mark.parametrize(("steps", "last", "expected"), [pytest.param(*row[1:], id=row[0]) for row in TABLE])
def test_decision_table(steps: list[Step], last: Step, expected: list[Action]) -> None:
    state, _ = run(steps)
    assert quiet(last(state)) == expected


# --- details the table cannot show -----------------------------------------------------------------


def test_outbound_start_pads_silence_before_any_agent_audio() -> None:
    _, (actions,) = run([P(start(), 0.0)], CallPolicy(outbound=True, greeting_pad_ms=500))
    assert quiet(actions) == [ConnectAgent(), phone_audio(base64.b64encode(b"\xff" * 4000).decode(), 0)]


@pytest.mark.parametrize(("outbound", "pad_ms"), [(True, 0), (False, 500)])
def test_no_silence_pad_unless_outbound_with_a_pad(outbound: bool, pad_ms: int) -> None:
    _, (actions,) = run([P(start(), 0.0)], CallPolicy(outbound=outbound, greeting_pad_ms=pad_ms))
    assert quiet(actions) == [ConnectAgent()]


def test_start_for_another_call_is_rejected() -> None:
    state, (actions,) = run([P(start(call_sid="CA" + "0" * 32), 0.0)], expected_call_sid=CALL_SID)
    assert quiet(actions) == [
        EndCall(f"start callSid CA{'0' * 32} does not match the stream token", Outcome.REJECTED, False)
    ]
    assert state.phase is Phase.ENDING


def test_start_for_the_expected_call_connects() -> None:
    state, (actions,) = run([P(start(), 0.0)], expected_call_sid=CALL_SID)
    assert quiet(actions) == [ConnectAgent()]
    assert (state.stream_sid, state.call_sid, state.custom_parameters) == (STREAM_SID, CALL_SID, {"session": "s-7f3a"})


def test_second_start_keeps_the_first_stream() -> None:
    state, _ = run([P(start(), 0.0), P(start(stream_sid="MZother"), 1.0)])
    assert state.stream_sid == STREAM_SID and state.stats.invalid_twilio == 1


def test_media_counters() -> None:
    state, _ = run([P(media(), 0.0), P(start(), 0.0), P(media(), 0.02), A(ready(), 0.5), P(media(), 0.52)])
    assert state.stats.invalid_twilio == 1
    assert state.stats.frames_dropped_pre_ready == 1
    assert state.stats.frames_to_agent == 1
    assert state.stats.frames_from_twilio == 3


def test_invalid_frames_are_logged_at_most_five_times() -> None:
    state, outs = run([*LIVE, *[P(tw.InvalidFrame("bad"), 1.0 + i) for i in range(8)]])
    assert [len(logs(o)) for o in outs[2:]] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert state.stats.invalid_twilio == 8


# --- flood control -----------------------------------------------------------------------------------


def test_flood_is_cut_after_the_burst_allowance() -> None:
    state, _ = run(LIVE)
    sent = [quiet(state.on_phone(media(), 1.0)) for _ in range(1000)]
    assert sum(1 for s in sent if s) == 100  # 2000 ms of 20 ms frames at one instant
    assert sent[99] == [to_agent()] and sent[100] == []
    assert state.stats.frames_dropped_flood == 900
    # The bucket refills at real time: one second later, 50 more frames fit.
    later = [quiet(state.on_phone(media(), 2.0)) for _ in range(60)]
    assert sum(1 for s in later if s) == 50


def test_burst_allowance_follows_the_policy() -> None:
    state, _ = run(LIVE, CallPolicy(caller_burst_ms=200.0))
    sent = [quiet(state.on_phone(media(), 1.0)) for _ in range(20)]
    assert sum(1 for s in sent if s) == 10


@pytest.mark.parametrize("origin", [0.0, 12_345.678, 1.0e6])
def test_real_time_stream_for_ten_minutes_is_never_dropped(origin: float) -> None:
    """Regression guard: a caller speaking at exactly real time must never lose a frame."""
    state, _ = run([P(start(), origin), A(ready(), origin)])
    frames = 10 * 60 * 50
    for i in range(frames):
        assert state.on_phone(media(chunk=i + 1), origin + i * 0.02) == [to_agent()], f"frame {i} dropped"
    assert state.stats.frames_dropped_flood == 0
    assert state.stats.frames_to_agent == frames


def test_jittery_real_time_stream_is_never_dropped() -> None:
    """Frames bunched in fours (as after a network hiccup) still average real time."""
    state, _ = run(LIVE)
    for i in range(3000):
        now = 0.5 + (i // 4) * 0.08 + 0.079  # four frames delivered together every 80 ms
        assert quiet(state.on_phone(media(), now)) == [to_agent()]
    assert state.stats.frames_dropped_flood == 0


def test_odd_sized_frames_are_metered_by_their_bytes() -> None:
    """Any chunk size is accepted (reference §1.5); the bucket counts exact bytes (8 per ms)."""
    big = base64.b64encode(b"\xff" * 8000).decode()  # 1000 ms
    state, _ = run(LIVE, CallPolicy(caller_burst_ms=2000.0))
    assert [bool(quiet(state.on_phone(media(big), 1.0))) for _ in range(3)] == [True, True, False]


# --- barge-in bookkeeping --------------------------------------------------------------------------


def test_barge_in_bumps_the_epoch_and_counts_only_when_audio_was_sent() -> None:
    state, outs = run(
        [
            *LIVE,
            A(speech_started(), 1.0),  # nothing playing: clear, but no barge-in
            A(reply_started("r1"), 2.0),
            A(reply_audio("r1"), 2.1),
            A(speech_started(), 3.0),  # audio was sent: a barge-in
            A(reply_audio("r1"), 3.1),  # the interrupted reply keeps talking: dropped
        ]
    )
    assert quiet(outs[2]) == [CLEAR] and quiet(outs[5]) == [CLEAR]
    assert state.epoch == 2
    assert state.stats.barge_ins == 1
    assert state.stats.turns == 2
    assert state.stats.frames_dropped_interrupted == 1
    assert quiet(outs[4]) == [phone_audio(epoch=1)]


@pytest.mark.parametrize(
    ("steps", "barge_ins"),
    [
        pytest.param([A(reply_done("r1"), 2.0), P(mark("played-1"), 3.0)], 0, id="reply-heard-before-speech"),
        pytest.param([A(reply_done("r1"), 2.0)], 1, id="reply-still-playing"),
        pytest.param([], 1, id="reply-still-streaming"),
        pytest.param(
            [
                A(reply_done("r1"), 2.0),
                A(reply_started("r2"), 2.1),
                A(reply_audio("r2"), 2.2),
                P(mark("played-1"), 3.0),
            ],
            1,
            id="next-reply-playing-when-the-previous-mark-echoes",
        ),
    ],
)
def test_barge_ins_count_only_speech_over_unplayed_audio(steps: list[Step], barge_ins: int) -> None:
    """Regression: the echo of reply 1's playback mark must not hide reply 2's audio, which was sent
    after that mark and is still playing."""
    state, outs = run([*LIVE, A(reply_started("r1"), 1.0), A(reply_audio("r1"), 1.1), *steps, A(speech_started(), 4.0)])
    assert quiet(outs[-1]) == [CLEAR]
    assert state.stats.barge_ins == barge_ins


def test_clear_turns_pending_marks_into_flushed_echoes() -> None:
    state, outs = run(
        [
            *LIVE,
            A(reply_done("r0"), 1.0),
            A(tool_call("c1", "end_call"), 1.1),  # goodbye-1 pending
            A(speech_started(), 1.5),  # clear: goodbye-1 now means "flushed"
            P(mark("goodbye-1"), 1.51),
            P(mark("goodbye-1"), 1.52),  # a duplicated echo is just unknown
        ]
    )
    assert quiet(outs[3]) == [goodbye_mark()]
    assert "flushed" in logs(outs[5])[0].message
    assert "unknown" in logs(outs[6])[0].message
    assert not state.hanging_up


# --- upstream errors ---------------------------------------------------------------------------------


def test_voice_rejection_names_voice_and_carries_the_message() -> None:
    message = "Invalid voice 'josh'. Valid voices: alba, anna, charles"
    _, outs = run([P(start(), 0.0), A(error("invalid_value", message, "output.voice"), 0.3)], CallPolicy(voice="josh"))
    errors = [log for log in logs(outs[1]) if log.level == logging.ERROR]
    assert len(errors) == 1
    assert "VOICE" in errors[0].message and "'josh'" in errors[0].message and message in errors[0].message
    assert quiet(outs[1]) == [EndCall(errors[0].message, Outcome.UPSTREAM_FAILED, False)]


def test_non_fatal_error_is_a_warning_and_counted() -> None:
    state, outs = run([*LIVE, A(error("audio_rate_violation", "too fast"), 2.0)])
    assert [(log.level, log.message) for log in outs[2]] == [
        (logging.WARNING, "Voice Agent error audio_rate_violation: too fast (the call goes on)")
    ]
    assert state.stats.upstream_errors == 1 and state.phase is Phase.LIVE


def test_resume_bookkeeping() -> None:
    state, _ = run([*LIVE, agent_closed(5.0), P(media(), 5.02), P(media(), 5.04), A(ready("sess_7a1e"), 6.0)])
    assert state.phase is Phase.LIVE
    assert state.stats.resumes == 1 and state.stats.frames_dropped_gap == 2
    assert state.stats.frames_dropped_pre_ready == 0


def test_no_resume_when_the_window_is_zero() -> None:
    _, outs = run([*LIVE, agent_closed(5.0)], CallPolicy(resume_window_s=0.0))
    assert quiet(outs[-1]) == [EndCall("Voice Agent connection lost (1006)", Outcome.UPSTREAM_FAILED, False)]


def test_ready_timeout_uses_the_policy() -> None:
    state, _ = run([P(start(), 7.0)], CallPolicy(ready_timeout_s=2.5))
    assert quiet(state.on_tick(9.49)) == []
    assert quiet(state.on_tick(9.5)) == [EndCall("no session.ready within 2.5 s", Outcome.UPSTREAM_FAILED, True)]
    assert state.on_tick(9.6) == []


def test_max_call_seconds_uses_the_policy() -> None:
    state, _ = run([P(start(), 7.0), A(ready(), 7.5)], CallPolicy(max_call_s=60.0))
    assert quiet(state.on_tick(66.99)) == []
    assert quiet(state.on_tick(67.0)) == [EndCall("call reached MAX_CALL_SECONDS=60", Outcome.TIME_LIMIT, True)]


# --- transfer -----------------------------------------------------------------------------------------

TRANSFER_POLICY = CallPolicy(transfer_numbers=("+14155550199", "+14155550100"))


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"number": "+14155550100"}, [Transfer("c1", "+14155550100")]),
        ({}, [Transfer("c1", "+14155550199")]),
        ({"number": ""}, [Transfer("c1", "+14155550199")]),
    ],
)
def test_transfer_to_an_allowed_number(arguments: dict[str, Any], expected: list[Action]) -> None:
    _, outs = run(
        [*LIVE, A(reply_done("r0"), 1.0), A(tool_call("c1", "transfer_call", arguments), 1.1)], TRANSFER_POLICY
    )
    assert quiet(outs[-1]) == expected


@pytest.mark.parametrize("number", ["+19005550123", "14155550100", 14155550100, ["+14155550100"]])
def test_transfer_outside_the_allow_list_is_refused(number: Any) -> None:
    _, outs = run(
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "transfer_call", {"number": number}), 1.1),
            A(reply_done("r1"), 1.2),
        ],
        TRANSFER_POLICY,
    )
    assert quiet(outs[-2]) == []
    (sent,) = quiet(outs[-1])
    assert isinstance(sent, SendAgent)
    body = orjson.loads(sent.text)
    assert body["call_id"] == "c1" and body["is_error"] is True
    assert "not an allowed transfer target" in orjson.loads(body["result"])["error"]


def test_transfer_without_configured_numbers_is_an_ordinary_tool() -> None:
    _, outs = run([*LIVE, A(tool_call("c1", "transfer_call", {"number": "+14155550100"}), 1.1)])
    assert quiet(outs[-1]) == [RunTool("c1", "transfer_call", {"number": "+14155550100"})]


def test_end_call_disabled_is_an_ordinary_tool() -> None:
    _, outs = run([*LIVE, A(tool_call("c1", "end_call"), 1.1)], CallPolicy(end_call_enabled=False))
    assert quiet(outs[-1]) == [RunTool("c1", "end_call", {})]


def test_goodbye_deadline_uses_the_policy_and_fires_once() -> None:
    state, _ = run(
        [*LIVE, A(reply_done("r0"), 1.0), A(tool_call("c1", "end_call"), 2.0)], CallPolicy(end_call_deadline_s=3.0)
    )
    assert quiet(state.on_tick(4.99)) == []
    assert quiet(state.on_tick(5.0)) == [HangUp("the goodbye mark did not come back in time")]
    assert quiet(state.on_tick(6.0)) == []
    assert quiet(state.on_phone(mark("goodbye-1"), 6.5)) == []  # the late echo does not hang up twice


# --- EndCall at most once, nothing after it (property) ---------------------------------------------

AGENT_EVENTS = [
    ready(),
    speech_started(),
    _ag({"type": "input.speech.stopped"}),
    reply_started("r1"),
    reply_started("r2"),
    reply_audio("r1"),
    reply_audio("r2"),
    reply_done("r1"),
    reply_done("r1", "interrupted"),
    reply_done("r2"),
    tool_call("c1", "lookup"),
    tool_call("c2", "end_call"),
    tool_call("c3", "transfer_call", {"number": "+1"}),
    tool_call("c4", "lookup", "garbage"),
    error("invalid_value"),
    error("unauthorized"),
    error("invalid_value", "bad voice", "output.voice"),
    session_ended(),
    _ag({"type": "reply.error"}),
    ag.InvalidEvent("not JSON"),
    _ag({"type": "transcript.user", "item_id": "i", "text": "hi"}),
]
PHONE_EVENTS = [
    start(),
    media(),
    media(stream_sid="MZother"),
    mark("goodbye-1"),
    mark("goodbye-2"),
    mark("x"),
    stop(),
    stop("MZother"),
    _tw({"event": "dtmf", "streamSid": STREAM_SID, "dtmf": {"track": "inbound_track", "digit": "1"}}),
    _tw({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
    tw.InvalidFrame("x"),
    tw.UnknownEvent("y"),
]


def _step(kind: str, index: int, dt: float) -> Callable[[CallState, float], list[Action]]:
    if kind == "phone":
        event: Any = PHONE_EVENTS[index % len(PHONE_EVENTS)]
        return lambda s, now: s.on_phone(event, now)
    if kind == "agent":
        aevent: Any = AGENT_EVENTS[index % len(AGENT_EVENTS)]
        return lambda s, now: s.on_agent(aevent, now)
    if kind == "done":
        return lambda s, now: s.on_tool_done(f"c{index % 5}", "ok", index % 2 == 0, now)
    if kind == "tick":
        return lambda s, now: s.on_tick(now)
    if kind == "closed":
        return (lambda s, now: s.on_phone_closed(now)) if index % 2 else (lambda s, now: s.on_agent_closed(now, "x"))
    if kind == "transfer":
        return (
            (lambda s, now: (s.on_transfer_started(), [])[1])
            if index % 2
            else (lambda s, now: s.on_transfer_result(f"c{index % 5}", TransferOutcome.FAILED, now))
        )
    return lambda s, now: s.end_now("shutdown", Outcome.SERVER_SHUTDOWN)


steps_strategy = st.lists(
    st.tuples(
        st.sampled_from(["phone", "phone", "agent", "agent", "agent", "done", "tick", "closed", "transfer", "end"]),
        st.integers(0, 100),
        st.floats(0.0, 8.0),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps_strategy, st.booleans())
def test_any_event_order_ends_at_most_once_and_stays_quiet(steps: list[tuple[str, int, float]], outbound: bool) -> None:
    state = CallState(
        CallPolicy(
            outbound=outbound,
            greeting_pad_ms=40,
            end_call_deadline_s=5.0,
            tool_hold_max_s=3.0,
            transfer_numbers=("+14155550100",),
            ready_timeout_s=20.0,
        )
    )
    now = 0.0
    ended = 0
    epoch = 0
    for kind, index, dt in steps:
        now += dt
        was_live = state.phase is Phase.LIVE
        actions = _step(kind, index, dt)(state, now)
        if ended:
            assert actions == [], "actions after EndCall"
        for action in actions:
            assert isinstance(action, (SendAgent, SendPhone, ConnectAgent, RunTool, Transfer, HangUp, EndCall, Log))
            if isinstance(action, EndCall):
                ended += 1
                assert state.phase is Phase.ENDING and state.outcome is action.outcome
            if isinstance(action, SendAgent):
                body = orjson.loads(action.text)
                assert body["type"] in ("input.audio", "tool.result")
                if action.audio:
                    assert was_live and body["type"] == "input.audio"
            if isinstance(action, SendPhone):
                frame = orjson.loads(action.text)
                assert frame["streamSid"] == STREAM_SID
                assert set(frame) == (
                    {"event", "streamSid"} if frame["event"] == "clear" else {"event", "streamSid", frame["event"]}
                )
                if frame["event"] == "media":
                    assert action.epoch is not None and action.epoch >= epoch
                    assert tw.is_base64(frame["media"]["payload"])
                else:
                    assert action.epoch is None
        assert state.epoch >= epoch
        epoch = state.epoch
    assert ended <= 1


def test_twilio_silence_ends_the_call_on_tick() -> None:
    state = CallState(CallPolicy(twilio_silence_s=10.0))
    state.on_phone_opened(100.0)
    assert state.on_tick(109.9) == []
    (end,) = quiet(state.on_tick(110.0))
    assert isinstance(end, EndCall) and end.outcome is Outcome.STUCK


def test_any_twilio_message_resets_the_silence_clock() -> None:
    state = CallState(CallPolicy(twilio_silence_s=10.0))
    state.on_phone_opened(0.0)
    state.on_phone(tw.InvalidFrame("x"), 9.0)
    assert quiet(state.on_tick(18.9)) == []
    assert isinstance(quiet(state.on_tick(19.0))[0], EndCall)


def test_media_after_the_end_is_not_counted_as_a_pre_ready_drop() -> None:
    state, _ = run(LIVE)
    state.end_now("bye", Outcome.CALLER_HUNG_UP)
    state.on_phone(media(), 9.0)
    assert state.stats.frames_dropped_pre_ready == 0


def test_media_of_another_track_is_not_sent_as_caller_audio() -> None:
    state, _ = run(LIVE)
    frame = {"event": "media", "sequenceNumber": "3", "streamSid": STREAM_SID,
             "media": {"track": "outbound", "chunk": "1", "timestamp": "20", "payload": FRAME}}
    assert quiet(state.on_phone(_tw(frame), 1.0)) == []
    assert state.stats.invalid_twilio == 1 and state.stats.frames_to_agent == 0


# --- records: playback marks, heard or flushed (facts contract) -------------------------------------

AUDIO_MS = 37.5  # AGENT_AUDIO: 300 bytes of mu-law


def audio_mark(n: int) -> SendPhone:
    return SendPhone('{"event":"mark","streamSid":"' + STREAM_SID + '","mark":{"name":"audio-' + str(n) + '"}}')


def speaking(reply_id: str, frames: int, at: float = 1.0) -> list[Step]:
    return [A(reply_started(reply_id), at), *(A(reply_audio(reply_id), at + 0.01 * (i + 1)) for i in range(frames))]


def facts_of(actions: Sequence[Action]) -> list[Any]:
    return [a.fact for a in actions if isinstance(a, Fact)]


def test_records_a_mark_every_250_ms_of_a_replys_forwarded_audio() -> None:
    _, out = run([*LIVE, *speaking("r1", 14)], record=True)
    frames = out[len(LIVE) :]
    assert facts_of(frames[1]) == [AudioWritten("r1", 1.01)]  # the reply's first audio, once
    marks = [(i, a) for i, actions in enumerate(frames) for a in actions if a in (audio_mark(1), audio_mark(2))]
    # 7 chunks of 37.5 ms = 262.5 ms: the mark follows the 7th chunk, then the 14th
    assert marks == [(7, audio_mark(1)), (14, audio_mark(2))]
    assert frames[7] == [phone_audio(), audio_mark(1)]
    assert sum(len(facts_of(actions)) for actions in frames) == 1


RECORDED_TABLE: list[Any] = [
    (
        "a mark echoed before any clear was heard, at its offset in the reply",
        [*LIVE, *speaking("r1", 7)],
        P(mark("audio-1"), 2.0),
        [MarkPlayed("r1", 262, True, 2.0)],
    ),
    (
        "barge-in flushes the pending marks: their echoes were not heard",
        [*LIVE, *speaking("r1", 14), A(speech_started(), 1.5)],
        P(mark("audio-2"), 1.51),
        [MarkPlayed("r1", 525, False, 1.51)],
    ),
    (
        "a mark echoed before the clear stays heard; the clear is a fact",
        [*LIVE, *speaking("r1", 14), P(mark("audio-1"), 1.3)],
        A(speech_started(), 1.5),
        [ClearSent(1.5)],
    ),
    (
        "the mark at reply.done covers the whole reply",
        [*LIVE, *speaking("r1", 3), A(reply_done("r1"), 1.2)],
        P(mark("played-1"), 1.4),
        [MarkPlayed("r1", 112, True, 1.4)],
    ),
    (
        "a second echo of the same mark is not reported again",
        [*LIVE, *speaking("r1", 7), P(mark("audio-1"), 2.0)],
        P(mark("audio-1"), 2.1),
        [],
    ),
    (
        "a flushed mark's second echo is not reported either",
        [*LIVE, *speaking("r1", 7), A(speech_started(), 1.5), P(mark("audio-1"), 1.6)],
        P(mark("audio-1"), 1.7),
        [],
    ),
    (
        "offsets start again with the next reply",
        [*LIVE, *speaking("r1", 3), A(reply_done("r1"), 1.2), *speaking("r2", 7, at=2.0)],
        P(mark("audio-2"), 3.0),
        [MarkPlayed("r2", 262, True, 3.0)],
    ),
    (
        "the goodbye mark is placed at the end of the goodbye reply",
        [*LIVE, *speaking("bye", 2), A(tool_call("c1", "end_call"), 1.1), A(reply_done("bye"), 1.2)],
        P(mark("goodbye-1"), 4.0),
        [MarkPlayed("bye", 75, True, 4.0)],
    ),
    (
        "a keypad digit",
        LIVE,
        P(_tw({"event": "dtmf", "sequenceNumber": "9", "streamSid": STREAM_SID,
               "dtmf": {"track": "inbound_track", "digit": "7"}}), 1.0),
        [DtmfPressed("7", 1.0)],
    ),
    (
        "a tool call and its result",
        [*LIVE, A(tool_call("c1", "lookup", {"order": 42}), 1.0)],
        done("c1", '{"status":"shipped"}', 1.5),
        [ToolFinished("c1", '{"status":"shipped"}', False, 1.5)],
    ),
]


@pytest.mark.parametrize(("name", "before", "step", "expected"), RECORDED_TABLE, ids=[r[0] for r in RECORDED_TABLE])
def test_recorded_facts(name: str, before: list[Step], step: Step, expected: list[Any]) -> None:
    state, _ = run(before, record=True)
    assert facts_of(step(state)) == expected


def test_a_tool_call_is_recorded_when_it_starts() -> None:
    state, _ = run(LIVE, record=True)
    assert facts_of(state.on_agent(tool_call("c1", "lookup", {"order": 42}), 1.0)) == [
        ToolStarted("c1", "lookup", {"order": 42}, 1.0)
    ]


def test_barge_in_sends_the_clear_first_then_says_so() -> None:
    state, _ = run([*LIVE, *speaking("r1", 3)], record=True)
    actions = state.on_agent(speech_started(), 1.5)
    assert quiet(actions) == [CLEAR, Fact(ClearSent(1.5))]


def test_records_off_sends_no_periodic_marks_and_no_facts() -> None:
    _, out = run([*LIVE, *speaking("r1", 30), A(speech_started(), 2.0), P(mark("played-1"), 2.1)])
    assert all(not isinstance(a, Fact) and a != audio_mark(1) for actions in out for a in actions)


# --- what the model is told after a transfer, and connect refusals --------------------------------

TRANSFER_TO = "+14155550100"


@pytest.mark.parametrize(
    ("outcome", "text", "is_error", "transferring"),
    [
        (
            TransferOutcome.UNAVAILABLE,
            '{"error":"transfers need TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN"}',
            True,
            False,
        ),
        (TransferOutcome.FAILED, '{"error":"the transfer failed; apologise and offer to help"}', True, False),
        (TransferOutcome.STARTED, '{"ok":true,"note":"transferring"}', False, True),
    ],
)
def test_what_the_model_is_told_after_a_transfer(
    outcome: TransferOutcome, text: str, is_error: bool, transferring: bool
) -> None:
    asked = [
        *LIVE,
        A(reply_started("r1"), 1.0),
        A(tool_call("c1", "transfer_call", {"number": TRANSFER_TO}), 1.1),
        A(reply_done("r1"), 1.2),
    ]
    state, out = run(asked, CallPolicy(transfer_numbers=(TRANSFER_TO,)))
    assert Transfer("c1", TRANSFER_TO) in out[3]
    state.on_transfer_started()
    assert quiet(state.on_transfer_result("c1", outcome, 2.0)) == [result("c1", text, is_error)]
    assert state.transferring is transferring


@pytest.mark.parametrize(
    ("before", "code", "retry"),
    [
        ([P(start(), 0.0)], "at_capacity", True),
        ([P(start(), 0.0)], "concurrency_exceeded", True),
        ([P(start(), 0.0)], "unauthorized", False),
        (LIVE, "at_capacity", False),  # after ready it is an error of the live session
    ],
)
def test_which_refusals_before_ready_are_retried(before: list[Step], code: str, retry: bool) -> None:
    state, _ = run(before)
    event = error(code)
    assert isinstance(event, ag.SessionError)
    assert state.connect_refused_for_now(event) is retry
