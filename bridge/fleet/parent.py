"""WORKERS=N: the parent process is the machine's one admission authority.

Each worker has one socketpair to the parent. Over it the worker sends a small request per
admission step (reserve, admit, release: never per frame) and waits for the answer; the parent
holds the one :class:`~bridge.fleet.ledger.Ledger` and applies each request to it synchronously,
so every decision is atomic across the workers. Frames are a 4-byte big-endian length and a
JSON object::

    worker -> parent  {"id": 7, "op": "reserve", "token": "...", "expires_at": 1767000000}
                      {"id": 8, "op": "admit", "token": "...", "call_id": "c-1a2b3c4d",
                       "call_sid": "CA...", "expires_at": 1767000000}
                      {"id": 9, "op": "release", "call_id": "c-1a2b3c4d"}
                      {"id": 10, "op": "hangup", "call_sid": "CA..."}
                      {"id": 12, "op": "amd", "call_sid": "CA...", "answered_by": "human",
                       "detection_ms": 1830}
    parent -> worker  {"id": 7, "ok": true}
                      {"id": 8, "verdict": "admitted", "replaces": null, "amd": [...]}
                            ("amd", when any: the AMD results kept for the CallSid)
                      {"id": 9, "ok": true}
                      {"id": 10, "route": "sent"}          (here | sent | unknown)
                      {"id": 12, "route": "kept"}          (here | sent | kept)
                      {"id": 11, "error": "bad request"}
                      {"push": "end", "call_id": "c-...", "reason": "..."}   (unsolicited)
                      {"push": "hangup", "call_sid": "CA..."}               (unsolicited)
                      {"push": "amd", "call_sid": "CA...", "answered_by": "...", "detection_ms": 1830}

The parent uses its own clock. When a worker's socket reaches EOF (it exited, or was killed with
SIGKILL), the parent frees every slot that worker held; tokens it redeemed stay redeemed. A
AMD result for a CallSid with no live stream is kept by the parent (bounded, for
:data:`~bridge.fleet.shared.KEPT_TTL_S`) and handed over in the answer to that CallSid's admission. A
worker whose parent is gone (or silent past :data:`REQUEST_DEADLINE_S`) fails closed: streams
are refused with 503 and webhooks answer busy, until ``drain_when_orphaned`` ends the worker.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import trio

from bridge.fleet.ledger import KeptSignals, Ledger, Verdict
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

MAX_FRAME_BYTES = 4096  # a request is ~250 bytes (a 100-character token, a CallSid, an id)
REQUEST_DEADLINE_S = 2.0  # the parent answers in well under 1 ms; 2 s of silence means it is gone or stuck
OUTBOX_FRAMES = 64  # pushes to one worker from the others' admissions (a few per replaced call; full: dropped, logged)
_MAX_LATE_ADMITS = 1024
_LENGTH = struct.Struct(">I")


class FrameError(Exception):
    """The other side broke the framing: the connection cannot be trusted any more."""


def encode(message: dict[str, Any]) -> bytes:
    body = orjson.dumps(message)
    if len(body) > MAX_FRAME_BYTES:
        raise FrameError(f"a {len(body)}-byte frame is over {MAX_FRAME_BYTES}")
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Turns received bytes into messages (pure). Buffers at most one frame plus one read."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[dict[str, Any]]:
        """The complete messages in ``data`` (and what came before). Raises FrameError."""
        self._buffer += data
        messages: list[dict[str, Any]] = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME_BYTES:
                raise FrameError(f"a frame of {length} bytes announced (limit {MAX_FRAME_BYTES})")
            if len(self._buffer) < _LENGTH.size + length:
                break
            body = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
            del self._buffer[: _LENGTH.size + length]
            try:
                message = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise FrameError("a frame that is not JSON") from exc
            if not isinstance(message, dict):
                raise FrameError("a frame that is not a JSON object")
            messages.append(message)
        return messages


# --- the parent's side --------------------------------------------------------------------------


class Authority:
    """The parent's ledger and its connections to the workers."""

    def __init__(self, max_calls: int, clock: Callable[[], float] = time.time) -> None:
        self.ledger = Ledger(max_calls)
        self.kept = KeptSignals(ttl_s=KEPT_TTL_S)  # AMD results that beat their stream
        self._clock = clock
        self._outboxes: dict[str, trio.MemorySendChannel[bytes]] = {}

    async def serve_worker(self, holder: str, stream: trio.abc.Stream) -> None:
        """Answer ``holder``'s requests until its socket reaches EOF (or breaks the framing),
        then free every slot it held. Cancellation frees them too. Closes ``stream``."""
        outbox, pushes = trio.open_memory_channel[bytes](OUTBOX_FRAMES)
        self._outboxes[holder] = outbox
        send_lock = trio.Lock()  # answers (from the reader) and pushes (from the pusher) share the socket
        async with stream:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_write_pushes, stream, pushes, send_lock)
                    try:
                        await self._read_all(holder, stream, send_lock)
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                # Before the socket closes: nobody may see it closed and find the slots still held.
                del self._outboxes[holder]
                outbox.close()
                freed = self.ledger.drop_holder(holder)
                log.info("%s has gone: freed %d live call(s) and %d reservation(s); its spent tokens stay spent",
                         holder, freed.calls, freed.reservations)

    async def _read_all(self, holder: str, stream: trio.abc.Stream, send_lock: trio.Lock) -> None:
        reader = FrameReader()
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            try:
                messages = reader.feed(data)
            except FrameError as exc:
                log.error("%s broke the shared-state framing (%s): dropping its connection", holder, exc)
                return
            # Applied synchronously, with no await between read and decision: atomic. The
            # answers to one read go back in one write; a worker that stops reading stalls only
            # its own connection (TCP-like push-back through the socket buffer).
            answers = b"".join(encode(self.answer(holder, message)) for message in messages)
            if answers:
                try:
                    async with send_lock:
                        await stream.send_all(answers)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the worker is gone

    def answer(self, holder: str, message: dict[str, Any]) -> dict[str, Any]:
        """Apply one request to the ledger (pure but for pushes to other workers' outboxes)."""
        request_id = message.get("id")
        try:
            op = message["op"]
            now = self._clock()
            if op == "reserve":
                ok = self.ledger.reserve(holder, _str(message, "token"), expires_at=_num(message), now=now)
                return {"id": request_id, "ok": ok}
            if op == "admit":
                decision = self.ledger.admit(
                    holder, _str(message, "token"), call_id=_str(message, "call_id"),
                    call_sid=_str(message, "call_sid"), expires_at=_num(message), now=now,
                )
                replaces = decision.replaces
                if replaces is not None and replaces.holder != holder:
                    self._push_end(replaces.holder, replaces.call_id)
                    replaces = None
                admitted = decision.verdict is Verdict.ADMITTED
                kept = self.kept.take(_str(message, "call_sid"), now) if admitted else []
                answer = {"id": request_id, "verdict": decision.verdict.value,
                          "replaces": replaces.call_id if replaces else None}
                return answer | {"amd": kept} if kept else answer
            if op == "release":
                return {"id": request_id, "ok": self.ledger.release(holder, _str(message, "call_id"))}
            if op == "hangup":
                call_sid = _str(message, "call_sid")
                ref = self.ledger.live_call(call_sid)
                if ref is None:
                    route = HangupRoute.UNKNOWN
                elif ref.holder == holder:
                    route = HangupRoute.HERE
                else:
                    sent = self._push(ref.holder, {"push": "hangup", "call_sid": call_sid})
                    route = HangupRoute.SENT if sent else HangupRoute.UNKNOWN
                return {"id": request_id, "route": route.value}
            if op == "amd":
                return {"id": request_id, "route": self._route_amd(holder, message, now).value}
            raise ValueError(f"unknown op {op!r}")
        except (KeyError, TypeError, ValueError) as exc:
            log.error("%s sent a bad shared-state request (%s): refused", holder, exc)
            return {"id": request_id, "error": "bad request"}

    def _route_amd(self, holder: str, message: dict[str, Any], now: float) -> SignalRoute:
        call_sid = _str(message, "call_sid")
        item = amd_to_wire(AmdResult(call_sid, _str(message, "answered_by"), _ms(message)))
        ref = self.ledger.live_call(call_sid)
        if ref is not None and ref.holder == holder:
            return SignalRoute.HERE
        if ref is not None:
            if self._push(ref.holder, {"push": "amd", **item}):
                return SignalRoute.SENT
            log.warning("could not send call %s's AMD result to %s (its outbox is full): kept", call_sid, ref.holder)
        self.kept.keep(call_sid, item, now)
        return SignalRoute.KEPT

    def _push_end(self, holder: str, call_id: str) -> None:
        message = {"push": "end", "call_id": call_id, "reason": "a newer stream for its CallSid was admitted"}
        if not self._push(holder, message):
            log.warning("could not tell %s to end call %s (replaced by a newer stream)", holder, call_id)

    def _push(self, holder: str, message: dict[str, Any]) -> bool:
        outbox = self._outboxes.get(holder)
        try:
            if outbox is None:
                raise trio.BrokenResourceError
            outbox.send_nowait(encode(message))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            # Dropped rather than waited for: the asking worker must not wait on another one.
            return False
        return True


