"""A fleet: three ``python -m bridge serve`` instances behind the repository's deploy/nginx.conf
(TLS, rendered as tests/test_deploy.py does), sharing one real redis-server (tests/redis.py),
a fake Voice Agent and a fake Twilio REST API (TWILIO_API_BASE).

- a stream token redeemed on A is refused on B and C; the cluster cap (CLUSTER_MAX_CALLS) holds
  across instances, and ``kill -9`` of an instance frees its slots within LEASE_S;
- a hang-up asked of B (the console's End call) ends a call that lives on A, through the REST
  API; a newer stream for a CallSid on C ends the older one on B;
- Redis restarted mid-call: the calls go on untouched, every instance says degraded (and still
  takes calls) while it is down, and the shared guarantees come back by themselves.

Instances are reached directly (a call pinned to one) or through nginx (wherever it sends it).
Every wait is bounded; every process is killed in ``finally``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import coredis
import httpx
import pytest
import trio

from tests.redis import RedisServer, redis_server
from tests.test_deploy import (
    API_KEY,
    AUTH_TOKEN,
    REPO,
    BridgeProcess,
    _free_port,
    _metric,
    _nginx,
    bridge_env,
    bridge_process,
    fake_agent,
    nginx_proxy,
)
from tools.fake_agent import FakeAgent, FakeAgentConfig
from tools.fake_twilio import CallPlan, CallResult, FakeTwilio, StreamRejected, new_sid, parse_twiml
from tools.fake_twilio_rest import CallRecord, FakeTwilioRest

ACCOUNT_SID = "AC" + "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
CONSOLE_TOKEN = "fleet-console-token-0123456789"
LEASE_S = 2.0


@dataclass
class Fleet:
    instances: dict[str, BridgeProcess]
    redis: RedisServer
    agent: FakeAgent
    rest: FakeTwilioRest
    public: str
    via_nginx: FakeTwilio
    phones: dict[str, FakeTwilio]  # a fake Twilio pinned to each instance

    def phone(self, name: str) -> FakeTwilio:
        return self.phones[name]


@asynccontextmanager
async def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **extra: str) -> AsyncIterator[Fleet]:
    if _nginx() is None:
        pytest.skip("nginx and openssl are needed for the fleet test")
    names = ["A", "B", "C"]
    ports = {name: _free_port() for name in names}
    nginx_port = _free_port()
    public = f"https://127.0.0.1:{nginx_port}"
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(redis_server(tmp_path / "redis"))
        agent = await stack.enter_async_context(fake_agent())
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        rest = FakeTwilioRest(ACCOUNT_SID, AUTH_TOKEN)
        rest_base = await nursery.start(rest.serve)
        instances: dict[str, BridgeProcess] = {}

        async def start(name: str) -> None:
            records = {"RECORDS_URL": f"sqlite:///{tmp_path}/calls-{name}.sqlite3"}
            env = bridge_env(
                port=ports[name], public=public, agent_url=agent.url,
                REDIS_URL=server.url, LEASE_S=str(LEASE_S), CONSOLE_TOKEN=CONSOLE_TOKEN,
                TWILIO_ACCOUNT_SID=ACCOUNT_SID, TWILIO_API_BASE=rest_base, **(records | extra),
            )  # fmt: skip
            instances[name] = await stack.enter_async_context(bridge_process(tmp_path, f"bridge-{name}", env))

        async with trio.open_nursery() as starting:  # in parallel: interpreter start-up dominates
            for name in names:
                starting.start_soon(start, name)
        all_ports = [ports[n] for n in names]
        cert = await stack.enter_async_context(
            nginx_proxy(tmp_path, nginx_port, webhooks=all_ports, streams=all_ports)
        )
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        via_nginx = FakeTwilio(http_base=public, public_base=public, auth_token=AUTH_TOKEN,
                               connect_base=f"wss://127.0.0.1:{nginx_port}", account_sid=ACCOUNT_SID)  # fmt: skip
        phones = {
            name: FakeTwilio(http_base=bp.base, public_base=public, auth_token=AUTH_TOKEN,
                             connect_base=f"ws://127.0.0.1:{bp.port}", account_sid=ACCOUNT_SID)
            for name, bp in instances.items()
        }

        async def hung_up(call: CallRecord) -> None:  # Twilio ends the call: its stream stops
            for phone in (via_nginx, *phones.values()):
                phone.request_hangup(call.sid)

        rest.on_hangup = hung_up
        for bp in instances.values():
            await _until(lambda bp=bp: _shared_up(bp), 5, f"{bp.name}'s shared state to be up")
        yield Fleet(instances, server, agent, rest, public, via_nginx, phones)


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    try:
        with trio.fail_after(timeout_s):
            while not await check():
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


async def _shared_up(bp: BridgeProcess) -> bool:
    ready = (await bp.get("/readyz")).json()
    metric = _metric((await bp.get("/metrics")).text, "bridge_shared_state_up")
    return ready["status"] == "ok" and metric == 1.0


async def _shared_down(bp: BridgeProcess) -> bool:
    ready = await bp.get("/readyz")
    metric = _metric((await bp.get("/metrics")).text, "bridge_shared_state_up")
    return ready.status_code == 200 and ready.json() == {
        "status": "degraded", "shared_state": "down", "active_calls": ready.json()["active_calls"]
    } and metric == 0.0  # fmt: skip


async def _stream_url(phone: FakeTwilio, call_sid: str | None = None) -> str | None:
    """The webhook on ``phone``'s instance: the stream URL, or None for the busy TwiML."""
    params = phone.voice_params(CallPlan(), call_sid or new_sid("CA"))
    answer = await phone.post_webhook("/twiml", params)
    assert answer.status_code == 200, answer.text
    spec = parse_twiml(answer.text).stream
    if spec is None:
        verbs = parse_twiml(answer.text).verbs_before
        assert verbs[0].startswith("Say: ") and verbs[-1] == "Hangup", answer.text
        return None
    return spec.url


