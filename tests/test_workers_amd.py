"""AMD results with WORKERS=N, through the real server: Twilio's ``POST /amd-status`` reaches the
call whichever worker the kernel hands the callback to.

Real ``python -m bridge serve`` processes (the parent and its workers) on a loopback port, the fake
Voice Agent, the fake Twilio (the callee) and the fake Twilio REST API (``TWILIO_API_BASE``: the
voicemail's hang-up). The AMD callback is posted, signed, straight to one chosen worker (its private
Hypercorn socket under the server's ``TMPDIR``, as tests/test_workers_shared.py finds them), so the
test decides that it lands on a worker *not* holding the stream, or before any stream exists.

``AMD_WAIT_S`` is 60 s, longer than every call here: a result that did not reach the call would
leave a machine greeted and without voicemail, and a person never greeted.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from tests.harness import ACCOUNT_SID, API_KEY, AUTH_TOKEN
from tools.fake_agent import FakeAgent, FakeAgentConfig
from tools.fake_twilio import CallPlan, CallResult, FakeTwilio, new_sid
from tools.fake_twilio_rest import CallRecord, FakeTwilioRest

ROOT = Path(__file__).resolve().parent.parent
SECRET = "workers-amd-secret-0123456789abcdef"
VOICEMAIL = "Please call Acme back."
CLIPS = {"A person has just answered": "greeting", "You have reached an answering machine": "goodbye"}
AMD_ENV = {
    "AMD": "on", "AMD_WAIT_S": "60", "VOICEMAIL_MESSAGE": VOICEMAIL,
    "OUTBOUND_GREETING": "Hi, this is Acme calling about your order.", "OUTBOUND_GREETING_DELAY_MS": "400",
    "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_PHONE_NUMBER": "+14155550100",
    "TARGET_PHONE_NUMBER": "+14155550123",
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Machine:
    proc: trio.Process
    base: str  # the shared port (also the public URL webhooks are signed for)
    run_dir: Path
    agent: FakeAgent
    twilio: FakeTwilio
    rest: FakeTwilioRest
    log: Path

    def sockets(self) -> dict[int, Path]:
        """{pid: that worker's private Hypercorn socket}."""
        return {int(sock.parent.name.split("-")[2]): sock
                for sock in self.run_dir.glob("bridge-hypercorn-*-*/hypercorn.sock")}  # fmt: skip

    async def ask(self, pid: int, method: str, path: str, **kwargs: object) -> httpx.Response:
        transport = httpx.AsyncHTTPTransport(uds=str(self.sockets()[pid]))
        async with httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=10) as http:
            return await http.request(method, path, **kwargs)  # type: ignore[arg-type]

    async def active_calls(self) -> dict[int, int]:
        return {pid: (await self.ask(pid, "GET", "/healthz")).json()["active_calls"] for pid in self.sockets()}

    async def post_amd(self, pid: int, call_sid: str, answered_by: str) -> None:
        """Twilio's signed AMD callback, delivered to worker ``pid`` only."""
        form = {"AccountSid": ACCOUNT_SID, "CallSid": call_sid, "AnsweredBy": answered_by,
                "MachineDetectionDuration": "1830"}  # fmt: skip
        signature = self.twilio.sign(f"{self.base}/amd-status", form)
        answer = await self.ask(pid, "POST", "/amd-status", data=form, headers={"X-Twilio-Signature": signature})
        assert answer.status_code == 204, answer.text


@asynccontextmanager
async def machine(tmp_path: Path, count: int, **env: str) -> AsyncIterator[Machine]:
    agent = FakeAgent(FakeAgentConfig(api_key=API_KEY, vad=False, instruction_clips=CLIPS))
    rest = FakeTwilioRest(ACCOUNT_SID, AUTH_TOKEN)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    run_dir = Path(tempfile.mkdtemp(prefix="ba-", dir="/tmp"))  # short: a unix socket path has 107 bytes
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        rest_base = await nursery.start(rest.serve)
        environ = {
            "PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "ASSEMBLYAI_API_KEY": API_KEY,
            "PUBLIC_HOSTNAME": base, "PORT": str(port), "BIND_HOST": "127.0.0.1", "VOICE_AGENT_URL": agent.url,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "STREAM_TOKEN_SECRET": SECRET, "TWILIO_API_BASE": rest_base,
            "WORKERS": str(count), "DRAIN_SECONDS": "1", "CALLER_AUDIO_BURST_MS": "600000", "TMPDIR": str(run_dir),
        } | AMD_ENV | env  # fmt: skip
        log_path = tmp_path / "server.log"
        with log_path.open("wb") as log:
            proc = await trio.lowlevel.open_process([sys.executable, "-m", "bridge", "serve"], cwd=tmp_path,
                                                    env=environ, stdout=log, stderr=subprocess.STDOUT)
        twilio = FakeTwilio(http_base=base, public_base=base, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)

        async def hung_up(call: CallRecord) -> None:  # Twilio ends the call: its stream stops
            twilio.request_hangup(call.sid)

        rest.on_hangup = hung_up
        m = Machine(proc, base, run_dir, agent, twilio, rest, log_path)
        pids: set[int] = set()
        try:
            with trio.fail_after(30):
                while len(pids) < count:
                    await trio.sleep(0.05)
                    pids = set(m.sockets())
                    with suppress(httpx.HTTPError, OSError):
                        await m.active_calls()
                        continue
                    pids = set()
            yield m
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
            if proc.poll() is None:
                proc.kill()
            for pid in pids:  # a worker must never outlive its test
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            nursery.cancel_scope.cancel()


