"""Deployment tests: real ``python -m bridge serve`` processes, a real nginx with TLS in front,
real signals.

1. Two bridge processes behind nginx (TLS, rendered from ``deploy/nginx.conf``): the webhook is
   routed to process A, the Media Stream to process B; a signed call works end to end through
   the proxy (B accepts the token A minted), and bad signatures are refused with 403.
2. One of two processes draining while nginx still routes to it (no active health checks in
   nginx): new streams that land on it are passed to the other (``proxy_next_upstream``), and
   it exits 0 as soon as its last call hangs up.
3. Graceful drain of one process: SIGTERM with a live call, SIGINT twice, SIGTERM when idle.

Needs nginx and openssl (CI installs nginx via .ci/run); skipped cleanly without them.
Everything is on loopback; every wait is bounded; every process is killed in ``finally``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from tools.fake_agent import FakeAgent, FakeAgentConfig
from tools.fake_twilio import CallPlan, CallResult, FakeTwilio, StreamRejected, new_sid, parse_twiml

REPO = Path(__file__).resolve().parent.parent
NGINX_CONF = REPO / "deploy" / "nginx.conf"
AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
API_KEY = "aai-test-key-0123456789abcdef"
TOKEN_SECRET = "deploy-test-stream-token-secret-0123456789"
START_TIMEOUT_S = 15.0  # interpreter start + imports on a slow CI machine


def _nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def _stop(proc: trio.Process, name: str, log: Path | None) -> None:
    """Kill `proc` if it still runs and reap it (shielded, bounded); print its log tail."""
    with trio.move_on_after(5, shield=True):
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    if log is not None:
        print(f"----- {name} (exit {proc.returncode}) -----\n{_tail(log)}")


# --------------------------------------------------------------------------------------------
# Bridge processes


@dataclass
class BridgeProcess:
    name: str
    proc: trio.Process
    port: int
    log: Path
    started_at: float

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=5) as client:
            return await client.get(self.base + path)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def bridge_env(*, port: int, public: str, agent_url: str, **extra: str) -> dict[str, str]:
    """A minimal environment: nothing inherited (a shell's HOSTNAME, a stray TWILIO_ACCOUNT_SID)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "LANG": "C.UTF-8",
        "ASSEMBLYAI_API_KEY": API_KEY,
        "PUBLIC_HOSTNAME": public,
        "VOICE_AGENT_URL": agent_url,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "STREAM_TOKEN_SECRET": TOKEN_SECRET,
        "PORT": str(port),
        "BIND_HOST": "127.0.0.1",
        "CALLER_AUDIO_BURST_MS": "600000",  # the nginx test streams faster than real time
        "LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env


@asynccontextmanager
async def bridge_process(tmp_path: Path, name: str, env: dict[str, str]) -> AsyncIterator[BridgeProcess]:
    """``python -m bridge serve`` in `tmp_path` (so no developer .env is read), healthy on exit."""
    log = tmp_path / f"{name}.log"
    port = int(env["PORT"])
    with log.open("wb") as out:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bridge", "serve"],
            env=env,
            cwd=str(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    bp = BridgeProcess(name, proc, port, log, time.monotonic())
    try:
        with trio.fail_after(START_TIMEOUT_S):
            while True:
                assert proc.returncode is None, f"{name} exited with {proc.returncode}:\n{_tail(log)}"
                try:
                    if (await bp.get("/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.05)
        yield bp
    finally:
        await _stop(proc, name, log)


@asynccontextmanager
async def fake_agent(config: FakeAgentConfig | None = None) -> AsyncIterator[FakeAgent]:
    agent = FakeAgent(config or FakeAgentConfig(api_key=API_KEY, vad=False))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        try:
            yield agent
        finally:
            nursery.cancel_scope.cancel()


async def _wait_exit(bp: BridgeProcess, timeout_s: float) -> tuple[int, float]:
    """(exit code, seconds waited)."""
    t0 = time.monotonic()
    with trio.fail_after(timeout_s):
        code = await bp.proc.wait()
    return code, time.monotonic() - t0


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll `check` (something in another process: nothing to wait on) until true, bounded."""
    try:
        with trio.fail_after(timeout_s):
            while True:
                if await check():
                    return
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


async def _draining(bp: BridgeProcess) -> bool:
    """Not ready (/readyz 503) while still alive (/healthz 200): a drain has started."""
    ready, health = await bp.get("/readyz"), await bp.get("/healthz")
    return ready.status_code == 503 and ready.json()["status"] == "draining" and health.status_code == 200


# --------------------------------------------------------------------------------------------
# nginx + TLS


async def make_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 (openssl CLI)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    with trio.fail_after(30):
        await trio.run_process(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout", str(key), "-out", str(cert),
            ],
            capture_stdout=True, capture_stderr=True,
        )  # fmt: skip
    return cert, key


def _sub(pattern: str, repl: str, text: str, *, count: int = 1, flags: int = 0) -> str:
    """re.subn that fails loudly when deploy/nginx.conf no longer has the expected shape."""
    new, n = re.subn(pattern, lambda _: repl, text, flags=flags)
    assert n == count, f"deploy/nginx.conf: expected {count} match(es) of {pattern!r}, found {n}"
    return new


def render_site(
    shipped: str, *, listen_port: int, cert: Path, key: Path, webhooks: list[int], streams: list[int]
) -> str:
    """The shipped site config with test ports and certificate; webhooks go to the `webhooks`
    processes and Media Streams to the `streams` processes. Every location keeps its shipped
    directives (upgrade headers, timeouts, retries); only upstreams, listen and certificate change."""
    site = _sub(r"^\s*listen\s+\[::\]:443\s+ssl;\s*$\n", "", shipped, flags=re.M)
    site = _sub(r"listen\s+443\s+ssl;", f"listen 127.0.0.1:{listen_port} ssl;", site)
    site = _sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", site)
    site = _sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", site)
    upstream = re.search(r"upstream bridge \{.*?\n\}", site, flags=re.S)
    assert upstream, "deploy/nginx.conf: no `upstream bridge { ... }` block"
    block = upstream.group(0)
    assert re.search(r"^\s*server\s+127\.0\.0\.1:\d+;", block, flags=re.M), "upstream has no server lines"

    def with_servers(name: str, ports: list[int]) -> str:
        body = re.sub(r"^\s*server\s+\S+;\s*$\n", "", block, flags=re.M)
        servers = "".join(f"\n    server 127.0.0.1:{port};" for port in ports)
        return body.replace("upstream bridge {", f"upstream {name} {{{servers}", 1)

    site = site.replace(block, with_servers("bridge", streams) + "\n\n" + with_servers("bridge_webhooks", webhooks))
    # Only the webhook location (`location / {`) is re-pointed; /media-stream/ stays on `bridge`.
    site = re.sub(
        r"(location / \{[^}]*?)proxy_pass http://bridge;",
        lambda m: m.group(1) + "proxy_pass http://bridge_webhooks;",
        site,
        count=1,
    )
    assert "proxy_pass http://bridge_webhooks;" in site, "deploy/nginx.conf: no `location / { proxy_pass ... }`"
    return site


def render_main(prefix: Path, site: Path) -> str:
    """A complete nginx.conf: foreground, one process, logs and pid in `prefix`, the site included."""
    temp = "\n".join(
        f"    {d}_temp_path {prefix / (d + '_temp')};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
daemon off;
master_process off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix / "access.log"};
{temp}
    include {site};
}}
"""


@asynccontextmanager
async def nginx_proxy(tmp_path: Path, port: int, *, webhooks: list[int], streams: list[int]) -> AsyncIterator[Path]:
    """nginx in the foreground on loopback TLS `port`; yields the certificate to trust."""
    nginx = _nginx()
    if nginx is None or shutil.which("openssl") is None:
        pytest.skip("nginx and openssl are needed for the reverse-proxy test")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    cert, key = await make_cert(prefix)
    site = prefix / "bridge-site.conf"
    site.write_text(
        render_site(NGINX_CONF.read_text(), listen_port=port, cert=cert, key=key, webhooks=webhooks, streams=streams)
    )
    main = prefix / "nginx.conf"
    main.write_text(render_main(prefix, site))
    errlog = prefix / "error.log"
    with trio.fail_after(30):
        check = await trio.run_process(
            [nginx, "-t", "-p", f"{prefix}/", "-c", str(main), "-e", str(errlog)],
            check=False, capture_stdout=True, capture_stderr=True,
        )  # fmt: skip
    assert check.returncode == 0, f"nginx -t failed:\n{check.stderr.decode()}\n{site.read_text()}"
    proc = await trio.lowlevel.open_process(
        [nginx, "-p", f"{prefix}/", "-c", str(main), "-e", str(errlog)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with trio.fail_after(10):
            while True:
                assert proc.returncode is None, f"nginx exited with {proc.returncode}:\n{_tail(errlog)}"
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    await stream.aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
        yield cert
    finally:
        await _stop(proc, "nginx", errlog)


async def _https_get(url: str, cert: Path) -> httpx.Response:
    context = ssl.create_default_context(cafile=str(cert))
    async with httpx.AsyncClient(verify=context, timeout=5) as client:
        return await client.get(url)


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (label order doesn't matter); 0 when absent."""
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")) == labels:
            return float(m.group(3))
    return 0.0


# --------------------------------------------------------------------------------------------
# 1. Behind nginx with TLS, two processes


async def test_call_through_nginx_tls_webhook_on_a_stream_on_b(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if _nginx() is None or shutil.which("openssl") is None:
        pytest.skip("nginx and openssl are needed for the reverse-proxy test")
    port_a, port_b, nginx_port = _free_port(), _free_port(), _free_port()
    public = f"https://127.0.0.1:{nginx_port}"
    async with fake_agent() as agent:
        env = dict(public=public, agent_url=agent.url)
        async with (
            bridge_process(tmp_path, "bridge-A", bridge_env(port=port_a, **env)) as a,
            bridge_process(tmp_path, "bridge-B", bridge_env(port=port_b, **env)) as b,
            nginx_proxy(tmp_path, nginx_port, webhooks=[a.port], streams=[b.port]) as cert,
        ):
            # FakeTwilio's httpx and trio-websocket clients build default SSL contexts, which
            # honour SSL_CERT_FILE: trust the throwaway certificate for this test only.
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))
            twilio = FakeTwilio(http_base=public, public_base=public, auth_token=AUTH_TOKEN,
                                connect_base=f"wss://127.0.0.1:{nginx_port}")  # fmt: skip

            health = await _https_get(public + "/healthz", cert)
            assert health.status_code == 200, health.text

            result: CallResult | None = None
            seen_live: dict[str, int] = {}

            async def run_call() -> None:
                nonlocal result
                result = await twilio.call(CallPlan(speed=10.0, hangup_after_s=20.0))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_call)
                with trio.fail_after(10):
                    session = await agent.wait_for_session(1)
                # While the call is live: the stream is on B, nothing on A.
                for bp in (a, b):
                    seen_live[bp.name] = (await bp.get("/healthz")).json()["active_calls"]
                with trio.fail_after(20):
                    await session.ended.wait()  # hang-up -> session.end upstream
            assert result is not None
            assert result.error is None, result.timeline
            assert result.webhook_status == 200
            assert result.stream_url is not None
            assert result.stream_url.startswith(f"wss://127.0.0.1:{nginx_port}/media-stream/")
            assert result.handshake_status == 101
            assert result.violations == []
            assert result.ended_by == "caller"
            assert agent.greeting_audio in result.heard  # the whole greeting, through nginx
            assert seen_live == {"bridge-A": 0, "bridge-B": 1}

            async def upstream_closed() -> bool:
                return agent.connections_open == 0

            await _eventually(upstream_closed, 3, "the upstream socket to close")

            # The webhook was answered by A, the stream run by B (token minted by A).
            metrics_a = (await a.get("/metrics")).text
            metrics_b = (await b.get("/metrics")).text
            assert _metric(metrics_a, "bridge_webhooks_total", route="/twiml", result="ok") == 1
            assert _metric(metrics_b, "bridge_webhooks_total", route="/twiml", result="ok") == 0
            assert "streaming" in a.log_text() and result.call_sid in a.log_text()
            assert _metric(metrics_b, "bridge_rejected_streams_total", reason="bad signature") == 0

            # Bad signatures through nginx: webhook and upgrade are both refused with 403.
            params = twilio.voice_params(CallPlan(), new_sid("CA"))
            bad = await twilio.post_webhook("/twiml", params, signature="bm90IGEgc2lnbmF0dXJl")
            assert bad.status_code == 403
            unsigned = await twilio.post_webhook("/twiml", params, sign=False)
            assert unsigned.status_code == 403
            # A fresh, valid stream URL (signed webhook), opened with a wrong signature.
            good = await twilio.post_webhook("/twiml", params)
            assert good.status_code == 200
            spec = parse_twiml(good.text).stream
            assert spec is not None
            with pytest.raises(StreamRejected) as rejected, trio.fail_after(10):
                async with twilio.open_stream(spec.url, signature="bm90IGEgc2lnbmF0dXJl"):
                    pass
            assert rejected.value.status_code == 403
            metrics_b = (await b.get("/metrics")).text
            assert _metric(metrics_b, "bridge_rejected_streams_total", reason="bad signature") == 1
            assert agent.connections_total == 1  # nothing reached the agent for refused requests


async def test_draining_process_behind_nginx_does_not_lose_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nginx has no active health checks: a draining process stays in the upstream. New calls
    must still work: a stream that lands on the draining process is refused before the
    handshake and nginx retries it on the other one (proxy_next_upstream in the shipped config).
    A webhook that lands on it gets the busy TwiML (a 200 nginx cannot retry). When the last
    call on the draining process hangs up, it exits 0 without waiting for DRAIN_SECONDS."""
    if _nginx() is None or shutil.which("openssl") is None:
        pytest.skip("nginx and openssl are needed for the reverse-proxy test")
    port_a, port_b, nginx_port = _free_port(), _free_port(), _free_port()
    public = f"https://127.0.0.1:{nginx_port}"
    async with fake_agent() as agent:
        env = dict(public=public, agent_url=agent.url)
        async with (
            bridge_process(tmp_path, "bridge-A", bridge_env(port=port_a, DRAIN_SECONDS="30", **env)) as a,
            bridge_process(tmp_path, "bridge-B", bridge_env(port=port_b, **env)) as b,
            nginx_proxy(tmp_path, nginx_port, webhooks=[a.port, b.port], streams=[a.port, b.port]) as cert,
        ):
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))
            via_nginx = FakeTwilio(http_base=public, public_base=public, auth_token=AUTH_TOKEN,
                                   connect_base=f"wss://127.0.0.1:{nginx_port}")  # fmt: skip
            # A live call pinned to A (Twilio signs the public URL; the fake posts to A directly).
            on_a = FakeTwilio(http_base=a.base, public_base=public, auth_token=AUTH_TOKEN)
            live_sid = new_sid("CA")
            live: CallResult | None = None
            live_done = trio.Event()

            async def live_call() -> None:
                nonlocal live
                live = await on_a.call(CallPlan(call_sid=live_sid, speed=1.0, hangup_after_s=60.0, max_call_s=90.0))
                live_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(live_call)
                with trio.fail_after(10):
                    live_session = await agent.wait_for_session(1)
                a.proc.send_signal(signal.SIGTERM)
                await _eventually(lambda: _draining(a), 2, "A's /readyz to turn 503")

                outcomes: list[str] = []
                for _ in range(6):
                    with trio.fail_after(15):
                        r = await via_nginx.call(CallPlan(speed=20.0, hangup_after_s=1.0))
                    if r.stream_url is None:
                        verbs = parse_twiml(r.twiml).verbs_before
                        assert verbs[0].startswith("Say: ") and verbs[-1] == "Hangup", r.twiml
                        outcomes.append("busy")
                    else:
                        assert r.handshake_status == 101, (r.handshake_status, r.timeline)
                        assert r.ended_by == "caller" and r.violations == [], r.timeline
                        outcomes.append("streamed")
                assert outcomes.count("streamed") >= 3, outcomes
                assert a.proc.returncode is None  # still draining: its call is live
                assert await _draining(a)  # not ready, still alive
                metrics_a = (await a.get("/metrics")).text
                # Streams did land on A and were passed on to B by nginx.
                assert _metric(metrics_a, "bridge_rejected_streams_total", reason="capacity") >= 1, outcomes

                # The last call on A hangs up: A stops at once (well before DRAIN_SECONDS).
                assert on_a.request_hangup(live_sid)
                with trio.fail_after(5):
                    await live_done.wait()
                    await live_session.ended.wait()
            assert live is not None and live.violations == [] and live.ended_by == "api"
            code, waited = await _wait_exit(a, 5)
            assert code == 0, a.log_text()
            # Nothing (e.g. an idle proxy keep-alive connection) holds the stopped server open.
            assert waited < 2.0, f"A exited {waited:.2f} s after its last call ended"
            assert (await b.get("/healthz")).status_code == 200
            assert (await b.get("/readyz")).json()["status"] == "ok"


# --------------------------------------------------------------------------------------------
# 2. Graceful drain with real signals


async def test_sigterm_drains_a_live_call_then_exits_0(tmp_path: Path) -> None:
    drain_s = 2.0
    port = _free_port()
    public = f"http://127.0.0.1:{port}"
    async with fake_agent() as agent:
        env = bridge_env(port=port, public=public, agent_url=agent.url, DRAIN_SECONDS=str(drain_s))
        async with bridge_process(tmp_path, "bridge", env) as bp:
            twilio = FakeTwilio(http_base=bp.base, public_base=public, auth_token=AUTH_TOKEN)
            result: CallResult | None = None
            call_done = trio.Event()

            async def run_call() -> None:
                nonlocal result
                result = await twilio.call(CallPlan(speed=1.0, hangup_after_s=60.0, max_call_s=90.0))
                call_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_call)
                with trio.fail_after(10):
                    session = await agent.wait_for_session(1)
                await trio.sleep(0.3)
                assert (await bp.get("/healthz")).json()["active_calls"] == 1

                t_signal = time.monotonic()
                bp.proc.send_signal(signal.SIGTERM)

                # /readyz turns 503 while the call goes on; /healthz stays 200 until exit.
                await _eventually(lambda: _draining(bp), 2, "/readyz to turn 503")
                # A new call is told the lines are busy: <Say> + <Hangup/>, no <Connect>.
                busy = await twilio.post_webhook("/twiml", twilio.voice_params(CallPlan(), new_sid("CA")))
                assert busy.status_code == 200
                doc = parse_twiml(busy.text)
                assert doc.stream is None and doc.connect_action is None, busy.text
                assert "<Connect" not in busy.text
                assert doc.verbs_before[0].startswith("Say: ") and doc.verbs_before[-1] == "Hangup"
                # The live call keeps streaming during the drain: caller audio still arrives upstream.
                frames_at_signal = len(session.input_audio)
                await trio.sleep(drain_s / 2)
                assert not call_done.is_set(), "the live call was ended before DRAIN_SECONDS"
                assert len(session.input_audio) >= frames_at_signal + 25  # >= 0.5 s more audio

                with trio.fail_after(drain_s + 5):
                    await call_done.wait()
                t_call_end = time.monotonic() - t_signal
                with trio.fail_after(3):
                    await session.ended.wait()  # session.end upstream -> session.ended

            assert result is not None
            assert drain_s - 0.3 <= t_call_end <= drain_s + 2.0, t_call_end
            assert result.ended_by == "server", result.timeline  # the server closed the socket
            assert result.close_code == 1000
            assert result.violations == []
            assert result.handshake_status == 101
            code, waited = await _wait_exit(bp, 5)
            assert code == 0, bp.log_text()
            assert waited < 2.0, f"exited {waited:.2f} s after the last call ended"
            assert agent.connections_open == 0
            assert "Traceback" not in bp.log_text()


async def test_second_sigint_stops_at_once_with_130(tmp_path: Path) -> None:
    port = _free_port()
    public = f"http://127.0.0.1:{port}"
    async with fake_agent() as agent:
        env = bridge_env(port=port, public=public, agent_url=agent.url, DRAIN_SECONDS="30")
        async with bridge_process(tmp_path, "bridge", env) as bp:
            twilio = FakeTwilio(http_base=bp.base, public_base=public, auth_token=AUTH_TOKEN)
            result: CallResult | None = None
            call_done = trio.Event()

            async def run_call() -> None:
                nonlocal result
                result = await twilio.call(CallPlan(speed=1.0, hangup_after_s=60.0, max_call_s=90.0))
                call_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_call)
                with trio.fail_after(10):
                    session = await agent.wait_for_session(1)
                bp.proc.send_signal(signal.SIGINT)
                # The first SIGINT drains (30 s allowed for the call)...
                await _eventually(lambda: _draining(bp), 2, "/readyz to turn 503")
                bp.proc.send_signal(signal.SIGINT)
                code, waited = await _wait_exit(bp, 5)
                with trio.fail_after(5):
                    await call_done.wait()
            assert code == 130, bp.log_text()
            assert waited < 2.0, f"second SIGINT took {waited:.2f} s"
            assert result is not None and result.ended_by == "server"
            # Even a forced stop says goodbye upstream (bounded, shielded).
            assert session.ended.is_set(), "no session.end upstream on a forced stop"
            assert "Traceback" not in bp.log_text()


async def test_sigterm_when_idle_exits_0_at_once(tmp_path: Path) -> None:
    port = _free_port()
    public = f"http://127.0.0.1:{port}"
    async with fake_agent() as agent:
        env = bridge_env(port=port, public=public, agent_url=agent.url, DRAIN_SECONDS="30")
        async with bridge_process(tmp_path, "bridge", env) as bp:
            bp.proc.send_signal(signal.SIGTERM)
            code, waited = await _wait_exit(bp, 5)
            assert code == 0, bp.log_text()
            assert waited < 1.0, f"idle SIGTERM took {waited:.2f} s"
            assert "Traceback" not in bp.log_text()
