"""The front door (bridge/net/front.py): request-head parsing and routing (pure), and real
connections through ``serve``: webhooks spliced to Hypercorn byte for byte (one request per
connection), hostile heads, and the Media Streams upgrade served by trio-websocket, the only
entry path for a call (an upgrade that reaches Hypercorn is refused)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import stat
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import trio
from hypercorn.trio import serve as hypercorn_serve

from bridge.net import front
from bridge.net.front import Replay, parse_head, wants_media_stream
from bridge.net.websocket import LeanWebSocketConnection
from bridge.phone.stream import WsPhoneSocket
from bridge.server import hypercorn_config
from tests.harness import ACCOUNT_SID, AUTH_TOKEN, PUBLIC, Running, running_bridge
from tools.fake_twilio import CallPlan, FakeTwilio

UPGRADE = (
    b"GET /media-stream/tok?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)

# --- pure ------------------------------------------------------------------------------------


def test_parse_head_reads_method_target_and_lower_cased_headers() -> None:
    head = parse_head(UPGRADE + b"trailing bytes")
    assert head is not None
    assert (head.method, head.target) == (b"GET", "/media-stream/tok?x=1")
    assert (b"upgrade", b"websocket") in head.headers and (b"host", b"h") in head.headers


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: h\r\n",  # incomplete
        b"",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 preface
        b"GET /\r\n\r\n",  # HTTP/0.9-ish request line
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",  # whitespace before the colon (request smuggling vector)
        b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",  # obsolete line folding
        b"GET  / HTTP/1.1\r\n\r\n",
    ],
)
def test_parse_head_refuses_incomplete_or_malformed_heads(data: bytes) -> None:
    assert parse_head(data) is None


@pytest.mark.parametrize(
    ("data", "media"),
    [
        (UPGRADE, True),
        (UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: WebSocket"), True),
        (UPGRADE.replace(b"keep-alive, Upgrade", b"upgrade"), True),
        (UPGRADE.replace(b"GET", b"POST", 1), False),
        (UPGRADE.replace(b"/media-stream/", b"/twiml/", 1), False),
        (UPGRADE.replace(b"Upgrade: websocket\r\n", b""), False),
        (UPGRADE.replace(b"keep-alive, Upgrade", b"keep-alive"), False),
        (UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: h2c"), False),
        (b"POST /twiml HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", False),
    ],
)
def test_only_a_websocket_upgrade_to_the_media_route_is_diverted(data: bytes, media: bool) -> None:
    head = parse_head(data)
    assert head is not None
    assert wants_media_stream(head) is media


async def test_replay_returns_the_head_first_within_max_bytes_then_the_stream() -> None:
    inner_send, inner_receive = trio.testing.memory_stream_pair()
    replay = Replay(inner_receive, b"abcdef")
    assert await replay.receive_some(4) == b"abcd"
    assert await replay.receive_some() == b"ef"
    await inner_send.send_all(b"more")
    assert await replay.receive_some() == b"more"


# --- through the server ------------------------------------------------------------------------


async def raw_exchange(port: int, chunks: list[bytes], *, half_close: bool = False) -> bytes:
    """Send ``chunks`` on one connection (a scheduling point after each, so the bridge may read
    them one by one) and read the whole answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for chunk in chunks:
            await stream.send_all(chunk)
            await trio.lowlevel.checkpoint()
        if half_close:
            await stream.send_eof()
        received = b""
        with trio.fail_after(10):
            while data := await stream.receive_some(65536):
                received += data
                if not half_close and b"\r\n\r\n" in received and _complete(received):
                    break
        return received


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


BIG = b"a" * (front.HEAD_LIMIT + 100)
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: bridge.example.com\r\nConnection: close\r\n\r\n"


