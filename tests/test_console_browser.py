"""The console in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven
by Selenium, against the real server, the fake Voice Agent and simulated Twilio calls.

One browser for the module (started once, ~2 s); each test starts its own bridge. Every WebDriver
call runs in a worker thread (``trio.to_thread``): the bridge runs on this test's Trio loop, and a
blocking call on the loop would stop it from answering the browser.

Screenshots of every page at 1280x800 and 390x844 go to ``test-artifacts/console/``; the README's
docs/console-call.png is ``call-stored-desktop.png`` (see the README's Console section).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.harness import API_KEY, Running, running_bridge
from tools.fake_agent import FakeAgentConfig
from tools.fake_twilio import CallPlan, CallResult

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoAlertPresentException, UnexpectedAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
# Every wait here is on a condition; its deadline only bounds a hang (a loaded 2-core machine
# running the whole suite is slow, not broken).
HANG_S = 20.0
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts" / "console"
TOKEN = "console-browser-token-0123456789"
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="Debian's chromium and chromium-driver are needed (.ci/run installs them)",
)

XSS_SCRIPT = "<script>window.__xss = 'script'</script> hello"
XSS_IMG = '"><img src=x onerror="window.__xss = \'img\'"> there'
XSS_URL = "javascript:window.__xss='url'"


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    profile = tempfile.mkdtemp(prefix="console-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(arg)
    options.accept_insecure_certs = True  # the nginx test's throw-away certificate
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(15)
    browser.set_script_timeout(10)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Browser:
    """The WebDriver, awaited: each call in a worker thread, one at a time."""

    def __init__(self, driver: Any, base: str) -> None:
        self.driver = driver
        self.base = base

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args)

    async def open(self, path: str) -> None:
        await self.run(self.driver.get, self.base + path)

    async def js(self, script: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, script, *args)

    async def wait(self, script: str, *args: Any, timeout_s: float = HANG_S, what: str = "") -> Any:
        """Poll ``script`` (a JS expression body returning a value) until it is truthy."""
        try:
            with trio.fail_after(timeout_s):
                while True:
                    value = await self.js(script, *args)
                    if value:
                        return value
                    await trio.sleep(0.03)
        except trio.TooSlowError:
            # What the page showed instead, so a failure on a loaded CI machine says why.
            url, shown = await self.js("return [location.href, (document.body || {}).innerText || '']")
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for {what or script}; at {url} the page shows: {shown[:600]!r}"
            ) from None

    async def text(self, css: str) -> str:
        return str(await self.js("const e = document.querySelector(arguments[0]); return e ? e.textContent : ''", css))

    async def size(self, name: str) -> None:
        width, height = SIZES[name]
        await self.run(
            self.driver.execute_cdp_cmd,
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": name == "phone"},
        )

    async def shots(self, page: str) -> list[Path]:
        """A screenshot of the current page at both sizes; asserts nothing overflows sideways and
        every control has a name."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert await self.unnamed_controls() == [], f"{page}: controls without an accessible name"
        paths = []
        for name in SIZES:
            await self.size(name)
            await self.wait("return matchMedia(`(width: ${arguments[0]}px)`).matches", SIZES[name][0],
                            what=f"the layout at {name} width")  # the media queries' width: a scrollbar is in it
            await self.next_frame()
            # Against the layout width the page asked for (clientWidth): a phone browser widens
            # window.innerWidth to fit content that overflows, and then shows the page zoomed out.
            overflow = await self.js("const d = document.documentElement; return d.scrollWidth - d.clientWidth")
            assert overflow <= 1, f"{page} at {name}: the page is {overflow} px wider than the screen"
            path = ARTIFACTS / f"{page}-{name}.png"
            assert await self.run(self.driver.save_screenshot, str(path))
            paths.append(path)
        await self.size("desktop")
        return paths

    async def next_frame(self) -> None:
        """Returns once the page has drawn a frame after this call (so a screenshot shows it)."""
        await self.run(self.driver.execute_async_script,
                       "const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(() => done()))")

    async def unnamed_controls(self) -> list[str]:
        """Controls that Chromium's accessibility tree gives no name (what a screen reader says)."""
        tree = await self.run(self.driver.execute_cdp_cmd, "Accessibility.getFullAXTree", {})
        roles = {"button", "link", "textbox", "searchbox", "combobox", "checkbox", "radio", "slider", "menuitem"}
        unnamed = []
        for node in tree["nodes"]:
            role = (node.get("role") or {}).get("value")
            if node.get("ignored") or role not in roles:
                continue
            if not str((node.get("name") or {}).get("value") or "").strip():
                unnamed.append(f"{role} (backend node {node.get('backendDOMNodeId')})")
        return unnamed

    async def press(self, key: str) -> None:
        def send() -> None:
            # A key that opens a confirm() ends the action with this error; the caller answers it.
            with contextlib.suppress(UnexpectedAlertPresentException):
                ActionChains(self.driver).send_keys(key).perform()

        await self.run(send)

    async def tab_to(self, css: str, limit: int = 40) -> None:
        """Press Tab until ``css`` has the focus; asserts the focus is drawn (outline)."""
        for _ in range(limit):
            await self.press(Keys.TAB)
            if await self.js("return document.activeElement.matches(arguments[0])", css):
                style = await self.js("const s = getComputedStyle(document.activeElement); "
                                      "return [s.outlineStyle, parseFloat(s.outlineWidth)]")
                assert style[0] != "none" and style[1] >= 2, f"the focus on {css} is not visible: {style}"
                return
        raise AssertionError(f"{limit} presses of Tab never reached {css}")

    async def sign_in(self, token: str = TOKEN) -> None:
        await self.open("/console")
        field = await self.run(self.driver.find_element, By.ID, "token")
        await self.run(field.send_keys, token + Keys.ENTER)  # Enter submits the form

    async def accept_confirm(self) -> str:
        def accept() -> str:
            alert = self.driver.switch_to.alert
            text = str(alert.text)
            alert.accept()
            return text

        with trio.fail_after(HANG_S):
            while True:
                try:
                    return await self.run(accept)
                except NoAlertPresentException:
                    await trio.sleep(0.03)

    async def no_script_ran(self) -> None:
        assert await self.js("return typeof window.__xss") == "undefined", "an injected script ran"


