"""CallRegistry (bridge.call.registry): capacity, webhook reservations that expire, drain."""

from __future__ import annotations

from bridge.call.registry import CallRegistry


class FakeCall:
    def __init__(self) -> None:
        self.ended: list[str] = []

    def request_end(self, reason: str) -> None:
        self.ended.append(reason)


def test_capacity_counts_live_calls_and_reservations() -> None:
    reg = CallRegistry(2)
    assert reg.reserve("t1", expires_at=60.0, now=0.0)
    assert reg.reserve("t2", expires_at=60.0, now=0.0)
    assert not reg.reserve("t3", expires_at=60.0, now=0.0)  # full with reservations alone
    assert reg.admit("t1", "call-1", FakeCall(), now=1.0)
    assert reg.admit("t2", "call-2", FakeCall(), now=1.0)
    assert len(reg) == 2
    assert not reg.admit("other-instance-token", "call-3", FakeCall(), now=1.0)
    reg.release("call-1")
    assert len(reg) == 1
    assert reg.admit("other-instance-token", "call-3", FakeCall(), now=2.0)  # a free slot, no reservation


def test_reservation_holds_a_slot_for_its_own_stream() -> None:
    reg = CallRegistry(1)
    assert reg.reserve("t1", expires_at=60.0, now=0.0)
    assert not reg.admit("someone-else", "call-x", FakeCall(), now=1.0)
    assert reg.admit("t1", "call-1", FakeCall(), now=1.0)


def test_reservations_expire_at_their_exact_time() -> None:
    reg = CallRegistry(1)
    assert reg.reserve("t1", expires_at=10.0, now=0.0)
    assert not reg.reserve("t2", expires_at=20.0, now=10.0)  # still held at its expiry instant
    assert reg.reserve("t2", expires_at=20.0, now=10.001)


def test_expired_reservation_no_longer_guarantees_a_slot() -> None:
    reg = CallRegistry(1)
    assert reg.reserve("t1", expires_at=10.0, now=0.0)
    assert reg.admit("t-other", "call-other", FakeCall(), now=11.0)  # t1 expired: the slot was free
    assert not reg.admit("t1", "call-1", FakeCall(), now=12.0)


def test_reserving_the_same_token_twice_takes_one_slot() -> None:
    reg = CallRegistry(2)
    assert reg.reserve("t1", expires_at=10.0, now=0.0)
    assert reg.reserve("t1", expires_at=20.0, now=1.0)
    assert reg.reserve("t2", expires_at=10.0, now=1.0)


def test_drain_refuses_new_calls_and_keeps_live_ones() -> None:
    reg = CallRegistry(5)
    live = FakeCall()
    assert reg.reserve("t1", expires_at=60.0, now=0.0)
    assert reg.reserve("t2", expires_at=60.0, now=0.0)
    assert reg.admit("t1", "call-1", live, now=1.0)
    reg.start_drain()
    assert reg.draining
    assert not reg.reserve("t3", expires_at=60.0, now=2.0)
    assert not reg.admit("t2", "call-2", FakeCall(), now=2.0)  # its reservation is void too
    assert list(reg.live()) == [live]
    assert live.ended == []  # ending live calls is the server's decision, not the registry's
    reg.release("call-1")
    assert len(reg) == 0


def test_live_is_a_snapshot() -> None:
    reg = CallRegistry(3)
    for i in range(3):
        assert reg.admit(f"t{i}", f"call-{i}", FakeCall(), now=0.0)
    for i, _ in enumerate(reg.live()):
        reg.release(f"call-{i}")  # releasing while iterating must not break the iteration
    assert len(reg) == 0


def test_release_of_an_unknown_call_is_harmless() -> None:
    reg = CallRegistry(1)
    reg.release("nope")
    assert len(reg) == 0
