"""No orphans, proven (issue 7, item 5): fault injection through the real server on loopback.

Every call gets one failure of ../shared/reference/voice-agent-api.md §9 (or of Twilio's side),
all calls of a round run in parallel, and each call has a fake Voice Agent of its own (the
bridge's real upstream connector is routed per CallSid), so faults never bleed between calls.
After each round: no upstream socket open at any fake agent, no live call, no task or object of
a call left, one ``call summary`` log line per accepted stream with the expected outcome, and
(after a warm-up round) the process RSS back near its baseline.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from bridge.agent.connection import AgentEndpoint, AgentSocket, open_agent_socket
from bridge.call.session import CallSession
from bridge.observe import call_tags
from bridge.web import default_collaborators
from tests.harness import API_KEY, Running, running_bridge, settings_for
from tools.fake_agent import FakeAgent, FakeAgentConfig, FaultPlan
from tools.fake_twilio import CallPlan, CallResult, StreamClient, new_sid, parse_twiml

# Bounds the connect retries too. The round starts 25 calls at once in one process (the bridge,
# the fake Twilio and every fake agent share one event loop), so on a loaded machine a set-up and
# its retries take seconds: 3 s let the "at_capacity twice" retries, and a caller's stop during
# the upstream connect, lose to this timeout. The cases that need it to fire give it room.
READY_TIMEOUT_S = 6.0
# The idle timers are off: these callers never speak, and the read-stall case's 25 s call
# would race the 8 + 15 s idle goodbye (its outcome would be agent_ended, not the fault's).
ENV = {"SESSION_READY_TIMEOUT_S": str(READY_TIMEOUT_S), "IDLE_REPROMPT_S": "0", "IDLE_HANGUP_S": "0"}
SPEED = 5.0  # call seconds per wall second at the fake Twilio
FALLBACK = ["Say", "Hangup"]  # the TwiML after </Connect>: what a caller hears when we give up
RSS_SLACK = 12 * 2**20
# Bounds a hang only: the slowest case is the read stall past the send deadline (a 25 s call).
ROUND_DEADLINE_S = 60.0
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


# --- per-call upstream routing ---------------------------------------------------------------


@dataclass
class Route:
    """Where one call's upstream connects go. `later` applies from the second attempt on."""

    agent: FakeAgent | None = None
    first: str = "agent"  # "agent" | "hang" (a connect that never completes)
    later: str = "agent"  # "agent" | "hang" | "refused" (nothing listens: ECONNREFUSED)
    attempts: int = 0


class Upstreams:
    """The bridge's production connector (``open_agent_socket``), pointed per call (by the
    CallSid in the call's log context) at that call's fake agent, a dead port or a black hole."""

    def __init__(self, max_message_bytes: int) -> None:
        self.routes: dict[str, Route] = {}
        self.max_message_bytes = max_message_bytes
        self._dead = socket.socket()  # bound, never listening: connects are refused
        self._dead.bind(("127.0.0.1", 0))
        self.dead_url = f"ws://127.0.0.1:{self._dead.getsockname()[1]}/v1/ws"

    async def connect(self, nursery: trio.Nursery) -> Any:
        tags = call_tags.get()
        route = self.routes[tags.call_sid if tags else ""]
        route.attempts += 1
        how = route.first if route.attempts == 1 else route.later
        if how == "hang":
            await trio.sleep_forever()
        url = self.dead_url if how == "refused" or route.agent is None else route.agent.url
        return await open_agent_socket(nursery, AgentEndpoint(url, API_KEY, self.max_message_bytes))


# --- the cases -------------------------------------------------------------------------------


Script = Callable[[FakeAgent], Awaitable[None]]


async def end_from_server(agent: FakeAgent) -> None:
    session = await agent.wait_for_session(1)
    await trio.sleep(0.3)
    await agent.end_from_server(session.session_id)


async def user_turn_after_resume(agent: FakeAgent) -> None:
    session = await agent.wait_for_session(1)
    while True:  # until the bridge has resumed the session on a second socket
        await trio.sleep(0.02)
        if agent.connections_total >= 2:
            try:
                await agent.user_turn(session.session_id, "are you still there?", reply_audio=agent.reply_audio)
                return
            except LookupError:
                pass