async def _handshake(phone: FakeTwilio, url: str) -> int:
    try:
        with trio.fail_after(10):
            async with phone.open_stream(url):
                return 101
    except StreamRejected as exc:
        assert exc.status_code is not None
        return exc.status_code


@dataclass
class LiveCall:
    sid: str
    done: trio.Event
    result: CallResult | None = None


async def _start_call(nursery: trio.Nursery, fleet: Fleet, phone: FakeTwilio, *, seconds: float = 60.0,
                      call_sid: str | None = None) -> LiveCall:
    """A call that stays up until hung up (or ``seconds`` of call time); returns once it streams."""
    sid = call_sid or new_sid("CA")
    fleet.rest.add_live_call(sid, to="+14155550100", from_="+14155550123")
    call = LiveCall(sid, trio.Event())

    async def run() -> None:
        plan = CallPlan(call_sid=sid, speed=1.0, hangup_after_s=seconds, max_call_s=seconds + 30)
        call.result = await phone.call(plan)
        call.done.set()

    nursery.start_soon(run)

    async def streaming() -> bool:
        result = phone.results.get(sid)
        return call.done.is_set() or (result is not None and result.first_audio_s is not None)

    await _until(streaming, 10, f"call {sid} to stream")
    assert not call.done.is_set(), call.result.timeline if call.result else None
    return call


async def _hang_up_from(bp: BridgeProcess, call_sid: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=15) as client:
        return await client.post(f"{bp.base}/api/calls/{call_sid}/hangup",
                                 headers={"Authorization": f"Bearer {CONSOLE_TOKEN}"})  # fmt: skip


