"""Issue 17, through the real server: WORKERS=N keeps every guarantee of one process.

Real ``python -m bridge serve`` processes (the parent and its workers) on a loopback port, the fake
Voice Agent and the fake Twilio. Which worker refused a stream is read from the shared log: each
refusal names its worker's pid; the pids themselves come from ``/healthz``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from bridge.phone.security import mint_token
from tests.harness import API_KEY, AUTH_TOKEN
from tools.fake_agent import FakeAgent, FakeAgentConfig
from tools.fake_twilio import CallPlan, FakeTwilio, StreamRejected, new_sid, parse_twiml

ROOT = Path(__file__).resolve().parent.parent
SECRET = "workers-shared-secret-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Fleet:
    proc: trio.Process
    port: int
    pids: set[int]
    agent: FakeAgent
    twilio: FakeTwilio
    log: Path
    run_dir: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def workers(tmp_path: Path, count: int, **env: str) -> AsyncIterator[Fleet]:
    agent = FakeAgent(FakeAgentConfig(api_key=API_KEY, vad=False))
    port = _free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        environ = {
            "PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "ASSEMBLYAI_API_KEY": API_KEY,
            "PUBLIC_HOSTNAME": f"http://127.0.0.1:{port}", "PORT": str(port), "BIND_HOST": "127.0.0.1",
            "VOICE_AGENT_URL": agent.url, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "STREAM_TOKEN_SECRET": SECRET,
            "WORKERS": str(count), "DRAIN_SECONDS": "1", "CALLER_AUDIO_BURST_MS": "600000",
        } | env
        # Each worker's private Hypercorn socket lands here (bridge/server.py: make_private_dir),
        # so a test can ask every worker directly instead of hoping the kernel picks each one.
        # (Short: a unix socket's path has at most 107 bytes, more than pytest's tmp_path leaves.)
        run_dir = Path(tempfile.mkdtemp(prefix="bw-", dir="/tmp"))
        environ["TMPDIR"] = str(run_dir)
        log_path = tmp_path / "server.log"
        with log_path.open("wb") as log:
            proc = await trio.lowlevel.open_process([sys.executable, "-m", "bridge", "serve"], cwd=tmp_path,
                                                    env=environ, stdout=log, stderr=subprocess.STDOUT)
        try:
            pids: set[int] = set()
            with trio.fail_after(30):
                while len(pids) < count:
                    pids = {pid for pid in _worker_sockets(run_dir) if await _healthz(run_dir, pid) is not None}
                    await trio.sleep(0.05)
                while True:  # and the shared port answers
                    try:
                        async with httpx.AsyncClient() as http:
                            await http.get(f"http://127.0.0.1:{port}/healthz")
                        break
                    except httpx.HTTPError:
                        await trio.sleep(0.05)
            twilio = FakeTwilio(http_base=f"http://127.0.0.1:{port}", public_base=f"http://127.0.0.1:{port}",
                                auth_token=AUTH_TOKEN)
            yield Fleet(proc, port, pids, agent, twilio, log_path, run_dir)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
            if proc.poll() is None:
                proc.kill()
            for pid in pids:  # a worker must never outlive its test
                if _alive(pid):
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            shutil.rmtree(run_dir, ignore_errors=True)
            nursery.cancel_scope.cancel()


def _refusals(fleet: Fleet, status: int, reason: str) -> dict[int, int]:
    """{pid: refusals of that kind} for every worker, from the shared log (each refusal names
    its worker's pid)."""
    text = fleet.log.read_text()
    return {pid: text.count(f"refused a Media Stream before accept ({status}, pid {pid}): {reason}")
            for pid in fleet.pids}


def _worker_sockets(run_dir: Path) -> dict[int, Path]:
    """{pid: that worker's private Hypercorn socket}."""
    found: dict[int, Path] = {}
    for sock in run_dir.glob("bridge-hypercorn-*-*/hypercorn.sock"):
        found[int(sock.parent.name.split("-")[2])] = sock
    return found


async def _healthz(run_dir: Path, pid: int) -> dict[str, int] | None:
    """``GET /healthz`` of one worker, through its own socket; None if it does not answer."""
    sock = _worker_sockets(run_dir).get(pid)
    if sock is None:
        return None
    try:
        transport = httpx.AsyncHTTPTransport(uds=str(sock))
        async with httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=5) as http:
            body: dict[str, int] = (await http.get("/healthz")).json()
    except (httpx.HTTPError, ValueError):
        return None
    assert body["pid"] == pid
    return body