async def test_a_webhook_head_sent_byte_by_byte_is_still_answered() -> None:
    async with running_bridge() as bridge:
        response = await raw_exchange(bridge.port, [HEALTH[i : i + 1] for i in range(len(HEALTH))])
        assert response.startswith(b"HTTP/1.1 200")
        assert b'"status"' in response or b"ok" in response.lower()


async def test_a_client_that_half_closes_after_its_request_gets_the_answer() -> None:
    async with running_bridge() as bridge:
        response = await raw_exchange(bridge.port, [HEALTH], half_close=True)
        assert response.startswith(b"HTTP/1.1 200")


async def read_response(stream: trio.abc.ReceiveStream) -> bytes:
    received = b""
    with trio.fail_after(10):
        while not (b"\r\n\r\n" in received and _complete(received)):
            data = await stream.receive_some(65536)
            assert data, received
            received += data
    return received


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    rest = b""
    with trio.fail_after(5):
        try:
            while data := await stream.receive_some(65536):
                rest += data
        except trio.BrokenResourceError:
            pass  # reset: we wrote to a connection the bridge had closed
    return rest


async def test_a_keep_alive_request_is_answered_and_the_connection_closed_after_it() -> None:
    """Hypercorn serves one request per connection, says so, and closes it: so every request
    head on every connection passes the front door (see the next test)."""
    request = b"GET /healthz HTTP/1.1\r\nHost: bridge.example.com\r\n\r\n"
    async with running_bridge() as bridge:
        stream = await trio.open_tcp_stream("127.0.0.1", bridge.port)
        async with stream:
            await stream.send_all(request)
            response = await read_response(stream)
            assert response.startswith(b"HTTP/1.1 200")
            assert b"\r\nconnection: close\r\n" in response.lower()
            assert await read_to_eof(stream) == b""


async def _twiml_then_upgrade(bridge: Running, *, pipelined: bool) -> tuple[bytes, bytes, str]:
    """A signed /twiml webhook, then on the same connection the signed upgrade for the stream
    it returned. Returns (webhook response, what came after it, the stream URL)."""
    call_sid = "CA" + "ab" * 16
    form = urlencode(bridge.twilio.voice_params(CallPlan(), call_sid)).encode()
    signature = bridge.twilio.sign(PUBLIC + "/twiml", parse_qsl(form.decode()))
    webhook = (
        b"POST /twiml HTTP/1.1\r\nHost: bridge.example.com\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        + f"X-Twilio-Signature: {signature}\r\nContent-Length: {len(form)}\r\n\r\n".encode()
        + form
    )
    stream = await trio.open_tcp_stream("127.0.0.1", bridge.port)
    async with stream:
        await stream.send_all(webhook)
        if pipelined:
            await stream.send_all(_signed_upgrade(bridge, "/media-stream/not-yet-known"))
        response = await read_response(stream)
        stream_url = re.search(rb'url="([^"]+)"', response).group(1).decode()  # type: ignore[union-attr]
        if not pipelined:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(_signed_upgrade(bridge, urlsplit(stream_url).path))
        return response, await read_to_eof(stream), stream_url


def _signed_upgrade(bridge: Running, path: str) -> bytes:
    signature = bridge.twilio.sign(f"wss://bridge.example.com{path}", {})
    return UPGRADE.replace(b"/media-stream/tok?x=1", path.encode()).replace(
        b"Host: h\r\n", f"Host: bridge.example.com\r\nX-Twilio-Signature: {signature}\r\n".encode()
    )


