"""REDIS_URL: the shared state of a cluster of instances, in one Redis (through coredis).

What lives in Redis (keys under ``vab:``; one Redis or a Sentinel-managed primary, not Redis
Cluster: the scripts touch keys they compute):

- ``vab:tok:<sha256(token)>`` — a redeemed stream token: its value is the token's expiry, its
  TTL the token's remaining life (plus a second). Redeeming is part of the atomic admit script,
  so a token is single-use across every instance.
- ``vab:slots`` — a sorted set of the cluster's slots (``CLUSTER_MAX_CALLS``), each scored by the
  moment its lease runs out: ``c|<instance>|<call id>`` for a live call, ``r|<sha256(token)>``
  for a webhook's reservation (never past its token's expiry). Every instance renews its own
  leases every ``LEASE_S``/3; an instance that dies (kill -9, a lost node) stops renewing and
  its slots are free ``LEASE_S`` later at most. Expired members are swept by every script that
  counts.
- ``vab:sid:<CallSid>`` — the call registry: ``<instance>\\n<call id>`` of the CallSid's live
  stream, with the lease's TTL. Admitting a newer stream for a CallSid points it at the newer one
  and tells the older instance to end its call.
- ``vab:inbox:<instance>`` — a list of JSON messages to one instance (``end``: a call replaced
  by a newer stream; ``hangup``: the console's End call, received by another instance; ``amd``:
  Twilio's AMD result for one of its calls, received by another instance). Capped at
  :data:`INBOX_MAX` (oldest dropped) and expiring two leases after its last message, so a dead
  instance's inbox goes away. The instance reads it with BLPOP.
- ``vab:amd:<CallSid>`` — AMD results that beat their CallSid's stream (JSON, at most
  :data:`~bridge.fleet.ledger.KEPT_PER_CALL`, expiring :data:`~bridge.fleet.shared.KEPT_TTL_S`
  after the last): the admit script takes them atomically with the registration, and the
  admitting instance hands them to the call.

Redis is touched at admission, teardown and lease renewal only, never per frame. Every Redis
call has a deadline (:data:`REDIS_DEADLINE_S`). Times in Redis are the instances' wall clocks
(tokens expire on them too), so the instances' clocks must agree to well under ``LEASE_S`` (NTP
does: milliseconds).

Redis down or restarting: live calls are untouched. The first failure marks the state down
(``up`` False: ``bridge_shared_state_up 0``, ``/readyz`` degraded) with one warning, and from
then on admission uses only this instance's own ledger (tokens single-use here, the local
``MAX_CONCURRENT_CALLS`` cap, one stream per CallSid here). The renewal task retries every
second; when Redis answers again it re-registers what this instance holds (live calls and their
CallSids, reservations, the unexpired tokens it redeemed) and the state is up again. The local
ledger is kept in every mode, so the local cap always holds as well.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import trio

from bridge.fleet.ledger import KEPT_PER_CALL, Ledger, Verdict
from bridge.fleet.shared import (
    KEPT_TTL_S,
    Admission,
    AmdResult,
    Deliver,
    EndCall,
    HangUp,
    HangupRoute,
    SharedStateUnavailable,
    SignalRoute,
    amd_from_wire,
    amd_to_wire,
)

log = logging.getLogger("bridge.fleet")

REDIS_DEADLINE_S = 1.0  # Redis answers in well under 1 ms on a LAN; a second of silence is an outage
RETRY_S = 1.0  # while Redis is down: how often to try again
INBOX_MAX = 256  # messages waiting for one instance (a few per replaced or hung-up call)
_INBOX_WAIT_S = 1  # BLPOP's own timeout (whole seconds are portable across Redis versions)
_PREFIX = "vab:"
_SLOTS = _PREFIX + "slots"
_T = TypeVar("_T")

# KEYS: slots, token. ARGV: now, token expiry, cap, reservation member, lease.
_RESERVE = """
local now, exp, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local spent = redis.call('GET', KEYS[2])
if spent and tonumber(spent) >= now then return 0 end
if cap == 0 then return 1 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
local score = math.min(exp, now + tonumber(ARGV[5]))
if not redis.call('ZSCORE', KEYS[1], ARGV[4]) and redis.call('ZCARD', KEYS[1]) >= cap then return 0 end
redis.call('ZADD', KEYS[1], score, ARGV[4])
return 1
"""

# KEYS: slots, token, sid, kept AMD results. ARGV: now, token expiry, cap, call member,
# reservation member, registry value, lease, this instance, inbox prefix, inbox max.
# Admitted: {'admitted', this instance's older call id or '', the kept AMD results...}.
_ADMIT = """
local now, exp, cap, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[7])
local spent = redis.call('GET', KEYS[2])
if spent and tonumber(spent) >= now then return {'replayed', ''} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
local reserved = redis.call('ZREM', KEYS[1], ARGV[5])
if reserved == 0 and cap > 0 and redis.call('ZCARD', KEYS[1]) >= cap then return {'full', ''} end
redis.call('SET', KEYS[2], ARGV[2], 'PX', math.max(1, math.ceil((exp - now) * 1000)) + 1000)
redis.call('ZADD', KEYS[1], now + lease, ARGV[4])
local kept = redis.call('LRANGE', KEYS[4], 0, -1)
redis.call('DEL', KEYS[4])
local answer = {'admitted', ''}
for _, item in ipairs(kept) do table.insert(answer, item) end
local older = redis.call('GET', KEYS[3])
redis.call('SET', KEYS[3], ARGV[6], 'PX', math.ceil(lease * 1000))
if older and older ~= ARGV[6] then
  local nl = string.find(older, '\\n', 1, true)
  if nl then
    local holder, call_id = string.sub(older, 1, nl - 1), string.sub(older, nl + 1)
    if holder == ARGV[8] then answer[2] = call_id; return answer end
    local inbox = ARGV[9] .. holder
    redis.call('RPUSH', inbox, cjson.encode({op = 'end', call_id = call_id,
      reason = 'a newer stream for its CallSid was admitted on another instance'}))
    redis.call('LTRIM', inbox, -tonumber(ARGV[10]), -1)
    redis.call('PEXPIRE', inbox, math.ceil(lease * 2000))
  end
