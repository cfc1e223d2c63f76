"""The SharedState contract (tests/shared_state_contract.py) against each implementation:
InProcessState, and ParentState talking to a real Authority over real socketpairs."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.lowlevel

from bridge.fleet.parent import Authority, ParentState
from bridge.fleet.shared import InProcessState, SharedState
from tests.shared_state_contract import *  # noqa: F403 - the contract's tests, collected here
from tests.shared_state_contract import FakeClock, Group, GroupFactory


@asynccontextmanager
async def in_process(max_calls: int, holders: int) -> AsyncIterator[Group]:
    clock = FakeClock()
    state = InProcessState(max_calls, clock=clock)
    ended: list[tuple[str, str]] = []
    await state.run(lambda call_id, reason: ended.append((call_id, reason)))
    yield Group([state] * holders, clock, separate=False, ended=[ended] * holders)


@asynccontextmanager
async def parent(max_calls: int, holders: int) -> AsyncIterator[Group]:
    """N workers' states, each on its own socketpair to one Authority, all in this Trio run."""
    clock = FakeClock()
    authority = Authority(max_calls, clock=clock)
    async with trio.open_nursery() as nursery:
        states: list[SharedState] = []
        ended: list[list[tuple[str, str]]] = []
        workers: list[trio.CancelScope] = []
        for i in range(holders):
            ours, theirs = socket.socketpair()
            nursery.start_soon(authority.serve_worker, f"w{i}", trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
            state, log = ParentState(theirs), list[tuple[str, str]]()
            scope = trio.CancelScope()

            async def run_worker(state: ParentState, log: list[tuple[str, str]], scope: trio.CancelScope,
                                 task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with scope:
                    await state.run(lambda call_id, reason: log.append((call_id, reason)), task_status=task_status)

            await nursery.start(run_worker, state, log, scope)
            states.append(state)
            ended.append(log)
            workers.append(scope)

        async def kill(i: int) -> None:
            workers[i].cancel()  # its run() closes the socket, as the kernel does for a dead process
            await trio.lowlevel.checkpoint()

        yield Group(states, clock, separate=True, ended=ended, kill=kill)
        nursery.cancel_scope.cancel()


@pytest.fixture(params=["in-process", "parent"])
def shared_group(request: pytest.FixtureRequest) -> GroupFactory:
    return in_process if request.param == "in-process" else parent  # type: ignore[return-value]
