"""bridge.call.idle: the idle-caller timers, as tables of (input, now) -> actions."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from bridge.call.idle import GOODBYE_INSTRUCTIONS, REPROMPT_INSTRUCTIONS, Goodbye, IdleStage, IdleTimer, Reprompt

Step = tuple[str, float]  # (input name or "tick", now)


def run(steps: Sequence[Step], *, reprompt_s: float = 8.0, hangup_s: float = 15.0) -> list[tuple[float, str]]:
    """Feed the inputs in order; every action ticked out, with its time."""
    timer = IdleTimer(reprompt_s=reprompt_s, hangup_s=hangup_s)
    out: list[tuple[float, str]] = []
    for name, now in steps:
        if name == "tick":
            out += [(now, type(a).__name__) for a in timer.tick(now)]
        else:
            getattr(timer, name)(now)
    return out


def silence(timer: IdleTimer, until: float) -> list[tuple[float, str]]:
    """Tick exactly at every deadline up to ``until`` (what the session's timer loop does)."""
    out: list[tuple[float, str]] = []
    while (deadline := timer.next_deadline()) is not None and deadline <= until:
        assert timer.tick(deadline - 0.001) == []
        out += [(deadline, type(a).__name__) for a in timer.tick(deadline)]
    return out


def test_reprompt_after_8_s_then_goodbye_15_s_after_the_reprompt_was_heard() -> None:
    timer = IdleTimer()
    timer.agent_started(0.0)
    timer.agent_heard(3.0)  # the greeting's last mark
    assert timer.next_deadline() == 11.0
    assert silence(timer, 11.0) == [(11.0, "Reprompt")]
    timer.agent_started(11.2)
    assert timer.next_deadline() is None  # the agent is talking
    timer.agent_heard(13.0)
    assert silence(timer, 100.0) == [(28.0, "Goodbye")]
    assert timer.stage is IdleStage.ENDED and timer.next_deadline() is None


def test_a_reprompt_that_never_plays_still_leads_to_the_goodbye() -> None:
    assert run([("agent_heard", 2.0), ("tick", 10.0), ("tick", 24.9), ("tick", 25.0)]) == [
        (10.0, "Reprompt"),
        (25.0, "Goodbye"),
    ]


@pytest.mark.parametrize(
    ("activity", "at"),
    [("key_pressed", 9.0), ("caller_stopped", 9.0), ("tool_finished", 9.0)],
)
def test_signs_of_life_restart_the_whole_cycle(activity: str, at: float) -> None:
    steps: list[Step] = [("agent_heard", 0.0), ("tick", 8.0)]  # reprompted at 8
    if activity == "caller_stopped":
        steps.append(("caller_started", 8.5))
    if activity == "tool_finished":
        steps.append(("tool_started", 8.5))
    steps += [(activity, at), ("tick", 16.9), ("tick", 17.0), ("tick", 31.9), ("tick", 32.0)]
    # a second reprompt 8 s after the activity, and the goodbye 15 s after that
    assert run(steps) == [(8.0, "Reprompt"), (17.0, "Reprompt"), (32.0, "Goodbye")]


def test_nothing_counts_while_the_caller_speaks_or_a_tool_runs() -> None:
    timer = IdleTimer()
    timer.agent_heard(0.0)
    timer.caller_started(5.0)
    assert timer.next_deadline() is None and timer.tick(60.0) == []
    timer.caller_stopped(61.0)
    timer.tool_started(62.0)
    timer.tool_started(62.5)  # two tools at once
    timer.tool_finished(63.0)
    assert timer.next_deadline() is None  # one still runs
    timer.tool_finished(70.0)
    assert timer.next_deadline() == 78.0


def test_no_timer_before_the_agent_was_heard_or_the_caller_acted() -> None:
    timer = IdleTimer()
    assert timer.stage is IdleStage.OFF and timer.tick(1000.0) == []
    timer.agent_started(0.0)
    assert timer.tick(1000.0) == []
    timer.arm(1000.0)
    assert timer.next_deadline() is None  # armed, but the agent is still speaking
    timer.agent_heard(1001.0)
    assert timer.next_deadline() == 1009.0
    unarmed = IdleTimer()
    unarmed.arm(5.0)  # e.g. no greeting: count from session.ready
    assert unarmed.next_deadline() == 13.0


def test_the_agents_own_words_do_not_earn_another_reprompt() -> None:
    steps: list[Step] = [("agent_heard", 0.0), ("tick", 8.0), ("agent_started", 8.1), ("agent_heard", 10.0)]
    steps += [("agent_started", 11.0), ("agent_heard", 12.0), ("tick", 26.9), ("tick", 27.0)]
    assert run(steps) == [(8.0, "Reprompt"), (27.0, "Goodbye")]  # 15 s after the last words heard


def test_reprompt_disabled_goes_straight_to_the_goodbye() -> None:
    assert run([("agent_heard", 1.0), ("tick", 15.9), ("tick", 16.0)], reprompt_s=0) == [(16.0, "Goodbye")]


def test_hangup_disabled_reprompts_once_per_silence() -> None:
    steps: list[Step] = [("agent_heard", 0.0), ("tick", 8.0), ("agent_heard", 9.0), ("tick", 1000.0)]
    steps += [("key_pressed", 1001.0), ("tick", 1009.0)]
    assert run(steps, hangup_s=0) == [(8.0, "Reprompt"), (1009.0, "Reprompt")]


def test_both_disabled_never_acts() -> None:
    timer = IdleTimer(reprompt_s=0, hangup_s=0)
    assert not timer.enabled
    for name in ("agent_heard", "key_pressed", "caller_stopped", "tool_finished", "arm"):
        getattr(timer, name)(1.0)
    assert timer.next_deadline() is None and timer.tick(1e9) == []


def test_the_caller_speaking_after_the_goodbye_revives_the_timer() -> None:
    timer = IdleTimer()
    timer.agent_heard(0.0)
    silence(timer, 8.0)
    assert silence(timer, 30.0) == [(23.0, "Goodbye")]
    assert timer.tick(1e6) == []  # once
    timer.caller_started(24.0)  # the session cancels the hang-up, as for end_call's goodbye
    timer.caller_stopped(25.0)
    assert timer.stage is IdleStage.REPROMPT and timer.next_deadline() == 33.0


def test_duplicated_and_late_inputs() -> None:
    timer = IdleTimer()
    timer.agent_heard(0.0)
    timer.agent_heard(0.0)
    timer.tool_finished(1.0)  # a finish without a start: counted from it, never negative
    timer.caller_stopped(2.0)  # a stop without a start
    assert timer.next_deadline() == 10.0
    assert timer.tick(5.0) == []  # early tick
    assert timer.tick(11.0) == [Reprompt()]  # a late tick fires once
    assert timer.tick(11.0) == []


def test_the_instructions() -> None:
    assert Reprompt().instructions == REPROMPT_INSTRUCTIONS and "still there" in REPROMPT_INSTRUCTIONS
    assert Goodbye().instructions == GOODBYE_INSTRUCTIONS and "goodbye" in GOODBYE_INSTRUCTIONS
    with pytest.raises(ValueError, match="negative"):
        IdleTimer(reprompt_s=-1)