async def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    try:
        with trio.fail_after(timeout_s):
            while not check():
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


async def live_record(bridge: Running, call_sid: str, timeout_s: float = HANG_S) -> dict[str, Any]:
    records = bridge.app.records
    assert records is not None
    await wait_until(lambda: records.live(call_sid) is not None, timeout_s, f"the live record of {call_sid}")
    record = records.live(call_sid)
    assert record is not None
    return record


# Truthy once the duration on the card ``arguments[0]`` went up with no event about the call in
# between: every event about a call re-renders its card's transcript (a childList mutation once it
# has a turn, as here), so a change seen while no mutation was counted is the page's own tick.
# An event restarts the watch. Checked: with the page's timers cleared, this wait times out.
TICKS_BY_ITSELF = """
const card = document.querySelector(arguments[0]);
if (!card) return false;
const seconds = (text) => /^\\d+:\\d\\d$/.test(text) ? text.split(':').reduce((a, b) => a * 60 + Number(b), 0) : null;
const shown = card.querySelector('.duration').textContent;
let w = window.__ticks;
if (!w || w.card !== card) {
  w = window.__ticks = {card, events: 0, seen: -1, first: null};
  new MutationObserver((records) => { w.events += records.length; })
    .observe(card.querySelector('.transcript'), {childList: true});
}
if (w.seen !== w.events || w.first === null) {
  w.seen = w.events;
  w.first = seconds(shown);
  return false;
}
const now = seconds(shown);
return now !== null && now > w.first;
"""


def sid(n: int) -> str:
    return "CA" + f"{n:x}" * 32


def env() -> dict[str, str]:
    return {"CONSOLE_TOKEN": TOKEN}


# --------------------------------------------------------------------------------------------