end
return answer
"""

# KEYS: slots, sid. ARGV: call member, registry value.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: slots. ARGV: now, lease, recreate (1: Redis may have lost everything), then
# n calls (member, sid key, registry value)..., n reservations (member, expiry)...,
# n tokens (key, expiry)... (tokens only when recreating).
_RENEW = """
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local recreate = ARGV[3] == '1'
local lease_ms = math.ceil(lease * 1000)
local i = 4
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
  local current = redis.call('GET', ARGV[i + 1])
  if (not current) or current == ARGV[i + 2] then redis.call('SET', ARGV[i + 1], ARGV[i + 2], 'PX', lease_ms) end
  i = i + 3
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local score = math.min(tonumber(ARGV[i + 1]), now + lease)
  if score >= now then
    if recreate then redis.call('ZADD', KEYS[1], score, ARGV[i])
    else redis.call('ZADD', KEYS[1], 'XX', score, ARGV[i]) end
  end
  i = i + 2
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local exp = tonumber(ARGV[i + 1])
  if exp >= now then
    redis.call('SET', ARGV[i], ARGV[i + 1], 'NX', 'PX', math.max(1, math.ceil((exp - now) * 1000)) + 1000)
  end
  i = i + 2
end
return 1
"""

# KEYS: sid. ARGV: this instance, inbox prefix, inbox max, lease, CallSid.
_HANGUP = """
local value = redis.call('GET', KEYS[1])
if not value then return 'unknown' end
local nl = string.find(value, '\\n', 1, true)
if not nl then return 'unknown' end
local holder = string.sub(value, 1, nl - 1)
if holder == ARGV[1] then return 'here' end
local inbox = ARGV[2] .. holder
redis.call('RPUSH', inbox, cjson.encode({op = 'hangup', call_sid = ARGV[5], call_id = string.sub(value, nl + 1)}))
redis.call('LTRIM', inbox, -tonumber(ARGV[3]), -1)
redis.call('PEXPIRE', inbox, math.ceil(tonumber(ARGV[4]) * 2000))
return 'sent'
"""


# KEYS: sid, kept AMD results. ARGV: this instance, inbox prefix, inbox max, lease, the
# result (an inbox message, op 'amd'), kept TTL (ms), kept max.
_AMD = """
local value = redis.call('GET', KEYS[1])
local nl = value and string.find(value, '\\n', 1, true)
if nl then
  local holder = string.sub(value, 1, nl - 1)
  if holder == ARGV[1] then return 'here' end
  local inbox = ARGV[2] .. holder
  redis.call('RPUSH', inbox, ARGV[5])
  redis.call('LTRIM', inbox, -tonumber(ARGV[3]), -1)
  redis.call('PEXPIRE', inbox, math.ceil(tonumber(ARGV[4]) * 2000))
  return 'sent'