async def tool_call(agent: FakeAgent) -> None:
    session = await agent.wait_for_session(1)
    await agent.tool_call(session.session_id, "generate_random_number", {"min": 1, "max": 6})


@dataclass
class Case:
    name: str
    outcome: str
    reason: str  # a substring of the logged reason
    faults: FaultPlan = field(default_factory=FaultPlan)
    agent: dict[str, Any] = field(default_factory=dict)  # FakeAgentConfig overrides
    plan: dict[str, Any] = field(default_factory=lambda: {"hangup_after_s": 15.0})
    raw: list[str] | None = None  # a hand-driven stream: the frames to send, then close
    route: dict[str, Any] = field(default_factory=dict)
    script: Script | None = None
    fallback: bool = False  # we closed the stream: the caller hears the fallback TwiML
    connections: int | None = None  # upstream connections the case's fake agent must have seen
    check: Callable[[Run], None] | None = None


@dataclass
class Run:
    case: Case
    call_sid: str
    agent: FakeAgent
    route: Route
    result: CallResult | None = None
    summary: str = ""
    done: bool = False


def invalid_agent(run: Run) -> int:
    return int(re.search(r"invalid\(twilio=\d+ agent=(\d+)\)", run.summary).group(1))  # type: ignore[union-attr]


def invalid_twilio(run: Run) -> int:
    return int(re.search(r"invalid\(twilio=(\d+)", run.summary).group(1))  # type: ignore[union-attr]


def greeting_heard(run: Run) -> None:
    assert run.result is not None
    assert run.agent.greeting_audio in run.result.heard, (len(run.result.heard), len(run.agent.greeting_audio))


def reply_heard_after_resume(run: Run) -> None:
    """The same session went on over the new socket, and the caller heard its next reply."""
    assert len(run.agent.sessions) == 1
    assert run.result is not None and run.agent.reply_audio in run.result.heard


def heard_part_of_the_greeting(run: Run) -> None:
    assert run.result is not None
    assert 0 < len(run.result.heard) < len(run.agent.greeting_audio)


def session_ended_upstream(run: Run) -> None:
    (session,) = run.agent.sessions.values()
    assert session.ended.is_set()  # session.end reached the agent (no 30 s billable grace)


def tool_result_received(run: Run) -> None:
    (session,) = run.agent.sessions.values()
    assert [r["is_error"] for r in session.tool_results] == [False]