async def placed_call(m: Machine, nursery: trio.Nursery, *, hangup_after_s: float) -> tuple[str, list[CallResult]]:
    """An outbound call answered by the fake callee (its REST record too, for the hang-up)."""
    sid = new_sid("CA")
    m.rest.add_live_call(sid, to="+14155550123", from_="+14155550100")
    results: list[CallResult] = []

    async def callee() -> None:
        plan = CallPlan(hangup_after_s=hangup_after_s, speed=2.0, max_call_s=hangup_after_s + 30)
        with trio.fail_after(60):
            results.append(await m.twilio.outbound_answered(sid, f"{m.base}/outbound-twiml", plan))

    nursery.start_soon(callee)
    return sid, results


async def holder(m: Machine) -> int:
    """The worker holding the one live call (waits until the stream is admitted)."""
    with trio.fail_after(20):
        while True:
            holding = [pid for pid, calls in (await m.active_calls()).items() if calls == 1]
            if holding:
                return holding[0]
            await trio.sleep(0.02)


async def idle(m: Machine) -> None:
    with trio.fail_after(20):
        while any((await m.active_calls()).values()):
            await trio.sleep(0.02)


@pytest.mark.parametrize("count", [2, 4])
async def test_an_amd_result_posted_to_another_worker_reaches_the_call(tmp_path: Path, count: int) -> None:
    async with machine(tmp_path, count) as m:
        # A machine: the result lands on a worker that does not hold the stream.
        async with trio.open_nursery() as nursery:
            sid, results = await placed_call(m, nursery, hangup_after_s=40.0)
            on = await holder(m)
            with trio.fail_after(20):
                await m.agent.wait_for_session(1)  # up, greeting held for the AMD result
            other = next(pid for pid in m.sockets() if pid != on)
            await m.post_amd(other, sid, "machine_end_beep")
        [result] = results
        assert result.ended_by == "api", result.timeline  # hung up through REST after the voicemail
        assert m.agent.clip("goodbye") in result.heard
        assert m.agent.clip("greeting") not in result.heard  # never greeted a machine
        assert any(VOICEMAIL in (i or "") for i in m.agent.reply_instructions)
        log = m.log.read_text()
        assert f"call {sid} answered by machine_end_beep (detected in 1830 ms) (sent to the process" in log
        await idle(m)

        # A person: greeted as soon as known (AMD_WAIT_S is longer than the whole call).
        async with trio.open_nursery() as nursery:
            sid, results = await placed_call(m, nursery, hangup_after_s=12.0)
            on = await holder(m)
            with trio.fail_after(20):
                await m.agent.wait_for_session(2)
            other = next(pid for pid in m.sockets() if pid != on)
            await m.post_amd(other, sid, "human")
        [result] = results
        assert result.ended_by == "caller", result.timeline
        assert m.agent.clip("greeting") in result.heard
        assert m.agent.clip("goodbye") not in result.heard


async def test_an_amd_result_that_beats_the_stream_is_kept_by_the_parent(tmp_path: Path) -> None:
    async with machine(tmp_path, 2) as m:
        early = new_sid("CA")
        pids = sorted(m.sockets())
        await m.post_amd(pids[0], early, "human")  # no stream anywhere yet
        assert f"call {early} answered by human (detected in 1830 ms) (kept for its stream)" in m.log.read_text()
        # The call opens now, on whichever worker; the parent hands the kept result to its admission.
        async with trio.open_nursery() as nursery:
            m.rest.add_live_call(early, to="+14155550123", from_="+14155550100")
            results: list[CallResult] = []

            async def callee() -> None:
                plan = CallPlan(hangup_after_s=12.0, speed=2.0)
                with trio.fail_after(60):
                    results.append(await m.twilio.outbound_answered(early, f"{m.base}/outbound-twiml", plan))

            nursery.start_soon(callee)
        [result] = results
        assert result.ended_by == "caller", result.timeline
        assert m.agent.clip("greeting") in result.heard
        assert f"call {early}: AMD result human from the shared state (kept for its stream)" in m.log.read_text()
