"""bridge.call.budget: the caller-audio token bucket, as tables of (payload ms, now) -> sent?"""

from __future__ import annotations

import base64

import pytest

from bridge.call.budget import CallerAudioBudget


def frame(ms: int) -> str:
    return base64.b64encode(b"\xff" * (8 * ms)).decode()


@pytest.mark.parametrize(
    ("name", "burst_ms", "steps", "sent"),
    [
        ("real time always fits", 100.0, [(20, 0.02 * i) for i in range(50)], [True] * 50),
        # 100 ms of allowance, then only what real time refills: 5 at once, the 6th dropped.
        ("a flood is cut at the burst", 100.0, [(20, 0.0)] * 6, [True] * 5 + [False]),
        ("refills at real time", 40.0, [(20, 0.0), (20, 0.0), (20, 0.0), (20, 0.02)], [True, True, False, True]),
        ("never holds more than the burst", 40.0, [(20, 100.0)] * 3, [True, True, False]),
        ("a frame that does not fit takes nothing", 30.0, [(20, 0.0), (20, 0.0), (10, 0.0)], [True, False, True]),
        ("odd sizes are exact (base64 padding)", 1.0, [(1, 0.0), (1, 0.0)], [True, False]),
        ("time going backwards adds nothing", 20.0, [(20, 5.0), (20, 4.0)], [True, False]),
    ],
)
def test_the_budget(name: str, burst_ms: float, steps: list[tuple[int, float]], sent: list[bool]) -> None:
    budget = CallerAudioBudget(burst_ms)
    assert [budget.take(frame(ms), now) for ms, now in steps] == sent, name


def test_refill_gives_the_whole_burst_again() -> None:
    budget = CallerAudioBudget(40.0)
    assert budget.take(frame(40), 0.0) and not budget.take(frame(20), 0.0)
    budget.refill(0.0)
    assert budget.available_ms == 40.0 and budget.take(frame(40), 0.0)