end
if redis.call('LLEN', KEYS[2]) < tonumber(ARGV[7]) then redis.call('RPUSH', KEYS[2], ARGV[5]) end
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return 'kept'
"""


def instance_name() -> str:
    """This process's name in the cluster: host, pid and a random suffix (a restarted process
    with a recycled pid is a new instance; its predecessor's leases run out on their own)."""
    host = socket.gethostname().replace("|", "-").replace("\n", "-")[:64] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def _digest(token: str) -> str:
    # Tokens are bearer credentials until they expire: Redis sees only their hash.
    return hashlib.sha256(token.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class _Call:
    call_sid: str
    member: str  # in vab:slots
    registry: str  # the vab:sid:<CallSid> value that is ours


class RedisState:
    """A :class:`~bridge.fleet.shared.SharedState` for a cluster sharing one Redis.

    ``max_calls`` is this instance's own cap (``MAX_CONCURRENT_CALLS``), ``cluster_max_calls``
    the cluster's (``CLUSTER_MAX_CALLS``; 0: no cluster cap), ``lease_s`` how long a slot
    outlives its instance's last renewal (``LEASE_S``). ``client`` is a coredis client (not yet
    entered: :meth:`run` enters it); ``clock`` the wall clock tokens expire on.
    """

    HOLDER = "local"

    def __init__(
        self,
        client: Any,
        *,
        max_calls: int,
        cluster_max_calls: int = 0,
        lease_s: float = 15.0,
        instance: str | None = None,
        clock: Callable[[], float] = time.time,
        deadline_s: float = REDIS_DEADLINE_S,
    ) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.instance = instance or instance_name()
        self.lease_s = lease_s
        self.cluster_max_calls = cluster_max_calls
        self.local = Ledger(max_calls)
        self._client = client
        self._clock = clock
        self._deadline_s = deadline_s
        self._inbox = f"{_PREFIX}inbox:{self.instance}"
        self._calls: dict[str, _Call] = {}
        self._reserved: dict[str, float] = {}  # our reservations in Redis: member -> token expiry
        self._spent: dict[str, float] = {}  # tokens we redeemed: token key -> expiry (re-registered after a restart)
        self._pending = 0  # admissions waiting for Redis: promised slots the local ledger cannot see yet
        self._up = False
        self.recoveries = 0  # outages survived (Redis came back and this instance re-registered)
        self._warned_down = False  # this outage was logged
        self._running = False
        self._recovered = trio.Event()  # set while up (replaced at each outage)
        self._lost = trio.Event()  # set while down (replaced at each recovery)
        self._scripts: dict[str, Any] = {}
        self._on_amd: Deliver | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisState:
        """A state on a ``redis://`` or ``rediss://`` URL (password in the URL allowed)."""
        import coredis
        from coredis.retry import NoRetryPolicy

        deadline_s = float(kwargs.get("deadline_s", REDIS_DEADLINE_S))
        client = coredis.Redis.from_url(
            url,
            decode_responses=True,
            connect_timeout=deadline_s,
            stream_timeout=deadline_s + _INBOX_WAIT_S,  # the inbox's BLPOP waits that long by design
            # Our deadline decides; a retry inside it would only hide the outage.
            retry_policy=NoRetryPolicy(),
            client_name="voice-agent-bridge",
        )
        return cls(client, **kwargs)

    # --- SharedState --------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._up

    async def run(
        self,
        end_call: EndCall,
        hang_up: HangUp | None = None,
        deliver: Deliver | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Enter the client, try Redis once (start-up is not held up by an outage: the state
        starts down and recovers), then renew leases and read this instance's inbox until
        cancelled."""
        self._on_amd = deliver
        async with self._client, trio.open_nursery() as nursery:
            self._scripts = {
                name: self._client.register_script(body)
                for name, body in (("reserve", _RESERVE), ("admit", _ADMIT), ("release", _RELEASE),
                                   ("renew", _RENEW), ("hangup", _HANGUP), ("amd", _AMD))
            }  # fmt: skip
            self._running = True
            try:
                await self._renew(recreate=True)
                if not self._up:
                    self._went_down("not reachable at start-up")
                task_status.started()
                nursery.start_soon(self._keep_leases)
                await self._read_inbox(end_call, hang_up)
            finally:
                self._running = False
                self._up = False

    async def reserve(self, token: str, *, expires_at: float) -> bool:
        now = self._clock()
        if not self._up:
            return self.local.reserve(self.HOLDER, token, expires_at=expires_at, now=now)
        if self.local.redeemed(token, now) or not self.local.has_room(now, pending=self._pending):
            return False
        member = "r|" + _digest(token)
        try:
            ok = await self._call(
                "reserve", [_SLOTS, self._token_key(token)],
                [now, expires_at, self.cluster_max_calls, member, self.lease_s],
            )  # fmt: skip
        except SharedStateUnavailable as exc:
            self._went_down(str(exc))
            return self.local.reserve(self.HOLDER, token, expires_at=expires_at, now=now)
        if ok and self.cluster_max_calls:
            self._reserved[member] = expires_at
        return bool(ok)

    async def admit(self, token: str, *, call_id: str, call_sid: str, expires_at: float) -> Admission:
        """Redeem ``token`` and take a slot (cluster-wide while Redis is up, here always).

        The Redis step is shielded and bounded by its deadline, so it either happened or not:
        if the caller is cancelled after Redis granted the slot, the slot is given back."""
        now = self._clock()
        verdict = self.local.would_admit(token, now, pending=self._pending)
        if verdict is not Verdict.ADMITTED:
            return Admission(verdict)
        call = _Call(call_sid, f"c|{self.instance}|{call_id}", f"{self.instance}\n{call_id}")
        cluster_replaces: str | None = None
        kept: list[Any] = []
        if self._up:
            self._pending += 1
            try:
                with trio.CancelScope(shield=True):
                    answer = await self._call(
                        "admit",
                        [_SLOTS, self._token_key(token), _PREFIX + "sid:" + call_sid, _PREFIX + "amd:" + call_sid],
                        [now, expires_at, self.cluster_max_calls, call.member, "r|" + _digest(token),
                         call.registry, self.lease_s, self.instance, _PREFIX + "inbox:", INBOX_MAX],
                    )  # fmt: skip
            except SharedStateUnavailable as exc:
                self._went_down(str(exc))
                answer = None
            finally:
                self._pending -= 1
            if answer is not None:
                if answer[0] != Verdict.ADMITTED.value:
                    return Admission(Verdict(answer[0]))
                cluster_replaces = answer[1] or None
                kept = list(answer[2:])
        decision = self.local.admit(
            self.HOLDER, token, call_id=call_id, call_sid=call_sid, expires_at=expires_at, now=now
        )
        self._spent[self._token_key(token)] = expires_at
        self._reserved.pop("r|" + _digest(token), None)
        if decision.verdict is not Verdict.ADMITTED:  # cannot happen: checked, and pending counted
            await self._release_in_redis(call)
            return Admission(decision.verdict)
        self._calls[call_id] = call
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self.release(call_id)
            raise
        for raw in kept:
            self._hand_over(raw)
        local_replaces = decision.replaces.call_id if decision.replaces else None
        return Admission(Verdict.ADMITTED, cluster_replaces or local_replaces)

    async def release(self, call_id: str) -> None:
        self.local.release(self.HOLDER, call_id)
        call = self._calls.pop(call_id, None)
        if call is not None and self._up:
            await self._release_in_redis(call)

    async def request_hangup(self, call_sid: str) -> HangupRoute:
        if self.local.live_call(call_sid) is not None:
            return HangupRoute.HERE
        if not self._up:
            raise SharedStateUnavailable("Redis is unreachable: cannot find which instance holds the call")
        try:
            route = await self._call(
                "hangup", [_PREFIX + "sid:" + call_sid],
                [self.instance, _PREFIX + "inbox:", INBOX_MAX, self.lease_s, call_sid],
            )  # fmt: skip
        except SharedStateUnavailable as exc:
            self._went_down(str(exc))
            raise
        return HangupRoute(route)

    async def deliver_amd(self, result: AmdResult) -> SignalRoute:
        if self.local.live_call(result.call_sid) is not None:
            return SignalRoute.HERE
        if not self._up:
            raise SharedStateUnavailable("Redis is unreachable: cannot find which instance holds the call")
        message = orjson.dumps({"op": "amd", **amd_to_wire(result)}).decode()
        try:
            route = await self._call(
                "amd", [_PREFIX + "sid:" + result.call_sid, _PREFIX + "amd:" + result.call_sid],
                [self.instance, _PREFIX + "inbox:", INBOX_MAX, self.lease_s, message,
                 math.ceil(KEPT_TTL_S * 1000), KEPT_PER_CALL],
            )  # fmt: skip
        except SharedStateUnavailable as exc:
            self._went_down(str(exc))
            raise
        return SignalRoute(route)

    def _hand_over(self, raw: str) -> None:
        """An AMD result (an inbox message, or kept for a stream admitted here) to our call."""
        try:
            result = amd_from_wire(orjson.loads(raw))
        except orjson.JSONDecodeError:
            result = None
        if result is None:
            log.error("ignored an unreadable AMD result from Redis: %.80r", raw)
        elif self._on_amd is None:
            log.warning("call %s: an AMD result arrived, but this instance takes none", result.call_sid)
        else:
            self._on_amd(result)

    # --- background ---------------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        """Renew every LEASE_S/3 (a lease survives two missed renewals); while down, retry every
        RETRY_S and re-register everything this instance holds once Redis answers."""
        while True:
            if self._up:
                with trio.move_on_after(self.lease_s / 3):
                    await self._lost.wait()  # an outage seen elsewhere: start retrying at once
            if not self._up:
                await trio.sleep(min(RETRY_S, self.lease_s / 3))
            await self._renew(recreate=not self._up)

    async def _renew(self, *, recreate: bool) -> None:
        now = self._clock()
        self._forget_expired(now)
        args: list[object] = [now, self.lease_s, 1 if recreate else 0, len(self._calls)]
        for call in self._calls.values():
            args += [call.member, _PREFIX + "sid:" + call.call_sid, call.registry]
        args.append(len(self._reserved))
        for member, expires_at in self._reserved.items():
            args += [member, expires_at]
        tokens = self._spent if recreate else {}
        args.append(len(tokens))
        for key, expires_at in tokens.items():
            args += [key, expires_at]
        try:
            await self._call("renew", [_SLOTS], args)
        except SharedStateUnavailable as exc:
            if self._up:
                self._went_down(str(exc))
            return
        if not self._up:
            self._came_back(len(self._calls), len(tokens))

    async def _read_inbox(self, end_call: EndCall, hang_up: HangUp | None) -> None:
        while True:
            if not self._up:
                await self._recovered.wait()
                continue
            try:
                item = await self._call_raw(
                    lambda: self._client.blpop([self._inbox], timeout=_INBOX_WAIT_S), _INBOX_WAIT_S
                )
            except SharedStateUnavailable as exc:
                self._went_down(str(exc))
                continue
            if item is not None:
                self._deliver(item[1], end_call, hang_up)

    def _deliver(self, raw: str, end_call: EndCall, hang_up: HangUp | None) -> None:
        try:
            message = orjson.loads(raw)
            op = message["op"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.error("ignored an unreadable message in %s: %.80r", self._inbox, raw)
            return
        if op == "end":
            end_call(str(message.get("call_id")), str(message.get("reason") or "replaced"))
        elif op == "hangup":
            call_sid = str(message.get("call_sid"))
            if self.local.live_call(call_sid) is None:
                log.info("asked to hang up call %s, which has already left this instance", call_sid)
            elif hang_up is None:
                log.warning("asked to hang up call %s, but this instance has no call control", call_sid)
            else:
                hang_up(call_sid)
        elif op == "amd":
            self._hand_over(raw)
        else:
            log.error("ignored a message of unknown op %.40r in %s", op, self._inbox)

    # --- plumbing -----------------------------------------------------------------------------

    def _token_key(self, token: str) -> str:
        return _PREFIX + "tok:" + _digest(token)

    def _forget_expired(self, now: float) -> None:
        for table in (self._reserved, self._spent):
            for key in [k for k, expires_at in table.items() if expires_at < now]:
                del table[key]

    async def _release_in_redis(self, call: _Call) -> None:
        try:
            await self._call("release", [_SLOTS, _PREFIX + "sid:" + call.call_sid], [call.member, call.registry])
        except SharedStateUnavailable as exc:
            # Not renewed any more: its lease frees the slot within LEASE_S.
            self._went_down(str(exc))

    async def _call(self, script: str, keys: list[str], args: list[object]) -> Any:
        if not self._running:
            raise SharedStateUnavailable("the Redis client is not running")
        run = self._scripts[script]
        return await self._call_raw(lambda: run(keys=keys, args=[_arg(a) for a in args]))

    async def _call_raw(self, request: Callable[[], Awaitable[_T]], extra_s: float = 0.0) -> _T:
        import coredis.exceptions

        try:
            with trio.fail_after(self._deadline_s + extra_s):
                return await request()
        except trio.TooSlowError:
            raise SharedStateUnavailable(f"Redis did not answer within {self._deadline_s + extra_s:g} s") from None
        except (coredis.exceptions.RedisError, OSError) as exc:
            raise SharedStateUnavailable(f"Redis: {exc}") from exc

    def _went_down(self, why: str) -> None:
        """Redis failed: admit locally from now on. One warning per outage."""
        if not self._warned_down:
            log.warning(
                "shared state: Redis is unreachable (%s): admitting calls with this instance's own "
                "guarantees until it is back", why,
            )  # fmt: skip
        self._warned_down = True
        self._up = False
        if self._recovered.is_set():
            self._recovered = trio.Event()
        self._lost.set()

    def _came_back(self, calls: int, tokens: int) -> None:
        if self._warned_down:
            log.warning("shared state: Redis is back: re-registered %d live call(s) and %d spent token(s)",
                        calls, tokens)
            self.recoveries += 1
        self._warned_down = False
        self._up = True
        self._recovered.set()
        if self._lost.is_set():
            self._lost = trio.Event()


def _arg(value: object) -> str | int | float:
    if isinstance(value, float):
        # Lua reads numbers back with tonumber(); repr keeps every bit of a float.
        return repr(value) if math.isfinite(value) else "0"
    if isinstance(value, str | int):
        return value
    raise TypeError(f"not a Redis argument: {value!r}")