async def _active_calls(fleet: Fleet) -> dict[int, int]:
    """{pid: live calls} of every live worker, each asked directly."""
    seen: dict[int, int] = {}
    with trio.fail_after(20):  # bounds a hang only
        for pid in sorted(fleet.pids):
            while _alive(pid):
                body = await _healthz(fleet.run_dir, pid)
                if body is not None:
                    seen[pid] = body["active_calls"]
                    break
                await trio.sleep(0.05)
    return seen


async def _stream_url(fleet: Fleet) -> tuple[str, str]:
    call_sid = new_sid("CA")
    resp = await fleet.twilio.post_webhook("/twiml", fleet.twilio.voice_params(CallPlan(), call_sid))
    assert resp.status_code == 200, resp.text
    spec = parse_twiml(resp.text).stream
    assert spec is not None, resp.text
    return call_sid, spec.url


async def _refused(fleet: Fleet, url: str, call_sid: str) -> int | None:
    with trio.fail_after(20), pytest.raises(StreamRejected) as info:  # bounds a hang only
        async with fleet.twilio.open_stream(url, call_sid=call_sid):
            pass
    return info.value.status_code


async def _replays_until_every_worker_refused(fleet: Fleet, url: str, call_sid: str, *, status: int,
                                              reason: str, detail: str = "") -> int:
    """Replay ``url`` until every worker has refused it at least once; returns the attempts."""
    before = _refusals(fleet, status, detail or reason)
    attempts = 0
    with trio.fail_after(45):
        while True:
            for _ in range(8):
                assert await _refused(fleet, url, call_sid) == status
                attempts += 1
            await trio.sleep(0.05)  # the refusal's log line is written just after the 403/503
            counts = _refusals(fleet, status, detail or reason)
            if all(counts[pid] > before[pid] for pid in fleet.pids):
                assert sum(counts.values()) - sum(before.values()) == attempts
                return attempts


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:  # an exited child may linger as a zombie
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("count", [2, 4])
async def test_a_stream_url_opens_one_stream_on_whichever_worker_it_lands(tmp_path: Path, count: int) -> None:
    async with workers(tmp_path, count) as fleet:
        call_sid, url = await _stream_url(fleet)
        async with fleet.twilio.open_stream(url, call_sid=call_sid) as client:
            await client.send_connected()
            await client.send_start()
            await fleet.agent.wait_for_session(1)
            # While the call is live: a second stream to its URL is refused by every worker.
            live = await _replays_until_every_worker_refused(fleet, url, call_sid, status=403, reason="token replayed")
            await client.send_stop()
        with trio.fail_after(20):  # bounds a hang only (a loaded machine, four workers)
            while sum((await _active_calls(fleet)).values()):
                await trio.sleep(0.05)
        # After it: the finished call's URL, replayed, is refused by every worker, however often.
        after = await _replays_until_every_worker_refused(fleet, url, call_sid, status=403, reason="token replayed")
        assert live >= count and after >= count
        assert fleet.agent.connections_total == 1  # no replay ever reached the Voice Agent


