"""Offline demo: hear the bridge work with no accounts and no configuration.

Starts the fake Voice Agent and the real bridge (``python -m bridge serve``) on loopback, places
one simulated Twilio call whose caller speaks a real recorded question, writes what the caller
heard to ``demo-call.wav``, prints the call's timeline and the bridge's log of the call, and stops
everything cleanly. ``make demo`` runs it; ``--speed 4`` runs it four times faster.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

from tools.fake_twilio import CallPlan, CallResult, FakeTwilio
from tools.mulaw import write_wav_from_ulaw
from tools.simulate_call import format_report

ROOT = Path(__file__).resolve().parent.parent
AUDIO = ROOT / "tools" / "audio"
DEMO_TOKEN = "demo0000000000000000000000000000"  # a stand-in Twilio auth token: signatures are checked
PAUSE_BEFORE_QUESTION_S = 4.5  # let the greeting play before the caller speaks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], what: str, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: {what} exited early:\n{log_path.read_text(errors='replace')}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"demo: {what} did not start within 30 s (log: {log_path})")


def _wait_for_line(path: Path, text: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"demo: {what} exited early:\n{path.read_text(errors='replace')}")
        time.sleep(0.05)
    raise SystemExit(f"demo: {what} did not start within 30 s")


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--speed", type=float, default=1.0, help="time scale (1 = real time)")
    parser.add_argument("--out", default="demo-call.wav", help="where to write what the caller heard")
    parser.add_argument("--logs", default=None, help="folder for the two servers' logs (default: a temp folder)")
    args = parser.parse_args(argv)

    import tempfile

    log_dir = Path(args.logs or tempfile.mkdtemp(prefix="bridge-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    agent_port, bridge_port = _free_port(), _free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "ASSEMBLYAI_", "BRIDGE_"))}
    python = sys.executable

    agent_log = log_dir / "fake-agent.log"
    agent = _start(
        [python, "-m", "tools.fake_agent", "--port", str(agent_port), "--speed", str(args.speed),
         "--tool-on-turn", '1:generate_random_number:{"min":1,"max":10}'],
        base_env, agent_log,
    )
    bridge_log = log_dir / "bridge.log"
    bridge_env = base_env | {
        "ASSEMBLYAI_API_KEY": "demo-key-not-a-real-key",
        "PUBLIC_HOSTNAME": f"http://127.0.0.1:{bridge_port}",
        "PORT": str(bridge_port),
        "BIND_HOST": "127.0.0.1",
        "VOICE_AGENT_URL": f"ws://127.0.0.1:{agent_port}/v1/ws",
        "TWILIO_AUTH_TOKEN": DEMO_TOKEN,
        "CALLER_AUDIO_BURST_MS": str(int(2000 * max(args.speed, 1.0) * 10)),
        "LOG_LEVEL": "INFO",
    }
    bridge = None
    result: CallResult | None = None
    try:
        _wait_for_line(agent_log, "listening", agent, "the fake agent")
        bridge = _start([python, "-m", "bridge", "serve"], bridge_env, bridge_log)
        _wait_until_up(f"http://127.0.0.1:{bridge_port}/healthz", bridge, "the bridge", bridge_log)
        print(f"demo: fake Voice Agent on ws://127.0.0.1:{agent_port}/v1/ws, bridge on http://127.0.0.1:{bridge_port}")
        print("demo: calling the bridge as Twilio would (signed webhook, signed Media Stream)...\n")

        silence = bytes([0xFF]) * int(PAUSE_BEFORE_QUESTION_S * 8000)
        question = (AUDIO / "caller.ulaw").read_bytes()
        plan = CallPlan(caller_audio=silence + question, speed=args.speed, hangup_after_s=16.0)
        twilio = FakeTwilio(
            http_base=f"http://127.0.0.1:{bridge_port}",
            public_base=f"http://127.0.0.1:{bridge_port}",
            auth_token=DEMO_TOKEN,
        )

        async def run_call() -> CallResult:
            with trio.fail_after(120):
                return await twilio.call(plan)

        result = trio.run(run_call)
        out = Path(args.out)
        write_wav_from_ulaw(out, result.heard)
        print(format_report(result, plan))
        heard_s = len(result.heard) / 8000
        print(f"\ndemo: wrote {out} ({heard_s:.1f} s of what the caller heard)")
    finally:
        codes = [_stop(p) for p in (bridge, agent) if p is not None]
    print("\ndemo: the bridge's log of the call:")
    for line in bridge_log.read_text(errors="replace").splitlines():
        if "bridge.call" in line or "bridge.web" in line:
            print("  " + line.split(" ", 2)[-1])
    print(f"\ndemo: stopped the bridge and the fake agent (exit codes {codes}); logs in {log_dir}")
    if result is None or result.violations or result.first_audio_s is None:
        violations = result.violations if result else "no call"
        print(f"demo: FAILED: violations={violations}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
