"""The console over HTTP through the real server: off without CONSOLE_TOKEN, sign-in, the session
cookie, security headers, the SSE stream, hang-up auth; and static checks of the console files.

The browser tests are in tests/test_console_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from bridge.call.actions import Outcome
from bridge.console import STATIC_DIR
from bridge.web.console import COOKIE, CSP, EventStream
from tests.harness import Running, running_bridge

TOKEN = "console-test-token-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


@asynccontextmanager
async def console_bridge(**env: str) -> AsyncIterator[tuple[Running, httpx.AsyncClient]]:
    async with (
        running_bridge(env={"CONSOLE_TOKEN": TOKEN, **env}) as bridge,
        httpx.AsyncClient(base_url=bridge.http_base, timeout=5) as http,
    ):
        yield bridge, http


async def sign_in(http: httpx.AsyncClient, token: str = TOKEN, next_path: str = "/console") -> httpx.Response:
    """POST the sign-in form; the session cookie goes into the client's jar even though the
    client talks plain HTTP to the loopback port (the public URL is https, so it is Secure)."""
    response = await http.post("/console/sign-in", data={"token": token, "next": next_path})
    match = re.match(rf"{COOKIE}=([^;]*)", response.headers.get("set-cookie", ""))
    if match and match.group(1):
        http.cookies.clear()
        http.cookies.set(COOKIE, match.group(1))
    return response


def csrf_of(page: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([0-9a-f]{32})">', page)
    assert match, page[:400]
    return match.group(1)


async def test_without_console_token_everything_is_404() -> None:
    async with running_bridge() as bridge, httpx.AsyncClient(base_url=bridge.http_base) as http:
        for method, path in [
            ("GET", "/console"),
            ("GET", "/console/past"),
            ("GET", "/console/static/console.js"),
            ("POST", "/console/sign-in"),
            ("GET", "/api/events"),
            ("POST", "/api/calls/CA" + "1" * 32 + "/hangup"),
        ]:
            response = await http.request(method, path, headers=HEADERS)
            assert response.status_code == 404, (method, path)
            assert "csrf" not in response.text


async def test_no_cookie_gives_the_sign_in_page_only_with_strict_headers() -> None:
    async with console_bridge() as (_, http):
        for path in ("/console", "/console/past", "/console/calls/CA" + "2" * 32):
            page = await http.get(path)
            assert page.status_code == 401
            assert 'type="password"' in page.text and 'name="token"' in page.text
            assert "csrf-token" not in page.text and "console.js" not in page.text  # no data, no app
            assert page.headers["content-security-policy"] == CSP
            assert page.headers["x-content-type-options"] == "nosniff"
            assert page.headers["referrer-policy"] == "no-referrer"
        assert "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP and "script-src 'self'" in CSP
        assert (await http.get("/api/events")).status_code == 401
        assert (await http.get("/console/static/console.css")).status_code == 200  # assets hold no data


async def test_wrong_token_is_401_and_sets_no_cookie() -> None:
    async with console_bridge() as (_, http):
        response = await sign_in(http, "console-test-token-012345678X")
        assert response.status_code == 401
        assert "set-cookie" not in response.headers
        assert "not right" in response.text and "csrf-token" not in response.text
        assert (await http.get("/console")).status_code == 401


async def test_sign_in_sets_a_strict_httponly_secure_cookie_and_the_page_has_a_csrf_token() -> None:
    async with console_bridge() as (_, http):
        response = await sign_in(http, next_path="/console/past")
        assert response.status_code == 303 and response.headers["location"] == "/console/past"
        cookie = response.headers["set-cookie"]
        assert cookie.startswith(COOKIE + "=v1.")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert "Secure" in cookie  # the public URL is https
        page = await http.get("/console")
        assert page.status_code == 200 and 'data-page="live"' in page.text
        csrf_of(page.text)
        assert '<script src="/console/static/console.js" defer></script>' in page.text
        assert page.headers["content-security-policy"] == CSP


async def test_no_secure_flag_on_plain_http_and_next_is_only_our_own_pages() -> None:
    async with console_bridge(HOSTNAME="http://localhost:3000") as (_, http):
        for asked in ("https://evil.example/", "//evil.example", "/console/../metrics", "javascript:alert(1)"):
            response = await sign_in(http, next_path=asked)
            assert response.headers["location"] == "/console", asked
        assert "Secure" not in response.headers["set-cookie"]


async def test_a_restart_invalidates_sessions_unless_the_secret_is_set() -> None:
    async with console_bridge() as (_, http):
        await sign_in(http)
        cookie = http.cookies[COOKIE]
    async with console_bridge() as (_, http):
        http.cookies.set(COOKIE, cookie)
        assert (await http.get("/console")).status_code == 401  # a new random secret
    secret = {"CONSOLE_SESSION_SECRET": "a-shared-session-secret-0123456789"}
    async with console_bridge(**secret) as (_, http):
        await sign_in(http)
        cookie = http.cookies[COOKIE]
    async with console_bridge(**secret) as (_, http):
        http.cookies.set(COOKIE, cookie)
        assert (await http.get("/console")).status_code == 200


async def test_sign_out_needs_the_csrf_token_and_clears_the_cookie() -> None:
    async with console_bridge() as (_, http):
        await sign_in(http)
        csrf = csrf_of((await http.get("/console")).text)
        assert (await http.post("/console/sign-out", data={"csrf": "0" * 32})).status_code == 403
        out = await http.post("/console/sign-out", data={"csrf": csrf})
        assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
        http.cookies.clear()  # what the browser does with Max-Age=0 (httpx keeps a Secure one over http)
        assert (await http.get("/console")).status_code == 401


async def test_hang_up_auth_csrf_and_unknown_calls() -> None:
    sid = "CA" + "3" * 32
    async with console_bridge() as (_, http):
        path = f"/api/calls/{sid}/hangup"
        assert (await http.post(path)).status_code == 401
        assert (await http.post(path, headers={"Authorization": "Bearer wrong-token-0123456789"})).status_code == 401
        bearer = await http.post(path, headers=HEADERS)
        assert bearer.status_code == 404 and bearer.json()["call_sid"] == sid  # not live here
        await sign_in(http)
        csrf = csrf_of((await http.get("/console")).text)
        assert (await http.post(path)).status_code == 403  # the cookie alone is not enough
        assert (await http.post(path, headers={"X-CSRF-Token": "f" * 32})).status_code == 403
        assert (await http.post(path, headers={"X-CSRF-Token": csrf})).status_code == 404
        assert bearer.headers["content-security-policy"] == CSP


async def read_events(response: httpx.Response, until: Any, limit_s: float = 5.0) -> list[dict[str, Any]]:
    """SSE events (JSON) from a streaming response until ``until(events)`` is true."""
    events: list[dict[str, Any]] = []
    buffer = ""
    with trio.fail_after(limit_s):
        async for chunk in response.aiter_text():
            buffer += chunk
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                for line in block.splitlines():
                    if line.startswith("data: "):
                        events.append(orjson.loads(line[len("data: ") :]))
                if until(events):
                    return events
    return events


async def test_events_stream_starts_with_a_snapshot_and_is_not_buffered() -> None:
    async with console_bridge() as (_, http):
        async with http.stream("GET", "/api/events", headers=HEADERS) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-accel-buffering"] == "no"
            events = await read_events(response, lambda e: bool(e))
        assert events[0]["type"] == "snapshot" and isinstance(events[0]["calls"], list)


class FakeHub:
    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[dict[str, Any]](8)
        self.entered = self.exited = 0

    def subscribe(self) -> Any:
        hub = self

        class Sub:
            def __enter__(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
                hub.entered += 1
                return hub.receive

            def __exit__(self, *exc: object) -> None:
                hub.exited += 1

        return Sub()


class FakeLive:
    def __init__(self) -> None:
        self.hub = FakeHub()

    def live(self, call_sid: str) -> dict[str, Any] | None:
        return {"call_sid": call_sid, "live": True, "turns": [{"speaker": "caller", "text": str(i)} for i in range(80)]}

    def live_summaries(self) -> list[dict[str, Any]]:
        return [{"call_sid": "CA1"}]


async def test_event_stream_snapshot_batches_heartbeat_drain_and_unsubscribes(autojump_clock: Any) -> None:
    live = FakeLive()
    drained = False
    stream = EventStream(live, lambda: drained)
    first = await stream.__anext__()
    assert first.startswith(b"retry: ")
    snapshot = orjson.loads(first.split(b"data: ", 1)[1])
    (call,) = snapshot["calls"]
    assert len(call["turns"]) == 50 and call["turns_offset"] == 30 and call["turns"][0]["text"] == "30"
    assert live.hub.entered == 1
    live.hub.send.send_nowait({"type": "turn", "n": 1})
    live.hub.send.send_nowait({"type": "turn", "n": 2})
    batch = await stream.__anext__()
    assert batch.count(b"data: ") == 2  # one write for what was waiting
    t0 = trio.current_time()
    assert await stream.__anext__() == b": keep-alive\n\n"
    assert trio.current_time() - t0 == pytest.approx(10.0)
    drained = True
    assert orjson.loads((await stream.__anext__())[len(b"data: ") :]) == {"type": "server.draining"}
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
    await stream.aclose()
    assert live.hub.exited == 1


async def test_an_unread_event_stream_holds_no_subscription() -> None:
    live = FakeLive()
    stream = EventStream(live, lambda: False)
    await stream.aclose()
    assert live.hub.entered == 0


# --- the console's files ------------------------------------------------------------------------


def test_the_console_script_never_inserts_html_or_evaluates_code() -> None:
    script = (STATIC_DIR / "console.js").read_text()
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                   "javascript:", "setTimeout(\"", "setInterval(\""):
        assert banned not in script, banned
    # Every href the script sets comes from one of our URL builders.
    for match in re.finditer(r"href[\"']?\s*[:=]\s*([^,;)}]+)", script):
        value = match.group(1).strip()
        assert value.startswith(("callUrl(", "apiCallUrl(", "pastUrl(")), value


def test_pages_have_no_inline_script_or_style_and_load_nothing_from_elsewhere() -> None:
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, path
        if path.suffix == ".html":
            assert re.findall(r"<script(?![^>]*\bsrc=)", text) == [], path
            assert "<style" not in text and " style=" not in text, path
            assert not re.search(r"\son\w+=", text), path


def test_every_outcome_is_a_filter_option() -> None:
    shell = (STATIC_DIR / "shell.html").read_text()
    for outcome in Outcome:
        assert f'<option value="{outcome.value}">' in shell, outcome


def test_every_form_control_has_a_label() -> None:
    for name in ("shell.html", "sign-in.html"):
        text = (STATIC_DIR / name).read_text()
        ids = re.findall(r"<(?:input|select|textarea)(?![^>]*type=\"hidden\")[^>]*\bid=\"([^\"]+)\"", text)
        assert ids, name
        for control in ids:
            assert f'<label for="{control}">' in text, (name, control)


def test_the_console_files_are_package_data() -> None:
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '"bridge.console" = ["static/*"]' in pyproject


def test_the_readme_console_section_shows_the_screenshot_the_browser_test_makes() -> None:
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    section = readme.split("\n## Console\n", 1)[1].split("\n## ", 1)[0]
    assert "](docs/console-call.png)" in section
    png = (root / "docs" / "console-call.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1280, 800)
    assert len(png) < 200_000  # small enough for the repository
    # The way to make it again, as the README says, is the browser test's own screenshot.
    assert "cp test-artifacts/console/call-stored-desktop.png docs/console-call.png" in section
    browser_tests = (root / "tests" / "test_console_browser.py").read_text()
    assert 'await browser.shots("call-stored")' in browser_tests