@pytest.mark.parametrize("count", [2, 4])
async def test_max_concurrent_calls_holds_for_the_machine_whichever_worker_is_asked(tmp_path: Path, count: int) -> None:
    async with workers(tmp_path, count, MAX_CONCURRENT_CALLS="2") as fleet:
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def hold_a_call(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                call_sid, url = await _stream_url(fleet)
                async with fleet.twilio.open_stream(url, call_sid=call_sid) as client:
                    await client.send_connected()
                    await client.send_start()
                    task_status.started()
                    await done.wait()
                    await client.send_stop()

            await nursery.start(hold_a_call)
            await nursery.start(hold_a_call)
            await fleet.agent.wait_for_session(2)
            where = await _active_calls(fleet)
            assert sum(where.values()) == 2
            # Whichever worker is asked, the machine is full: a stream with a valid token (minted
            # elsewhere: no reservation) is refused 503 by every worker, even one holding no call...
            sid = new_sid("CA")
            token = mint_token(SECRET.encode(), sid, "inbound", now=time.time(), ttl_s=60)
            extra = f"ws://127.0.0.1:{fleet.port}/media-stream/{token}"
            await _replays_until_every_worker_refused(fleet, extra, sid, status=503, reason="capacity",
                                                      detail="at capacity")
            # ...and webhooks answer busy.
            for _ in range(12):
                busy = await fleet.twilio.post_webhook("/twiml", fleet.twilio.voice_params(CallPlan(), new_sid("CA")))
                assert busy.status_code == 200 and parse_twiml(busy.text).stream is None, busy.text
            assert fleet.agent.connections_total == 2
            done.set()
        # The slots are free again; the extra stream's token was never spent.
        with trio.fail_after(20):  # bounds a hang only (a loaded machine, four workers)
            while sum((await _active_calls(fleet)).values()):
                await trio.sleep(0.05)
        async with fleet.twilio.open_stream(extra, call_sid=sid) as client:
            await client.send_connected()
            await client.send_start()
            await fleet.agent.wait_for_session(3)
            await client.send_stop()


@pytest.mark.parametrize("count", [2, 4])
async def test_a_killed_worker_frees_its_slots_and_its_tokens_stay_spent(tmp_path: Path, count: int) -> None:
    async with workers(tmp_path, count, MAX_CONCURRENT_CALLS="1") as fleet:
        call_sid, url = await _stream_url(fleet)
        async with fleet.twilio.open_stream(url, call_sid=call_sid) as client:
            await client.send_connected()
            await client.send_start()
            await fleet.agent.wait_for_session(1)
            where = await _active_calls(fleet)
            (holder,) = [pid for pid, calls in where.items() if calls == 1]
            busy = await fleet.twilio.post_webhook("/twiml", fleet.twilio.voice_params(CallPlan(), new_sid("CA")))
            assert parse_twiml(busy.text).stream is None  # full
            os.kill(holder, signal.SIGKILL)
            with trio.fail_after(20):  # bounds a hang only
                while _alive(holder):
                    await trio.sleep(0.02)
        # The parent noticed the dead worker's socket close and freed its slot: a new call gets in
        # on the surviving worker, and carries audio both ways.
        with trio.fail_after(30):  # bounds a hang only: the call itself is 0.8 s
            result = await fleet.twilio.call(CallPlan(speed=10.0, hangup_after_s=8.0))
        assert result.handshake_status == 101, result.timeline
        assert result.violations == [] and fleet.agent.greeting_audio in result.heard
        # The dead worker's token is still spent.
        assert await _refused(fleet, url, call_sid) == 403
        assert fleet.proc.poll() is None  # the parent carries on with the survivor
        text = fleet.log.read_text()
        assert f"(pid {holder}) has gone: freed 1 live call(s)" in text


async def test_a_console_sign_in_holds_on_every_worker(tmp_path: Path) -> None:
    # No CONSOLE_SESSION_SECRET: each process would draw its own random one, so a cookie signed by
    # one worker would be refused by the others; the parent hands its workers one secret.
    token = "console-workers-token-0123456789"
    async with workers(tmp_path, 2, CONSOLE_TOKEN=token, RECORDS="off") as fleet:
        async with httpx.AsyncClient(base_url=fleet.base) as http:
            signed_in = await http.post("/console/sign-in", data={"token": token, "next": "/console"})
        assert signed_in.status_code == 303, signed_in.text
        cookie = signed_in.headers["set-cookie"].split(";")[0]
        assert cookie.startswith("console_session=") and len(cookie) > 40, cookie
        statuses = []
        for _ in range(32):  # a new connection each: the kernel spreads them over both workers
            async with httpx.AsyncClient(base_url=fleet.base) as http:
                statuses.append((await http.get("/console", headers={"Cookie": cookie})).status_code)
        assert statuses == [200] * 32
