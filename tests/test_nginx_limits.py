"""deploy/nginx.conf's per-address limits, with a real nginx in front of a real bridge process.

A flood of webhooks and of stream upgrades from one address (127.0.0.2) is cut to the shipped
`limit_req` rate and burst with 429 at nginx, while a signed call from another address
(127.0.0.1) connects and carries audio through the same nginx. The processes, the certificate
and the rendering of the shipped configuration are tests/test_deploy.py's.

Needs nginx and openssl (CI installs nginx via .ci/run); skipped cleanly without them.
"""

from __future__ import annotations

import re
import shutil
import ssl
import time
from pathlib import Path

import httpx
import pytest
import trio

from tests.test_deploy import (
    AUTH_TOKEN,
    NGINX_CONF,
    _free_port,
    _nginx,
    bridge_env,
    bridge_process,
    fake_agent,
    nginx_proxy,
)
from tools.fake_twilio import CallPlan, CallResult, FakeTwilio

FLOOD_FROM = "127.0.0.2"  # any 127/8 address is loopback on Linux; nginx keys its zones by it


def _zone(name: str) -> tuple[float, int]:
    """(rate per second, burst) of the `limit_req` zone `name` as shipped."""
    text = NGINX_CONF.read_text()
    rate = re.search(rf"limit_req_zone\s+\$binary_remote_addr\s+zone={name}:\S+\s+rate=(\d+)r/s;", text)
    burst = re.search(rf"limit_req\s+zone={name}\s+burst=(\d+)\s+nodelay;", text)
    assert rate and burst, f"deploy/nginx.conf: no limit_req zone {name} with a nodelay burst"
    return float(rate.group(1)), int(burst.group(1))


async def _flood(url: str, cert: Path, *, method: str, count: int) -> tuple[list[int], float]:
    """`count` requests from FLOOD_FROM, four at a time (under any limit_conn), as fast as they
    are answered; their statuses and the seconds the flood took."""
    context = ssl.create_default_context(cafile=str(cert))
    transport = httpx.AsyncHTTPTransport(local_address=FLOOD_FROM, verify=context)
    statuses: list[int] = []
    started = time.monotonic()
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:

        async def worker(n: int) -> None:
            for _ in range(n):
                response = await client.request(method, url, data={"CallSid": "CA" + "0" * 32})
                statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(worker, count // 4)
    return statuses, time.monotonic() - started


async def test_a_flood_from_one_address_is_cut_at_nginx_while_a_call_from_another_connects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if _nginx() is None or shutil.which("openssl") is None:
        pytest.skip("nginx and openssl are needed for the reverse-proxy test")
    port, nginx_port = _free_port(), _free_port()
    public = f"https://127.0.0.1:{nginx_port}"
    async with fake_agent() as agent:
        env = bridge_env(port=port, public=public, agent_url=agent.url)
        async with (
            bridge_process(tmp_path, "bridge", env) as bridge,
            nginx_proxy(tmp_path, nginx_port, webhooks=[bridge.port], streams=[bridge.port]) as cert,
        ):
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))
            twilio = FakeTwilio(http_base=public, public_base=public, auth_token=AUTH_TOKEN,
                                connect_base=f"wss://127.0.0.1:{nginx_port}")  # fmt: skip
            result: CallResult | None = None

            async def run_call() -> None:
                nonlocal result
                result = await twilio.call(CallPlan(speed=10.0, hangup_after_s=8.0))

            async with trio.open_nursery() as nursery:
                # Webhooks: unsigned, so whatever passes nginx is the bridge's 403.
                rate, burst = _zone("bridge_webhooks")
                statuses, took_s = await _flood(public + "/twiml", cert, method="POST", count=2 * burst)
                nursery.start_soon(run_call)  # during the stream flood below, from 127.0.0.1
                passed = [s for s in statuses if s != 429]
                assert set(passed) == {403}, statuses
                # The burst plus the first request, plus what the rate refilled meanwhile.
                assert burst + 1 <= len(passed) <= burst + 1 + rate * took_s + 1, (len(passed), took_s)

                # Stream requests with a bogus token: refused by the bridge when they pass nginx.
                rate, burst = _zone("bridge_streams")
                url = public + "/media-stream/not-a-token"
                statuses, took_s = await _flood(url, cert, method="GET", count=2 * burst)
                passed = [s for s in statuses if s != 429]
                assert set(passed) <= {403, 404}, statuses  # the bridge's answers
                assert burst + 1 <= len(passed) <= burst + 1 + rate * took_s + 1, (len(passed), took_s)

            assert result is not None
            assert result.error is None, result.timeline
            assert result.webhook_status == 200
            assert result.handshake_status == 101
            assert result.ended_by == "caller"
            assert agent.greeting_audio in result.heard
            assert "limiting requests" in (tmp_path / "nginx" / "error.log").read_text()
