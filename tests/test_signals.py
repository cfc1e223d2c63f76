"""bridge.call.signals: per-CallSid delivery of out-of-band news (the AMD result) to a live call."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from bridge.call.signals import CHANNEL_SIZE, PENDING_PER_CALL, AmdResult, CallSignals

SID = "CA" + "1" * 32
OTHER = "CA" + "2" * 32


def amd(answered_by: str = "human", sid: str = SID) -> AmdResult:
    return AmdResult(sid, answered_by, 1200)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_live_subscriber_gets_its_calls_signals_only() -> None:
    signals = CallSignals()
    with signals.subscribe(SID) as sub:
        assert signals.publish(amd("machine_end_beep"))
        assert not signals.publish(amd(sid=OTHER))  # kept for OTHER's stream
        assert await sub.receive.receive() == amd("machine_end_beep")
        with pytest.raises(trio.WouldBlock):
            sub.receive.receive_nowait()
    assert signals.pending(OTHER) == [amd(sid=OTHER)]


async def test_a_signal_that_beats_the_stream_waits_for_it() -> None:
    signals = CallSignals()
    assert not signals.publish(amd("human"))
    assert not signals.publish(amd("human"))  # a duplicated callback
    with signals.subscribe(SID) as sub:
        assert [sub.receive.receive_nowait(), sub.receive.receive_nowait()] == [amd(), amd()]
    assert signals.pending(SID) == []


async def test_the_reader_ends_when_its_subscription_ends() -> None:
    signals = CallSignals()
    got: list[AmdResult] = []
    sub = signals.subscribe(SID)

    async def reader() -> None:
        async for signal in sub.receive:
            got.append(signal)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            signals.publish(amd("fax"))
            await trio.testing.wait_all_tasks_blocked()
            replacement = signals.subscribe(SID)  # a second stream for the same call
    # The old reader ended by itself (EndOfChannel), the new subscriber gets what follows.
    assert got == [amd("fax")]
    assert signals.publish(amd("human"))
    assert replacement.receive.receive_nowait() == amd("human")
    sub.close()  # closing the replaced one does not unsubscribe the replacement
    assert signals.publish(amd("unknown"))
    replacement.close()
    assert not signals.publish(amd("unknown"))  # nobody listens any more: kept pending


def test_bounds_pending_calls_signals_per_call_and_ttl() -> None:
    clock = Clock()
    signals = CallSignals(max_pending=2, pending_ttl_s=60.0, clock=clock)
    for _ in range(PENDING_PER_CALL + 3):
        signals.publish(amd())
    assert len(signals.pending(SID)) == PENDING_PER_CALL and signals.dropped == 3
    clock.now = 10.0
    signals.publish(amd(sid=OTHER))
    signals.publish(amd(sid="CA" + "3" * 32))  # the oldest CallSid makes room
    assert signals.pending(SID) == [] and signals.pending(OTHER) == [amd(sid=OTHER)]
    clock.now = 70.0  # OTHER's waited 60 s
    assert signals.pending(OTHER) == []
    # The latest AnsweredBy per call, bounded the same way.
    assert signals.answered_by(SID) is None and signals.answered_by(OTHER) == "human"
    signals.publish(amd("fax", sid=OTHER))
    assert signals.answered_by(OTHER) == "fax"


def test_a_full_channel_drops_the_newest_and_counts_it() -> None:
    signals = CallSignals()
    sub = signals.subscribe(SID)
    for _ in range(CHANNEL_SIZE):
        assert signals.publish(amd())
    assert not signals.publish(amd("fax"))
    assert sub.dropped == 1 and signals.dropped == 1
    sub.close()


def test_the_authoritys_kept_results_are_bounded_expire_and_are_taken_once() -> None:
    from bridge.fleet.ledger import KEPT_PER_CALL, KeptSignals

    kept = KeptSignals(ttl_s=60.0, max_calls=2)
    for i in range(KEPT_PER_CALL + 1):
        kept.keep(SID, {"n": i}, now=1000.0)
    assert kept.dropped == 1
    kept.keep(OTHER, {"n": "other"}, now=1010.0)
    kept.keep("CA3", {"n": "third"}, now=1020.0)  # a third CallSid evicts the oldest
    assert kept.dropped == 2 and len(kept) == 2
    assert kept.take(SID, now=1020.0) == []
    assert kept.take("CA3", now=1020.0) == [{"n": "third"}]
    assert kept.take("CA3", now=1020.0) == []  # taken once
    assert kept.take(OTHER, now=1070.0) == []  # 60 s after it was kept: expired
    kept.keep(SID, {"n": 0}, now=2000.0)
    assert kept.take(SID, now=2059.0) == [{"n": 0}]


def test_the_parent_refuses_a_malformed_amd_request() -> None:
    from bridge.fleet.parent import Authority

    authority = Authority(5, clock=lambda: 1000.0)
    good = {"id": 1, "op": "amd", "call_sid": SID, "answered_by": "human", "detection_ms": 1200}
    assert authority.answer("w0", good) == {"id": 1, "route": "kept"}
    for bad in ({"detection_ms": "12"}, {"detection_ms": -1}, {"answered_by": ""}, {"call_sid": 7}):
        assert authority.answer("w0", good | bad | {"id": 2}) == {"id": 2, "error": "bad request"}
    admitted = authority.answer("w1", {"id": 3, "op": "admit", "token": "t", "call_id": "c1", "call_sid": SID,
                                       "expires_at": 1060.0})
    assert admitted["amd"] == [{"call_sid": SID, "answered_by": "human", "detection_ms": 1200}]