CASES: list[Case] = [
    # --- the Voice Agent fails (reference §8/§9) ---
    Case("agent drops TCP, resumed", "caller_hung_up", "caller hung up (stop)",
         FaultPlan(drop_tcp_after_s=0.3), connections=2, script=user_turn_after_resume,
         check=reply_heard_after_resume),
    Case("agent closes 1011, resumed", "caller_hung_up", "caller hung up (stop)",
         FaultPlan(close_1011_after_s=0.3), connections=2, script=user_turn_after_resume,
         check=reply_heard_after_resume),
    Case("agent never ready", "upstream_failed", f"no session.ready within {READY_TIMEOUT_S:g} s",
         FaultPlan(never_ready=True), plan={"hangup_after_s": 100.0}, fallback=True, connections=1,
         check=session_ended_upstream),
    Case("at_capacity twice on connect, retried", "caller_hung_up", "caller hung up (stop)",
         FaultPlan(reject_first_n=2), plan={"hangup_after_s": 30.0}, connections=3, check=greeting_heard),
    Case("concurrency_exceeded on connect, retried", "caller_hung_up", "caller hung up (stop)",
         FaultPlan(reject_first_n=1, reject_code="concurrency_exceeded"), connections=2),
    Case("unauthorized", "upstream_failed", "Voice Agent error unauthorized",
         FaultPlan(unauthorized=True), plan={"hangup_after_s": 60.0}, fallback=True, connections=1),
    Case("garbage frames after ready", "caller_hung_up", "caller hung up (stop)",
         FaultPlan(garbage_after_ready=True), connections=1, check=lambda r: assert_(invalid_agent(r) >= 2)),
    Case("session duration cap", "upstream_failed", "session_expired",
         FaultPlan(session_cap_s=0.5), plan={"hangup_after_s": 60.0}, fallback=True, connections=1),
    Case("agent ends the session", "upstream_failed", "the Voice Agent ended the session",
         plan={"hangup_after_s": 60.0}, script=end_from_server, fallback=True, connections=1),
    # Every session drops 0.3 s after ready and no resume is allowed: each refusal opens a fresh
    # session (issue 15 recovery), at most MAX_RECOVERIES (3) times; the next refusal ends the call.
    Case("drop, then resume refused (grace over)", "upstream_failed", "session_not_found",
         FaultPlan(drop_tcp_after_s=0.3), agent={"grace_s": 0.0}, plan={"hangup_after_s": 60.0},
         fallback=True, connections=2 + 2 * 3),
    Case("agent stalls reads for 2 s", "caller_hung_up", "caller hung up (stop)",
         FaultPlan(stop_reading=True, stop_reading_s=2.0), connections=1),
    # The stalled connection is cut after the send deadline and the session resumed on a new
    # one: the caller stays on the line. The stall lasts until the bridge cuts it (how soon the
    # socket's buffers fill depends on how fast a loaded loop streams: a 15 s stall could end
    # first); the resumed connection reads.
    Case("agent stalls reads past the send deadline", "caller_hung_up", "caller hung up (stop)",
         FaultPlan(stop_reading=True, stop_reading_s=None),
         plan={"hangup_after_s": 250.0, "max_call_s": 300.0, "speed": 10.0},
         connections=2),
    Case("tool.call with legacy args key", "caller_hung_up", "caller hung up (stop)",
         FaultPlan(tool_args_key="args"), script=tool_call, connections=1, check=tool_result_received),
    # --- Twilio fails or hangs up at every phase ---
    Case("socket closed before any message", "caller_hung_up", "Twilio closed the stream", raw=[]),
    Case("hang-up before start (connected, close)", "caller_hung_up", "Twilio closed the stream",
         raw=["connected"]),
    Case("hang-up before start (stop)", "caller_hung_up", "caller hung up (stop)", raw=["connected", "stop"]),
    Case("garbage from Twilio, then stop", "caller_hung_up", "caller hung up (stop)",
         raw=["connected", "start", "binary", "notjson", "unknown", "media", "stop"], connections=1,
         check=lambda r: assert_(invalid_twilio(r) >= 2)),
    Case("hang-up during the upstream connect", "caller_hung_up", "caller hung up (stop)",
         plan={"hangup_after_s": 2.5}, route={"first": "hang"}, connections=0),
    Case("hang-up after start, before ready", "caller_hung_up", "caller hung up (stop)",
         agent={"ready_delay_s": 1.0}, plan={"hangup_after_s": 1.5}, connections=1, check=session_ended_upstream),
    # The caller hangs up once 0.5 s of the greeting was heard (the agent sends it in real time,
    # 3.45 s): at a call time, a loaded loop could let the whole greeting through first.
    Case("hang-up mid-reply", "caller_hung_up", "caller hung up (stop)",
         agent={"speed": 1.0}, plan={"hangup_when": lambda r: r.heard_bytes >= 4000}, connections=1,
         check=heard_part_of_the_greeting),
    Case("abrupt close without stop", "caller_hung_up", "Twilio closed the stream",
         plan={"hangup_after_s": 10.0, "abrupt_close": True}, connections=1, check=session_ended_upstream),
    Case("hang-up during a tool call", "caller_hung_up", "caller hung up (stop)",
         agent={"tool_preamble_s": 5.0}, plan={"hangup_after_s": 7.5}, script=tool_call, connections=1,
         check=session_ended_upstream),
    Case("hang-up in a resume gap (agent unreachable)", "caller_hung_up", "caller hung up (stop)",
         FaultPlan(drop_tcp_after_s=0.3), plan={"hangup_after_s": 12.0}, route={"later": "refused"},
         connections=1, check=lambda r: assert_(r.route.attempts >= 3)),
    Case("hang-up in a resume gap (connect hangs)", "caller_hung_up", "caller hung up (stop)",
         FaultPlan(drop_tcp_after_s=0.3), plan={"hangup_after_s": 12.0}, route={"later": "hang"},
         connections=1, check=lambda r: assert_(r.route.attempts == 2)),
    Case("hang-up while the agent stalls reads", "caller_hung_up", "caller hung up (stop)",
         FaultPlan(stop_reading=True, stop_reading_s=4.0), plan={"hangup_after_s": 10.0}, connections=1),
]  # fmt: skip


