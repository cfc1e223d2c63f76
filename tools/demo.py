"""Offline demo: hear the bridge work with no accounts and no configuration.

Starts the fake Voice Agent and the real bridge (``python -m bridge serve``, with its console and
call records in a temporary folder) on loopback, prints the console's URL and a demo token,
places one simulated Twilio call whose caller speaks real recorded questions and types an order
number on the keypad when the agent asks for it (the bridge's collect_digits tool), writes what
the caller heard to ``demo-call.wav``, prints the call's timeline, the bridge's log of the call
and the call's record as the records API gives it (turn latencies, said vs heard), and stops
everything cleanly. ``make demo`` runs it; ``--speed 4`` runs it four times faster; ``--keep``
keeps the bridge up after the call, until Ctrl-C, so the call can be read in the console.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from bridge.records.report import format_record
from tools.fake_twilio import CallPlan, CallResult, FakeTwilio
from tools.mulaw import write_wav_from_ulaw
from tools.simulate_call import format_report

ROOT = Path(__file__).resolve().parent.parent
AUDIO = ROOT / "tools" / "audio"
DEMO_TOKEN = "demo0000000000000000000000000000"  # a stand-in Twilio auth token: signatures are checked
# The caller's script, in call seconds (the fake agent's replies take fixed times: its clips, its
# 0.2 s of leading silence and its VAD's 0.5 s end of turn; each step leaves ~1 s to spare).
QUESTION_AT_S = 4.5  # after the greeting (0.2-3.6 s)
ORDER_AT_S = 12.8  # after the answer (~8.9-11.8 s)
ORDER_QUESTION = "Can you also check my order?"  # tools/audio/caller_order.ulaw (1.9 s)
ORDER_DIGITS = "1234"
DIGITS_AT_S = 20.0  # after the agent asked for them (~15.3-19.0 s); one key every 0.5 s
HANG_UP_AT_S = 26.5  # after the answer to the digits (~21.6-24.7 s)
RECORD_WAIT_S = 15.0  # the record is written by the bridge's writer task within milliseconds of the end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    # Its own process group: a Ctrl-C reaches only the demo, which then stops the servers in
    # order (bridge first), so each exits cleanly and says so.
    with log_path.open("wb") as log:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0)


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


def caller_audio() -> bytes:
    """What the caller says, as μ-law from call time 0: the question, then the order question."""
    question = (AUDIO / "caller.ulaw").read_bytes()
    order = (AUDIO / "caller_order.ulaw").read_bytes()
    silence = bytes([0xFF])  # μ-law silence
    audio = silence * int(QUESTION_AT_S * 8000) + question
    return audio + silence * (int(ORDER_AT_S * 8000) - len(audio)) + order


def _fetch_record(base: str, token: str, call_sid: str) -> dict[str, Any] | None:
    """The finished record of ``call_sid`` from the bridge's records API, or None after RECORD_WAIT_S."""
    deadline = time.monotonic() + RECORD_WAIT_S
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base}/api/calls/{call_sid}", headers=headers, timeout=2)
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 200:
            record: dict[str, Any] = response.json()
            if not record.get("live"):
                return record
        time.sleep(0.1)
    return None


