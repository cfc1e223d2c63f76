"""RedisState against a real redis-server (tests/redis.py), beyond the shared contract
(tests/test_shared_state.py runs that one): coredis under Trio, the local cap, leases in real
time, an outage and a restart, a password."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import coredis
import httpx
import pytest
import sniffio
import trio

from bridge.fleet.redis_state import RedisState
from bridge.fleet.shared import Admission, HangupRoute, Verdict
from tests.harness import running_bridge
from tests.redis import RedisServer, redis_server
from tools.fake_twilio import CallPlan

EXP = 4_000_000_000.0  # tokens' expiry far ahead: these tests run on the real clock
CONSOLE_TOKEN = "console-token-0123456789abcdef"


async def test_coredis_runs_under_trio_through_its_anyio_backend(tmp_path: Path) -> None:
    """The issue's precondition: coredis 6 is anyio-based and anyio runs it on Trio's loop
    (no asyncio loop anywhere): commands, a Lua script, a blocking pop, a dead server."""
    async with redis_server(tmp_path) as server:
        client = coredis.Redis.from_url(server.url, decode_responses=True, connect_timeout=1, stream_timeout=3)
        async with client:
            assert sniffio.current_async_library() == "trio"
            assert anyio.get_current_task().name  # anyio resolves the running backend: Trio
            assert await client.ping() == "PONG"
            script = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
            assert await script(keys=["n"], args=[41]) == 41
            async with trio.open_nursery() as nursery:
                popped: list[object] = []

                async def pop() -> None:
                    popped.append(await client.blpop(["q"], timeout=2))

                nursery.start_soon(pop)
                await trio.sleep(0.05)
                assert await client.rpush("q", ["x"]) == 1
            assert popped == [["q", "x"]]
            await server.stop()
            with pytest.raises(coredis.exceptions.ConnectionError):
                await client.ping()
            await server.start()
            assert await client.ping() == "PONG"  # the pool reconnects by itself


@asynccontextmanager
async def instances(server: RedisServer, n: int, **kwargs: object) -> AsyncIterator[list[RedisState]]:
    """``n`` running RedisStates; ``state.ended`` / ``state.hung_up`` collect their callbacks."""
    async with trio.open_nursery() as nursery:
        states = []
        for i in range(n):
            options: dict[str, object] = {"max_calls": 100, "cluster_max_calls": 10, "lease_s": 15.0} | kwargs
            state = RedisState.from_url(server.url, instance=f"i{i}", **options)  # type: ignore[arg-type]
            ended: list[tuple[str, str]] = []
            hung_up: list[str] = []
            state.ended, state.hung_up = ended, hung_up  # type: ignore[attr-defined]
            scope = trio.CancelScope()
            state.scope = scope  # type: ignore[attr-defined]

            async def run(
                state: RedisState, ended: list[tuple[str, str]], hung_up: list[str], scope: trio.CancelScope,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
            ) -> None:  # fmt: skip
                with scope:
                    await state.run(lambda c, r: ended.append((c, r)), hung_up.append, task_status=task_status)

            await nursery.start(run, state, ended, hung_up, scope)
            states.append(state)
        yield states
        nursery.cancel_scope.cancel()


async def _admit(state: RedisState, token: str, call_id: str, call_sid: str = "") -> Admission:
    return await state.admit(token, call_id=call_id, call_sid=call_sid or f"CA-{token}", expires_at=EXP)


async def _until(check: object, timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not check():  # type: ignore[operator]
            await trio.sleep(0.01)


async def test_the_local_cap_holds_under_a_larger_cluster_cap(tmp_path: Path) -> None:
    async with redis_server(tmp_path) as server, instances(server, 2, max_calls=1, cluster_max_calls=10) as (a, b):
        assert (await _admit(a, "t1", "c1")).verdict is Verdict.ADMITTED
        assert (await _admit(a, "t2", "c2")).verdict is Verdict.FULL  # this instance is full
        assert not await a.reserve("t3", expires_at=EXP)
        assert (await _admit(b, "t2", "c2")).verdict is Verdict.ADMITTED  # the cluster is not
        await a.release("c1")
        assert (await _admit(a, "t3", "c3")).verdict is Verdict.ADMITTED


async def test_no_cluster_cap_when_cluster_max_calls_is_0(tmp_path: Path) -> None:
    async with redis_server(tmp_path) as server, instances(server, 2, max_calls=3, cluster_max_calls=0) as (a, b):
        for i in range(3):
            assert await a.reserve(f"r{i}", expires_at=EXP)
            assert (await _admit(a, f"a{i}", f"ca{i}")).verdict is Verdict.ADMITTED
            assert (await _admit(b, f"b{i}", f"cb{i}")).verdict is Verdict.ADMITTED
        assert (await _admit(a, "a9", "ca9")).verdict is Verdict.FULL  # each instance's own cap only
        await b.release("cb0")
        assert (await _admit(b, "a0", "x")).verdict is Verdict.REPLAYED  # single-use stays cluster-wide


async def test_leases_are_renewed_while_alive_and_run_out_after_a_death(tmp_path: Path) -> None:
    """Real time, LEASE_S=0.6: a's slot outlives several lease periods while a renews, and is
    free within about a lease once a stops (as after kill -9)."""
    lease_s = 0.6
    async with redis_server(tmp_path) as server, instances(server, 2, cluster_max_calls=1, lease_s=lease_s) as (a, b):
        assert (await _admit(a, "t1", "c1")).verdict is Verdict.ADMITTED
        await trio.sleep(lease_s * 4)
        assert (await _admit(b, "t2", "c2")).verdict is Verdict.FULL  # renewed, not lost
        a.scope.cancel()  # type: ignore[attr-defined]
        with trio.fail_after(lease_s * 4):
            while (await _admit(b, "t2", "c2")).verdict is Verdict.FULL:
                await trio.sleep(0.02)
        assert (await _admit(b, "t1", "c9")).verdict is Verdict.REPLAYED


async def test_an_outage_falls_back_to_local_guarantees_and_recovers_by_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "bridge.fleet")
    async with redis_server(tmp_path) as server, instances(server, 2, max_calls=2, cluster_max_calls=10) as (a, b):
        assert (await _admit(a, "live", "c-live", "CA-live")).verdict is Verdict.ADMITTED
        await server.stop()
        # The first failure turns the state down; admission goes on with this instance's ledger.
        assert (await _admit(a, "t1", "c1", "CA-1")).verdict is Verdict.ADMITTED
        assert not a.up
        assert (await _admit(a, "t1", "c1b")).verdict is Verdict.REPLAYED  # single-use here
        assert (await _admit(a, "t2", "c2")).verdict is Verdict.FULL  # the local cap: c-live + c1
        assert await a.request_hangup("CA-1") is HangupRoute.HERE
        assert (await _admit(b, "b0", "cb0")).verdict is Verdict.ADMITTED  # b notices too (its own warning)
        warnings = [r for r in caplog.records if "Redis is unreachable" in r.getMessage()]
        assert [r.name for r in warnings] == ["bridge.fleet", "bridge.fleet"]  # one per instance
        await a.release("c1")  # while down: only the local ledger hears of it
        await server.start()  # empty: an unpersisted Redis loses everything
        await _until(lambda: a.recoveries == 1 and b.recoveries == 1)
        back = [r for r in caplog.records if "Redis is back" in r.getMessage()]
        assert len(back) == 2
        # a re-registered what it holds: its live call, its CallSid and the tokens it redeemed.
        assert (await _admit(b, "live", "x1")).verdict is Verdict.REPLAYED
        assert (await _admit(b, "t1", "x2")).verdict is Verdict.REPLAYED
        assert await b.request_hangup("CA-live") is HangupRoute.SENT
        await _until(lambda: a.hung_up == ["CA-live"])  # type: ignore[attr-defined]
        # One stream per CallSid again: a newer stream on b ends a's call.
        assert await _admit(b, "newer", "c-newer", "CA-live") == Admission(Verdict.ADMITTED, None)
        await _until(lambda: [c for c, _ in a.ended] == ["c-live"])  # type: ignore[attr-defined]


async def test_the_cluster_cap_counts_what_was_re_registered_after_a_restart(tmp_path: Path) -> None:
    async with redis_server(tmp_path) as server, instances(server, 2, cluster_max_calls=2) as (a, b):
        assert (await _admit(a, "t1", "c1")).verdict is Verdict.ADMITTED
        assert (await _admit(a, "t2", "c2")).verdict is Verdict.ADMITTED
        await server.stop()
        await server.start()
        # Each instance's inbox connection breaks with the restart, so both notice and re-register.
        await _until(lambda: a.recoveries == 1 and b.recoveries == 1)
        assert (await _admit(b, "t3", "c3")).verdict is Verdict.FULL
        await a.release("c1")
        assert (await _admit(b, "t3", "c3")).verdict is Verdict.ADMITTED


async def test_a_password_in_the_url_and_a_wrong_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with redis_server(tmp_path, password="s3cret-redis-pass") as server:
        async with instances(server, 1) as (a,):
            assert a.up
            assert (await _admit(a, "t1", "c1")).verdict is Verdict.ADMITTED
        wrong = RedisServer(server.directory, server.port, "not-the-password")
        async with instances(wrong, 1) as (w,):
            assert not w.up  # started all the same, degraded
            assert (await _admit(w, "t2", "c2")).verdict is Verdict.ADMITTED
        assert "not-the-password" not in caplog.text and "s3cret-redis-pass" not in caplog.text


async def test_garbage_in_an_inbox_is_logged_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with redis_server(tmp_path) as server, instances(server, 2) as (a, b):
        async with coredis.Redis.from_url(server.url, decode_responses=True) as client:
            await client.rpush("vab:inbox:i0", ["not json", '{"op": "explode"}', "[1, 2]", '{"op": "hangup"}'])
            with trio.fail_after(5):
                while await client.llen("vab:inbox:i0"):
                    await trio.sleep(0.01)
        assert (await _admit(b, "t1", "c1", "CA1")).verdict is Verdict.ADMITTED
        assert await a.request_hangup("CA1") is HangupRoute.SENT  # a still reads its inbox
        await _until(lambda: b.hung_up == ["CA1"])  # type: ignore[attr-defined]
        assert a.up and a.ended == [] and a.hung_up == []  # type: ignore[attr-defined]
        assert "ignored an unreadable message" in caplog.text and "unknown op" in caplog.text


async def test_console_hang_up_and_calls_while_redis_is_down(tmp_path: Path) -> None:
    """Through the real server with Redis down from the start: it starts degraded, takes calls
    on its own guarantees, and the console cannot find a call that is not its own (503)."""
    async with redis_server(tmp_path) as server:
        await server.stop()
        env = {"REDIS_URL": server.url, "CONSOLE_TOKEN": CONSOLE_TOKEN, "CLUSTER_MAX_CALLS": "5"}
        async with running_bridge(env=env) as bridge, httpx.AsyncClient(base_url=bridge.http_base) as http:
            assert not bridge.app.shared.up
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "degraded"
            assert "bridge_shared_state_up 0.0" in (await http.get("/metrics")).text
            bearer = {"Authorization": f"Bearer {CONSOLE_TOKEN}"}
            hang_up = await http.post(f"/api/calls/CA{'7' * 32}/hangup", headers=bearer)
            assert hang_up.status_code == 503 and "shared state" in hang_up.json()["error"]
            result = await bridge.twilio.call(CallPlan(speed=10.0, hangup_after_s=1.0))
            assert result.ended_by == "caller" and result.violations == [] and result.heard_bytes > 0
            await server.start()
            with trio.fail_after(5):
                while not bridge.app.shared.up:
                    await trio.sleep(0.02)
            assert "bridge_shared_state_up 1.0" in (await http.get("/metrics")).text
