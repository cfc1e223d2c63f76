"""bridge.call.lifecycle: the upstream session's phase and deadlines, as tables of steps."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.call.actions import CallStats
from bridge.call.lifecycle import (
    MAX_RECOVERIES,
    ConnectFailure,
    Expired,
    Phase,
    Ready,
    Resume,
    UpstreamLifecycle,
    Verdict,
)

READY_S, WINDOW_S, RECOVERY_S = 10.0, 5.0, 8.0


def machine(*, window_s: float = WINDOW_S, recovery_s: float = RECOVERY_S) -> UpstreamLifecycle:
    return UpstreamLifecycle(CallStats(), ready_timeout_s=READY_S, resume_window_s=window_s, recovery_s=recovery_s)


def step(up: UpstreamLifecycle, kind: str, arg: Any, now: float) -> object:
    if kind == "start":
        up.start(now)
        return None
    if kind == "ready":  # session id
        return up.ready(arg, now)
    if kind == "closed":
        return up.closed(now)
    if kind == "failed":
        return up.connect_failed()
    if kind == "error":  # (code, fatal)
        return up.error(arg[0], arg[1], now)
    if kind == "tick":
        return up.expired(now)
    if kind == "heard":  # agent audio went to Twilio
        up.stats.frames_to_twilio += arg
        return None
    if kind == "ended":
        up.ended()
        return None
    if kind == "end":  # upstream asked
        return up.end(upstream=arg)
    raise AssertionError(kind)


def run(steps: list[tuple[str, Any, float]], **kw: float) -> tuple[UpstreamLifecycle, list[object]]:
    up = machine(**kw)
    return up, [step(up, kind, arg, now) for kind, arg, now in steps]


LIVE = [("start", None, 0.0), ("ready", "s1", 1.0)]
DROPPED = [*LIVE, ("closed", None, 20.0)]


@pytest.mark.parametrize(
    ("name", "steps", "outs", "phase"),
    [
        ("start connects", [("start", None, 0.0)], [None], Phase.CONNECTING),
        (
            "a second start changes nothing",
            [("start", None, 0.0), ("start", None, 9.0), ("tick", None, 9.9)],
            [None, None, None],
            Phase.CONNECTING,
        ),
        ("ready: live", LIVE, [None, Ready.FIRST], Phase.LIVE),
        ("a duplicated ready", [*LIVE, ("ready", "s1", 2.0)], [None, Ready.FIRST, Ready.AGAIN], Phase.LIVE),
        (
            "no ready in time",
            [("start", None, 0.0), ("tick", None, 9.99), ("tick", None, 10.0)],
            [None, None, Expired.READY],
            Phase.CONNECTING,
        ),
        ("ready clears the ready deadline", [*LIVE, ("tick", None, 100.0)], [None, Ready.FIRST, None], Phase.LIVE),
        ("a drop resumes", DROPPED, [None, Ready.FIRST, Resume("s1", 1)], Phase.RECONNECTING),
        (
            "attempts count in one window",
            [*DROPPED, ("closed", None, 21.0), ("closed", None, 24.9)],
            [None, Ready.FIRST, Resume("s1", 1), Resume("s1", 2), Resume("s1", 3)],
            Phase.RECONNECTING,
        ),
        (
            "a drop past the resume deadline ends the upstream",
            [*DROPPED, ("closed", None, 25.0)],
            [None, Ready.FIRST, Resume("s1", 1), None],
            Phase.RECONNECTING,
        ),
        (
            "the resume deadline",
            [*DROPPED, ("tick", None, 24.9), ("tick", None, 25.0)],
            [None, Ready.FIRST, Resume("s1", 1), None, Expired.RESUME],
            Phase.RECONNECTING,
        ),
        (
            "resumed: a new window and attempts from 1 at the next drop",
            [*DROPPED, ("closed", None, 21.0), ("ready", "s1", 22.0), ("tick", None, 30.0), ("closed", None, 40.0)],
            [None, Ready.FIRST, Resume("s1", 1), Resume("s1", 2), Ready.RESUMED, None, Resume("s1", 1)],
            Phase.RECONNECTING,
        ),
        (
            "a drop before ready is no resume",
            [("start", None, 0.0), ("closed", None, 1.0)],
            [None, None],
            Phase.CONNECTING,
        ),
        (
            "a refused resume recovers",
            [*DROPPED, ("error", ("session_expired", True), 21.0)],
            [None, Ready.FIRST, Resume("s1", 1), Verdict.RECOVER],
            Phase.RECOVERING,
        ),
        (
            "a recovery clears the resume deadline",
            [*DROPPED, ("error", ("session_not_found", True), 21.0), ("tick", None, 28.9), ("tick", None, 29.0)],
            [None, Ready.FIRST, Resume("s1", 1), Verdict.RECOVER, None, Expired.RECOVERY],
            Phase.RECOVERING,
        ),
        (
            "recovered, then heard: the recovery deadline is met",
            [
                *DROPPED,
                ("error", ("session_forbidden", True), 21.0),
                ("ready", "s2", 22.0),
                ("heard", 1, 23.0),
                ("tick", None, 23.0),
                ("tick", None, 100.0),
            ],
            [None, Ready.FIRST, Resume("s1", 1), Verdict.RECOVER, Ready.RECOVERED, None, None, None],
            Phase.LIVE,
        ),
        (
            "recovered but never heard: the recovery deadline passes",
            [*DROPPED, ("error", ("session_expired", True), 21.0), ("ready", "s2", 22.0), ("tick", None, 29.0)],
            [None, Ready.FIRST, Resume("s1", 1), Verdict.RECOVER, Ready.RECOVERED, Expired.RECOVERY],
            Phase.LIVE,
        ),
        (
            "the other errors while resuming are fatal",
            [*DROPPED, ("error", ("invalid_value", False), 21.0)],
            [None, Ready.FIRST, Resume("s1", 1), Verdict.FATAL],
            Phase.RECONNECTING,
        ),
        (
            "any error before ready is fatal",
            [("start", None, 0.0), ("error", ("invalid_value", False), 0.5)],
            [None, Verdict.FATAL],
            Phase.CONNECTING,
        ),
        (
            "live: a non-fatal error goes on",
            [*LIVE, ("error", ("invalid_value", False), 2.0)],
            [None, Ready.FIRST, Verdict.GOES_ON],
            Phase.LIVE,
        ),
        (
            "live: a fatal code is fatal",
            [*LIVE, ("error", ("session_expired", True), 2.0)],
            [None, Ready.FIRST, Verdict.FATAL],
            Phase.LIVE,
        ),
        (
            "a first connect fails",
            [("start", None, 0.0), ("failed", None, 1.0)],
            [None, ConnectFailure.OPEN],
            Phase.CONNECTING,
        ),
        (
            "a resume connect fails",
            [*DROPPED, ("failed", None, 21.0)],
            [None, Ready.FIRST, Resume("s1", 1), ConnectFailure.RESUME],
            Phase.RECONNECTING,
        ),
        (
            "a recovery connect fails",
            [*DROPPED, ("error", ("session_expired", True), 21.0), ("failed", None, 22.0)],
            [None, Ready.FIRST, Resume("s1", 1), Verdict.RECOVER, ConnectFailure.RECOVERY],
            Phase.RECOVERING,
        ),
        (
            "ending is final",
            [*LIVE, ("end", True, 2.0), ("tick", None, 100.0), ("closed", None, 101.0), ("ready", "s9", 102.0)],
            [None, Ready.FIRST, True, None, None, Ready.AGAIN],
            Phase.ENDING,
        ),
    ],
)
def test_transitions(name: str, steps: list[tuple[str, Any, float]], outs: list[object], phase: Phase) -> None:
    up, got = run(steps)
    assert got == outs
    assert up.phase is phase


def test_no_resume_window_a_drop_ends_the_upstream() -> None:
    up, outs = run(DROPPED, window_s=0.0)
    assert outs[-1] is None and up.upstream_ended and up.phase is Phase.LIVE
    assert up.end(upstream=True) is False  # nothing left to end


def test_no_recovery_when_it_is_off() -> None:
    up, outs = run([*DROPPED, ("error", ("session_expired", True), 21.0)], recovery_s=0.0)
    assert outs[-1] is Verdict.FATAL and up.phase is Phase.RECONNECTING and not up.drop_upstream


def test_recoveries_are_bounded_per_call() -> None:
    up = machine()
    for name, arg, now in LIVE:
        step(up, name, arg, now)
    t = 10.0
    for n in range(MAX_RECOVERIES):
        assert up.closed(t) == Resume("s1", 1)
        assert up.error("session_expired", True, t + 0.1) is Verdict.RECOVER
        assert up.drop_upstream
        up.drop_upstream = False  # the session retired the refused socket
        assert up.ready("s1", t + 0.2) is Ready.RECOVERED
        assert up.stats.recoveries == n + 1 and up.recovered
        t += 10.0
    assert up.closed(t) == Resume("s1", 1)
    assert up.error("session_expired", True, t + 0.1) is Verdict.FATAL
    assert up.phase is Phase.RECONNECTING


def test_counts_and_the_session_id() -> None:
    up, _ = run(
        [
            *DROPPED,
            ("ready", "s1", 21.0),
            ("closed", None, 30.0),
            ("error", ("session_expired", True), 30.5),
            ("ready", "s2", 31.0),
        ]
    )
    stats = up.stats
    assert (stats.resumes, stats.recoveries, up.recovered, up.session_id) == (1, 1, True, "s2")


@pytest.mark.parametrize(
    ("steps", "upstream", "ends_upstream"),
    [
        ([], True, False),  # before start nothing was opened
        ([("start", None, 0.0)], True, True),
        (LIVE, True, True),
        (LIVE, False, False),
        (DROPPED, True, True),  # resuming: the new socket is ended
        ([*LIVE, ("ended", None, 2.0)], True, False),  # the service ended it already
        ([("start", None, 0.0), ("failed", None, 1.0)], True, False),
    ],
)
def test_end_ends_the_upstream_only_when_one_is_open(
    steps: list[tuple[str, Any, float]], upstream: bool, ends_upstream: bool
) -> None:
    up, _ = run(steps)
    assert up.end(upstream=upstream) is ends_upstream
    assert up.phase is Phase.ENDING
    assert up.end(upstream=True) is False  # ENDING is final: a second end opens nothing


@pytest.mark.parametrize(
    ("steps", "code", "retry"),
    [
        ([("start", None, 0.0)], "at_capacity", True),
        ([("start", None, 0.0)], "concurrency_exceeded", True),
        ([("start", None, 0.0)], "unauthorized", False),
        (LIVE, "at_capacity", False),  # live, a refusal is no connect to retry
        (DROPPED, "at_capacity", False),  # a resume is retried by the leg's own loop
        ([*DROPPED, ("error", ("session_expired", True), 21.0)], "at_capacity", True),
        ([], "at_capacity", False),
    ],
)
def test_refused_for_now(steps: list[tuple[str, Any, float]], code: str, retry: bool) -> None:
    up, _ = run(steps)
    assert up.refused_for_now(code) is retry


def test_upstream_ended_never_goes_back() -> None:
    up, _ = run([*LIVE, ("ended", None, 2.0), ("ready", "s1", 3.0), ("closed", None, 4.0)])
    assert up.upstream_ended
