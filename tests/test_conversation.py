"""bridge.call.conversation: keypad, idle timers and AMD composed, on parsed events and a fake clock."""

from __future__ import annotations

import json
import logging
from typing import Any

import orjson

from bridge.agent import events as ag
from bridge.call.amd import greeting_instructions, voicemail_instructions
from bridge.call.conversation import (
    AgentSend,
    Conversation,
    FinalReply,
    HangUpNow,
    Note,
    Out,
    Record,
    SayAndHangUp,
    ToolReply,
)
from bridge.call.idle import GOODBYE_INSTRUCTIONS, REPROMPT_INSTRUCTIONS
from bridge.phone import media as tw
from bridge.records import facts as fx

GREETING = "Hi, Acme calling."
VOICEMAIL = "Please call Acme back."


def conversation(*, outbound: bool = False, amd: bool = False, **overrides: Any) -> Conversation:
    knobs: dict[str, Any] = {
        "keypad_tool": True,
        "dtmf_to_agent": False,
        "idle_reprompt_s": 8.0,
        "idle_hangup_s": 15.0,
        "amd_wait_s": 4.0,
        "voicemail_message": VOICEMAIL,
    }
    knobs.update(overrides)
    return Conversation.for_call(outbound=outbound, greeting=GREETING, now=0.0, amd=amd, **knobs)


def dtmf(digit: str) -> tw.Dtmf:
    return tw.Dtmf("MZ1", digit, None)


def sent(out: list[Out]) -> list[dict[str, Any]]:
    """What goes upstream: ``reply.create`` as is, a tool reply as the ``tool.result`` it becomes."""
    texts = [
        o.text if isinstance(o, AgentSend) else ag.tool_result(o.tool_call_id, o.result, is_error=o.is_error)
        for o in out
        if isinstance(o, AgentSend | ToolReply)
    ]
    return [orjson.loads(t) for t in texts]


def recorded(out: list[Out]) -> list[object]:
    return [o.fact for o in out if isinstance(o, Record)]


def test_collect_digits_end_to_end_with_the_finish_key() -> None:
    c = conversation()
    assert c.claims("collect_digits") and not c.claims("lookup_order")
    out = c.agent_event(ag.ToolCall("call_7", "collect_digits", {"max_digits": 6}), 10.0)
    assert recorded(out) == [fx.ToolStarted("call_7", "collect_digits", {"max_digits": 6}, 10.0)]
    assert sent(out) == [] and c.next_deadline() == 20.0
    for i, key in enumerate("42#"):
        out = c.phone_event(dtmf(key), 11.0 + i)
    assert sent(out) == [{"type": "tool.result", "call_id": "call_7", "result": '{"digits": "42"}', "is_error": False}]
    assert recorded(out) == [
        fx.DtmfPressed("#", 13.0, sensitive=False),
        fx.ToolFinished("call_7", '{"digits": "42"}', False, 13.0),
    ]


def test_sensitive_digits_reach_only_the_agent() -> None:
    c = conversation()
    c.agent_event(ag.ToolCall("c1", "collect_digits", {"max_digits": 4, "sensitive": True}), 0.0)
    everything: list[Out] = []
    for i, key in enumerate("9876"):
        everything += c.phone_event(dtmf(key), 1.0 + i)
    [agent] = sent(everything)
    assert json.loads(agent["result"]) == {"digits": "9876"}
    for item in everything:
        if isinstance(item, Record) and isinstance(item.fact, fx.DtmfPressed):
            assert item.fact.sensitive  # the record builder masks it
        elif not isinstance(item, ToolReply):
            assert not any(d in repr(item) for d in "9876"), item
    assert [f.sensitive for f in recorded(everything) if isinstance(f, fx.DtmfPressed)] == [True] * 4
    [finished] = [f for f in recorded(everything) if isinstance(f, fx.ToolFinished)]
    assert finished.result == '{"digits": "****"}'


def test_unreadable_arguments_and_the_keypad_off() -> None:
    c = conversation()
    out = c.agent_event(ag.ToolCall("c2", "collect_digits", None, "not JSON"), 0.0)
    [result] = sent(out)
    assert result["is_error"] and "could not be read (not JSON)" in result["result"]
    off = conversation(keypad_tool=False)
    assert not off.claims("collect_digits")
    assert off.agent_event(ag.ToolCall("c3", "collect_digits", {"max_digits": 1}), 0.0) == []


def test_keys_outside_a_collection_go_to_the_agent_only_with_dtmf_to_agent() -> None:
    assert sent(conversation().phone_event(dtmf("3"), 1.0)) == []
    [told] = sent(conversation(dtmf_to_agent=True, keypad_tool=False).phone_event(dtmf("3"), 1.0))
    assert told["type"] == "reply.create" and "'3'" in told["instructions"]


