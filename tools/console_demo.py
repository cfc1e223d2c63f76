"""Console demo: the real bridge with its console, fed by simulated calls, until Ctrl-C.

Starts, in one process on loopback: the fake Voice Agent, a fake Twilio REST API (so the
console's End call works), and the real bridge with ``CONSOLE_TOKEN`` set and call records in a
temporary SQLite file. Prints the console's URL and the token, then places a simulated call
right away and another every ``--every`` seconds. Each is ``make demo``'s call: the caller waits
for the greeting, asks a recorded question (the agent runs a tool to answer), asks about an
order and types its number on the keypad when the agent asks (collect_digits), and hangs up
after ``--call-seconds`` unless you end the call from the console first. ``make console-demo``
runs it.

Ctrl-C (or SIGTERM) drains the bridge and stops everything.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import trio

from bridge.config import from_env
from bridge.errors import ConfigError
from bridge.phone.rest import TrioHttpClient, TwilioRest
from bridge.server import serve
from bridge.web import create_app, default_collaborators
from tools.demo import DIGITS_AT_S, ORDER_DIGITS, ORDER_QUESTION, caller_audio
from tools.fake_agent import FakeAgent, FakeAgentConfig
from tools.fake_twilio import CallPlan, FakeTwilio, new_sid
from tools.fake_twilio_rest import CallRecord, FakeTwilioRest

DEMO_AUTH_TOKEN = "demo0000000000000000000000000000"  # a stand-in Twilio auth token: signatures are checked
DEMO_ACCOUNT_SID = "AC" + "de" * 16
API_KEY = "demo-key-not-a-real-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _environment(base: str, agent_url: str, token: str, records_dir: Path) -> dict[str, str]:
    return {
        "ASSEMBLYAI_API_KEY": API_KEY,
        "PUBLIC_HOSTNAME": base,
        "VOICE_AGENT_URL": agent_url,
        "TWILIO_AUTH_TOKEN": DEMO_AUTH_TOKEN,
        "TWILIO_ACCOUNT_SID": DEMO_ACCOUNT_SID,
        "CONSOLE_TOKEN": token,
        "RECORDS_URL": f"sqlite:///{records_dir / 'calls.sqlite3'}",
        "RECORD_REDACT": "From",  # the console shows the caller's number masked
        "CALLER_AUDIO_BURST_MS": "600000",  # --speed above 1 sends the caller's audio faster
        "DRAIN_SECONDS": "0",  # Ctrl-C ends the demo's calls at once
        "LOG_LEVEL": "WARNING",
    }


async def run(args: argparse.Namespace, token: str, records_dir: Path) -> int:
    port = args.port or _free_port()
    base = f"http://127.0.0.1:{port}"
    agent = FakeAgent(
        FakeAgentConfig(
            api_key=API_KEY,
            speed=args.speed,
            tool_on_turn={
                1: ("generate_random_number", {"min": 1, "max": 10}),
                2: ("collect_digits", {"max_digits": 4, "timeout_s": 10}),
            },
            turn_transcripts={2: ORDER_QUESTION},
            tool_clips={"collect_digits": ("order_ask", "order_found")},
        )
    )
    rest = FakeTwilioRest(DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        rest_base = await nursery.start(rest.serve)
        try:
            settings = from_env(_environment(base, agent.url, token, records_dir))
        except ConfigError as exc:  # e.g. a --token that is too short: the setting's one line
            print(f"console_demo: {exc}", file=sys.stderr)
            nursery.cancel_scope.cancel()
            return 2
        collaborators = default_collaborators(settings)
        collaborators.control = TwilioRest(
            DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN, http_client=TrioHttpClient(api_base=rest_base)
        )
        app = create_app(settings, collaborators)
        twilio = FakeTwilio(http_base=base, public_base=base, auth_token=DEMO_AUTH_TOKEN, account_sid=DEMO_ACCOUNT_SID)

        async def hung_up(call: CallRecord) -> None:
            twilio.request_hangup(call.sid)

        rest.on_hangup = hung_up
        stopped, shutdown = trio.Event(), trio.Event()
        exit_code = 0

        async def bridge(task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
            # Ctrl-C / SIGTERM, or ``shutdown`` once the last call has ended: drain, then stop.
            nonlocal exit_code
            exit_code = await serve(
                app, settings, bind=[f"127.0.0.1:{port}"], handle_signals=True, shutdown=shutdown,
                task_status=task_status,
            )
            stopped.set()

        with trio.fail_after(10):  # start-up: opening SQLite and the listeners takes milliseconds
            await nursery.start(bridge)
        print(f"console:  {base}/console", flush=True)
        print(f"token:    {token}", flush=True)
        print(
            f"a simulated call now and every {args.every:g} s (each up to {args.call_seconds:g} s); "
            "End call in the console hangs one up. Ctrl-C stops.",
            flush=True,
        )
        said = caller_audio()
        keys = [(DIGITS_AT_S + 0.5 * i, digit) for i, digit in enumerate(ORDER_DIGITS)]
        placed = 0

        async def place_calls() -> None:
            nonlocal placed
            async with trio.open_nursery() as calls:
                while args.calls == 0 or placed < args.calls:
                    call_sid = new_sid("CA")
                    rest.add_live_call(call_sid, to="+14155550100", from_="+14155550123")
                    plan = CallPlan(
                        call_sid=call_sid,
                        caller_audio=said,
                        dtmf=[(at, digit) for at, digit in keys if at < args.call_seconds],
                        speed=args.speed,
                        hangup_after_s=args.call_seconds,
                        max_call_s=args.call_seconds + 30,
                    )
                    calls.start_soon(twilio.call, plan)
                    placed += 1
                    print(f"call {placed}: {base}/console/calls/{call_sid}", flush=True)
                    if args.calls and placed >= args.calls:
                        break
                    await trio.sleep(args.every)
            if args.exit_when_done:
                print("the last call has ended: stopping", flush=True)
                shutdown.set()

        nursery.start_soon(place_calls)
        await stopped.wait()
        print(f"stopped (exit code {exit_code})", flush=True)
        nursery.cancel_scope.cancel()
    return exit_code


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.console_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port of the bridge (default: a free one)")
    parser.add_argument("--token", default=None, help="console token, 16 characters or more (default: a random one)")
    parser.add_argument("--speed", type=_positive, default=1.0, help="time scale of the calls (1 = real time)")
    parser.add_argument("--every", type=_positive, default=60.0, help="seconds between simulated calls")
    parser.add_argument("--call-seconds", type=_positive, default=30.0, help="when the caller hangs up "
                        "(the script takes ~26 s)")
    parser.add_argument("--calls", type=int, default=0, help="stop placing calls after this many (0: never)")
    parser.add_argument("--exit-when-done", action="store_true", help="stop once the last call has ended")
    args = parser.parse_args(argv)
    token = args.token or "demo-" + secrets.token_urlsafe(18)
    records_dir = Path(tempfile.mkdtemp(prefix="bridge-console-demo-"))
    try:
        return trio.run(run, args, token, records_dir)
    except KeyboardInterrupt:  # a second Ctrl-C while draining
        return 130
    finally:
        shutil.rmtree(records_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
