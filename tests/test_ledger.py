"""The admission ledger (bridge.fleet.ledger): tables of steps -> outcomes, plain data only."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.fleet.ledger import CallRef, Decision, Freed, Ledger, Verdict

A, B = "w1", "w2"
ADMITTED, REPLAYED, FULL = Verdict.ADMITTED, Verdict.REPLAYED, Verdict.FULL


def _admit(ledger: Ledger, holder: str, token: str, call_id: str, *, sid: str = "", exp: float = 60.0,
           now: float = 1.0) -> Decision:
    return ledger.admit(holder, token, call_id=call_id, call_sid=sid or f"CA-{token}", expires_at=exp, now=now)


# Each row: (name, max_calls, steps, expected results). A step is (op, args...).
Step = tuple[Any, ...]
TABLE: list[tuple[str, int, list[Step], list[object]]] = [
    (
        "a token opens one stream, on any holder, however often it is replayed",
        5,
        [("admit", A, "t1", "c1"), ("admit", A, "t1", "c2"), ("admit", B, "t1", "c3"), ("release", A, "c1"),
         ("admit", B, "t1", "c4")],
        [ADMITTED, REPLAYED, REPLAYED, True, REPLAYED],
    ),
    (
        "the cap counts live calls and reservations, whichever holder has them",
        2,
        [("reserve", A, "t1"), ("admit", B, "t2", "c2"), ("reserve", B, "t3"), ("admit", A, "t4", "c4"),
         ("admit", B, "t1", "c1")],
        [True, ADMITTED, False, FULL, ADMITTED],
    ),
    (
        "a stream refused for capacity keeps its token unspent for a retry",
        1,
        [("admit", A, "t1", "c1"), ("admit", B, "t2", "c2"), ("release", A, "c1"), ("admit", B, "t2", "c2")],
        [ADMITTED, FULL, True, ADMITTED],
    ),
    (
        "a reservation is its own stream's, made on one holder and admitted on another",
        1,
        [("reserve", A, "t1"), ("admit", B, "other", "cx"), ("admit", B, "t1", "c1")],
        [True, FULL, ADMITTED],
    ),
    (
        "reserving a token twice takes one slot; a spent token cannot reserve",
        2,
        [("reserve", A, "t1"), ("reserve", A, "t1"), ("reserve", A, "t2"), ("admit", A, "t1", "c1"),
         ("reserve", A, "t1")],
        [True, True, True, ADMITTED, False],
    ),
    (
        "releasing twice, or an unknown call, or another holder's call id, is harmless",
        1,
        [("admit", A, "t1", "c1"), ("release", B, "c1"), ("release", A, "c1"), ("release", A, "c1"),
         ("admit", B, "t2", "c2")],
        [ADMITTED, False, True, False, ADMITTED],
    ),
    (
        "dropping a holder frees its calls and reservations but not its spent tokens",
        3,
        [("admit", A, "t1", "c1"), ("reserve", A, "t2"), ("admit", B, "t3", "c3"), ("drop", A),
         ("admit", B, "t1", "c9"), ("admit", B, "t4", "c4"), ("admit", B, "t5", "c5"), ("admit", B, "t6", "c6")],
        [ADMITTED, True, ADMITTED, Freed(1, 1), REPLAYED, ADMITTED, ADMITTED, FULL],
    ),
    (
        "the same call id on two holders is two calls",
        2,
        [("admit", A, "t1", "c1"), ("admit", B, "t2", "c1"), ("release", A, "c1"), ("held", B)],
        [ADMITTED, ADMITTED, True, (1, 0)],
    ),
]


@pytest.mark.parametrize(("name", "max_calls", "steps", "expected"), TABLE, ids=[row[0] for row in TABLE])
def test_ledger_table(name: str, max_calls: int, steps: list[Step], expected: list[object]) -> None:
    ledger = Ledger(max_calls)
    results: list[object] = []
    for op, *args in steps:
        if op == "admit":
            results.append(_admit(ledger, *args).verdict)
        elif op == "reserve":
            results.append(ledger.reserve(args[0], args[1], expires_at=60.0, now=1.0))
        elif op == "release":
            results.append(ledger.release(*args))
        elif op == "drop":
            results.append(ledger.drop_holder(*args))
        elif op == "held":
            results.append(ledger.held_by(args[0], now=1.0))
    assert results == expected


def test_a_spent_token_is_remembered_until_its_expiry_and_then_forgotten() -> None:
    ledger = Ledger(5)
    assert _admit(ledger, A, "t1", "c1", exp=10.0, now=1.0).verdict is ADMITTED
    assert _admit(ledger, B, "t1", "c2", exp=10.0, now=10.0).verdict is REPLAYED  # at its expiry instant
    assert ledger.redeemed("t1", now=10.0)
    # Past its expiry the token no longer verifies (check_token refuses it), so the ledger may forget it.
    assert not ledger.redeemed("t1", now=10.001)


def test_reservations_expire_at_their_exact_time() -> None:
    ledger = Ledger(1)
    assert ledger.reserve(A, "t1", expires_at=10.0, now=0.0)
    assert not ledger.reserve(B, "t2", expires_at=20.0, now=10.0)  # still held at its expiry instant
    assert ledger.reserve(B, "t2", expires_at=20.0, now=10.001)
    assert ledger.reservations(now=10.001) == 1


def test_an_expired_reservation_no_longer_guarantees_a_slot() -> None:
    ledger = Ledger(1)
    assert ledger.reserve(A, "t1", expires_at=10.0, now=0.0)
    assert _admit(ledger, B, "t-other", "cx", now=11.0).verdict is ADMITTED  # t1's slot was free again
    assert _admit(ledger, A, "t1", "c1", now=12.0).verdict is FULL


def test_re_reserving_moves_the_expiry_and_the_old_deadline_does_not_free_it() -> None:
    ledger = Ledger(1)
    assert ledger.reserve(A, "t1", expires_at=10.0, now=0.0)
    assert ledger.reserve(A, "t1", expires_at=30.0, now=5.0)
    assert not ledger.reserve(B, "t2", expires_at=40.0, now=20.0)  # the first deadline has passed: still held
    assert ledger.reserve(B, "t2", expires_at=40.0, now=30.5)


def test_one_live_call_per_call_sid_the_newer_names_the_older() -> None:
    ledger = Ledger(5)
    first = _admit(ledger, A, "t1", "c1", sid="CA1")
    assert first == Decision(ADMITTED, replaces=None)
    second = _admit(ledger, B, "t2", "c2", sid="CA1")  # a duplicated webhook's second stream
    assert second == Decision(ADMITTED, replaces=CallRef(A, "c1"))
    assert ledger.live_call("CA1") == CallRef(B, "c2")
    # The older one ends afterwards: the CallSid keeps pointing at the newer.
    assert ledger.release(A, "c1")
    assert ledger.live_call("CA1") == CallRef(B, "c2")
    assert ledger.release(B, "c2")
    assert ledger.live_call("CA1") is None
    assert _admit(ledger, A, "t3", "c3", sid="CA1").replaces is None


def test_dropping_a_holder_forgets_its_call_sids_only() -> None:
    ledger = Ledger(5)
    _admit(ledger, A, "t1", "c1", sid="CA1")
    _admit(ledger, B, "t2", "c2", sid="CA2")
    assert ledger.drop_holder(A) == Freed(1, 0)
    assert ledger.live_call("CA1") is None
    assert ledger.live_call("CA2") == CallRef(B, "c2")
    assert ledger.live_calls == 1


def test_a_duplicate_call_id_on_one_holder_is_a_bug_and_changes_nothing() -> None:
    ledger = Ledger(5)
    _admit(ledger, A, "t1", "c1")
    with pytest.raises(ValueError, match="already holds"):
        _admit(ledger, A, "t2", "c1")
    assert not ledger.redeemed("t2", now=1.0)
    assert ledger.live_calls == 1


def test_memory_is_bounded_by_what_can_still_verify() -> None:
    ledger = Ledger(10)
    for i in range(5000):
        now = float(i)
        assert _admit(ledger, A, f"t{i}", f"c{i}", exp=now + 60.0, now=now).verdict is ADMITTED
        assert ledger.release(A, f"c{i}")
        assert ledger.reserve(A, f"r{i}", expires_at=now + 60.0, now=now)
        _admit(ledger, B, f"r{i}", f"d{i}", now=now)
        ledger.release(B, f"d{i}")
    assert len(ledger._redeemed) <= 122 and len(ledger._redeemed_expiry) <= 122
    assert len(ledger._reserved_expiry) <= 62


def test_max_calls_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Ledger(0)


# (name, max_calls, setup steps, token asked about, pending, expected would_admit, expected has_room)
WOULD_ADMIT = [
    ("empty", 2, [], "t", 0, ADMITTED, True),
    ("spent token", 2, [("admit", A, "t", "c1")], "t", 0, REPLAYED, True),
    ("full of calls", 1, [("admit", A, "t1", "c1")], "t", 0, FULL, False),
    ("full of pending admissions elsewhere", 2, [("admit", A, "t1", "c1")], "t", 1, FULL, False),
    ("full, but the token holds a reservation", 1, [("reserve", B, "t")], "t", 0, ADMITTED, False),
    ("full of another's reservation", 1, [("reserve", B, "r")], "t", 0, FULL, False),
    ("spent wins over full", 1, [("admit", A, "t", "c1")], "t", 3, REPLAYED, False),
]


@pytest.mark.parametrize(("name", "max_calls", "steps", "token", "pending", "verdict", "room"), WOULD_ADMIT,
                         ids=[row[0] for row in WOULD_ADMIT])  # fmt: skip
def test_would_admit_and_has_room_answer_without_changing_anything(
    name: str, max_calls: int, steps: list[Step], token: str, pending: int, verdict: Verdict, room: bool
) -> None:
    ledger = Ledger(max_calls)
    for op, holder, *args in steps:
        if op == "admit":
            _admit(ledger, holder, args[0], args[1])
        else:
            ledger.reserve(holder, args[0], expires_at=60.0, now=1.0)
    before = (ledger.live_calls, ledger.reservations(1.0), ledger.redeemed(token, 1.0))
    assert ledger.would_admit(token, 1.0, pending=pending) is verdict
    assert ledger.has_room(1.0, pending=pending) is room
    assert (ledger.live_calls, ledger.reservations(1.0), ledger.redeemed(token, 1.0)) == before
    if pending == 0:  # what admit then really says
        assert _admit(ledger, A, token, "probe").verdict is verdict