@pytest.mark.parametrize("pipelined", [False, True])
async def test_an_upgrade_after_a_webhook_on_one_connection_is_a_call_through_the_front_door(
    pipelined: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hypercorn 0.18 would serve a second request on a kept-alive connection, an upgrade too
    (a WSStream for any GET with Upgrade: websocket). It closes the connection after the first
    response instead, so the upgrade is never served there; the client's next connection, where
    a real client sends it, passes the front door and is a call with audio."""
    sockets: list[WsPhoneSocket] = []
    accepted = WsPhoneSocket.accepted

    def spy(self: WsPhoneSocket, ws: object) -> None:
        sockets.append(self)
        accepted(self, ws)  # type: ignore[arg-type]

    monkeypatch.setattr(WsPhoneSocket, "accepted", spy)
    async with running_bridge() as bridge:
        response, after, stream_url = await _twiml_then_upgrade(bridge, pipelined=pipelined)
        assert response.startswith(b"HTTP/1.1 200") and b"connection: close" in response.lower()
        assert after == b""  # no 101 on the webhook's connection
        assert sockets == [] and bridge.agent.connections_total == 0
        async with bridge.twilio.open_stream(stream_url, call_sid="CA" + "ab" * 16) as client:
            await client.send_connected()
            await client.send_start()
            with trio.fail_after(10):
                while json.loads(await client.receive()).get("event") != "media":
                    pass
        assert len(sockets) == 1 and bridge.agent.connections_total == 1


@pytest.mark.parametrize(
    ("request_bytes", "statuses"),
    [
        (b"GET /media-stream/abc HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", (b"404", b"405", b"400")),
        # Past HEAD_LIMIT the front door stops looking and Hypercorn decides (it takes this one).
        (b"GET /healthz HTTP/1.1\r\nHost: h\r\nX-Big: " + BIG + b"\r\n\r\n", (b"200", b"400", b"431")),
        (b"BREW /pot HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", (b"404", b"405", b"400")),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n", (b"400",)),  # a TLS hello
    ],
)
async def test_what_the_front_door_does_not_divert_is_answered_by_hypercorn_as_before(
    request_bytes: bytes, statuses: tuple[bytes, ...]
) -> None:
    async with running_bridge() as bridge:
        response = await raw_exchange(bridge.port, [request_bytes])
        assert response[9:12] in statuses, response[:200]
        assert await bridge.twilio.call(CallPlan(speed=8.0, hangup_after_s=3.0)) is not None  # still serving


async def test_a_garbage_upgrade_to_the_media_route_is_refused_and_opens_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(front, "HANDSHAKE_DEADLINE_S", 0.3)
    async with running_bridge() as bridge:
        broken = UPGRADE.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 99")
        response = await raw_exchange(bridge.port, [broken])
        assert response.startswith(b"HTTP/1.1 4"), response[:200]
        rejected = bridge.app.metrics.rejected_streams.labels("bad handshake")
        with trio.fail_after(5):
            while rejected._value.get() < 1:
                await trio.sleep(0.05)
        assert "a connection failed" not in caplog.text  # refused, not crashed
        unsigned = await raw_exchange(bridge.port, [UPGRADE])
        assert unsigned.startswith(b"HTTP/1.1 403"), unsigned[:200]
        assert b"Forbidden" in unsigned
        assert bridge.agent.connections_total == 0
        assert bridge.app.active_calls == 0


def _private_sockets() -> set[Path]:
    root = Path(os.environ.get("TMPDIR", "/tmp"))
    return {p for p in root.glob("bridge-hypercorn-*/hypercorn.sock") if stat.S_ISSOCK(p.stat().st_mode)}


async def test_hypercorn_private_socket_is_private_and_removed_at_shutdown() -> None:
    before = _private_sockets()
    async with running_bridge() as bridge:
        mine = _private_sockets() - before
        assert len(mine) == 1, mine
        (path,) = mine
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        await bridge.twilio.call(CallPlan(speed=8.0, hangup_after_s=2.0))
    assert not path.exists() and not path.parent.exists()


async def test_an_upgrade_that_reaches_hypercorn_is_refused_and_opens_nothing() -> None:
    """One entry path for Media Streams: the app behind Hypercorn serves no WebSocket."""
    async with running_bridge() as bridge, trio.open_nursery() as nursery:
        config = hypercorn_config(bridge.settings, bind=["127.0.0.1:0"])
        binds = await nursery.start(functools.partial(hypercorn_serve, bridge.app, config, mode="asgi"))  # type: ignore[arg-type]
        twilio = FakeTwilio(http_base=binds[0], public_base=PUBLIC, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
        result = await twilio.call(CallPlan(speed=8.0, hangup_after_s=6.0))
        assert result.heard == b"" and result.ended_by != "caller"
        assert bridge.agent.connections_total == 0 and bridge.app.active_calls == 0
        nursery.cancel_scope.cancel()


async def test_a_call_through_the_front_door_runs_on_the_lean_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    accepted = WsPhoneSocket.accepted

    def spy(self: WsPhoneSocket, ws: object) -> None:
        seen.append(ws)
        accepted(self, ws)  # type: ignore[arg-type]

    monkeypatch.setattr(WsPhoneSocket, "accepted", spy)
    async with running_bridge() as bridge:
        result = await bridge.twilio.call(CallPlan(speed=8.0, hangup_after_s=2.0))
    assert result.ended_by == "caller" and result.violations == []
    assert len(seen) == 1 and isinstance(seen[0], LeanWebSocketConnection)


async def test_memory_is_released_when_the_last_media_connection_has_closed_and_while_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    released: list[int] = []
    monkeypatch.setattr(front, "IDLE_RELEASES_AT_S", (0.0, 1.5))
    async with running_bridge() as bridge:
        monkeypatch.setattr(front, "release_free_memory", lambda: released.append(bridge.app.active_calls))
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(bridge.twilio.call, CallPlan(speed=8.0, hangup_after_s=2.0))
        with trio.fail_after(5):
            while not released:
                await trio.sleep(0.01)
        assert released == [0]  # with no call left: not when the first of the two ended
        # A call starts before the second release is due: that release is skipped (never
        # mid-call) and the next idle starts over: at once, then again 1.5 s later.
        await bridge.twilio.call(CallPlan(speed=1.0, hangup_after_s=2.0))
        await trio.sleep(1.8)
    assert released == [0, 0, 0]


def test_a_port_in_use_stops_start_up_with_one_line(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from tests.harness import API_KEY

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            "ASSEMBLYAI_API_KEY": API_KEY,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "PUBLIC_HOSTNAME": PUBLIC,
            "BIND_HOST": "127.0.0.1",
            "PORT": str(port),
        }
        done = subprocess.run(
            [sys.executable, "-m", "bridge", "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"Configuration error: cannot listen on 127.0.0.1:{port} (Address already in use)")
    assert "PORT" in lines[0] and "Traceback" not in done.stderr


async def test_a_silent_connection_is_closed_after_the_head_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front, "HEAD_DEADLINE_S", 0.3)
    async with running_bridge() as bridge:
        stream = await trio.open_tcp_stream("127.0.0.1", bridge.port)
        async with stream:
            with trio.fail_after(5):
                assert await stream.receive_some() == b""  # closed by the bridge, nothing sent
        assert (await raw_exchange(bridge.port, [HEALTH])).startswith(b"HTTP/1.1 200")


def test_directories_left_by_killed_bridges_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    import subprocess

    from bridge.server import PRIVATE_PREFIX, make_private_dir

    dead_pid = subprocess.Popen(["true"])  # a pid that has exited (and been reaped)
    dead_pid.wait()
    stale = tmp_path / f"{PRIVATE_PREFIX}{dead_pid.pid}-abc"
    stale.mkdir()
    (stale / "hypercorn.sock").write_text("left over")
    alive = tmp_path / f"{PRIVATE_PREFIX}{os.getppid()}-def"
    alive.mkdir()
    other = tmp_path / "bridge-demo-xyz"
    other.mkdir()
    mine = Path(make_private_dir(str(tmp_path)))
    assert not stale.exists()
    assert alive.exists() and other.exists()
    assert mine.name.startswith(f"{PRIVATE_PREFIX}{os.getpid()}-")
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
