"""The pure call record builder: tables of (events, facts, clock) -> record fields."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from bridge.agent import events as ag
from bridge.call.actions import CallStats
from bridge.phone import media as tw
from bridge.records import facts as fx
from bridge.records import record as rc

SID = "CA" + "a" * 32
WALL0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def start(params: dict[str, str] | None = None) -> tw.Start:
    return tw.Start("MZ1", SID, "AC1", ("inbound",), params or {}, "audio/x-mulaw", 8000, 1, 1)


def delta(reply_id: str, word: str, start_ms: int | None, end_ms: int | None) -> ag.TranscriptAgentDelta:
    return ag.TranscriptAgentDelta(reply_id=reply_id, item_id="i", delta=word, start_ms=start_ms, end_ms=end_ms)


def builder(**kw: Any) -> rc.RecordBuilder:
    return rc.RecordBuilder("c-1", "inbound", origin_mono=100.0, origin_wall=WALL0, **kw)


def feed(b: rc.RecordBuilder, script: list[tuple[float, object]]) -> None:
    """Each step: (now, a Twilio event, an agent event, or a fact)."""
    for now, item in script:
        if isinstance(item, (tw.Start, tw.Dtmf, tw.Mark, tw.Stop)):
            b.phone(item, now)
        elif type(item).__module__.startswith("bridge.records"):
            b.fact(item)
        else:
            b.agent(item, now)  # type: ignore[arg-type]


GREETING = [
    (100.0, start({"From": "+14155550100", "To": "+14155550199", "Direction": "inbound"})),
    (100.1, fx.UpstreamOpened(100.1)),
    (100.3, ag.SessionReady("sess_1", "tok", None, {})),
    (100.3, ag.ReplyStarted("r0")),
    (100.5, fx.AudioWritten("r0", 100.5)),
    (100.8, fx.MarkPlayed("r0", 250, True, 100.8)),
    (101.0, ag.TranscriptAgent("r0", "Hello, how can I help?", False)),
    (101.0, ag.ReplyDone("r0", False)),
    (101.1, fx.MarkPlayed("r0", 500, True, 101.1)),
]

WORDS = ["I", "can", "book", "a", "table", "for", "you", "tonight."]


def barge_in_reply(reply: str = "r1", heard_marks: int = 2) -> list[tuple[float, object]]:
    """The caller asks, the agent answers with word timings, the caller barges in after
    ``heard_marks`` marks were played; later marks are flushed by the clear."""
    steps: list[tuple[float, object]] = [
        (102.0, ag.SpeechStarted()),
        (103.0, ag.SpeechStopped()),
        (103.2, ag.TranscriptUser("u1", "Can you book a table?")),
        (103.3, ag.ReplyStarted(reply)),
        (103.45, fx.AudioWritten(reply, 103.45)),
    ]
    steps += [(103.5, delta(reply, w, i * 250, i * 250 + 200)) for i, w in enumerate(WORDS)]
    for i in range(1, 5):
        steps.append((103.5 + i * 0.25, fx.MarkPlayed(reply, i * 250, i <= heard_marks, 103.5 + i * 0.25)))
    steps += [
        (104.1, ag.SpeechStarted()),
        (104.1, fx.ClearSent(104.1)),
        (104.2, ag.TranscriptAgent(reply, "I can book a", True)),
        (104.2, ag.ReplyDone(reply, True)),
    ]
    return steps


def agent_turn(record: dict[str, Any], reply_id: str) -> dict[str, Any]:
    return next(t for t in record["turns"] if t.get("reply_id") == reply_id)


def test_greeting_has_first_audio_ms_and_no_response_ms() -> None:
    b = builder()
    feed(b, GREETING)
    rec = b.build(101.2)
    greeting = agent_turn(rec, "r0")
    assert greeting["first_audio_ms"] == 500
    assert greeting["response_ms"] is None
    assert greeting["interrupted"] is False
    assert greeting["text"] == greeting["heard_text"] == "Hello, how can I help?"
    assert greeting["heard_ms"] == 500
    assert rec["live"] is True and rec["ended_at"] is None
    assert rec["started_at"] == "2027-01-15T08:00:00.000Z"
    assert (rec["from"], rec["to"], rec["direction"]) == ("+14155550100", "+14155550199", "inbound")


def test_barge_in_mid_reply_heard_text_is_a_strict_prefix_of_text() -> None:
    b = builder()
    feed(b, GREETING + barge_in_reply(heard_marks=2))
    turn = agent_turn(b.build(105.0), "r1")
    assert turn["text"] == "I can book a table for you tonight."
    # heard up to 500 ms: the words ending at 200 and 450 ms
    assert turn["heard_text"] == "I can"
    assert turn["text"].startswith(turn["heard_text"]) and turn["heard_text"] != turn["text"]
    assert turn["heard_ms"] == 500
    assert turn["said_ms"] == 1000
    assert turn["interrupted"] is True


def test_marks_flushed_by_a_clear_are_not_heard() -> None:
    b = builder()
    feed(b, GREETING + barge_in_reply(heard_marks=0))
    turn = agent_turn(b.build(105.0), "r1")
    assert turn["heard_ms"] == 0
    assert turn["heard_text"] == ""
    assert turn["interrupted"] is True


def test_flushed_mark_alone_marks_the_reply_interrupted() -> None:
    # the service never said "interrupted" (e.g. our own clear), a flushed mark is enough
    b = builder()
    feed(b, [*GREETING, (102.0, ag.ReplyStarted("r1")), (102.1, fx.AudioWritten("r1", 102.1)),
             (102.2, delta("r1", "Sure", 0, 300)), (102.2, delta("r1", "thing", 300, 700)),
             (102.4, fx.MarkPlayed("r1", 250, True, 102.4)), (102.5, fx.MarkPlayed("r1", 500, False, 102.5)),
             (102.6, ag.ReplyDone("r1", False))])
    turn = agent_turn(b.build(103.0), "r1")
    assert turn["interrupted"] is True
    assert (turn["heard_text"], turn["heard_ms"]) == ("", 250)


def test_without_word_timings_an_interrupted_reply_uses_the_service_trimmed_text() -> None:
    steps = [s for s in barge_in_reply() if not isinstance(s[1], ag.TranscriptAgentDelta)]
    b = builder()
    feed(b, GREETING + steps)
    turn = agent_turn(b.build(105.0), "r1")
    assert turn["text"] == "I can book a"  # no deltas: what the service reported is all we have
    assert turn["heard_text"] == "I can book a"
    assert turn["interrupted"] is True


def test_deltas_without_timings_fall_back_to_the_trimmed_text() -> None:
    steps = [
        (s[0], delta("r1", s[1].delta, None, None)) if isinstance(s[1], ag.TranscriptAgentDelta) else s
        for s in barge_in_reply()
    ]
    b = builder()
    feed(b, GREETING + steps)
    turn = agent_turn(b.build(105.0), "r1")
    assert turn["text"] == "I can book a table for you tonight."
    assert turn["heard_text"] == "I can book a"


def test_uninterrupted_reply_is_heard_whole_even_past_its_last_mark() -> None:
    b = builder()
    feed(b, [*GREETING, (102.0, ag.ReplyStarted("r1")), (102.1, fx.AudioWritten("r1", 102.1)),
             *[(102.2, delta("r1", w, i * 250, i * 250 + 200)) for i, w in enumerate(WORDS)],
             (102.4, fx.MarkPlayed("r1", 250, True, 102.4)),
             (104.0, ag.TranscriptAgent("r1", "I can book a table for you tonight.", False)),
             (104.0, ag.ReplyDone("r1", False))])
    turn = agent_turn(b.build(105.0), "r1")
    assert turn["heard_text"] == turn["text"] == "I can book a table for you tonight."
    assert turn["interrupted"] is False
    assert turn["heard_ms"] == 1950  # the last word's end


def test_call_ending_mid_reply_keeps_only_what_played() -> None:
    b = builder()
    feed(b, [*GREETING, (102.0, ag.ReplyStarted("r1")), (102.1, fx.AudioWritten("r1", 102.1)),
             *[(102.2, delta("r1", w, i * 250, i * 250 + 200)) for i, w in enumerate(WORDS)],
             (102.4, fx.MarkPlayed("r1", 250, True, 102.4)),
             (102.5, fx.CallEnded("caller_hung_up", "stop", 102.5))])
    b.finish(102.6)
    turn = agent_turn(b.build(102.6), "r1")
    assert turn["heard_text"] == "I"
    assert turn["interrupted"] is False


def test_response_ms_from_speech_stopped_to_first_audio_written() -> None:
    b = builder()
    feed(b, GREETING + barge_in_reply())
    rec = b.build(105.0)
    assert agent_turn(rec, "r1")["response_ms"] == 450
    assert agent_turn(rec, "r1")["first_audio_ms"] is None
    caller = rec["turns"][1]
    assert caller == {"speaker": "caller", "text": "Can you book a table?", "started_at": "2027-01-15T08:00:02.000Z"}


def test_response_ms_goes_to_the_first_reply_with_audio_after_a_tool() -> None:
    b = builder()
    feed(b, [*GREETING, (102.0, ag.SpeechStopped()), (102.2, ag.TranscriptUser("u", "weather?")),
             (102.3, ag.ReplyStarted("r1")), (102.3, ag.ToolCall("t1", "weather", {"city": "Paris"})),
             (102.3, fx.ToolStarted("t1", "weather", {"city": "Paris"}, 102.3)), (102.4, ag.ReplyDone("r1", False)),
             (103.3, fx.ToolFinished("t1", "sunny", False, 103.3)),
             (103.4, ag.ReplyStarted("r2")), (103.6, fx.AudioWritten("r2", 103.6))])
    rec = b.build(104.0)
    assert agent_turn(rec, "r1")["response_ms"] is None
    assert agent_turn(rec, "r2")["response_ms"] == 1600
    assert rec["tools"] == [{
        "tool_call_id": "t1", "name": "weather", "arguments": {"city": "Paris"}, "result": "sunny",
        "is_error": False, "started_at": "2027-01-15T08:00:02.300Z", "duration_ms": 1000,
    }]


def test_tool_error_is_recorded() -> None:
    b = builder()
    feed(b, [*GREETING, (102.0, fx.ToolStarted("t9", "lookup", {"id": 3}, 102.0)),
             (102.05, fx.ToolFinished("t9", "KeyError: 3", True, 102.05))])
    (tool,) = b.build(103.0)["tools"]
    assert (tool["is_error"], tool["result"], tool["duration_ms"]) == (True, "KeyError: 3", 50)


def test_resume_gives_two_session_ids_and_upstream_time_adds_up() -> None:
    b = builder()
    feed(b, [*GREETING, (110.0, fx.UpstreamClosed(110.0)), (110.5, fx.UpstreamOpened(110.5)),
             (110.6, ag.SessionReady("sess_2", "tok", None, {})), (110.7, ag.SessionReady("sess_2", "t", None, {})),
             (120.0, fx.CallEnded("caller_hung_up", "stop", 120.0))])
    b.finish(120.5)
    rec = b.build(121.0)
    assert rec["agent_session_ids"] == ["sess_1", "sess_2"]
    assert rec["upstream_open_s"] == pytest.approx(9.9 + 10.0)
    assert (rec["outcome"], rec["reason"], rec["live"]) == ("caller_hung_up", "stop", False)
    assert rec["duration_s"] == 20.0
    assert rec["ended_at"] == "2027-01-15T08:00:20.000Z"


def test_dtmf_in_order_sensitive_masked_and_not_doubled_by_event_plus_fact() -> None:
    b = builder()
    feed(b, [*GREETING,
             (102.0, tw.Dtmf("MZ1", "1", 5)), (102.0, fx.DtmfPressed("1", 102.0)),
             (102.5, fx.DtmfPressed("2", 102.5, sensitive=True)), (102.5, tw.Dtmf("MZ1", "2", 6)),
             (103.0, tw.Dtmf("MZ1", "1", 7)), (103.0, fx.DtmfPressed("1", 103.0)),
             (103.5, tw.Dtmf("MZ1", "#", 8))])
    assert [d["digit"] for d in b.build(104.0)["dtmf"]] == ["1", "***", "1", "#"]
    assert b.build(104.0)["dtmf"][0]["at"] == "2027-01-15T08:00:02.000Z"


def test_redacted_custom_parameters_and_parties_are_masked() -> None:
    b = builder(redact=frozenset({"from", "AccountPin"}))
    feed(b, [(100.0, start({"From": "+14155550100", "To": "+14155550199", "AccountPin": "1234"}))])
    rec = b.build(100.0)
    assert rec["from"] == "***00" and rec["to"] == "+14155550199"
    assert rec["custom_parameters"] == {"From": "***00", "To": "+14155550199", "AccountPin": "***"}


def test_frames_summary_comes_from_call_stats() -> None:
    stats = CallStats(frames_from_twilio=500, frames_to_agent=490, frames_dropped_flood=10)
    frames = rc.frames_summary(stats)
    assert frames["from_twilio"] == 500 and frames["dropped_flood"] == 10
    assert "turns" not in frames and len(frames) == 9
    assert builder().build(100.0, frames)["frames"] == frames


HOSTILE = [
    'say "hi"\n\t\\',
    "nul\x00byte",
    "emoji 🎉👩\u200d👩\u200d👧",
    "RTL \u202e\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627",
    "</script><img src=x>",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_is_kept_exactly_and_survives_json(text: str) -> None:
    b = builder()
    feed(b, [*GREETING, (102.0, ag.TranscriptUser("u", text)), (102.1, ag.ReplyStarted("r1")),
             (102.2, ag.TranscriptAgent("r1", text, False)), (102.2, ag.ReplyDone("r1", False)),
             (102.3, fx.ToolStarted("t", "x", {"q": text}, 102.3)), (102.4, fx.ToolFinished("t", text, False, 102.4))])
    rec = orjson.loads(orjson.dumps(b.build(103.0)))
    assert rec["turns"][1]["text"] == text
    assert agent_turn(rec, "r1")["text"] == agent_turn(rec, "r1")["heard_text"] == text
    assert rec["tools"][0]["arguments"] == {"q": text} and rec["tools"][0]["result"] == text
    assert json.loads(json.dumps(rec)) == rec
    assert "\x00" not in rc.search_text(rec)


def test_ten_thousand_turns_are_kept_and_more_are_counted() -> None:
    b = builder()
    feed(b, GREETING)
    for i in range(rc.MAX_TURNS + 50):
        b.agent(ag.TranscriptUser(f"u{i}", f"turn {i}"), 102.0 + i)
    rec = b.build(20_000.0)
    assert len(rec["turns"]) == rc.MAX_TURNS == 10_000
    assert rec["turns"][-1]["text"] == f"turn {rc.MAX_TURNS - 2}"  # the greeting is turn 0
    assert rec["truncated"] == {"turns": 51}
    # replies past the cap are ignored, their facts too
    b.agent(ag.ReplyStarted("late"), 30_000.0)
    b.fact(fx.MarkPlayed("late", 250, True, 30_000.0))
    b.fact(fx.AudioWritten("late", 30_000.0))
    assert len(b.build(30_001.0)["turns"]) == rc.MAX_TURNS


def test_a_one_megabyte_tool_result_is_truncated_with_a_marker() -> None:
    b = builder()
    big = "x" * 1_000_000
    feed(b, [(100.0, start()), (101.0, fx.ToolStarted("t", "dump", {"blob": big}, 101.0)),
             (102.0, fx.ToolFinished("t", big, False, 102.0))])
    (tool,) = b.build(103.0)["tools"]
    assert tool["result"].startswith("x" * rc.MAX_RESULT_CHARS + rc.TRUNCATED_MARK)
    assert len(tool["result"]) < rc.MAX_RESULT_CHARS + 100
    assert isinstance(tool["arguments"], str) and rc.TRUNCATED_MARK in tool["arguments"]


def test_duplicated_and_late_events_change_nothing_twice() -> None:
    b = builder()
    feed(b, GREETING + GREETING[3:])  # reply r0 again: same turn
    rec = b.build(102.0)
    assert [t.get("reply_id") for t in rec["turns"]] == ["r0"]
    assert agent_turn(rec, "r0")["first_audio_ms"] == 500
    b.fact(fx.MarkPlayed("unknown", 250, True, 102.0))  # a mark of a reply we never saw
    b.fact(fx.ToolFinished("nope", "r", False, 102.0))
    b.fact("not a fact")
    assert b.build(102.0)["tools"] == []
    b.fact(fx.CallEnded("caller_hung_up", "stop", 103.0))
    b.fact(fx.CallEnded("stuck", "again", 104.0))  # the first end wins
    b.finish(104.0)
    b.finish(105.0)
    assert b.build(106.0)["outcome"] == "caller_hung_up"


@pytest.mark.parametrize(
    ("steps", "activity"),
    [
        ([], "connecting"),
        (GREETING[:4], "greeting"),
        (GREETING, "listening"),
        ([*GREETING, (102.0, ag.TranscriptUser("u", "hi")), (102.1, ag.ReplyStarted("r1"))], "agent speaking"),
        ([*GREETING, (102.0, fx.ToolStarted("t", "x", {}, 102.0))], "tool running"),
        ([*GREETING, (102.0, fx.CallEnded("caller_hung_up", "stop", 102.0))], "ending"),
    ],
)
def test_activity(steps: list[tuple[float, object]], activity: str) -> None:
    b = builder()
    feed(b, steps)
    assert b.activity() == activity


def test_join_words() -> None:
    assert rc.join_words(["Hello", ",", "world", "!"]) == "Hello, world!"
    assert rc.join_words(["Hel", "lo "]) == "Hel lo "
    assert rc.join_words([" Hello", " world"]) == " Hello world"


def test_summary_of_a_record() -> None:
    b = builder()
    feed(b, GREETING + barge_in_reply())
    s = rc.summary(b.build(105.0))
    assert (s["call_sid"], s["turn_count"], s["interrupted_count"], s["live"]) == (SID, 3, 1, True)


def test_the_report_shows_latencies_and_said_vs_heard() -> None:
    from bridge.records.report import format_record

    b = builder()
    feed(b, GREETING + barge_in_reply())
    b.fact(fx.ToolStarted("t", "lookup", {}, 104.5))
    b.fact(fx.ToolFinished("t", "found it", False, 104.6))
    b.fact(fx.CallEnded("caller_hung_up", "stop", 105.0))
    b.finish(105.0)
    text = format_record(b.build(105.0))
    assert "agent (first audio 500 ms): Hello, how can I help?" in text
    assert "agent (response 450 ms) [interrupted]: I can book a table for you tonight." in text
    assert "heard (500 ms): I can" in text
    assert "caller: Can you book a table?" in text
    assert "tool lookup ok in 100 ms: found it" in text
    assert "outcome caller_hung_up" in text and "said 1.50 s, heard 1.00 s" in text


def _silent_reply(reply: str, at: float, tools: list[tuple[str, str]], interrupted: bool = False) -> list[Any]:
    """A reply without words: started, its tool calls (if any), done."""
    steps: list[Any] = [(at, ag.ReplyStarted(reply))]
    for n, (tool_call_id, name) in enumerate(tools):
        t = at + 0.01 * (n + 1)
        steps += [(t, ag.ToolCall(tool_call_id, name, {})), (t, fx.ToolStarted(tool_call_id, name, {}, t)),
                  (t + 0.05, fx.ToolFinished(tool_call_id, '{"ok":true}', False, t + 0.05))]
    return [*steps, (at + 0.2, ag.ReplyDone(reply, interrupted))]


@pytest.mark.parametrize(
    ("script", "line"),
    [
        # the agent's goodbye, then a silent pre-amble that only calls end_call
        ([*_silent_reply("r1", 102.0, [("t1", "end_call")])], "  agent: (no words: called end_call)"),
        ([*_silent_reply("r1", 102.0, [("t1", "lookup"), ("t2", "weather")])],
         "  agent: (no words: called lookup, weather)"),
        # a tool called in a later reply is not this silent reply's
        ([*_silent_reply("r1", 102.0, []), *_silent_reply("r2", 103.0, [("t2", "weather")])], "  agent: (no words)"),
        # the caller speaks (a caller turn starts) while the pre-amble's tool runs: still its tool
        ([(101.9, ag.SpeechStarted()), (102.0, ag.ReplyStarted("r1")), (102.1, ag.TranscriptUser("u", "hm")),
          (102.2, ag.ToolCall("t1", "lookup", {})), (102.2, fx.ToolStarted("t1", "lookup", {}, 102.2)),
          (102.3, ag.ReplyDone("r1", False))], "  agent: (no words: called lookup)"),
        ([(102.0, ag.ReplyStarted("r1")), (102.1, ag.SpeechStarted()), (102.1, ag.ReplyDone("r1", True))],
         "  agent [interrupted]: (no words)"),
    ],
    ids=["end_call", "two_tools", "tool_of_a_later_reply", "caller_turn_between", "interrupted_before_words"],
)
def test_the_report_of_an_agent_turn_without_words_says_so(script: list[Any], line: str) -> None:
    from bridge.records.report import format_record

    b = builder()
    feed(b, GREETING + script + [(105.0, fx.CallEnded("agent_ended", "end_call", 105.0))])
    b.finish(105.0)
    record = b.build(105.0)
    silent = [t for t in record["turns"] if t["speaker"] == "agent" and not t["text"]]
    assert silent, "the script has an agent turn without words"
    lines = format_record(record).splitlines()
    assert line in lines, lines
    assert not [x for x in lines if x.rstrip().endswith(":")], lines  # never an empty line after a label
    assert "agent (first audio 500 ms): Hello, how can I help?" in lines[3]


def test_the_report_of_a_stored_record_with_odd_times_does_not_fail() -> None:
    from bridge.records.report import format_record

    record = {"turns": [{"speaker": "agent", "text": "", "started_at": "not a time"},
                        {"speaker": "agent", "text": " ", "started_at": None}],
              "tools": [{"name": "end_call", "started_at": "2027-01-15T08:00:01.000Z"}]}
    lines = format_record(record).splitlines()
    assert lines.count("  agent: (no words)") == 2
    assert "  tool end_call: no result" in lines  # not "ok in None ms: "