def _wait_for_ctrl_c(bridge: subprocess.Popen[bytes]) -> None:
    """Until Ctrl-C or SIGTERM (or the bridge exits by itself)."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Both set here: a shell starts a background job with SIGINT ignored, and Python then keeps it so.
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        while bridge.poll() is None:
            time.sleep(0.2)
        print(f"demo: the bridge exited by itself (exit code {bridge.returncode})")
    except KeyboardInterrupt:
        print("\ndemo: stopping")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--speed", type=float, default=1.0, help="time scale (1 = real time)")
    parser.add_argument("--out", default="demo-call.wav", help="where to write what the caller heard")
    parser.add_argument("--logs", default=None, help="folder for the servers' logs and the call records "
                        "(default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="after the call, keep the bridge and its console up "
                        "until Ctrl-C")
    parser.add_argument("--token", default=None, help="the console's token (default: a random demo token)")
    args = parser.parse_args(argv)

    log_dir = Path(args.logs or tempfile.mkdtemp(prefix="bridge-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    agent_port, bridge_port = _free_port(), _free_port()
    base = f"http://127.0.0.1:{bridge_port}"
    token = args.token or "demo-" + secrets.token_urlsafe(18)
    base_env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("TWILIO_", "ASSEMBLYAI_", "BRIDGE_", "CONSOLE_", "RECORD"))
    }  # fmt: skip
    python = sys.executable

    agent_log = log_dir / "fake-agent.log"
    agent = _start(
        [python, "-m", "tools.fake_agent", "--port", str(agent_port), "--speed", str(args.speed),
         "--tool-on-turn", '1:generate_random_number:{"min":1,"max":10}',
         # The second turn: the agent asks for the order number and collects it from the keypad
         # (the bridge's built-in collect_digits tool), then answers.
         "--turn-transcript", f"2:{ORDER_QUESTION}",
         "--tool-on-turn", '2:collect_digits:{"max_digits":4,"timeout_s":10}',
         "--tool-clips", "collect_digits:order_ask:order_found"],
        base_env, agent_log,
    )
    bridge_log = log_dir / "bridge.log"
    bridge_env = base_env | {
        "ASSEMBLYAI_API_KEY": "demo-key-not-a-real-key",
        "PUBLIC_HOSTNAME": base,
        "PORT": str(bridge_port),
        "BIND_HOST": "127.0.0.1",
        "VOICE_AGENT_URL": f"ws://127.0.0.1:{agent_port}/v1/ws",
        "TWILIO_AUTH_TOKEN": DEMO_TOKEN,
        "CALLER_AUDIO_BURST_MS": str(int(2000 * max(args.speed, 1.0) * 10)),
        "CONSOLE_TOKEN": token,
        "RECORDS_URL": f"sqlite:///{(log_dir / 'calls.sqlite3').resolve()}",
        "LOG_LEVEL": "INFO",
    }
    bridge = None
    result: CallResult | None = None
    record: dict[str, Any] | None = None
    try:
        _wait_for_line(agent_log, "listening", agent, "the fake agent")
        bridge = _start([python, "-m", "bridge", "serve"], bridge_env, bridge_log)
        _wait_until_up(f"{base}/healthz", bridge, "the bridge", bridge_log)
        print(f"demo: fake Voice Agent on ws://127.0.0.1:{agent_port}/v1/ws, bridge on {base}")
        print(f"demo: the console: {base}/console  (sign in with the token {token})")
        print("demo: calling the bridge as Twilio would (signed webhook, signed Media Stream)...\n")

        plan = CallPlan(
            caller_audio=caller_audio(), speed=args.speed, hangup_after_s=HANG_UP_AT_S,
            dtmf=[(DIGITS_AT_S + 0.5 * i, digit) for i, digit in enumerate(ORDER_DIGITS)],
        )
        twilio = FakeTwilio(http_base=base, public_base=base, auth_token=DEMO_TOKEN)

        async def run_call() -> CallResult:
            with trio.fail_after(120):
                return await twilio.call(plan)

        result = trio.run(run_call)
        out = Path(args.out)
        write_wav_from_ulaw(out, result.heard)
        print(format_report(result, plan))
        heard_s = len(result.heard) / 8000
        print(f"\ndemo: wrote {out} ({heard_s:.1f} s of what the caller heard)")
        _print_bridge_log(bridge_log)
        record = _fetch_record(base, token, result.call_sid)
        if record is None:
            print(f"\ndemo: the call's record did not arrive within {RECORD_WAIT_S:g} s")
        else:
            print(f"\ndemo: the call's record (GET /api/calls/{result.call_sid}):")
            print(format_record(record))
        if args.keep:
            print(f"\ndemo: the bridge stays up. Read the call in the console: {base}/console/calls/{result.call_sid}")
            print(f"demo: sign in with the token {token}; Ctrl-C stops the bridge.", flush=True)
            _wait_for_ctrl_c(bridge)
    finally:
        codes = [_stop(p) for p in (bridge, agent) if p is not None]
    print(f"\ndemo: stopped the bridge and the fake agent (exit codes {codes}); logs and records in {log_dir}")
    if result is None or result.violations or result.first_audio_s is None or record is None:
        violations = result.violations if result else "no call"
        print(f"demo: FAILED: violations={violations}, record={'yes' if record else 'none'}", file=sys.stderr)
        return 1
    return 0


def _print_bridge_log(bridge_log: Path) -> None:
    print("\ndemo: the bridge's log of the call:")
    for line in bridge_log.read_text(errors="replace").splitlines():
        if "bridge.call" in line or "bridge.web" in line:
            print("  " + line.split(" ", 2)[-1])


if __name__ == "__main__":
    sys.exit(main())
