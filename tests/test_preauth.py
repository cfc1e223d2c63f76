"""Pre-auth limits (issue 16): the pure bookkeeping (``bridge/net/preauth.py``) as tables, the
settings, and a real server under a flood of idle connections from one address while a signed
call from another connects and carries audio."""

from __future__ import annotations

import ipaddress
import time

import httpx
import pytest
import trio

from bridge.errors import ConfigError
from bridge.net import front
from bridge.net.preauth import Admitted, PendingConnections, Refused, peer_key
from tests.harness import running_bridge, settings_for
from tools.fake_twilio import CallPlan

LOCAL = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1")]

# --- pure --------------------------------------------------------------------------------------


def test_per_address_limit_refuses_the_new_connection_and_counts_nothing_for_it() -> None:
    pending = PendingConnections[str](max_total=10, max_per_peer=2)
    assert pending.arrive("a", "1.1.1.1") == Admitted()
    assert pending.arrive("b", "1.1.1.1") == Admitted()
    assert pending.arrive("c", "1.1.1.1") == Refused()
    assert len(pending) == 2  # the refused one is not pending (and "e" below proves it is not counted)
    assert pending.arrive("d", "2.2.2.2") == Admitted()  # another address is not affected
    pending.done("a")
    assert pending.arrive("e", "1.1.1.1") == Admitted()  # room again
    assert pending.arrive("f", "1.1.1.1") == Refused()


def test_over_the_total_the_oldest_pending_connection_is_evicted() -> None:
    pending = PendingConnections[str](max_total=3, max_per_peer=3)
    for key, address in [("a", "1.1.1.1"), ("b", "2.2.2.2"), ("c", "3.3.3.3")]:
        assert pending.arrive(key, address) == Admitted()
    assert pending.arrive("d", "4.4.4.4") == Admitted(evict=("a",))
    assert len(pending) == 3
    pending.done("b")  # b's head arrived: c is now the oldest
    assert pending.arrive("e", "5.5.5.5") == Admitted()
    assert pending.arrive("f", "6.6.6.6") == Admitted(evict=("c",))


def test_an_evicted_connection_gives_its_address_room_again() -> None:
    pending = PendingConnections[str](max_total=1, max_per_peer=1)
    assert pending.arrive("a", "1.1.1.1") == Admitted()
    assert pending.arrive("b", "2.2.2.2") == Admitted(evict=("a",))
    assert pending.arrive("c", "1.1.1.1") == Admitted(evict=("b",))  # not Refused: a no longer counts


def test_trusted_proxies_count_only_toward_the_total() -> None:
    pending = PendingConnections[int](max_total=4, max_per_peer=1, trusted=LOCAL)
    assert pending.arrive(1, "10.1.2.3") == Admitted()
    assert pending.arrive(2, "10.1.2.3") == Admitted()  # over the per-address limit, but trusted
    assert pending.arrive(3, "::1") == Admitted()
    assert pending.arrive(4, "8.8.8.8") == Admitted()
    assert pending.arrive(5, "8.8.8.8") == Refused()
    assert pending.arrive(6, "10.9.9.9") == Admitted(evict=(1,))  # the total still holds


def test_done_is_idempotent_and_an_evicted_connection_reporting_done_changes_nothing() -> None:
    pending = PendingConnections[str](max_total=1, max_per_peer=1)
    assert pending.arrive("a", "1.1.1.1") == Admitted()
    assert pending.arrive("b", "2.2.2.2") == Admitted(evict=("a",))
    pending.done("a")
    pending.done("a")
    assert len(pending) == 1
    assert pending.arrive("x", "2.2.2.2") == Refused()  # b still counts for its address
    pending.done("b")
    pending.done("b")
    assert len(pending) == 0
    assert pending.arrive("c", "2.2.2.2") == Admitted()  # counted once, released once
    assert pending.arrive("d", "2.2.2.2") == Refused()


@pytest.mark.parametrize(
    ("address", "key"),
    [("::ffff:192.0.2.7", "192.0.2.7"), ("192.0.2.7", "192.0.2.7"), ("2001:db8::1", "2001:db8::1"), ("", "")],
)
def test_peers_are_counted_under_one_form_of_their_address(address: str, key: str) -> None:
    assert peer_key(address) == key


def test_an_ipv4_mapped_peer_shares_the_ipv4_count_and_a_unix_peer_is_only_in_the_total() -> None:
    pending = PendingConnections[int](max_total=5, max_per_peer=1)
    assert pending.arrive(1, "192.0.2.7") == Admitted()
    assert pending.arrive(2, "::ffff:192.0.2.7") == Refused()
    assert pending.arrive(3, "") == Admitted() and pending.arrive(4, "") == Admitted()


def test_limits_below_one_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        PendingConnections[int](max_total=0, max_per_peer=1)


# --- settings ----------------------------------------------------------------------------------