def test_idle_reprompt_then_goodbye_ends_like_end_call() -> None:
    c = conversation()
    c.session_ready(0.0, greeting=True)
    c.agent_event(ag.ReplyStarted("r1"), 0.1)
    c.reply_heard(2.0)
    assert c.next_deadline() == 10.0
    out = c.tick(10.0)
    assert sent(out) == [{"type": "reply.create", "instructions": REPROMPT_INSTRUCTIONS}]
    c.agent_event(ag.ReplyStarted("r2"), 10.2)
    c.reply_heard(12.0)
    out = c.tick(27.0)
    assert [o for o in out if not isinstance(o, Note)] == [FinalReply(GOODBYE_INSTRUCTIONS, "the caller stayed silent")]
    assert c.ending == "idle" and c.next_deadline() is None
    # The caller speaks during the goodbye: the conversation goes on (the core cancels the end).
    c.agent_event(ag.SpeechStarted(), 28.0)
    c.agent_event(ag.SpeechStopped(), 29.0)
    assert c.ending is None and c.next_deadline() == 37.0


def test_a_keypad_collection_holds_the_idle_timer() -> None:
    c = conversation(idle_reprompt_s=5.0)
    c.reply_heard(0.0)
    c.agent_event(ag.ToolCall("c1", "collect_digits", {"max_digits": 4, "timeout_s": 30}), 1.0)
    assert c.next_deadline() == 31.0  # only the keypad's timeout
    out = c.tick(31.0)
    assert json.loads(sent(out)[0]["result"]) == {"digits": "", "timed_out": True}
    assert c.next_deadline() == 36.0  # idle counts again from the result


def test_python_tools_hold_the_idle_timer_too() -> None:
    c = conversation()
    c.reply_heard(0.0)
    c.tool_started(1.0)
    assert c.next_deadline() is None
    c.tool_finished(4.0)
    assert c.next_deadline() == 12.0


def test_no_greeting_arms_the_idle_timer_at_ready() -> None:
    c = conversation()
    c.session_ready(5.0, greeting=False)
    assert c.next_deadline() == 13.0


def test_amd_human_greets_and_only_then_forwards_caller_audio() -> None:
    c = conversation(outbound=True, amd=True)
    assert c.hold_greeting and not c.forward_caller_audio
    assert c.session_ready(0.5, greeting=False) == []
    out = c.amd_result("human", 1.5)
    assert sent(out) == [{"type": "reply.create", "instructions": greeting_instructions(GREETING)}]
    assert c.forward_caller_audio


def test_amd_machine_leaves_the_voicemail_and_switches_the_rest_off() -> None:
    c = conversation(outbound=True, amd=True)
    c.session_ready(0.5, greeting=False)
    c.tick(4.0)  # greeted on the timer
    out = c.amd_result("machine_end_beep", 9.0)
    assert [o for o in out if not isinstance(o, Note)] == [
        FinalReply(voicemail_instructions(VOICEMAIL), "voicemail left", clear_first=True)
    ]
    assert c.ending == "amd" and not c.forward_caller_audio
    assert c.tick(1000.0) == [] and c.next_deadline() is None  # no idle reprompt to a machine
    [refused] = sent(c.agent_event(ag.ToolCall("c", "collect_digits", {"max_digits": 1}), 9.5))
    assert refused["is_error"]
    assert c.phone_event(dtmf("1"), 9.6) == []


def test_amd_before_the_agent_is_up_and_fax() -> None:
    early = conversation(outbound=True, amd=True)
    assert [o for o in early.amd_result("machine_end_silence", 0.3) if not isinstance(o, Note)] == [
        SayAndHangUp(VOICEMAIL, "voicemail left")
    ]
    fax = conversation(outbound=True, amd=True)
    fax.session_ready(0.2, greeting=False)
    assert [o for o in fax.amd_result("fax", 1.0) if not isinstance(o, Note)] == [HangUpNow("a fax machine answered")]


def test_inbound_calls_have_no_amd() -> None:
    c = conversation(outbound=False, amd=True)
    assert not c.hold_greeting and c.forward_caller_audio
    [note] = c.amd_result("human", 1.0)
    assert isinstance(note, Note) and note.level == logging.INFO


def test_a_fresh_session_drops_a_running_collection() -> None:
    c = conversation()
    c.reply_heard(0.0)
    c.agent_event(ag.ToolCall("c1", "collect_digits", {"max_digits": 4}), 1.0)
    c.upstream_replaced(2.0)
    assert c.next_deadline() == 10.0  # idle again, no keypad deadline
    assert sent(c.phone_event(dtmf("5"), 3.0)) == []
