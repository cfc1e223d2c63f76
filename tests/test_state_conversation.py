"""CallState with the conversation composed and recovery: pure tables of (event, now) -> actions."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from bridge.agent import events as ag
from bridge.call import state as st
from bridge.call.state import CallPolicy, CallState, Phase
from bridge.phone import media as tw
from bridge.records import facts as fx
from tests.fakes import TwilioScript, ev, payload, ready

CONFIG = ag.SessionConfig(system_prompt="You are Acme's assistant.", greeting="Hello, Acme here.", voice="ivy")
OLD, NEW = "sess_" + "a" * 32, "sess_" + "b" * 32


def agent(kind: str, **fields: Any) -> ag.AgentEvent | ag.InvalidEvent:
    return ag.parse(orjson.dumps(ev(kind, **fields)).decode())


def phone(message: dict[str, Any]) -> tw.TwilioEvent | tw.InvalidFrame:
    return tw.parse(orjson.dumps(message).decode())


def live(record: bool = False, **policy: Any) -> tuple[CallState, TwilioScript]:
    script = TwilioScript()
    state = CallState(CallPolicy(**policy), record=record)
    state.on_phone_opened(0.0)
    state.on_phone(phone(script.start()), 0.0)
    state.session_config(CONFIG)
    state.on_agent(ag.parse(orjson.dumps(ready(OLD)).decode()), 0.0)
    return state, script


def sent(actions: list[st.Action]) -> list[dict[str, Any]]:
    return [orjson.loads(a.text) for a in actions if isinstance(a, st.SendAgent) and not a.audio]


def refuse_resume(state: CallState, now: float) -> list[st.Action]:
    assert state.on_agent_closed(now, "connection lost")[-1] == st.ConnectAgent(resume_session_id=OLD, attempt=1)
    return state.on_agent(agent("session.error", code="session_not_found", message="gone"), now + 0.1)


# --- recovery ---------------------------------------------------------------------------------


def test_a_refused_resume_recovers_and_the_fresh_session_is_prompted_with_the_history() -> None:
    state, script = live(recovery_s=5.0)
    state.on_agent(agent("transcript.user", item_id="i", text="Where is my order?"), 1.0)
    state.on_agent(agent("transcript.agent", reply_id="r", item_id="a", text="It ships today.", interrupted=False), 2.0)
    actions = refuse_resume(state, 3.0)
    assert actions[-1] == st.ConnectAgent(fresh=True)
    assert state.phase is Phase.RECOVERING and state.drop_upstream
    assert state.on_phone(phone(script.media(payload(1))), 3.2) == []  # gap audio: dropped, counted
    assert state.stats.frames_dropped_gap == 1
    config = state.session_config(CONFIG)
    assert config.greeting == "" and config.voice == CONFIG.voice and config.tools == CONFIG.tools
    assert "Caller: Where is my order?\nAgent: It ships today." in config.system_prompt
    after = state.on_agent(ag.parse(orjson.dumps(ready(NEW)).decode()), 3.5)
    [create] = sent(after)
    assert create["type"] == "reply.create" and "Apologise" in create["instructions"]
    assert state.phase is Phase.LIVE and state.recovered and state.stats.recoveries == 1


@pytest.mark.parametrize(
    ("what", "event", "outcome_reason"),
    [
        ("refused too", ("session.error", {"code": "agent_init_failed", "message": "x"}), "Voice Agent error"),
        ("closed before ready", None, "connection lost"),
    ],
)
def test_a_failing_recovery_ends_the_call(what: str, event: Any, outcome_reason: str) -> None:
    state, _ = live(recovery_s=5.0)
    refuse_resume(state, 1.0)
    if event is None:
        actions = state.on_agent_closed(1.5, "connection lost")
    else:
        actions = state.on_agent(agent(event[0], **event[1]), 1.5)
    [end] = [a for a in actions if isinstance(a, st.EndCall)]
    assert end.outcome is st.Outcome.UPSTREAM_FAILED and outcome_reason in end.reason, what


def test_the_connect_of_the_fresh_session_failing_ends_the_call() -> None:
    state, _ = live(recovery_s=5.0)
    refuse_resume(state, 1.0)
    [end] = state.on_agent_connect_failed(1.5, "connection refused")
    assert isinstance(end, st.EndCall) and "recovery failed" in end.reason


def test_capacity_refusals_of_the_fresh_session_are_retried() -> None:
    state, _ = live(recovery_s=5.0)
    refuse_resume(state, 1.0)
    assert state.connect_refused_for_now(ag.SessionError("at_capacity", "busy", None))


@pytest.mark.parametrize(("audio_at", "ends"), [(None, True), (4.0, False)])
def test_recovery_s_bounds_the_silence_after_the_refusal(audio_at: float | None, ends: bool) -> None:
    state, _ = live(recovery_s=5.0)
    refuse_resume(state, 1.0)  # refused at 1.1
    state.session_config(CONFIG)
    state.on_agent(ag.parse(orjson.dumps(ready(NEW)).decode()), 2.0)
    if audio_at is not None:
        state.on_agent(agent("reply.started", reply_id="r1"), audio_at)
        state.on_agent(ag.ReplyAudio("r1", payload(1)), audio_at)
        assert state.on_tick(audio_at + 0.25) == []
    assert state.on_tick(6.0) == []  # 4.9 s after the refusal
    late = state.on_tick(6.2)
    assert any(isinstance(a, st.EndCall) for a in late) is ends


def test_recovery_off_or_exhausted_ends_the_call_as_before() -> None:
    state, _ = live(recovery_s=0.0)
    [*_, end] = refuse_resume(state, 1.0)
    assert isinstance(end, st.EndCall) and end.outcome is st.Outcome.UPSTREAM_FAILED
    state, _ = live(recovery_s=5.0)
    for n in range(st.MAX_RECOVERIES):
        refuse_resume(state, 10.0 * n)
        state.on_agent(ag.parse(orjson.dumps(ready(OLD)).decode()), 10.0 * n + 1)
    [*_, end] = refuse_resume(state, 100.0)
    assert isinstance(end, st.EndCall)


def test_the_record_is_told_of_the_recovery() -> None:
    state, _ = live(record=True, recovery_s=5.0)
    refuse_resume(state, 1.0)
    state.session_config(CONFIG)
    facts = [a.fact for a in state.on_agent(ag.parse(orjson.dumps(ready(NEW)).decode()), 2.0) if isinstance(a, st.Fact)]
    assert facts == [fx.SessionRecovered(NEW, 2.0)]


# --- AMD -------------------------------------------------------------------------------------


def test_amd_holds_the_greeting_and_the_callers_audio_until_a_person_is_known() -> None:
    script = TwilioScript()
    state = CallState(CallPolicy(outbound=True, amd=True, amd_wait_s=4.0), record=True)
    state.on_phone_opened(0.0)
    state.on_phone(phone(script.start()), 0.0)
    assert state.session_config(CONFIG).greeting == ""
    assert sent(state.on_agent(ag.parse(orjson.dumps(ready(OLD)).decode()), 0.5)) == []
    assert state.on_phone(phone(script.media(payload(1))), 1.0) == []
    actions = state.on_amd_result("human", 1.5)
    assert isinstance(actions[0], st.Fact) and actions[0].fact == fx.AnsweredBy("human", 1.5)
    [greet] = sent(actions)
    assert CONFIG.greeting in greet["instructions"]
    assert state.on_phone(phone(script.media(payload(2))), 2.0) == [st.SendAgent(ag.input_audio(payload(2)), True)]
    assert state.on_amd_result("machine_end_beep", 3.0) == [
        st.Log(20, "AMD: machine_end_beep after a person answered: ignored")
    ]


def test_a_fax_hangs_up_and_its_stop_is_the_agents_hang_up() -> None:
    script = TwilioScript()
    state = CallState(CallPolicy(outbound=True, amd=True))
    state.on_phone(phone(script.start()), 0.0)
    assert any(isinstance(a, st.HangUp) for a in state.on_amd_result("fax", 1.0))
    [end] = state.on_phone(phone(script.stop()), 1.2)
    assert isinstance(end, st.EndCall) and end.outcome is st.Outcome.AGENT_ENDED


def test_a_last_reply_that_never_plays_hangs_up_at_the_end_call_deadline() -> None:
    state, _ = live(idle_reprompt_s=0.0, idle_hangup_s=5.0, end_call_deadline_s=15.0, twilio_silence_s=3600.0)
    state.on_agent(agent("reply.started", reply_id="g"), 0.0)
    state.on_agent(agent("reply.done", reply_id="g", status="completed"), 0.1)  # silent: heard at once
    [create] = [a for a in state.on_tick(5.2) if not isinstance(a, st.Log)]
    assert isinstance(create, st.SendAgent) and "goodbye" in create.text
    assert state.on_tick(20.0) == []
    assert state.on_tick(20.3) == [st.HangUp("the last reply did not play in time")]


# --- outbound silence as a tick output (issue 12) ----------------------------------------------


def silence_ms(actions: list[st.Action]) -> list[int]:
    out = []
    for a in actions:
        frame = orjson.loads(a.text) if isinstance(a, st.SendPhone) else {}
        if frame.get("event") == "media":
            audio = base64.b64decode(frame["media"]["payload"])
            assert set(audio) == {0xFF}  # mu-law silence
            out.append(len(audio) // 8)
    return out


def test_outbound_silence_is_topped_up_on_ticks_and_cleared_before_the_first_agent_audio() -> None:
    script = TwilioScript()
    state = CallState(CallPolicy(outbound=True, greeting_pad_ms=400, twilio_silence_s=3600.0))
    assert silence_ms(state.on_phone(phone(script.start()), 0.0)) == [400]  # the pad
    assert silence_ms(state.on_tick(0.25)) == [140]  # whole frames up to 0.54 s (0.3 s ahead), from the pad's end
    assert silence_ms(state.on_tick(0.5)) == [260]  # up to 0.8 s
    assert silence_ms(state.on_tick(2.0)) == [300]  # a late tick: from now, never a backlog
    state.session_config(CONFIG)
    state.on_agent(ag.parse(orjson.dumps(ready(OLD)).decode()), 2.1)
    first = state.on_agent(ag.ReplyAudio("r1", payload(1)), 2.1)
    assert [orjson.loads(a.text)["event"] for a in first if isinstance(a, st.SendPhone)] == ["clear", "media"]
    assert silence_ms(state.on_tick(2.25)) == []  # the agent speaks: no more silence
    second = state.on_agent(ag.ReplyAudio("r1", payload(2)), 2.3)
    assert [orjson.loads(a.text)["event"] for a in second if isinstance(a, st.SendPhone)] == ["media"]


def test_inbound_calls_get_no_silence() -> None:
    state, _ = live()
    assert state.on_tick(0.25) == [] and state.playback.silence_to is None


def test_agent_audio_during_the_pad_still_waits_for_the_whole_pad() -> None:
    script = TwilioScript()
    state = CallState(CallPolicy(outbound=True, greeting_pad_ms=400, twilio_silence_s=3600.0))
    state.on_phone(phone(script.start()), 0.0)
    assert silence_ms(state.on_tick(0.25)) == [140]
    state.session_config(CONFIG)
    state.on_agent(ag.parse(orjson.dumps(ready(OLD)).decode()), 0.25)
    first = state.on_agent(ag.ReplyAudio("r1", payload(1)), 0.29)
    # The queued silence is cleared; what is left of the pad (110 ms, rounded up to 120) plays first.
    assert [orjson.loads(a.text)["event"] for a in first if isinstance(a, st.SendPhone)] == ["clear", "media", "media"]
    assert silence_ms(first[1:2]) == [120]


# --- keypad collection and barge-in (reference §7) ------------------------------------------------
# The demo bug: the caller barged in on the reply asking for digits; its tool result was
# discarded, yet the collection ran on and answered 10 s later. §7 discards every result of an
# interrupted reply, so the collection is cancelled with it: the keys after it are keys outside
# a collection (told to the agent only with DTMF_TO_AGENT), and nothing answers the dead call.

COLLECT = {"max_digits": 4, "timeout_s": 10}


def _collect_then(steps: list[tuple[str, Any]], **policy: Any) -> tuple[CallState, list[list[st.Action]]]:
    state, script = live(record=True, keypad_tool=True, **policy)
    outs: list[list[st.Action]] = []
    now = 1.0
    for kind, arg in steps:
        now += 0.5
        if kind == "agent":
            event_kind, fields = arg
            outs.append(state.on_agent(agent(event_kind, **fields), now))
        elif kind == "keys":
            outs.append([a for d in arg for a in state.on_phone(phone(script.dtmf(d)), now)])
        elif kind == "tick":
            outs.append(state.on_tick(now + arg))
    return state, outs


def _results(outs: list[list[st.Action]]) -> list[dict[str, Any]]:
    return [m for actions in outs for m in sent(actions) if m["type"] == "tool.result"]


def _asked_in(reply_id: str, call_id: str, status: str | None) -> list[tuple[str, Any]]:
    steps: list[tuple[str, Any]] = [
        ("agent", ("reply.started", {"reply_id": reply_id, "item_id": "i" + reply_id})),
        ("agent", ("tool.call", {"call_id": call_id, "name": "collect_digits", "arguments": COLLECT})),
    ]
    if status == "interrupted":
        steps.append(("agent", ("input.speech.started", {})))
    if status is not None:
        steps.append(("agent", ("reply.done", {"reply_id": reply_id, "status": status})))
    return steps


KEYPAD_BARGE_IN = [
    (
        "barge-in on the asking reply cancels the collection: the keys after it answer nothing",
        [*_asked_in("r1", "c1", "interrupted"), ("keys", "12")],
        [],
    ),
    (
        "barge-in on the asking reply: neither the limit nor the timeout answers the dead call",
        [*_asked_in("r1", "c1", "interrupted"), ("keys", "1234#"), ("tick", 30.0)],
        [],
    ),
    (
        "a completed asking reply keeps the collection: the keys answer it",
        [*_asked_in("r1", "c1", "completed"), ("keys", "12#")],
        [("c1", {"digits": "12"})],
    ),
    (
        "a completed asking reply, then a barge-in on a later reply: the collection goes on",
        [
            *_asked_in("r1", "c1", "completed"),
            *_asked_in("r2", "c_other", None)[:1],
            ("agent", ("input.speech.started", {})),
            ("agent", ("reply.done", {"reply_id": "r2", "status": "interrupted"})),
            ("keys", "12#"),
            ("agent", ("reply.started", {"reply_id": "r3", "item_id": "ir3"})),
            ("agent", ("reply.done", {"reply_id": "r3", "status": "completed"})),
        ],
        [("c1", {"digits": "12"})],
    ),
    (
        "after the cancelled collection the agent asks again: the new one gets the keys",
        [
            *_asked_in("r1", "c1", "interrupted"),
            ("keys", "9"),
            *_asked_in("r2", "c2", "completed"),
            ("keys", "1234"),
        ],
        [("c2", {"digits": "1234"})],
    ),
]


@pytest.mark.parametrize(("name", "steps", "expected"), KEYPAD_BARGE_IN, ids=[c[0] for c in KEYPAD_BARGE_IN])
def test_a_keypad_collection_follows_its_reply(name: str, steps: list[Any], expected: list[Any]) -> None:
    state, outs = _collect_then(steps)
    assert [(r["call_id"], orjson.loads(r["result"])) for r in _results(outs)] == expected
    assert state.conversation is not None and state.conversation.keypad.next_deadline() is None


def test_the_cancelled_collection_is_logged_and_later_keys_go_to_the_agent_with_dtmf_to_agent() -> None:
    _, outs = _collect_then([*_asked_in("r1", "c1", "interrupted"), ("keys", "5")], dtmf_to_agent=True)
    (finished,) = [
        a.fact for actions in outs for a in actions if isinstance(a, st.Fact) and isinstance(a.fact, fx.ToolFinished)
    ]
    assert finished.tool_call_id == "c1" and finished.is_error and "cancelled" in finished.result
    messages = [a.message for actions in outs for a in actions if isinstance(a, st.Log)]
    assert "keypad collection for c1 cancelled: its reply was interrupted" in messages
    assert not any("collect_digits result" in m for m in messages)
    told = [m for m in sent(outs[-1]) if m["type"] == "reply.create"]
    assert len(told) == 1 and "'5'" in told[0]["instructions"]
    assert _results(outs) == []