def assert_(condition: bool) -> None:
    assert condition


# --- running a round -------------------------------------------------------------------------


async def drive_raw(bridge: Running, run: Run) -> None:
    """A Twilio stream driven frame by frame (signed webhook, then the TwiML's stream URL)."""
    twilio = bridge.twilio
    resp = await twilio.post_webhook("/twiml", twilio.voice_params(CallPlan(), run.call_sid))
    spec = parse_twiml(resp.text).stream
    assert resp.status_code == 200 and spec is not None
    async with twilio.open_stream(spec.url, call_sid=run.call_sid) as client:
        for step in run.case.raw or []:
            await send_raw_step(client, step, spec.parameters)
            if step == "start":
                await run.agent.wait_for_session(1)
            await trio.sleep(0.05)


async def send_raw_step(client: StreamClient, step: str, parameters: dict[str, str]) -> None:
    if step == "connected":
        await client.send_connected()
    elif step == "start":
        await client.send_start(parameters)
    elif step == "media":
        await client.send_media(b"\xff" * 160)
    elif step == "stop":
        await client.send_stop()
    elif step == "binary":
        await client.send_raw(b"\x00\x01\x02")
    elif step == "notjson":
        await client.send_raw("this is not json {")
    elif step == "unknown":
        await client.send_event("surprise", {"surprise": {}})
    else:
        raise AssertionError(step)


async def drive(bridge: Running, run: Run) -> None:
    case = run.case
    async with trio.open_nursery() as nursery:
        if case.script is not None:
            nursery.start_soon(case.script, run.agent)
        if case.raw is not None:
            await drive_raw(bridge, run)
        else:
            plan = CallPlan(call_sid=run.call_sid, **{"speed": SPEED, **case.plan})
            run.result = await bridge.twilio.call(plan)
        nursery.cancel_scope.cancel()  # a script whose trigger never came
    run.done = True


async def run_round(bridge: Running, upstreams: Upstreams) -> list[Run]:
    runs: list[Run] = []
    async with trio.open_nursery() as agents:
        for case in CASES:
            agent = FakeAgent(FakeAgentConfig(api_key=API_KEY, vad=False, faults=case.faults, **case.agent))
            await agents.start(agent.serve)
            run = Run(case, new_sid("CA"), agent, Route(agent=agent, **case.route))
            upstreams.routes[run.call_sid] = run.route
            runs.append(run)
        with trio.move_on_after(ROUND_DEADLINE_S) as deadline:
            async with trio.open_nursery() as calls:
                for run in runs:
                    calls.start_soon(drive, bridge, run)
            # Every call is over at Twilio's end: now nothing of any call may be left.
            while bridge.app.active_calls or any(r.agent.connections_open for r in runs):
                await trio.sleep(0.02)
        if deadline.cancelled_caught:
            raise AssertionError(
                f"round not over after {ROUND_DEADLINE_S} s: Twilio still in "
                f"{[r.case.name for r in runs if not r.done]}, {bridge.app.active_calls} live call(s), "
                f"upstream open in {[r.case.name for r in runs if r.agent.connections_open]}"
            )
        agents.cancel_scope.cancel()
    for run in runs:
        del upstreams.routes[run.call_sid]
    return runs


def is_open(sock: AgentSocket) -> bool:
    """The upstream socket's TCP stream has not been closed."""
    return bool(sock._stream.socket.fileno() != -1)  # type: ignore[attr-defined]


