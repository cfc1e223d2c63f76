"""CallRegistry (bridge.call.registry): the live calls of one process, the idle event, ending
them, drain. Capacity is the shared state's (tests/test_ledger.py, tests/shared_state_contract.py)."""

from __future__ import annotations

import trio

from bridge.call.registry import CallRegistry


class FakeCall:
    def __init__(self) -> None:
        self.ended: list[str] = []

    def request_end(self, reason: str) -> None:
        self.ended.append(reason)


class FlagEvent:
    """An event that records its own history (pure tests need no Trio)."""

    made = 0

    def __init__(self) -> None:
        FlagEvent.made += 1
        self.number = FlagEvent.made
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def registry() -> CallRegistry[FakeCall, FlagEvent]:
    return CallRegistry[FakeCall, FlagEvent](FlagEvent)


def test_add_remove_and_end_one_call() -> None:
    reg = registry()
    first, second = FakeCall(), FakeCall()
    reg.add("c1", first)
    reg.add("c2", second)
    assert len(reg) == 2
    assert reg.end("c1", "replaced by a newer stream")
    assert first.ended == ["replaced by a newer stream"] and second.ended == []
    reg.remove("c1")
    assert not reg.end("c1", "again")  # ended meanwhile: nothing to do
    assert first.ended == ["replaced by a newer stream"]
    assert list(reg.by_id.values()) == [second]


def test_idle_is_set_exactly_while_no_call_is_live() -> None:
    reg = registry()
    start = reg.idle
    assert start.is_set() and len(reg) == 0
    reg.add("c1", FakeCall())
    busy = reg.idle
    assert busy is not start and not busy.is_set()  # a set event is never cleared: a new one
    reg.add("c2", FakeCall())
    assert reg.idle is busy  # still the same busy period
    reg.remove("c1")
    assert not busy.is_set()
    reg.remove("c2")
    assert busy.is_set() and reg.idle is busy  # the drain waiting on it wakes up
    reg.add("c3", FakeCall())
    assert reg.idle is not busy and not reg.idle.is_set() and busy.is_set()


def test_removing_an_unknown_call_keeps_a_busy_registry_busy() -> None:
    reg = registry()
    reg.add("c1", FakeCall())
    reg.remove("nope")
    assert len(reg) == 1 and not reg.idle.is_set()
    reg.remove("c1")
    reg.remove("c1")  # twice: harmless
    assert len(reg) == 0 and reg.idle.is_set()


def test_drain_keeps_live_calls_and_end_all_ends_them() -> None:
    reg = registry()
    live = FakeCall()
    reg.add("c1", live)
    reg.start_drain()
    assert reg.draining
    assert live.ended == []  # ending live calls is the server's decision, not the registry's
    reg.end_all("server shutting down")
    assert live.ended == ["server shutting down"]


def test_by_id_is_read_only() -> None:
    reg = registry()
    reg.add("c1", FakeCall())
    view = reg.by_id
    try:
        view["c2"] = FakeCall()  # type: ignore[index]
    except TypeError:
        pass
    else:
        raise AssertionError("by_id must not be writable")
    assert list(view) == ["c1"]


async def test_a_drain_waiting_on_the_trio_event_wakes_when_the_last_call_ends() -> None:
    reg = CallRegistry[FakeCall, trio.Event](trio.Event)
    reg.add("c1", FakeCall())
    woke: list[int] = []

    async def drain() -> None:
        await reg.idle.wait()
        woke.append(len(reg))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        reg.remove("c1")
    assert woke == [0]
