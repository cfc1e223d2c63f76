"""CallRegistry (bridge.call.registry): the live calls of one process, ending them, drain.
Capacity is the shared state's (tests/test_ledger.py, tests/shared_state_contract.py)."""

from __future__ import annotations

from bridge.call.registry import CallRegistry


class FakeCall:
    def __init__(self) -> None:
        self.ended: list[str] = []

    def request_end(self, reason: str) -> None:
        self.ended.append(reason)


def test_add_remove_and_end_one_call() -> None:
    reg = CallRegistry[FakeCall]()
    first, second = FakeCall(), FakeCall()
    reg.add("c1", first)
    reg.add("c2", second)
    assert len(reg) == 2
    assert reg.end("c1", "replaced by a newer stream")
    assert first.ended == ["replaced by a newer stream"] and second.ended == []
    reg.remove("c1")
    assert not reg.end("c1", "again")  # ended meanwhile: nothing to do
    assert first.ended == ["replaced by a newer stream"]
    assert list(reg.live()) == [second]


def test_drain_keeps_live_calls_and_end_all_ends_them() -> None:
    reg = CallRegistry[FakeCall]()
    live = FakeCall()
    reg.add("c1", live)
    reg.start_drain()
    assert reg.draining
    assert live.ended == []  # ending live calls is the server's decision, not the registry's
    reg.end_all("server shutting down")
    assert live.ended == ["server shutting down"]


def test_live_is_a_snapshot() -> None:
    reg = CallRegistry[FakeCall]()
    for i in range(3):
        reg.add(f"c{i}", FakeCall())
    for i, _ in enumerate(reg.live()):
        reg.remove(f"c{i}")  # removing while iterating must not break the iteration
    assert len(reg) == 0


def test_removing_an_unknown_call_is_harmless() -> None:
    reg = CallRegistry[FakeCall]()
    reg.remove("nope")
    assert len(reg) == 0
