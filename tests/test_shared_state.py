"""The SharedState contract (tests/shared_state_contract.py) against each implementation:
InProcessState, ParentState talking to a real Authority over real socketpairs, and RedisState
instances sharing a real redis-server (tests/redis.py)."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from bridge.fleet.parent import Authority, ParentState
from bridge.fleet.redis_state import RedisState
from bridge.fleet.shared import AmdResult, InProcessState, SharedState
from tests.redis import redis_server
from tests.shared_state_contract import *  # noqa: F403 - the contract's tests, collected here
from tests.shared_state_contract import FakeClock, Group, GroupFactory

LEASE_S = 15.0


@asynccontextmanager
async def in_process(max_calls: int, holders: int) -> AsyncIterator[Group]:
    clock = FakeClock()
    state = InProcessState(max_calls, clock=clock)
    ended: list[tuple[str, str]] = []
    hung_up: list[str] = []
    delivered: list[AmdResult] = []
    await state.run(lambda call_id, reason: ended.append((call_id, reason)), hung_up.append, delivered.append)
    yield Group([state] * holders, clock, separate=False, ended=[ended] * holders, hung_up=[hung_up] * holders,
                delivered=[delivered] * holders)


@asynccontextmanager
async def parent(max_calls: int, holders: int) -> AsyncIterator[Group]:
    """N workers' states, each on its own socketpair to one Authority, all in this Trio run."""
    clock = FakeClock()
    authority = Authority(max_calls, clock=clock)
    async with trio.open_nursery() as nursery:
        states: list[SharedState] = []
        ended: list[list[tuple[str, str]]] = []
        hung_up: list[list[str]] = []
        delivered: list[list[AmdResult]] = []
        workers: list[trio.CancelScope] = []
        for i in range(holders):
            ours, theirs = socket.socketpair()
            nursery.start_soon(authority.serve_worker, f"w{i}", trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
            state, log, hangups = ParentState(theirs), list[tuple[str, str]](), list[str]()
            amd, scope = list[AmdResult](), trio.CancelScope()

            async def run_worker(state: ParentState, log: list[tuple[str, str]], hangups: list[str],
                                 amd: list[AmdResult], scope: trio.CancelScope,
                                 task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with scope:
                    await state.run(lambda call_id, reason: log.append((call_id, reason)), hangups.append,
                                    amd.append, task_status=task_status)

            await nursery.start(run_worker, state, log, hangups, amd, scope)
            states.append(state)
            ended.append(log)
            hung_up.append(hangups)
            delivered.append(amd)
            workers.append(scope)

        async def kill(i: int) -> None:
            workers[i].cancel()  # its run() closes the socket, as the kernel does for a dead process
            await trio.lowlevel.checkpoint()

        yield Group(states, clock, separate=True, ended=ended, kill=kill, hung_up=hung_up, delivered=delivered)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def redis(max_calls: int, holders: int) -> AsyncIterator[Group]:
    """N instances' states on one real redis-server; ``max_calls`` is the cluster's cap (each
    instance's own cap is far above it, so the cap under test is the cluster's)."""
    clock = FakeClock()
    with tempfile.TemporaryDirectory(prefix="bridge-test-redis-") as directory:
        async with redis_server(Path(directory)) as server, trio.open_nursery() as nursery:
            states: list[SharedState] = []
            ended: list[list[tuple[str, str]]] = []
            hung_up: list[list[str]] = []
            delivered: list[list[AmdResult]] = []
            scopes: list[trio.CancelScope] = []
            for i in range(holders):
                state = RedisState.from_url(server.url, max_calls=1000, cluster_max_calls=max_calls,
                                            lease_s=LEASE_S, instance=f"i{i}", clock=clock)  # fmt: skip
                log, hangups, scope = list[tuple[str, str]](), list[str](), trio.CancelScope()
                amd = list[AmdResult]()

                async def run_instance(state: RedisState, log: list[tuple[str, str]], hangups: list[str],
                                       amd: list[AmdResult], scope: trio.CancelScope,
                                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                    with scope:
                        await state.run(lambda call_id, reason: log.append((call_id, reason)), hangups.append,
                                        amd.append, task_status=task_status)

                await nursery.start(run_instance, state, log, hangups, amd, scope)
                assert state.up
                states.append(state)
                ended.append(log)
                hung_up.append(hangups)
                delivered.append(amd)
                scopes.append(scope)

            async def kill(i: int) -> None:
                scopes[i].cancel()  # no more renewals: its leases run out
                await trio.lowlevel.checkpoint()
                clock.now += LEASE_S + 0.5

            yield Group(states, clock, separate=True, ended=ended, kill=kill, hung_up=hung_up,
                        delivered=delivered)
            nursery.cancel_scope.cancel()


_GROUPS = {"in-process": in_process, "parent": parent, "redis": redis}


@pytest.fixture(params=list(_GROUPS))
def shared_group(request: pytest.FixtureRequest) -> GroupFactory:
    return _GROUPS[request.param]  # type: ignore[return-value]
