"""WORKERS=N: one port, N real processes, stateless tokens across them, drained together."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from tests.harness import API_KEY, AUTH_TOKEN
from tools.fake_agent import FakeAgent, FakeAgentConfig
from tools.fake_twilio import CallPlan, FakeTwilio

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_workers_share_the_port_and_drain_together(tmp_path: Path) -> None:
    agent = FakeAgent(FakeAgentConfig(api_key=API_KEY, vad=False))
    port = _free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "ASSEMBLYAI_API_KEY": API_KEY,
            "PUBLIC_HOSTNAME": f"http://127.0.0.1:{port}",
            "PORT": str(port),
            "BIND_HOST": "127.0.0.1",
            "VOICE_AGENT_URL": agent.url,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,  # no STREAM_TOKEN_SECRET: the parent must share one
            "WORKERS": "2",
            "DRAIN_SECONDS": "2",
            "CALLER_AUDIO_BURST_MS": "600000",
        }
        log = (tmp_path / "server.log").open("wb")
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bridge", "serve"],
            cwd=tmp_path, env=env | {"PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            pids: set[int] = set()
            with trio.fail_after(20):
                while len(pids) < 2:
                    try:
                        async with httpx.AsyncClient() as http:  # a new connection each time
                            pids.add((await http.get(f"http://127.0.0.1:{port}/healthz")).json()["pid"])
                    except httpx.HTTPError:
                        await trio.sleep(0.1)
            assert proc.pid not in pids  # the parent only supervises

            twilio = FakeTwilio(http_base=f"http://127.0.0.1:{port}", public_base=f"http://127.0.0.1:{port}",
                                auth_token=AUTH_TOKEN)
            results = []

            async def one_call() -> None:
                results.append(await twilio.call(CallPlan(speed=10.0, hangup_after_s=8.0)))

            with trio.fail_after(60):
                async with trio.open_nursery() as calls:
                    for _ in range(6):
                        calls.start_soon(one_call)
            assert [r.handshake_status for r in results] == [101] * 6  # tokens valid on either worker
            assert all(r.violations == [] and bridge_greeting(agent) in r.heard for r in results)

            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                assert await proc.wait() == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        nursery.cancel_scope.cancel()
    assert agent.connections_open == 0
    text = (tmp_path / "server.log").read_text()
    assert text.count("Server running on") == 1 and "(2 workers)" in text
    assert text.count("drained: stopping the server") == 2


def bridge_greeting(agent: FakeAgent) -> bytes:
    return agent.greeting_audio


async def test_workers_do_not_outlive_a_killed_parent(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        "PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "ASSEMBLYAI_API_KEY": API_KEY,
        "PUBLIC_HOSTNAME": f"http://127.0.0.1:{port}", "PORT": str(port), "BIND_HOST": "127.0.0.1",
        "WORKERS": "2", "DRAIN_SECONDS": "1",
    }
    proc = await trio.lowlevel.open_process([sys.executable, "-m", "bridge", "serve"], cwd=tmp_path, env=env,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids: set[int] = set()
    with trio.fail_after(20):
        while len(pids) < 2:
            try:
                async with httpx.AsyncClient() as http:
                    pids.add((await http.get(f"http://127.0.0.1:{port}/healthz")).json()["pid"])
            except httpx.HTTPError:
                await trio.sleep(0.1)
    proc.kill()  # SIGKILL: the parent cannot forward anything
    await proc.wait()
    with trio.fail_after(10):
        while any(_alive(pid) for pid in pids):
            await trio.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # an exited child of PID 1 may linger as a zombie
        return stat.read().split(")")[-1].split()[0] != "Z"
