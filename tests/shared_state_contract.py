"""The SharedState contract, as a reusable suite (bridge.fleet.shared).

Every implementation must pass it. A test module plugs one in by providing a ``shared_group``
fixture (a :data:`GroupFactory`) and importing the tests::

    from tests.shared_state_contract import *  # noqa: F403  (collects the contract's tests)

    @pytest.fixture(params=[...])
    def shared_group(request) -> GroupFactory: ...

A group is the states of several holders (WORKERS workers, fleet instances) that share one
authority. ``Group.separate`` says whether its states are separate holders (an in-process state
is one holder: every "other" state is the same object). Time is the group's fake wall clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import pytest
import trio

from bridge.fleet.ledger import KEPT_PER_CALL
from bridge.fleet.shared import Admission, AmdResult, HangupRoute, SharedState, SignalRoute, Verdict

__all__ = [
    "FakeClock",
    "Group",
    "GroupFactory",
    "test_a_gone_holder_frees_its_slots_but_not_its_tokens",
    "test_a_hang_up_request_reaches_the_holder_of_the_call",
    "test_a_newer_stream_for_a_call_sid_replaces_the_older_one",
    "test_a_refusal_for_capacity_keeps_the_token_for_a_retry",
    "test_a_reservation_holds_its_slot_until_the_token_expires",
    "test_a_spent_token_is_refused_however_often_and_wherever",
    "test_an_amd_result_reaches_the_holder_of_the_stream",
    "test_an_amd_result_that_beat_the_stream_is_handed_to_its_admission",
    "test_concurrent_admissions_never_exceed_the_cap",
    "test_release_frees_the_slot_and_unknown_releases_are_harmless",
    "test_the_cap_holds_across_holders",
]

EXP = 1060.0  # tokens' expiry in these tests; the clock starts at 1000


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Group:
    states: list[SharedState]
    clock: FakeClock
    separate: bool  # distinct holders (False: one process, every state is the same one)
    ended: list[list[tuple[str, str]]] = field(default_factory=list)  # end_call(call_id, reason) per state
    kill: Callable[[int], Awaitable[None]] | None = None  # the holder dies (its connection ends, its lease runs out)
    hung_up: list[list[str]] = field(default_factory=list)  # hang_up(call_sid) per state
    delivered: list[list[AmdResult]] = field(default_factory=list)  # deliver(result) per state


GroupFactory = Callable[[int, int], AbstractAsyncContextManager[Group]]
"""``factory(max_calls, holders)``: a running group (each state's ``run`` started)."""


async def _admit(state: SharedState, token: str, call_id: str, call_sid: str = "", exp: float = EXP) -> Admission:
    return await state.admit(token, call_id=call_id, call_sid=call_sid or f"CA-{token}", expires_at=exp)


async def test_a_spent_token_is_refused_however_often_and_wherever(shared_group: GroupFactory) -> None:
    async with shared_group(5, 2) as g:
        a, b = g.states
        assert (await _admit(a, "t1", "c1")).verdict is Verdict.ADMITTED
        for attempt in range(6):
            state = (a, b)[attempt % 2]
            assert (await _admit(state, "t1", f"r{attempt}")).verdict is Verdict.REPLAYED
        await a.release("c1")
        assert (await _admit(b, "t1", "after")).verdict is Verdict.REPLAYED  # finished, still spent
        g.clock.now = EXP + 0.5  # past the token's life: forgotten (check_token refuses it by then)
        assert (await _admit(b, "t1", "later", exp=EXP + 60)).verdict is Verdict.ADMITTED


async def test_the_cap_holds_across_holders(shared_group: GroupFactory) -> None:
    async with shared_group(2, 2) as g:
        a, b = g.states
        assert (await _admit(a, "t1", "c1")).verdict is Verdict.ADMITTED
        assert await b.reserve("t2", expires_at=EXP)
        assert not await a.reserve("t3", expires_at=EXP)
        assert (await _admit(b, "t4", "c4")).verdict is Verdict.FULL
        assert (await _admit(a, "t2", "c2")).verdict is Verdict.ADMITTED  # b's reservation, used on a
        await a.release("c1")
        assert (await _admit(b, "t4", "c4")).verdict is Verdict.ADMITTED


async def test_a_reservation_holds_its_slot_until_the_token_expires(shared_group: GroupFactory) -> None:
    async with shared_group(1, 2) as g:
        a, b = g.states
        assert await a.reserve("t1", expires_at=1010.0)
        assert (await _admit(b, "other", "cx")).verdict is Verdict.FULL
        g.clock.now = 1010.0
        assert not await b.reserve("t2", expires_at=1070.0)  # held at its expiry instant
        g.clock.now = 1010.5
        assert (await _admit(b, "other", "cx")).verdict is Verdict.ADMITTED


async def test_a_refusal_for_capacity_keeps_the_token_for_a_retry(shared_group: GroupFactory) -> None:
    async with shared_group(1, 2) as g:
        a, b = g.states
        assert (await _admit(a, "t1", "c1")).verdict is Verdict.ADMITTED
        assert (await _admit(b, "t2", "c2")).verdict is Verdict.FULL
        await a.release("c1")
        assert (await _admit(b, "t2", "c2")).verdict is Verdict.ADMITTED


async def test_release_frees_the_slot_and_unknown_releases_are_harmless(shared_group: GroupFactory) -> None:
    async with shared_group(1, 2) as g:
        a, b = g.states
        await a.release("never-admitted")
        assert (await _admit(a, "t1", "c1")).verdict is Verdict.ADMITTED
        if g.separate:
            await b.release("c1")  # another holder's call of the same id: not b's to free
            assert (await _admit(b, "t2", "c2")).verdict is Verdict.FULL
        await a.release("c1")
        await a.release("c1")
        assert (await _admit(b, "t2", "c2")).verdict is Verdict.ADMITTED


async def test_a_newer_stream_for_a_call_sid_replaces_the_older_one(shared_group: GroupFactory) -> None:
    async with shared_group(5, 2) as g:
        a, b = g.states
        assert await _admit(a, "t1", "c1", "CA1") == Admission(Verdict.ADMITTED, None)
        # The same holder: told which of its own calls to end.
        assert await _admit(a, "t2", "c2", "CA1") == Admission(Verdict.ADMITTED, "c1")
        await a.release("c1")
        if not g.separate:
            return
        # Another holder: the authority ends the older call where it lives.
        assert await _admit(b, "t3", "c3", "CA1") == Admission(Verdict.ADMITTED, None)
        with trio.fail_after(2):
            while not g.ended[0]:
                await trio.sleep(0.001)
        assert [call_id for call_id, _reason in g.ended[0]] == ["c2"]
        assert g.ended[1] == []


async def test_concurrent_admissions_never_exceed_the_cap(shared_group: GroupFactory) -> None:
    async with shared_group(3, 2) as g:
        verdicts: list[Verdict] = []

        async def one(i: int) -> None:
            verdicts.append((await _admit(g.states[i % 2], f"t{i}", f"c{i}")).verdict)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        assert sorted(v.value for v in verdicts) == ["admitted"] * 3 + ["full"] * 17


async def test_a_gone_holder_frees_its_slots_but_not_its_tokens(shared_group: GroupFactory) -> None:
    async with shared_group(2, 2) as g:
        if g.kill is None:
            pytest.skip("one process: its slots go with it")
        a, b = g.states
        assert (await _admit(a, "t1", "c1")).verdict is Verdict.ADMITTED
        assert await a.reserve("t2", expires_at=EXP)
        assert (await _admit(b, "t3", "c3")).verdict is Verdict.FULL
        await g.kill(0)
        with trio.fail_after(2):
            while (verdict := (await _admit(b, "t3", "c3")).verdict) is Verdict.FULL:
                await trio.sleep(0.001)
        assert verdict is Verdict.ADMITTED
        assert (await _admit(b, "t1", "c9")).verdict is Verdict.REPLAYED
        assert (await _admit(b, "t4", "c4")).verdict is Verdict.ADMITTED  # a's reservation went too


async def test_a_hang_up_request_reaches_the_holder_of_the_call(shared_group: GroupFactory) -> None:
    async with shared_group(5, 2) as g:
        a, b = g.states
        assert await a.request_hangup("CA-nobody") is HangupRoute.UNKNOWN
        assert (await _admit(a, "t1", "c1", "CA1")).verdict is Verdict.ADMITTED
        assert await a.request_hangup("CA1") is HangupRoute.HERE  # the caller hangs up its own call
        if g.separate:
            assert await b.request_hangup("CA1") is HangupRoute.SENT
            with trio.fail_after(2):
                while not g.hung_up[0]:
                    await trio.sleep(0.001)
            assert g.hung_up == [["CA1"], []]
        await a.release("c1")
        assert await b.request_hangup("CA1") is HangupRoute.UNKNOWN
        assert all(calls == [] or calls == ["CA1"] for calls in g.hung_up)


async def _until(check: Callable[[], bool]) -> None:
    with trio.fail_after(2):
        while not check():
            await trio.sleep(0.001)


async def test_an_amd_result_reaches_the_holder_of_the_stream(shared_group: GroupFactory) -> None:
    async with shared_group(5, 2) as g:
        a, b = g.states
        assert (await _admit(a, "t1", "c1", "CA1")).verdict is Verdict.ADMITTED
        human = AmdResult("CA1", "human", 1830)
        assert await a.deliver_amd(human) is SignalRoute.HERE  # the caller publishes it itself
        if not g.separate:
            return
        assert await b.deliver_amd(human) is SignalRoute.SENT
        await _until(lambda: bool(g.delivered[0]))
        assert g.delivered == [[human], []]
        await a.release("c1")
        assert await b.deliver_amd(human) is SignalRoute.KEPT  # nobody holds it now
        assert g.delivered == [[human], []]


async def test_an_amd_result_that_beat_the_stream_is_handed_to_its_admission(shared_group: GroupFactory) -> None:
    async with shared_group(5, 2) as g:
        a, b = g.states
        results = [AmdResult("CA2", "machine_end_beep", 1830 + i) for i in range(KEPT_PER_CALL + 2)]
        routes = [await b.deliver_amd(result) for result in results]
        if not g.separate:
            # One process is the whole scope: its CallSignals keeps what beat the stream.
            assert set(routes) == {SignalRoute.HERE}
            return
        assert set(routes) == {SignalRoute.KEPT}
        assert (await _admit(a, "t1", "c1", "CA1")).verdict is Verdict.ADMITTED  # another CallSid's
        assert (await _admit(a, "t1", "c2", "CA2")).verdict is Verdict.REPLAYED  # a refused stream takes nothing
        assert g.delivered == [[], []]
        assert (await _admit(a, "t2", "c2", "CA2")).verdict is Verdict.ADMITTED
        # Handed over before admit returned, bounded, oldest first; and only once.
        assert g.delivered == [results[:KEPT_PER_CALL], []]
        assert (await _admit(b, "t3", "c3", "CA2")).verdict is Verdict.ADMITTED
        assert g.delivered == [results[:KEPT_PER_CALL], []]