def call_tasks() -> list[str]:
    """Names of live Trio tasks that belong to a call (the session's tasks, the Media Streams
    handler, the upstream socket's reader, Hypercorn's per-request task)."""
    names: list[str] = []
    root = trio.lowlevel.current_root_task()
    assert root is not None
    stack = [root]
    while stack:
        task = stack.pop()
        names.append(task.name)
        stack.extend(t for nursery in task.child_nurseries for t in nursery.child_tasks)
    suspects = ("bridge.call", "media_stream", "WebSocketConnection._reader_task", "task_group._handle")
    return [n for n in names if any(s in n for s in suspects)]


class CallTagsFilter(logging.Filter):
    """Stamps each record with the call it was logged from (the filter runs in the call's task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        tags = call_tags.get()
        record.call = (tags.call_id, tags.call_sid) if tags else ("", "")
        return True


def check_round(runs: list[Run], records: list[logging.LogRecord], bridge: Running) -> None:
    # One summary per accepted stream, each from a distinct call, with an outcome and a reason.
    summaries = [r for r in records if r.getMessage().startswith("call summary:")]
    assert len(summaries) == len(runs)
    assert len({r.call[0] for r in summaries}) == len(runs)  # type: ignore[attr-defined]
    by_sid = {r.call[1]: r.getMessage() for r in summaries if r.call[1]}  # type: ignore[attr-defined]
    no_start = [r.getMessage() for r in summaries if not r.call[1]]  # type: ignore[attr-defined]
    problems: list[str] = []
    for run in runs:
        case = run.case
        if case.raw is not None and "start" not in case.raw:
            run.summary = next(s for s in no_start if case.reason in s)
            no_start.remove(run.summary)
        else:
            run.summary = by_sid.get(run.call_sid, "")
        try:
            assert run.summary, "no call summary logged"
            assert f"outcome={case.outcome} " in run.summary, run.summary
            assert case.reason in run.summary.split(" reason=", 1)[1], run.summary
            if run.result is not None:
                assert run.result.handshake_status == 101
                assert run.result.violations == [], run.result.violations
                expected_end = "server" if case.fallback else "caller"
                assert run.result.ended_by == expected_end, (run.result.ended_by, run.result.timeline[-5:])
                verbs = [v.split(":")[0] for v in run.result.post_connect_verbs]
                assert verbs == (FALLBACK if case.fallback else []), verbs
            if case.connections is not None:
                assert run.agent.connections_total == case.connections, run.agent.connections_total
            if case.check is not None:
                case.check(run)
        except AssertionError as exc:
            problems.append(f"{case.name}: {str(exc)[:300]}")
    assert problems == [], "\n".join(problems)
    assert bridge.app.metrics.active_calls._value.get() == 0


async def test_no_orphans_under_injected_faults(caplog: pytest.LogCaptureFixture) -> None:
    """Two rounds of every fault in parallel (the first is the warm-up for the memory check)."""
    caplog.set_level(logging.INFO, "bridge.call")
    caplog.handler.addFilter(CallTagsFilter())
    settings = settings_for("ws://127.0.0.1:9/v1/ws", **ENV)
    upstreams = Upstreams(settings.max_agent_frame_bytes)
    collaborators = default_collaborators(settings)
    collaborators.connect_agent = upstreams.connect
    async with running_bridge(env=ENV, collaborators=collaborators) as bridge:
        rss: list[int] = []
        for _ in range(2):
            caplog.clear()
            runs = await run_round(bridge, upstreams)
            check_round(runs, list(caplog.records), bridge)
            assert call_tasks() == []
            del runs
            gc.collect()
            assert not [o for o in gc.get_objects() if isinstance(o, CallSession)]
            assert not [o for o in gc.get_objects() if isinstance(o, AgentSocket) and is_open(o)]
            rss.append(rss_bytes())
        upstreams._dead.close()
    print(f"RSS after warm-up {rss[0] / 2**20:.1f} MiB, after round 2 {rss[1] / 2**20:.1f} MiB")
    assert rss[1] - rss[0] < RSS_SLACK, [r / 2**20 for r in rss]