async def test_tokens_and_the_cluster_cap_hold_across_instances_and_a_killed_one_frees_its_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fleet(tmp_path, monkeypatch, CLUSTER_MAX_CALLS="2") as f:
        a, b = f.instances["A"], f.instances["B"]
        # A token redeemed on A is refused on B and C (and on A again).
        url = await _stream_url(f.phone("A"))
        assert url is not None
        assert await _handshake(f.phone("A"), url) == 101
        for name in "BCA":
            assert await _handshake(f.phone(name), url) == 403, name
        assert _metric((await b.get("/metrics")).text, "bridge_rejected_streams_total", reason="token replayed") == 1

        async with trio.open_nursery() as nursery:
            # Two live calls fill the cluster, on A and on B.
            on_a = await _start_call(nursery, f, f.phone("A"))
            on_b = await _start_call(nursery, f, f.phone("B"))
            await _until(lambda: _calls_on(f, 2), 5, "two calls in the cluster")
            for name in "ABC":  # every instance is far below its own MAX_CONCURRENT_CALLS (100)
                assert await _stream_url(f.phone(name)) is None, f"{name} answered a webhook above the cluster cap"
            assert await _stream_url(f.via_nginx) is None

            # kill -9 of A: nothing says goodbye; A's slot is free once its lease runs out.
            a.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await a.proc.wait()
            with trio.fail_after(10):
                await on_a.done.wait()  # the phone on A saw its socket die
            assert on_a.result is not None and on_a.result.ended_by != "caller"
            freed: str | None = None
            with trio.fail_after(LEASE_S + 1.0):  # a lease renewed every LEASE_S/3 runs out by LEASE_S
                while (freed := await _stream_url(f.phone("B"))) is None:
                    await trio.sleep(0.05)
            print(f"A's slot freed {time.monotonic() - killed_at:.2f} s after kill -9 (LEASE_S={LEASE_S:g})")
            # B's webhook holds the freed slot for its stream; the stream lands on C and uses it.
            assert await _stream_url(f.phone("C")) is None  # full again: the reservation counts
            assert await _handshake(f.phone("C"), freed) == 101
            # That call has ended (the handshake closed it): a call through nginx gets its slot.
            through_nginx = await _start_call(nursery, f, f.via_nginx, seconds=1.0)
            with trio.fail_after(10):
                await through_nginx.done.wait()
            assert through_nginx.result is not None and through_nginx.result.ended_by == "caller"
            assert f.phone("B").request_hangup(on_b.sid)
            with trio.fail_after(10):
                await on_b.done.wait()


async def _calls_on(f: Fleet, n: int) -> bool:
    total = 0
    for bp in f.instances.values():
        if bp.proc.returncode is None:
            total += int((await bp.get("/healthz")).json()["active_calls"])
    return total == n


async def test_hang_up_and_duplicate_streams_across_instances_and_a_redis_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_url: str
) -> None:
    """The instances also share one PostgreSQL for their call records (tests/pg.py)."""
    async with fleet(tmp_path, monkeypatch, CLUSTER_MAX_CALLS="10", RECORDS_URL=pg_url) as f:
        a, b, c = (f.instances[n] for n in "ABC")
        async with trio.open_nursery() as nursery:
            # The console's End call on B, for a call that lives on A.
            x = await _start_call(nursery, f, f.phone("A"))
            answer = await _hang_up_from(b, x.sid)
            assert answer.status_code == 202 and answer.json()["status"] == "hanging up", answer.text
            with trio.fail_after(10):
                await x.done.wait()
            assert x.result is not None and x.result.ended_by == "api", x.result.timeline
            updates = [r for r in f.rest.requests if r.path.endswith(f"/Calls/{x.sid}.json") and r.method == "POST"]
            assert [u.get("Status") for u in updates] == ["completed"]  # once, by A's REST client

            async def gone() -> bool:  # A releases the call just after the phone saw it end
                return (await _hang_up_from(b, x.sid)).status_code == 404

            await _until(gone, 5, "the hung-up call to leave the registry")

            async def recorded() -> bool:  # A wrote the record; B reads it from the shared database
                async with httpx.AsyncClient(timeout=5) as client:
                    got = await client.get(f"{b.base}/api/calls/{x.sid}",
                                           headers={"Authorization": f"Bearer {CONSOLE_TOKEN}"})  # fmt: skip
                return got.status_code == 200 and got.json().get("call_sid") == x.sid

            await _until(recorded, 10, "A's record of the call, read on B")

            # A newer stream for a CallSid (Twilio retried it on C) ends the older one on B.
            y_b = await _start_call(nursery, f, f.phone("B"))
            y_c = await _start_call(nursery, f, f.phone("C"), call_sid=y_b.sid)
            with trio.fail_after(10):
                await y_b.done.wait()
            assert y_b.result is not None and y_b.result.ended_by == "server", y_b.result.timeline
            assert not y_c.done.is_set()
            f.phone("C").request_hangup(y_c.sid)

            # Redis restarted mid-call: the calls go on; the instances take calls while it is down.
            z = await _start_call(nursery, f, f.phone("A"), seconds=8.0)
            w = await _start_call(nursery, f, f.phone("C"), seconds=8.0)
            await f.redis.stop()
            for bp in (a, b, c):
                await _until(lambda bp=bp: _shared_down(bp), 5, f"{bp.name} to report the shared state down")
            during = await _start_call(nursery, f, f.phone("B"), seconds=1.0)
            await f.redis.start()
            for bp in (a, b, c):
                await _until(lambda bp=bp: _shared_up(bp), 5, f"{bp.name} to recover")
            for log in (a.log_text(), b.log_text(), c.log_text()):
                assert log.count("Redis is unreachable") == 1 and log.count("Redis is back") == 1
            # The guarantees are back: a token redeemed on A is refused on B, and the registry
            # knows where Z lives (re-registered by A), so B can hang it up.
            url = await _stream_url(f.phone("A"))
            assert url is not None and await _handshake(f.phone("A"), url) == 101
            assert await _handshake(f.phone("B"), url) == 403
            assert (await _hang_up_from(b, w.sid)).status_code == 202
            for call in (z, w, during):
                with trio.fail_after(15):
                    await call.done.wait()
            assert z.result is not None and z.result.ended_by == "caller" and z.result.violations == []
            assert z.result.heard_bytes > 0 and z.result.error is None
            assert w.result is not None and w.result.ended_by == "api"
            assert during.result is not None and during.result.ended_by == "caller"
            with trio.fail_after(10):
                await y_c.done.wait()