async def _write_pushes(
    stream: trio.abc.Stream, pushes: trio.MemoryReceiveChannel[bytes], send_lock: trio.Lock
) -> None:
    async with pushes:
        async for frame in pushes:
            try:
                async with send_lock:
                    await stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the worker is gone: the reader sees EOF and frees its slots


def _str(message: dict[str, Any], key: str) -> str:
    value = message[key]
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ValueError(f"{key} must be a short string")
    return value


def _ms(message: dict[str, Any]) -> int | None:
    value = message.get("detection_ms")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**9:
        raise ValueError("detection_ms must be a whole number of milliseconds or null")
    return value


def _num(message: dict[str, Any]) -> float:
    value = message["expires_at"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expires_at must be a number")
    return float(value)


# --- the worker's side --------------------------------------------------------------------------


@dataclass
class _Waiter:
    call_id: str | None  # admit only: released again if the answer comes after the deadline
    done: trio.Event = field(default_factory=trio.Event)
    answer: dict[str, Any] | None = None


class ParentState:
    """A worker's :class:`~bridge.fleet.shared.SharedState`: every step is a request to the
    parent. Requests before :meth:`run` has started, or after the parent has gone, fail closed."""

    def __init__(self, sock: socket.socket, deadline_s: float = REQUEST_DEADLINE_S) -> None:
        self._sock = sock
        self._stream: trio.SocketStream | None = None
        self._deadline_s = deadline_s
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Waiter] = {}
        self._send_lock = trio.Lock()
        self._connected = False  # run() is reading and the parent has not gone
        self._answering = True  # the last request was answered in time
        # Admissions whose answer had not come when their caller stopped waiting: released if
        # the answer turns out to be "admitted". Only a parent slower than the deadline adds
        # entries, and such a parent is about to be declared gone; capped all the same.
        self._late_admits: dict[int, str] = {}
        self._on_amd: Deliver | None = None

    @property
    def up(self) -> bool:
        return self._connected and self._answering

    async def run(
        self,
        end_call: EndCall,
        hang_up: HangUp | None = None,
        deliver: Deliver | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read the parent's answers and pushes until it goes away. Closes the socket."""
        self._on_amd = deliver
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(self._sock))
        self._connected = True
        reader = FrameReader()
        try:
            async with self._stream:
                task_status.started()
                while True:
                    try:
                        data = await self._stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        data = b""
                    if not data:
                        log.error("the WORKERS parent has gone: refusing new calls until this worker exits")
                        return
                    try:
                        messages = reader.feed(data)
                    except FrameError as exc:
                        log.error("the WORKERS parent broke the shared-state framing (%s): refusing new calls", exc)
                        return
                    for message in messages:
                        await self._received(message, end_call, hang_up)
        finally:
            self._connected = False
            for waiter in self._waiting.values():
                waiter.done.set()  # no answer: the request fails closed

    async def _received(self, message: dict[str, Any], end_call: EndCall, hang_up: HangUp | None) -> None:
        if message.get("push") == "end":
            end_call(str(message.get("call_id")), str(message.get("reason") or "replaced"))
            return
        if message.get("push") == "hangup":
            call_sid = str(message.get("call_sid"))
            if hang_up is None:
                log.warning("asked to hang up call %s, but this worker has no call control", call_sid)
            else:
                hang_up(call_sid)
            return
        if message.get("push") == "amd":
            self._hand_over([message])
            return
        request_id = message.get("id")
        waiter = self._waiting.pop(request_id, None) if isinstance(request_id, int) else None
        if waiter is not None:
            waiter.answer = message
            waiter.done.set()
        elif isinstance(request_id, int) and message.get("verdict") == "admitted":
            # An admission answered after its deadline: the stream was refused (503) meanwhile,
            # so give the slot back. Bounded; a parent that is this slow is about to be called gone.
            call_id = self._late_admits.pop(request_id, None)
            if call_id is not None:
                await self._release_quietly(call_id)

    async def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        if not self._connected:
            raise SharedStateUnavailable("not connected to the WORKERS parent")
        request_id = next(self._ids)
        waiter = _Waiter(message.get("call_id") if message["op"] == "admit" else None)
        self._waiting[request_id] = waiter
        returned = False
        try:
            with trio.fail_after(self._deadline_s):
                await self._send({"id": request_id, **message})
                await waiter.done.wait()
            returned = True
        except trio.TooSlowError:
            self._answering = False
            raise SharedStateUnavailable(f"the WORKERS parent did not answer within {self._deadline_s:g} s") from None
        finally:
            self._waiting.pop(request_id, None)
            if not returned and waiter.call_id is not None:
                # An admission that nobody will run (deadline, or the caller was cancelled): if
                # the parent said or will say "admitted", give the slot back.
                if waiter.answer is None:
                    if len(self._late_admits) < _MAX_LATE_ADMITS:
                        self._late_admits[request_id] = waiter.call_id
                elif waiter.answer.get("verdict") == "admitted":
                    with trio.CancelScope(shield=True):
                        await self._release_quietly(waiter.call_id)
        if waiter.answer is None:
            raise SharedStateUnavailable("the WORKERS parent has gone")
        self._answering = True
        if "error" in waiter.answer:
            raise SharedStateUnavailable(f"the WORKERS parent refused the request: {waiter.answer['error']}")
        return waiter.answer

    async def _release_quietly(self, call_id: str) -> None:
        # Unavailable: the parent frees everything we held when our socket closes.
        with trio.move_on_after(self._deadline_s), contextlib.suppress(SharedStateUnavailable):
            await self._send({"id": next(self._ids), "op": "release", "call_id": call_id})

    async def _send(self, message: dict[str, Any]) -> None:
        stream = self._stream
        if stream is None or not self._connected:
            raise SharedStateUnavailable("not connected to the WORKERS parent")
        frame = encode(message)
        async with self._send_lock:
            # Shielded: a frame cut in half by a cancelled caller (a webhook client that went
            # away) would garble every later frame. Bounded by its own deadline instead.
            with trio.CancelScope(shield=True), trio.move_on_after(self._deadline_s) as sending:
                try:
                    await stream.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._connected = False
                    raise SharedStateUnavailable("the WORKERS parent has gone") from exc
            if sending.cancelled_caught:
                self._connected = False  # part of a frame may have gone out: the framing is lost
                raise SharedStateUnavailable("the WORKERS parent stopped reading")

    async def reserve(self, token: str, *, expires_at: float) -> bool:
        answer = await self._request({"op": "reserve", "token": token, "expires_at": expires_at})
        return answer.get("ok") is True

    async def admit(self, token: str, *, call_id: str, call_sid: str, expires_at: float) -> Admission:
        answer = await self._request(
            {"op": "admit", "token": token, "call_id": call_id, "call_sid": call_sid, "expires_at": expires_at}
        )
        try:
            verdict = Verdict(answer.get("verdict"))
        except ValueError:
            raise SharedStateUnavailable(f"the WORKERS parent answered {answer!r}") from None
        replaces = answer.get("replaces")
        kept = answer.get("amd")
        if verdict is Verdict.ADMITTED and isinstance(kept, list) and kept:
            self._hand_over(kept)
        return Admission(verdict, replaces if isinstance(replaces, str) else None)

    def _hand_over(self, items: list[Any]) -> None:
        """AMD results from the parent (sent by another worker's webhook, or kept for a stream
        being admitted here) to this worker's calls."""
        for item in items:
            result = amd_from_wire(item)
            if result is None:
                log.error("the WORKERS parent sent an unreadable AMD result: %.80r", item)
            elif self._on_amd is None:
                log.warning("call %s: an AMD result arrived, but this worker takes none", result.call_sid)
            else:
                self._on_amd(result)

    async def deliver_amd(self, result: AmdResult) -> SignalRoute:
        answer = await self._request({"op": "amd", **amd_to_wire(result)})
        try:
            return SignalRoute(answer.get("route"))
        except ValueError:
            raise SharedStateUnavailable(f"the WORKERS parent answered {answer!r}") from None

    async def release(self, call_id: str) -> None:
        try:
            await self._request({"op": "release", "call_id": call_id})
        except SharedStateUnavailable as exc:
            # The parent frees whatever this worker held when our socket closes.
            log.warning("could not release call %s with the WORKERS parent: %s", call_id, exc)

    async def request_hangup(self, call_sid: str) -> HangupRoute:
        answer = await self._request({"op": "hangup", "call_sid": call_sid})
        try:
            return HangupRoute(answer.get("route"))
        except ValueError:
            raise SharedStateUnavailable(f"the WORKERS parent answered {answer!r}") from None
