"""`make console-demo` (tools/console_demo.py) as a newcomer runs it: a real process that prints the
console's URL and token, serves the console with that token, shows its simulated calls live,
hangs one up from the console, and stops cleanly on Ctrl-C (SIGINT) or SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from bridge.web.console import COOKIE, CSRF_HEADER

ROOT = Path(__file__).resolve().parent.parent
START_S = 30.0  # the process imports the bridge and starts three servers: ~1-2 s here
STOP_S = 20.0  # a drain with DRAIN_SECONDS=0 ends the calls at once


class Output:
    """The demo's stdout, read line by line under a deadline the caller sets."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.lines: list[str] = []

    async def line(self) -> str:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(4096)
            if not chunk:
                raise AssertionError("the demo ended its output early:\n" + "\n".join(self.lines))
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\n", 1)
        self.lines.append(raw.decode(errors="replace"))
        return self.lines[-1]

    async def until(self, pattern: str) -> re.Match[str]:
        while True:
            match = re.search(pattern, await self.line())
            if match:
                return match

    async def rest(self) -> str:
        while chunk := await self.stream.receive_some(4096):
            self.buffer += chunk
        self.lines += self.buffer.decode(errors="replace").splitlines()
        return "\n".join(self.lines)


async def events_until(http: httpx.AsyncClient, found: Any, limit_s: float) -> dict[str, Any]:
    """Read the console's event stream (as the page does, with the cookie) until ``found(event)``."""
    with trio.fail_after(limit_s):
        async with http.stream("GET", "/api/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    event = orjson.loads(line[len("data: ") :])
                    if found(event):
                        return dict(event)
    raise AssertionError("the event stream ended")


def mentions(event: dict[str, Any], call_sid: str) -> bool:
    return call_sid.encode() in orjson.dumps(event)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
async def test_console_demo_serves_its_calls_with_the_printed_token_and_stops_cleanly(how: signal.Signals) -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tools.console_demo", "--speed", "4", "--every", "60", "--call-seconds", "60"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    out = Output(proc.stdout)
    try:
        with trio.fail_after(START_S):
            base = (await out.until(r"^console:\s+(http://127\.0\.0\.1:\d+)/console$")).group(1)
            token = (await out.until(r"^token:\s+(\S+)$")).group(1)
            call_sid = (await out.until(r"^call 1: http://127\.0\.0\.1:\d+/console/calls/(CA[0-9a-f]{32})$")).group(1)
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            page = await http.get("/console")
            assert page.status_code == 401 and 'name="token"' in page.text  # sign-in first
            wrong = await http.post("/console/sign-in", data={"token": token + "x", "next": "/console"})
            assert wrong.status_code == 401 and COOKIE not in http.cookies
            signed_in = await http.post("/console/sign-in", data={"token": token, "next": f"/console/calls/{call_sid}"})
            assert signed_in.status_code == 303, signed_in.text
            assert signed_in.headers["location"] == f"/console/calls/{call_sid}"
            assert http.cookies.get(COOKIE)
            page = await http.get(f"/console/calls/{call_sid}")
            assert page.status_code == 200 and 'data-page="call"' in page.text
            csrf = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page.text)
            assert csrf

            # The call is live on the console, and its transcript arrives (the greeting at least).
            await events_until(http, lambda e: e.get("type") == "snapshot" and mentions(e, call_sid), 10)
            await events_until(http, lambda e: mentions(e, call_sid) and "Hi, thanks for calling" in str(e), 15)
            record = (await http.get(f"/api/calls/{call_sid}")).json()
            assert record["live"] is True and record["direction"] == "inbound"
            assert record["from"] != "+14155550123"  # RECORD_REDACT=From: the caller's number is masked

            if how == signal.SIGINT:
                # End call, as the page's button does: the fake Twilio REST API hangs the caller up.
                ended = await http.post(f"/api/calls/{call_sid}/hangup", headers={CSRF_HEADER: csrf.group(1)})
                assert ended.status_code == 202, ended.text
                with trio.fail_after(15):  # live record, then (briefly 404) the stored one
                    while (got := await http.get(f"/api/calls/{call_sid}")).status_code != 200 or got.json()["live"]:
                        await trio.sleep(0.1)
                record = got.json()
                assert record["ended_at"] and record["turns"]
            else:
                # The keypad entry reaches the console live; then SIGTERM while the call goes on.
                with trio.fail_after(20):
                    while not (record := (await http.get(f"/api/calls/{call_sid}")).json()).get("dtmf"):
                        await trio.sleep(0.1)
                    while len(record["dtmf"]) < 4 or not any(t["result"] for t in record["tools"][1:]):
                        await trio.sleep(0.1)
                        record = (await http.get(f"/api/calls/{call_sid}")).json()
                assert record["live"] is True
                assert [d["digit"] for d in record["dtmf"]] == list("1234")
                assert [t["name"] for t in record["tools"]] == ["generate_random_number", "collect_digits"]
                assert record["tools"][1]["result"] == '{"digits": "1234"}'

        proc.send_signal(how)
        with trio.fail_after(STOP_S):
            text = await out.rest()
            code = await proc.wait()
        assert code == 0, text
        assert "stopped (exit code 0)" in text
        assert "Traceback" not in text and "ERROR" not in text, text
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(5, shield=True):
                await proc.wait()


def test_a_bad_token_stops_the_console_demo_with_one_line_naming_the_setting() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tools.console_demo", "--token", "too-short"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("console_demo: CONSOLE_TOKEN is too short")
    assert "console:" not in proc.stdout  # nothing was served
