"""bridge.call.amd: the answering-machine decision table, on plain data and a fake clock."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

from bridge.call.amd import (
    AmdPhase,
    AnsweredBy,
    AnsweringMachineDetector,
    Greet,
    HangUpNow,
    LeaveVoicemail,
    greeting_instructions,
    parse_answered_by,
    voicemail_instructions,
)

GREETING = "Hi, this is Acme calling about your order."
VOICEMAIL = "Hi, this is Acme. Please call us back at 555 0100. Goodbye."
T0 = 100.0  # the call's clock when the stream started


def detector(wait_s: float = 4.0, greeting: str = GREETING) -> AnsweringMachineDetector:
    return AnsweringMachineDetector(
        greeting=greeting, voicemail_message=VOICEMAIL, wait_s=wait_s, answered_at=T0
    )


def decisions(actions: Sequence[object]) -> list[object]:
    """The actions without the log lines."""
    return [a for a in actions if type(a).__name__ != "AmdLog"]


GREET = Greet(greeting_instructions(GREETING))


def voicemail(*, via_agent: bool = True, interrupt: bool = False) -> LeaveVoicemail:
    return LeaveVoicemail(VOICEMAIL, voicemail_instructions(VOICEMAIL), via_agent, interrupt)


@pytest.mark.parametrize(
    ("answered_by", "expected", "phase"),
    [
        ("human", [GREET], AmdPhase.GREETED),
        ("unknown", [GREET], AmdPhase.GREETED),
        ("machine_end_beep", [voicemail()], AmdPhase.FINISHED),
        ("machine_end_silence", [voicemail()], AmdPhase.FINISHED),
        ("machine_end_other", [voicemail()], AmdPhase.FINISHED),
        ("fax", [HangUpNow("a fax machine answered")], AmdPhase.FINISHED),
        ("machine_start", [], AmdPhase.MACHINE),
    ],
)
def test_a_result_with_the_agent_up(answered_by: str, expected: list[object], phase: AmdPhase) -> None:
    amd = detector()
    assert amd.agent_ready(T0 + 0.5) == []  # nobody known yet: the greeting waits
    assert decisions(amd.result(answered_by, T0 + 2.0)) == expected
    assert amd.phase is phase
    assert amd.answered_by == AnsweredBy(answered_by)


@pytest.mark.parametrize(
    ("answered_by", "at_result", "at_ready"),
    [
        ("human", [], [GREET]),
        ("unknown", [], [GREET]),
        # The agent is not up: the voicemail is <Say> TwiML, not a reply.
        ("machine_end_beep", [voicemail(via_agent=False)], []),
        ("fax", [HangUpNow("a fax machine answered")], []),
    ],
)
def test_a_result_before_the_agent_is_up(
    answered_by: str, at_result: list[object], at_ready: list[object]
) -> None:
    amd = detector()
    assert decisions(amd.result(answered_by, T0 + 1.0)) == at_result
    assert amd.agent_ready(T0 + 1.5) == at_ready


def test_the_greeting_is_held_until_wait_s_passes_then_given_once() -> None:
    amd = detector(wait_s=4.0)
    amd.agent_ready(T0 + 0.3)
    assert amd.next_deadline() == T0 + 4.0
    assert amd.tick(T0 + 3.99) == []
    assert decisions(amd.tick(T0 + 4.0)) == [GREET]
    assert amd.greeted_on_timer and amd.next_deadline() is None
    assert amd.tick(T0 + 10.0) == []
    assert amd.agent_ready(T0 + 11.0) == []  # a resumed session does not greet again


def test_wait_s_passing_before_the_agent_is_up_greets_when_it_is() -> None:
    amd = detector(wait_s=1.0)
    assert amd.tick(T0 + 2.0) == []
    assert amd.agent_ready(T0 + 2.5) == [GREET]
    assert amd.greeted_on_timer


def test_a_late_machine_result_interrupts_the_timer_greeting_with_the_voicemail() -> None:
    amd = detector()
    amd.agent_ready(T0)
    amd.tick(T0 + 4.0)
    assert decisions(amd.result("machine_end_beep", T0 + 9.0)) == [voicemail(interrupt=True)]
    assert amd.answered_by is AnsweredBy.MACHINE_END_BEEP
    assert amd.result("human", T0 + 10.0) == []  # finished


def test_a_late_fax_result_hangs_up() -> None:
    amd = detector()
    amd.agent_ready(T0)
    amd.tick(T0 + 4.0)
    assert decisions(amd.result("fax", T0 + 6.0)) == [HangUpNow("a fax machine answered")]


def test_a_late_human_result_after_the_timer_greeting_changes_nothing() -> None:
    amd = detector()
    amd.agent_ready(T0)
    amd.tick(T0 + 4.0)
    assert decisions(amd.result("human", T0 + 5.0)) == []
    # From now on a person is known: a machine result is ignored (and logged).
    actions = amd.result("machine_end_beep", T0 + 6.0)
    assert decisions(actions) == [] and actions[0].level == logging.INFO  # type: ignore[union-attr]
    assert amd.phase is AmdPhase.GREETED and amd.answered_by is AnsweredBy.HUMAN


def test_results_after_a_person_was_known_are_ignored() -> None:
    amd = detector()
    amd.agent_ready(T0)
    assert decisions(amd.result("human", T0 + 1.0)) == [GREET]
    assert decisions(amd.result("human", T0 + 1.1)) == []  # a duplicated callback
    assert decisions(amd.result("machine_end_beep", T0 + 2.0)) == []
    assert decisions(amd.result("fax", T0 + 2.0)) == []
    assert amd.answered_by is AnsweredBy.HUMAN


def test_machine_start_waits_for_the_end_and_the_timer_does_not_greet() -> None:
    amd = detector(wait_s=4.0)
    amd.agent_ready(T0)
    amd.result("machine_start", T0 + 2.0)
    assert amd.tick(T0 + 4.0) == [] and amd.next_deadline() == T0 + 30.0
    assert decisions(amd.result("machine_end_beep", T0 + 12.0)) == [voicemail()]
    assert amd.answered_by is AnsweredBy.MACHINE_END_BEEP  # the final answer is recorded


def test_machine_start_without_an_end_leaves_the_voicemail_at_the_timeout() -> None:
    amd = detector()
    amd.agent_ready(T0)
    amd.result("machine_start", T0 + 2.0)
    assert amd.tick(T0 + 29.9) == []
    assert decisions(amd.tick(T0 + 30.0)) == [voicemail()]
    assert amd.next_deadline() is None and amd.tick(T0 + 60.0) == []


def test_machine_start_then_human_greets() -> None:
    amd = detector()
    amd.agent_ready(T0)
    amd.result("machine_start", T0 + 1.0)
    assert decisions(amd.result("human", T0 + 3.0)) == [GREET]


def test_an_empty_greeting_lets_the_callee_speak_first() -> None:
    amd = detector(greeting="  ")
    amd.agent_ready(T0)
    assert decisions(amd.result("human", T0 + 1.0)) == []
    assert amd.phase is AmdPhase.GREETED


def test_the_agent_hears_the_callee_only_once_greeted() -> None:
    amd = detector()
    amd.agent_ready(T0)
    assert not amd.listening  # a machine's greeting would start a reply by itself
    amd.result("machine_start", T0 + 1.0)
    assert not amd.listening
    amd.result("human", T0 + 2.0)
    assert amd.listening
    machine = detector()
    machine.agent_ready(T0)
    machine.result("machine_end_beep", T0 + 8.0)
    assert not machine.listening  # the voicemail is spoken to a machine


def test_a_zero_wait_greets_as_soon_as_the_agent_is_up() -> None:
    amd = detector(wait_s=0.0)
    assert amd.agent_ready(T0 + 0.2) == [GREET]


@pytest.mark.parametrize("value", ["", "robot", "HUMAN\n", "x" * 10_000, "machine_end_beep\x00", "\ud800"])
def test_undocumented_values_are_logged_and_ignored(value: str) -> None:
    amd = detector()
    amd.agent_ready(T0)
    actions = amd.result(value, T0 + 1.0)
    if parse_answered_by(value) is None:
        [log] = actions
        assert log.level == logging.WARNING  # type: ignore[union-attr]
        assert "\n" not in log.message and len(log.message) < 300  # type: ignore[union-attr]
        assert amd.phase is AmdPhase.WAITING and amd.answered_by is None
    else:  # case and surrounding whitespace are forgiven
        assert decisions(actions) == [GREET]


def test_instructions_carry_the_exact_texts() -> None:
    assert GREETING in greeting_instructions(GREETING)
    assert VOICEMAIL in voicemail_instructions(VOICEMAIL)
    assert [v.value for v in AnsweredBy] == [
        "human",
        "machine_start",
        "machine_end_beep",
        "machine_end_silence",
        "machine_end_other",
        "fax",
        "unknown",
    ]