def test_settings_defaults_and_parsing() -> None:
    s = settings_for("ws://127.0.0.1:9/")
    assert (s.max_pending_connections, s.max_pending_per_ip, s.trusted_proxies) == (256, 16, ())
    s = settings_for(
        "ws://127.0.0.1:9/",
        MAX_PENDING_CONNECTIONS="1000",
        MAX_PENDING_PER_IP="4",
        TRUSTED_PROXIES=" 127.0.0.1, 10.0.0.0/8 ,::1,, 192.168.1.7/24",
    )
    assert (s.max_pending_connections, s.max_pending_per_ip) == (1000, 4)
    assert [str(n) for n in s.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128", "192.168.1.0/24"]


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"TRUSTED_PROXIES": "nginx"}, "TRUSTED_PROXIES"),
        ({"TRUSTED_PROXIES": "10.0.0.0/33"}, "TRUSTED_PROXIES"),
        ({"MAX_PENDING_CONNECTIONS": "0"}, "MAX_PENDING_CONNECTIONS"),
        ({"MAX_PENDING_CONNECTIONS": "many"}, "MAX_PENDING_CONNECTIONS"),
        ({"MAX_PENDING_PER_IP": "-1"}, "MAX_PENDING_PER_IP"),
    ],
)
def test_malformed_settings_are_one_line_errors_naming_the_setting(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_for("ws://127.0.0.1:9/", **env)
    message = str(caught.value)
    assert names in message and "\n" not in message and "use" in message


# --- a real server under a flood ---------------------------------------------------------------

FLOOD = "127.0.0.2"  # loopback aliases work on Linux without setup
PROXY = "127.0.0.3"  # listed in TRUSTED_PROXIES


async def _connect_from(source: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _closed(streams: list[trio.SocketStream], within_s: float) -> list[bool]:
    """For each idle connection: did the server close it (EOF or reset) within ``within_s``?"""
    closed = [False] * len(streams)

    async def watch(i: int) -> None:
        with trio.move_on_after(within_s):
            try:
                data = await streams[i].receive_some(1024)
            except trio.BrokenResourceError:
                data = b""
            closed[i] = data == b""

    async with trio.open_nursery() as nursery:
        for i in range(len(streams)):
            nursery.start_soon(watch, i)
    return closed


def _count(bridge: object, reason: str) -> float:
    return bridge.app.metrics.preauth_closed.labels(reason)._value.get()  # type: ignore[attr-defined]


async def test_a_flood_of_idle_connections_does_not_keep_a_signed_call_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front, "HEAD_DEADLINE_S", 60.0)  # only the limits close the flood here
    env = {"MAX_PENDING_CONNECTIONS": "40", "MAX_PENDING_PER_IP": "16", "TRUSTED_PROXIES": PROXY}
    async with running_bridge(env=env) as bridge:
        flood: list[trio.SocketStream] = []
        proxied: list[trio.SocketStream] = []
        try:
            # 1. One address opens 24 idle connections: 16 are held, the 8 newest are closed at once.
            for _ in range(24):
                flood.append(await _connect_from(FLOOD, bridge.port))
            closed = await _closed(flood, 1.0)
            assert closed == [False] * 16 + [True] * 8
            assert (_count(bridge, "per_ip"), _count(bridge, "total")) == (8, 0)
            # 2. A trusted proxy's 30 idle connections are not limited per address, but the total
            #    is: 16 + 30 > 40, so the 6 oldest pending (the flood's first) are closed.
            for _ in range(30):
                proxied.append(await _connect_from(PROXY, bridge.port))
            closed = await _closed(flood[:16], 1.0)
            assert closed == [True] * 6 + [False] * 10
            assert not any(await _closed(proxied, 0.2))
            assert (_count(bridge, "per_ip"), _count(bridge, "total")) == (8, 6)
            # 3. With the total full, a signed call from 127.0.0.1 still connects (each of its
            #    connections makes room by closing the oldest idle one) and carries audio both ways.
            started = time.monotonic()
            async with httpx.AsyncClient(base_url=bridge.http_base, timeout=5) as http:
                assert (await http.get("/healthz")).status_code == 200
            health_s = time.monotonic() - started
            result = await bridge.twilio.call(CallPlan(speed=8.0, hangup_after_s=2.0))
            assert result.ended_by == "caller" and result.violations == []
            assert result.heard_bytes > 0  # the agent's audio reached the caller
            (session,) = bridge.agent.sessions.values()
            assert session.input_audio  # and the caller's reached the agent
            assert health_s < 0.5, health_s
            # Every closed connection is counted once, under the right reason; none is pending twice.
            closed_flood = await _closed(flood[6:16], 0.3)
            closed_proxied = await _closed(proxied, 0.3)
            total = _count(bridge, "total")
            assert total == 6 + sum(closed_flood) + sum(closed_proxied) and total > 6
            assert _count(bridge, "per_ip") == 8
            still_open = (10 - sum(closed_flood)) + (30 - sum(closed_proxied))
            (gauge,) = bridge.app.metrics.preauth_pending.collect()
            assert gauge.samples[0].value == still_open
        finally:
            for stream in flood + proxied:
                stream.socket.close()