async def test_make_fleet_starts_redis_two_instances_and_nginx_and_a_call_goes_through(tmp_path: Path) -> None:
    """tools/fleet.py (make fleet) end to end: up, the printed simulator command places a call
    through nginx, SIGTERM stops every process it started."""
    if _nginx() is None:
        pytest.skip("nginx and openssl are needed for make fleet")
    out = tmp_path / "fleet.out"
    with out.open("wb") as sink:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tools.fleet", "--port", "0", "--lease-s", "3"],
            cwd=str(REPO), stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        with trio.fail_after(40):
            while "Fleet up" not in out.read_text():
                assert proc.returncode is None, out.read_text()
                await trio.sleep(0.1)
            while "kill -9" not in out.read_text():
                await trio.sleep(0.05)
        text = out.read_text()
        command = text.split("SSL_CERT_FILE=", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ").split()
        cert, argv = command[0], command[1:]
        argv[argv.index("--duration") + 1] = "2"
        with trio.fail_after(30):
            call = await trio.run_process(
                [*argv, "--speed", "4"], cwd=str(REPO), env=dict(os.environ, SSL_CERT_FILE=cert),
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        report = call.stdout.decode()
        assert call.returncode == 0, report + call.stderr.decode()
        assert "violations          : none" in report and "time to first audio" in report, report
        pids = [int(p) for p in re.findall(r"\bpid (\d+)", text)]
        assert len(pids) == 3  # redis and two bridges (nginx and the fake agent are its children too)
    finally:
        with trio.move_on_after(45, shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, out.read_text()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_workers_with_redis_url_make_redis_the_authority(tmp_path: Path) -> None:
    """WORKERS=2 with REDIS_URL: each worker is an instance of the fleet (the parent steps aside),
    so CLUSTER_MAX_CALLS from Redis caps the machine and a live call's slot is leased in Redis."""
    async with redis_server(tmp_path / "redis") as server, fake_agent() as agent:
        port = _free_port()
        public = f"https://bridge-{port}.example.com"
        env = bridge_env(port=port, public=public, agent_url=agent.url, WORKERS="2", REDIS_URL=server.url,
                         CLUSTER_MAX_CALLS="1", RECORDS="off")  # fmt: skip
        async with bridge_process(tmp_path, "bridge-workers", env) as bp, trio.open_nursery() as nursery:
            phone = FakeTwilio(http_base=bp.base, public_base=public, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
            done, sid = trio.Event(), new_sid("CA")

            async def call() -> None:
                await phone.call(CallPlan(call_sid=sid, speed=1.0, hangup_after_s=30.0, max_call_s=60.0))
                done.set()

            nursery.start_soon(call)
            with trio.fail_after(10):
                await agent.wait_for_session(1)
            for _ in range(4):  # whichever worker takes the webhook: the cluster (one call) is full
                assert await _stream_url(phone) is None
            async with coredis.Redis.from_url(server.url, decode_responses=True) as client:
                with trio.fail_after(5):
                    members = await client.zrange("vab:slots", 0, -1)
            assert [m for m in members if m.startswith("c|")], members  # the call's leased slot
            assert phone.request_hangup(sid)
            with trio.fail_after(10):
                await done.wait()


async def test_an_amd_result_posted_to_another_instance_reaches_the_call(tmp_path: Path) -> None:
    """Two instances sharing Redis (no nginx: each is reached directly). Twilio's signed AMD
    callback lands on B for an outbound call whose stream is on A: sent to A's inbox, a machine
    gets the voicemail and A's REST hang-up. A callback before any stream is kept in Redis and
    taken by the stream's admission on A: a person is greeted. AMD_WAIT_S (60 s) is longer than
    the calls, so only the routed result can do either."""
    clips = {"A person has just answered": "greeting", "You have reached an answering machine": "goodbye"}
    config = FakeAgentConfig(api_key=API_KEY, vad=False, instruction_clips=clips)
    public = "https://bridge-amd.example.com"
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(redis_server(tmp_path / "redis"))
        agent = await stack.enter_async_context(fake_agent(config))
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        rest = FakeTwilioRest(ACCOUNT_SID, AUTH_TOKEN)
        rest_base = await nursery.start(rest.serve)
        instances: dict[str, BridgeProcess] = {}

        async def start(name: str) -> None:
            env = bridge_env(
                port=_free_port(), public=public, agent_url=agent.url, REDIS_URL=server.url, LEASE_S=str(LEASE_S),
                TWILIO_ACCOUNT_SID=ACCOUNT_SID, TWILIO_API_BASE=rest_base, RECORDS="off", AMD="on",
                AMD_WAIT_S="60", VOICEMAIL_MESSAGE="Please call Acme back.", TWILIO_PHONE_NUMBER="+14155550100",
                OUTBOUND_GREETING="Hi, this is Acme calling about your order.",
            )  # fmt: skip
            instances[name] = await stack.enter_async_context(bridge_process(tmp_path, f"bridge-{name}", env))

        async with trio.open_nursery() as starting:
            for name in "AB":
                starting.start_soon(start, name)
        phones = {name: FakeTwilio(http_base=bp.base, public_base=public, auth_token=AUTH_TOKEN,
                                   connect_base=f"ws://127.0.0.1:{bp.port}", account_sid=ACCOUNT_SID)
                  for name, bp in instances.items()}  # fmt: skip

        async def hung_up(call: CallRecord) -> None:
            phones["A"].request_hangup(call.sid)

        rest.on_hangup = hung_up
        for bp in instances.values():
            await _until(lambda bp=bp: _shared_up(bp), 5, f"{bp.name}'s shared state to be up")

        async def amd_on_b(call_sid: str, answered_by: str) -> None:
            form = {"AccountSid": ACCOUNT_SID, "CallSid": call_sid, "AnsweredBy": answered_by}
            assert (await phones["B"].post_webhook("/amd-status", form)).status_code == 204

        async def outbound_on_a(call_sid: str, hangup_after_s: float,
                                after: Callable[[], Awaitable[None]]) -> CallResult:
            rest.add_live_call(call_sid, to="+14155550123", from_="+14155550100")
            results: list[CallResult] = []

            async def callee() -> None:
                plan = CallPlan(hangup_after_s=hangup_after_s, speed=2.0, max_call_s=hangup_after_s + 30)
                with trio.fail_after(60):
                    results.append(await phones["A"].outbound_answered(call_sid, f"{public}/outbound-twiml", plan))

            async with trio.open_nursery() as calls:
                calls.start_soon(callee)
                await after()
            return results[0]

        machine = new_sid("CA")

        async def when_a_has_it() -> None:
            with trio.fail_after(20):
                await agent.wait_for_session(1)
            await amd_on_b(machine, "machine_end_silence")

        result = await outbound_on_a(machine, 40.0, when_a_has_it)
        assert result.ended_by == "api", result.timeline  # A hung up through REST after the voicemail
        assert agent.clip("goodbye") in result.heard and agent.clip("greeting") not in result.heard
        assert f"call {machine} answered by machine_end_silence (sent to the process" in instances["B"].log_text()

        person = new_sid("CA")
        await amd_on_b(person, "human")  # before any stream: kept in Redis
        assert f"call {person} answered by human (kept for its stream)" in instances["B"].log_text()
        async with coredis.Redis.from_url(server.url, decode_responses=True) as client:
            with trio.fail_after(5):
                assert 0 < await client.pttl(f"vab:amd:{person}") <= 60_000  # expires if no stream comes
        result = await outbound_on_a(person, 12.0, trio.lowlevel.checkpoint)
        assert result.ended_by == "caller", result.timeline
        assert agent.clip("greeting") in result.heard
        assert f"call {person}: AMD result human from the shared state" in instances["A"].log_text()
