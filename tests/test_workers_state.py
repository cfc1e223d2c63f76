"""The WORKERS parent as admission authority (bridge.fleet.parent): its framing, its answers to
bad requests, and how a worker fails closed when the parent is silent or gone."""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from bridge.fleet.parent import MAX_FRAME_BYTES, Authority, FrameError, FrameReader, ParentState, encode
from bridge.fleet.shared import SharedStateUnavailable, Verdict


def _stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def test_frames_round_trip_whatever_the_chunking() -> None:
    data = encode({"id": 1, "op": "release", "call_id": "c-1"}) + encode({"id": 2, "ok": True})
    for split in range(len(data) + 1):
        reader = FrameReader()
        got = reader.feed(data[:split]) + reader.feed(data[split:])
        assert got == [{"id": 1, "op": "release", "call_id": "c-1"}, {"id": 2, "ok": True}]


@pytest.mark.parametrize(
    "data",
    [struct.pack(">I", MAX_FRAME_BYTES + 1), struct.pack(">I", 3) + b"nop", struct.pack(">I", 2) + b"[]"],
    ids=["too big", "not json", "not an object"],
)
def test_broken_frames_are_refused(data: bytes) -> None:
    with pytest.raises(FrameError):
        FrameReader().feed(data)


def test_an_oversized_message_is_never_sent() -> None:
    with pytest.raises(FrameError):
        encode({"token": "x" * MAX_FRAME_BYTES})


@pytest.mark.parametrize(
    "request_",
    [{"id": 1}, {"id": 1, "op": "explode"}, {"id": 1, "op": "admit", "token": "t"},
     {"id": 1, "op": "reserve", "token": 5, "expires_at": 1.0},
     {"id": 1, "op": "reserve", "token": "t", "expires_at": True},
     {"id": 1, "op": "release", "call_id": "x" * 300}],
)
def test_the_authority_answers_a_bad_request_with_an_error_and_changes_nothing(request_: dict[str, object]) -> None:
    authority = Authority(1, clock=lambda: 1000.0)
    assert authority.answer("w1", request_) == {"id": 1, "error": "bad request"}
    assert authority.ledger.live_calls == 0 and authority.ledger.reservations(1000.0) == 0


async def test_a_worker_whose_parent_never_answers_fails_closed_within_the_deadline() -> None:
    ours, theirs = socket.socketpair()  # nobody answers on `ours`
    state = ParentState(theirs, deadline_s=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(state.run, lambda call_id, reason: None)
        assert state.up
        started = trio.current_time()
        with pytest.raises(SharedStateUnavailable, match="did not answer"):
            await state.admit("t1", call_id="c1", call_sid="CA1", expires_at=2e9)
        assert 0.2 <= trio.current_time() - started < 1.0
        assert not state.up
        with pytest.raises(SharedStateUnavailable):
            await state.reserve("t2", expires_at=2e9)
        await state.release("c1")  # never raises
        nursery.cancel_scope.cancel()
    ours.close()


async def test_an_admission_answered_after_its_deadline_is_released_again() -> None:
    """The stream was refused (503) when the deadline passed: the slot the parent then gave must
    not stay taken."""
    ours, theirs = socket.socketpair()
    authority = Authority(1)
    state = ParentState(theirs, deadline_s=0.2)
    parent_side = _stream(ours)
    reader = FrameReader()
    async with trio.open_nursery() as nursery:
        await nursery.start(state.run, lambda call_id, reason: None)
        with pytest.raises(SharedStateUnavailable):
            await state.admit("t1", call_id="c1", call_sid="CA1", expires_at=2e9)
        (request,) = reader.feed(await parent_side.receive_some(4096))
        await parent_side.send_all(encode(authority.answer("w1", request)))  # late: "admitted"
        assert authority.ledger.live_calls == 1
        (release,) = reader.feed(await parent_side.receive_some(4096))
        assert release["op"] == "release" and release["call_id"] == "c1"
        authority.answer("w1", release)
        assert authority.ledger.live_calls == 0
        nursery.cancel_scope.cancel()


async def test_a_worker_whose_parent_has_gone_refuses_at_once() -> None:
    ours, theirs = socket.socketpair()
    state = ParentState(theirs)
    with pytest.raises(SharedStateUnavailable, match="not connected"):
        await state.reserve("t0", expires_at=2e9)  # before run(): nothing is known
    async with trio.open_nursery() as nursery:
        nursery.start_soon(state.run, lambda call_id, reason: None)
        await trio.sleep(0.01)
        ours.close()
        with trio.fail_after(1):
            while state.up:
                await trio.sleep(0.001)
        with pytest.raises(SharedStateUnavailable):
            await state.admit("t1", call_id="c1", call_sid="CA1", expires_at=2e9)


async def test_a_worker_that_breaks_the_framing_is_dropped_and_its_slots_freed() -> None:
    ours, theirs = socket.socketpair()
    authority = Authority(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(authority.serve_worker, "w1", _stream(ours))
        worker = _stream(theirs)
        await worker.send_all(encode({"id": 1, "op": "admit", "token": "t1", "call_id": "c1", "call_sid": "CA1",
                                      "expires_at": 2e9}))
        assert FrameReader().feed(await worker.receive_some(4096)) == [{"id": 1, "verdict": "admitted",
                                                                        "replaces": None}]
        assert authority.ledger.live_calls == 1
        await worker.send_all(struct.pack(">I", MAX_FRAME_BYTES * 2))
        with trio.fail_after(1):
            assert await worker.receive_some(4096) == b""  # the parent closed it
        assert authority.ledger.live_calls == 0
        assert authority.ledger.redeemed("t1", now=1e9)
        nursery.cancel_scope.cancel()


async def test_answers_reach_the_right_waiters_when_requests_overlap() -> None:
    ours, theirs = socket.socketpair()
    authority = Authority(50)
    state = ParentState(theirs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(authority.serve_worker, "w1", _stream(ours))
        await nursery.start(state.run, lambda call_id, reason: None)
        results: dict[int, Verdict] = {}

        async def one(i: int) -> None:
            token = f"t{i % 10}"  # ten tokens, each tried by three requests at once
            results[i] = (await state.admit(token, call_id=f"c{i}", call_sid=f"CA{i}", expires_at=2e9)).verdict

        async with trio.open_nursery() as calls:
            for i in range(30):
                calls.start_soon(one, i)
        assert sum(v is Verdict.ADMITTED for v in results.values()) == 10
        assert authority.ledger.live_calls == 10
        nursery.cancel_scope.cancel()