async def test_sign_in_wrong_then_right_token_with_the_enter_key(driver: Any) -> None:
    async with running_bridge(env=env()) as bridge:
        browser = Browser(driver, bridge.http_base)
        await browser.open("/console")
        assert await browser.js("return document.activeElement.id") == "token"  # focus is in the field
        assert await browser.js("return document.querySelector('label[for=token]').textContent") == "Console token"
        await browser.shots("sign-in")
        await browser.sign_in("console-browser-token-wrong-wrong")
        await browser.wait("return !document.getElementById('sign-in-error').hidden", what="the error")
        assert "not right" in await browser.text("#sign-in-error")
        assert await browser.js("return document.querySelector('meta[name=csrf-token]')") is None
        await browser.sign_in()
        await browser.wait("return document.body.dataset.page === 'live'", what="the live page")
        await browser.wait("return document.getElementById('stream-status')?.textContent === 'live'",
                           what="the event stream")
        cookie = await browser.run(driver.get_cookie, "console_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["secure"]
        assert await browser.js("return document.cookie") == ""  # HttpOnly: scripts cannot read it


async def test_a_live_call_appears_streams_its_transcript_and_end_call_hangs_it_up(driver: Any) -> None:
    config = FakeAgentConfig(api_key=API_KEY, vad=False, speed=4.0)
    call_sid = sid(1)
    async with running_bridge(agent_config=config, env=env(), with_rest=True) as bridge:
        browser = Browser(driver, bridge.http_base)
        await browser.sign_in()
        await browser.wait("return document.getElementById('stream-status')?.textContent === 'live'",
                           what="the event stream")
        assert bridge.rest is not None
        bridge.rest.add_live_call(call_sid, to="+14155550100", from_="+14155550123")
        result: list[CallResult] = []
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                plan = CallPlan(call_sid=call_sid, speed=1.0, max_call_s=30.0)
                result.append(await bridge.twilio.call(plan))

            t0 = trio.current_time()
            nursery.start_soon(call)
            card = f"li.card[data-call-sid='{call_sid}']"
            await browser.wait(f"return document.querySelector(\"{card}\")", timeout_s=3, what="the live card")
            appeared_s = trio.current_time() - t0
            assert appeared_s < 1.0, f"the live call appeared after {appeared_s:.2f} s"
            head = await browser.text(f"{card} .card-head")
            assert call_sid in head
            assert "inbound" in await browser.text(f"{card} .meta")

            session = await bridge.agent.wait_for_session(1)
            await browser.wait(f"return document.querySelector(\"{card} .turn.agent\")", what="the greeting turn")
            t1 = trio.current_time()
            await bridge.agent.user_turn(session.session_id, "Where is my parcel, please?")
            await browser.wait(
                f"return [...document.querySelectorAll(\"{card} .turn.caller\")].some("
                "t => t.textContent.includes('Where is my parcel'))",
                what="the caller's turn",
            )
            assert trio.current_time() - t1 < 1.0
            activities = {"connecting", "greeting", "listening", "agent speaking", "tool running", "ending"}
            assert (await browser.text(f"{card} .activity")) in activities
            await browser.wait(TICKS_BY_ITSELF, card, what="the live card's duration to tick between events")
            await browser.shots("live")

            # With the keyboard only: Tab to the card's End call button, Enter, confirm.
            await browser.tab_to(f"{card} button.danger")
            assert call_sid in (await browser.js("return document.activeElement.getAttribute('aria-label')"))
            await browser.press(Keys.ENTER)
            assert call_sid in await browser.accept_confirm()
            await wait_until(
                lambda: any(r.method == "POST" and call_sid in r.path and ("Status", "completed") in r.form
                            for r in bridge.rest.requests),  # type: ignore[union-attr]
                HANG_S, "the hang-up at Twilio's REST API",
            )
            await browser.wait(f"return !document.querySelector(\"{card}\")", what="the card to go")
        assert result and result[0].ended_by != "timeout"
        assert call_sid in await browser.text("#ended-list")
        await browser.open("/console/past")
        await browser.wait(f"return document.querySelector(\"tr[data-call-sid='{call_sid}']\")",
                           what="the call in the past list")


async def test_past_call_said_vs_heard_tool_latency_chart_and_search(driver: Any) -> None:
    # Word timings right after each reply's first audio (as the service may send them), so an
    # interrupted reply's text is longer than what the caller heard.
    config = FakeAgentConfig(
        api_key=API_KEY, vad=False, speed=1.0, word_deltas="first_audio",
        tool_on_turn={1: ("generate_random_number", {"min": 1, "max": 10})},
    )
    call_sid = sid(2)
    async with running_bridge(agent_config=config, env=env()) as bridge:
        browser = Browser(driver, bridge.http_base)
        await browser.sign_in()

        def live() -> dict[str, Any]:
            record = bridge.app.records.live(call_sid)
            return record or {"activity": "", "tools": [], "turns": []}

        async def script() -> None:
            session = await bridge.agent.wait_for_session(1)
            await live_record(bridge, call_sid)
            await trio.sleep(1.2)  # the first second of the greeting is heard, then the caller barges in
            await bridge.agent.barge_in(session.session_id)
            await bridge.agent.user_turn(session.session_id, "Pick a number between one and ten")
            await wait_until(lambda: live()["tools"] != [], HANG_S, "the tool call")
            await wait_until(lambda: any(t.get("response_ms") is not None for t in live()["turns"]), HANG_S,
                             "the answer")
            await wait_until(lambda: live()["activity"] == "listening", HANG_S, "the answer's end")
            await bridge.agent.user_turn(session.session_id, "Actually never mind the parcel")
            await wait_until(lambda: len(live()["turns"]) >= 6 and live()["activity"] == "agent speaking", HANG_S,
                             "the last reply")
            await trio.sleep(0.3)
            bridge.twilio.request_hangup(call_sid)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(script)
            with trio.fail_after(40):
                await bridge.twilio.call(CallPlan(call_sid=call_sid, speed=1.0, max_call_s=40.0))

        await browser.open("/console/past?q=never+mind")
        row = f"tr[data-call-sid='{call_sid}']"
        await browser.wait(f"return document.querySelector(\"{row}\")", what="the search hit")
        assert await browser.js("return document.getElementById('f-q').value") == "never mind"
        await browser.shots("past")
        await browser.open("/console/past?q=no+such+words+anywhere")
        await browser.wait("return document.getElementById('past-status').textContent.includes('No calls match')",
                           what="an empty search")
        await browser.open("/console/past?q=never+mind")
        await browser.wait(f"return document.querySelector(\"{row} a\")", what="the row's link")
        await browser.js(f"document.querySelector(\"{row} a\").click()")
        await browser.wait("return document.querySelectorAll('#call-turns .turn').length >= 5", what="the turns")
        assert await browser.js("return location.pathname") == f"/console/calls/{call_sid}"
        unheard = await browser.js("return [...document.querySelectorAll('#call-turns del.unheard')]"
                                   ".map(d => d.textContent)")
        record = await browser.js("return fetch(arguments[0]).then(r => r.json())", f"/api/calls/{call_sid}")
        interrupted = [t for t in record["turns"] if t["speaker"] == "agent" and t["interrupted"]]
        assert interrupted, "the barge-in left no interrupted reply in the record"
        cut = [t for t in interrupted if t["text"] != t["heard_text"] and t["text"].startswith(t["heard_text"])]
        unheard = await browser.js("return [...document.querySelectorAll('#call-turns del.unheard')]"
                                   ".map(d => d.textContent)")
        assert [u.replace(" (not heard:) ", "") for u in unheard] == [t["text"][len(t["heard_text"]) :] for t in cut]
        assert cut, "an interrupted reply whose unheard words are not in the record"
        metas = await browser.js("return [...document.querySelectorAll('#call-turns .turn.agent .turn-meta')]"
                                 ".map(m => m.textContent)")
        assert sum("interrupted after" in m for m in metas) == len(interrupted)
        tool = await browser.text("#call-tools .tool")
        assert "generate_random_number" in tool and '"max": 10' in tool and " ms" in tool
        bars = await browser.js("return [...document.querySelectorAll('#latency-svg rect.bar')]"
                                ".map(r => Number(r.dataset.ms))")
        assert len(bars) >= 2 and all(ms >= 0 for ms in bars)
        facts = await browser.text("#call-facts")
        assert "Upstream seconds" in facts and "caller hung up" in facts
        json_href = await browser.js("return document.getElementById('call-json').getAttribute('href')")
        assert json_href == f"/api/calls/{call_sid}"
        await browser.shots("call")


async def test_hostile_transcripts_render_as_text_and_run_nothing(driver: Any) -> None:
    config = FakeAgentConfig(api_key=API_KEY, vad=False, speed=4.0, reply_text=f"{XSS_IMG} {XSS_URL}")
    call_sid = sid(3)
    async with running_bridge(agent_config=config, env=env()) as bridge:
        browser = Browser(driver, bridge.http_base)
        await browser.sign_in()
        await browser.wait("return document.getElementById('stream-status')?.textContent === 'live'",
                           what="the event stream")
        card = f"li.card[data-call-sid='{call_sid}']"

        async def script() -> None:
            session = await bridge.agent.wait_for_session(1)
            await live_record(bridge, call_sid)
            for text in (XSS_SCRIPT, XSS_IMG, XSS_URL):
                await bridge.agent.user_turn(session.session_id, text)
                await trio.sleep(0.3)
            await browser.wait(
                f"return [...document.querySelectorAll(\"{card} .turn.agent\")].some("
                "t => t.textContent.includes('javascript:'))",
                what="the hostile reply on the live card",
            )
            bridge.twilio.request_hangup(call_sid)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(script)
            with trio.fail_after(30):
                await bridge.twilio.call(CallPlan(call_sid=call_sid, speed=1.0, max_call_s=30.0))
        await browser.no_script_ran()
        await browser.open(f"/console/calls/{call_sid}")
        await browser.wait("return document.querySelectorAll('#call-turns .turn.caller').length >= 3",
                           what="the caller's turns")
        caller = await browser.js("return [...document.querySelectorAll('#call-turns .turn.caller .said')]"
                                  ".map(t => t.textContent)")
        for text in (XSS_SCRIPT, XSS_IMG, XSS_URL):
            assert text in caller  # the characters themselves, as text
        agent = await browser.text("#call-turns")
        assert XSS_IMG in agent and XSS_URL in agent
        assert await browser.js("return document.querySelectorAll('main img, main script, main [onerror]').length") == 0
        hrefs = await browser.js("return [...document.querySelectorAll('a')].map(a => a.getAttribute('href'))")
        assert not [h for h in hrefs if h and not h.startswith(("/", "#main"))], hrefs  # our own URLs only
        await trio.sleep(0.2)
        await browser.no_script_ran()


def stored_record(call_sid: str, audio_path: Path) -> dict[str, Any]:
    """A finished record as the records issue defines it, with a barge-in, a tool and audio."""
    at = "2026-12-01T10:00:0{}.000Z".format
    return {
        "call_sid": call_sid, "call_id": "c-stored", "direction": "outbound", "from": "***23", "to": "***00",
        "started_at": at(0), "ended_at": at(9), "duration_s": 9.0, "outcome": "agent_ended",
        "reason": "end_call tool", "live": False, "agent_session_ids": ["sess_a", "sess_b"],
        "upstream_open_s": 8.5, "frames": {}, "custom_parameters": {}, "audio_path": str(audio_path),
        "turns": [
            {"speaker": "agent", "text": "Hello there.", "started_at": at(0), "reply_id": "r0",
             "heard_text": "Hello there.", "heard_ms": 900, "said_ms": 900, "interrupted": False,
             "response_ms": None, "first_audio_ms": 640},
            {"speaker": "caller", "text": "When does order A-1042 arrive?", "started_at": at(2)},
            {"speaker": "agent", "text": "It ships on Monday and arrives on Tuesday.", "started_at": at(3),
             "reply_id": "r1", "heard_text": "It ships on Monday", "heard_ms": 1200, "said_ms": 2400,
             "interrupted": True, "response_ms": 1830, "first_audio_ms": None},
            {"speaker": "caller", "text": "Thanks, bye", "started_at": at(5)},
            {"speaker": "agent", "text": "Goodbye!", "started_at": at(6), "reply_id": "r2",
             "heard_text": "Goodbye!", "heard_ms": 700, "said_ms": 700, "interrupted": False,
             "response_ms": 420, "first_audio_ms": None},
        ],
        "tools": [{"tool_call_id": "t1", "name": "get_order_status", "arguments": {"order_id": "A-1042"},
                   "result": '{"status": "shipped"}', "is_error": False, "started_at": at(3), "duration_ms": 35}],
        "dtmf": [{"digit": "***", "at": at(4)}], "errors": [], "truncated": {},
    }


async def test_a_stored_record_strike_through_chart_values_and_the_recording(driver: Any, tmp_path: Path) -> None:
    call_sid = sid(4)
    wav = tmp_path / "call.wav"
    wav.write_bytes(b"RIFF" + (36).to_bytes(4, "little") + b"WAVEfmt " + bytes(24) + b"data" + bytes(4))
    async with running_bridge(env=env()) as bridge:
        store = bridge.app.record_store
        assert store is not None
        await store.ready.wait()
        store.submit(stored_record(call_sid, wav))
        with trio.fail_after(HANG_S):
            while await store.get(call_sid) is None:
                await trio.sleep(0.02)
        browser = Browser(driver, bridge.http_base)
        await browser.sign_in()
        await browser.open(f"/console/calls/{call_sid}")
        await browser.wait("return document.querySelectorAll('#call-turns .turn').length === 5", what="the turns")
        struck = await browser.js("return [...document.querySelectorAll('#call-turns del.unheard')].map(d => "
                                  "d.lastChild.textContent)")
        assert struck == [" and arrives on Tuesday."]
        heard = await browser.text("#call-turns .turn.agent:nth-of-type(3) .heard")
        assert heard == "It ships on Monday"
        bars = await browser.js("return [...document.querySelectorAll('#latency-svg rect.bar')].map(r => "
                                "[Number(r.dataset.ms), r.getAttribute('class')])")
        assert bars == [[640, "bar greeting"], [1830, "bar slow"], [420, "bar"]]
        assert "turn 3: 1830 ms" in await browser.js("return document.getElementById('latency-svg')"
                                                    ".getAttribute('aria-label')")
        labels = await browser.js("const svg = document.getElementById('latency-svg'); "
                                  "return [...svg.querySelectorAll('text')].map(t => { const b = t.getBBox(); "
                                  "return [t.textContent, b.x >= 0 && b.x + b.width <= svg.viewBox.baseVal.width]; })")
        assert ["2000 ms", True] in labels  # the scale: the slowest reply rounded up to 500 ms
        assert all(inside for _, inside in labels), labels  # no label cut off at the chart's edge
        assert "get_order_status" in await browser.text("#call-tools") and "35 ms" in await browser.text("#call-tools")
        assert "sess_a, sess_b" in await browser.text("#call-facts") and "8.5 s" in await browser.text("#call-facts")
        assert await browser.text("#call-dtmf") == "***"
        src = await browser.js("return document.getElementById('recording').getAttribute('src')")
        assert src == f"/console/calls/{call_sid}/recording"
        got = await browser.js(
            "return Promise.all([fetch(arguments[0]), fetch(arguments[0], {credentials: 'omit'})])"
            ".then(rs => rs.map(r => [r.status, r.headers.get('content-type')]))", src)
        assert got == [[200, "audio/wav"], [401, "application/json"]]
        await browser.no_script_ran()
        await browser.js("window.scrollTo(0, 0)")
        await browser.shots("call-stored")  # the README's docs/console-call.png


async def test_behind_nginx_the_event_stream_is_not_buffered(driver: Any, tmp_path: Path) -> None:
    from tests.test_deploy import _free_port, nginx_proxy

    config = FakeAgentConfig(api_key=API_KEY, vad=False, speed=4.0)
    call_sid = sid(5)
    async with running_bridge(agent_config=config, env=env()) as bridge:
        port = _free_port()
        async with nginx_proxy(tmp_path, port, webhooks=[bridge.port], streams=[bridge.port]):
            browser = Browser(driver, f"https://127.0.0.1:{port}")
            await browser.sign_in()
            await browser.wait("return document.getElementById('stream-status')?.textContent === 'live'",
                               what="the event stream through nginx")
            card = f"li.card[data-call-sid='{call_sid}']"
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    await bridge.twilio.call(CallPlan(call_sid=call_sid, speed=1.0, max_call_s=30.0))

                t0 = trio.current_time()
                nursery.start_soon(call)
                await browser.wait(f"return document.querySelector(\"{card}\")", timeout_s=3, what="the card")
                assert trio.current_time() - t0 < 1.0
                session = await bridge.agent.wait_for_session(1)
                t1 = trio.current_time()
                await bridge.agent.user_turn(session.session_id, "Through the proxy")
                await browser.wait(
                    f"return [...document.querySelectorAll(\"{card} .turn.caller\")].some("
                    "t => t.textContent.includes('Through the proxy'))",
                    what="the caller's turn through nginx",
                )
                assert trio.current_time() - t1 < 1.0  # one small event arrived at once: not buffered
                bridge.twilio.request_hangup(call_sid)
            await browser.wait(f"return !document.querySelector(\"{card}\")", what="the card to go")


async def test_a_restart_signs_the_browser_out_unless_console_session_secret_is_set(driver: Any) -> None:
    # Two bridges one after the other are a restart: a new process, a new port on the same host
    # (a cookie is per host, not per port, so the browser sends the first one's cookie).
    await browser_quietly_signed_out(driver)
    for shared, expected in ((None, "sign-in"), ("console-browser-session-secret-0123456789", "live")):
        extra = {"CONSOLE_SESSION_SECRET": shared} if shared else {}
        async with running_bridge(env=env() | extra) as before:
            browser = Browser(driver, before.http_base)
            await browser.sign_in()
            await browser.wait("return document.body.dataset.page === 'live'", what="the live page")
        async with running_bridge(env=env() | extra) as after:
            browser = Browser(driver, after.http_base)
            assert await browser.run(driver.get_cookie, "console_session")  # still in the browser
            await browser.open("/console")
            await browser.wait("return document.readyState === 'complete'", what="the page")
            page = await browser.js("return document.getElementById('token') ? 'sign-in' : document.body.dataset.page")
            assert page == expected, f"after a restart with CONSOLE_SESSION_SECRET={shared!r}"
        await browser_quietly_signed_out(driver)


async def browser_quietly_signed_out(driver: Any) -> None:
    await trio.to_thread.run_sync(driver.delete_all_cookies)


async def test_sensitive_keypad_digits_never_reach_the_console(driver: Any) -> None:
    # Issue 15: digits collected with sensitive: true appear in no page, live or past, and in
    # no event the page receives; the keys show as masked. Watched on the live call's own page,
    # whose duration ticks and which turns into the ended call's page by itself.
    from bridge.call.keypad import TOOL_NAME as COLLECT_DIGITS

    config = FakeAgentConfig(api_key=API_KEY, vad=False, speed=4.0)
    call_sid = sid(6)
    digits = "4417"
    async with running_bridge(agent_config=config, env=env()) as bridge:
        browser = Browser(driver, bridge.http_base)
        await browser.sign_in()
        plan = CallPlan(call_sid=call_sid, speed=1.0, max_call_s=30.0,
                        dtmf=[(3.0 + 0.3 * i, d) for i, d in enumerate(digits)])
        duration = "return document.querySelector('#call-facts dd[data-fact=Duration]').textContent"

        async def script() -> None:
            session = await bridge.agent.wait_for_session(1)
            await live_record(bridge, call_sid)
            await browser.open(f"/console/calls/{call_sid}")
            await browser.wait("return document.getElementById('call-facts').textContent.includes('live')",
                               what="the live call's page")
            # Everything a page is sent, as it arrives (a second EventSource, as the page's own).
            await browser.js("window.__events = []; const s = new EventSource('/api/events'); "
                             "s.onmessage = (m) => window.__events.push(m.data);")
            assert await browser.js("return document.getElementById('call-hangup').hidden") is False
            await bridge.agent.tool_call(session.session_id, COLLECT_DIGITS, {"max_digits": 4, "sensitive": True})
            first = await browser.js(duration)
            await browser.wait("return document.querySelector('#call-facts dd[data-fact=Status]').textContent"
                               " === 'live · tool running'", what="the keypad collection as a running tool")
            await wait_until(lambda: bool(session.tool_results), HANG_S, "the digits' tool result")
            assert session.tool_results[0]["result"] == f'{{"digits": "{digits}"}}'  # the agent got them
            await browser.wait("return !document.getElementById('dtmf-box').hidden", what="the keys, live")
            await browser.wait(f"return ({duration.removeprefix('return ')}) !== arguments[0]", first,
                               what="the live call page's duration to tick")
            # The events about the finished collection have reached the page before the hang-up.
            await browser.wait("return window.__events.some(e => { const v = JSON.parse(e); return v.type === "
                               "'tool' && v.tool.name === arguments[0] && typeof v.tool.duration_ms === 'number'; })",
                               COLLECT_DIGITS, what="the finished collection's tool event")
            bridge.twilio.request_hangup(call_sid)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(script)
            with trio.fail_after(30):
                await bridge.twilio.call(plan)
        # The page turned into the ended call's, without a reload.
        await browser.wait("return document.querySelector('#call-facts dd[data-fact=Status]').textContent === 'ended'",
                           what="the call to end on its page")
        assert await browser.js("return document.getElementById('call-hangup').hidden") is True
        events = "\n".join(await browser.js("return window.__events"))
        assert COLLECT_DIGITS in events and digits not in events
        assert digits not in await browser.js("return document.body.innerText")
        await browser.open(f"/console/calls/{call_sid}")
        await browser.wait("return !document.getElementById('dtmf-box').hidden", what="the keys")
        keys = (await browser.text("#call-dtmf")).split(" ")
        assert len(keys) == 4 and all(set(k) == {"*"} for k in keys), keys  # four keys, each masked
        assert COLLECT_DIGITS in await browser.text("#call-tools")
        assert digits not in await browser.js("return document.body.innerText")
        record = await browser.js("return fetch(arguments[0]).then(r => r.text())", f"/api/calls/{call_sid}")
        assert COLLECT_DIGITS in record and digits not in record
        await browser.no_script_ran()


async def test_past_calls_pages_and_filters_by_outcome_and_dates(driver: Any, tmp_path: Path) -> None:
    # 25 stored calls, one a day from 2026-11-01 at 10:00 UTC; every third one ended by the agent.
    def day(n: int) -> str:
        return f"2026-11-{n + 1:02d}"

    calls = []
    for n in range(25):
        record = stored_record("CA" + f"{n:032x}", tmp_path / "none.wav")
        record.update(
            started_at=f"{day(n)}T10:00:00.000Z", ended_at=f"{day(n)}T10:00:09.000Z",
            outcome="agent_ended" if n % 3 == 0 else "caller_hung_up", audio_path=None,
        )
        calls.append(record)
    newest_first = [c["call_sid"] for c in reversed(calls)]
    async with running_bridge(env=env()) as bridge:
        store = bridge.app.record_store
        assert store is not None
        await store.ready.wait()
        for record in calls:
            store.submit(record)
        # Written, not only held: a page lists the held records that belong on it as well as its
        # 20 rows (store.merge_held), and this test is about paging the stored ones.
        await wait_until(lambda: store.pending == 0, HANG_S, "the 25 records to be written")
        browser = Browser(driver, bridge.http_base)
        await browser.sign_in()
        rows = "return [...document.querySelectorAll('#past-rows tr')].map(r => r.dataset.callSid)"

        await browser.open("/console/past")
        await browser.wait("return document.querySelectorAll('#past-rows tr').length > 0", what="the first page")
        assert await browser.js(rows) == newest_first[:20]  # newest first, 20 a page
        assert await browser.js("return document.getElementById('page-first').hidden") is True
        await browser.tab_to("#page-older")  # the keyboard reaches the next page...
        await browser.press(Keys.ENTER)  # ...and opens it
        await browser.wait("return location.search.includes('before=') && "
                           "document.querySelectorAll('#past-rows tr').length === 5", what="the second page")
        assert await browser.js(rows) == newest_first[20:]
        assert await browser.js("return [document.getElementById('page-older').hidden, "
                                "document.getElementById('page-first').hidden]") == [True, False]

        # Outcome and a date range, chosen in the form and applied.
        await browser.open("/console/past")
        await browser.wait("return document.querySelectorAll('#past-rows tr').length === 20", what="the list")
        await browser.js("document.getElementById('f-outcome').value = 'agent_ended'; "
                         "document.getElementById('f-since').value = arguments[0]; "
                         "document.getElementById('f-until').value = arguments[1]; "
                         "document.querySelector('#filters button[type=submit]').click()", day(3), day(12))
        await browser.wait("return location.search.includes('outcome=agent_ended')", what="the filtered page")
        await browser.wait("return document.getElementById('past-status').textContent === '' && "
                           "document.querySelectorAll('#past-rows tr').length > 0", what="the filtered rows")
        expected = [c["call_sid"] for c in reversed(calls[3:13]) if c["outcome"] == "agent_ended"]
        assert await browser.js(rows) == expected  # days 4, 7, 10 and 13 (the "to" day included)
        assert await browser.js("return [document.getElementById('f-outcome').value, "
                                "document.getElementById('f-since').value]") == ["agent_ended", day(3)]
        await browser.shots("past-filtered")
