"""Playback toward Twilio, as a pure sub-machine of ``CallState``: epoch, marks, the goodbye.

Twilio plays what we send from a buffer of its own; a ``mark`` comes back when playback reaches
it, and a ``clear`` drops the unplayed audio and echoes every pending mark at once (reference
twilio.md §1.4). So an echo means "played *or* flushed", and only what was pending at a clear
tells the two apart.

Invariants:
- Agent audio is tagged with the epoch; a clear bumps it, so audio queued before the clear is
  never played (the phone writer drops it), and audio of an interrupted reply is dropped here.
- Every mark we send is in exactly one of: pending, flushed (pending at a clear), or gone (its
  echo came back). An echo is reported at most once: heard when it came back pending, not heard
  when a clear had flushed it. Both maps lose an entry on its echo, and Twilio echoes every mark
  (played, cleared, or at the end of the stream), so they hold at most what Twilio still buffers.
- ``state`` is PLAYING from the first audio after a clear until that clear, or until the mark
  sent after a reply's last audio comes back (everything sent has been heard).
- The goodbye (``end_call``) goes NONE -> AWAITING_REPLY (the goodbye reply is still speaking)
  -> MARK_SENT -> HANGING_UP (its mark came back, or did not within ``end_call_deadline_s``);
  a clear or an interrupted goodbye reply takes it back to NONE.
- Outbound calls (:meth:`Playback.fill_silence`): from the end of the pad until the first agent
  audio, silence is kept queued at most ``SILENCE_AHEAD_S`` ahead (whole 20 ms frames, never a
  backlog); the first agent audio is preceded by a ``clear`` when silence is still queued.
- With records on (``record``), a mark also goes out after every ``MARK_EVERY_MS`` of a reply's
  forwarded audio, each mapped to (reply_id, ms of that reply forwarded up to it), and the
  recorder gets ``AudioWritten`` once per reply, ``ClearSent`` and ``MarkPlayed``. With records
  off none of that work is done.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from enum import Enum

from bridge.agent import events as ag
from bridge.call.actions import Action, CallStats, Fact, HangUp, Log, SendPhone
from bridge.phone import media as tw
from bridge.records.facts import AudioWritten, ClearSent, MarkPlayed

MARK_EVERY_MS = 250  # the records' resolution for what the caller heard (facts contract)
_MARK_EVERY_BYTES = MARK_EVERY_MS * tw.BYTES_PER_MS
_NOWHERE = ("", 0)  # a mark not placed in a reply (records off, or before any audio)
# Outbound calls: silence is queued this far ahead of now on each tick (the session ticks every
# 0.25 s), so Twilio's buffer never runs dry before the agent speaks; what is still queued when
# the first agent audio comes is cleared, so the greeting waits behind none of it.
SILENCE_AHEAD_S = 0.3
SILENCE_FRAME_MS = 20


class PlaybackState(Enum):
    IDLE = "idle"  # nothing sent since the last clear, or all of it has been heard
    PLAYING = "playing"  # agent audio sent that Twilio may still be playing


class GoodbyePhase(Enum):
    NONE = "none"
    AWAITING_REPLY = "awaiting_reply"  # end_call came inside a reply: mark after its reply.done
    MARK_SENT = "mark_sent"  # hang up when this mark comes back
    HANGING_UP = "hanging_up"  # the goodbye was played (or its mark is late): HangUp returned


class Playback:
    """What has been sent to Twilio's buffer and what has come back. See the module docstring."""

    __slots__ = (
        "_all_heard_mark",
        "_end_call_deadline_s",
        "_flushed",
        "_goodbye_deadline",
        "_goodbye_mark",
        "_goodbye_reply",
        "_interrupted",
        "_marked_bytes",
        "_pending",
        "_reply_bytes",
        "_reply_id",
        "_seq",
        "epoch",
        "goodbye",
        "record",
        "silence_from",
        "silence_to",
        "state",
        "stats",
        "stopped",
        "stream_sid",
    )

    def __init__(self, stats: CallStats, *, end_call_deadline_s: float, record: bool = False) -> None:
        self.stats = stats
        self.record = record
        self.stream_sid = ""
        self.epoch = 0
        self.state = PlaybackState.IDLE
        self.goodbye = GoodbyePhase.NONE
        self.stopped = False  # the call is ending: no more audio is played
        self.silence_to: float | None = None  # outbound: silence is queued up to here (call clock)
        self.silence_from = 0.0  # ...and the greeting pad ends here: the first words never start sooner
        self._end_call_deadline_s = end_call_deadline_s
        self._interrupted: deque[str] = deque(maxlen=16)  # replies cut by the caller; a few suffice
        self._pending: dict[str, tuple[str, int]] = {}  # mark name -> (reply_id, offset_ms)
        self._flushed: dict[str, tuple[str, int]] = {}
        self._seq = 0
        self._all_heard_mark: str | None = None  # echoed when the last reply's audio has played
        self._goodbye_reply: str | None = None
        self._goodbye_mark: str | None = None
        self._goodbye_deadline: float | None = None
        self._reply_id: str | None = None  # records: the reply whose audio is being forwarded...
        self._reply_bytes = 0  # ...how much of it...
        self._marked_bytes = 0  # ...and how much of it the last mark covers

    # --- the hot path -------------------------------------------------------------------------

    def on_audio(self, event: ag.ReplyAudio, now: float) -> list[Action]:
        """One chunk of agent audio: to Twilio with the epoch, unless its reply was interrupted."""
        stats = self.stats
        stats.frames_from_agent += 1
        if self.stopped or not self.stream_sid:
            return []
        if event.reply_id in self._interrupted:
            stats.frames_dropped_interrupted += 1
            return []
        lead: list[Action] = []
        if stats.first_audio_at is None:
            stats.first_audio_at = now
            if self.silence_to is not None:
                if self.silence_to > now:  # queued silence would delay the greeting: drop it...
                    lead.append(SendPhone(tw.clear_frame(self.stream_sid)))
                    pad_ms = math.ceil((self.silence_from - now) * 1000 / SILENCE_FRAME_MS) * SILENCE_FRAME_MS
                    if pad_ms > 0:  # ...but what is left of the pad plays first (rounded up)
                        lead.append(SendPhone(tw.media_frame(self.stream_sid, tw.silence_payload(pad_ms)), self.epoch))
                self.silence_to = None
        self.state = PlaybackState.PLAYING
        self._all_heard_mark = None  # this audio plays after that mark: its echo no longer means "all heard"
        stats.frames_to_twilio += 1
        frame = SendPhone(tw.media_frame(self.stream_sid, event.data), self.epoch)
        if lead:
            return [*lead, *self._recorded(frame, event, now)] if self.record else [*lead, frame]
        if not self.record:
            return [frame]
        return self._recorded(frame, event, now)

    def fill_silence(self, now: float) -> list[Action]:
        """Outbound, before the agent's first audio: top the queued silence up to
        ``SILENCE_AHEAD_S`` ahead of ``now`` (one frame of whole 20 ms units)."""
        queued_to = self.silence_to
        if queued_to is None or self.stopped or not self.stream_sid:
            return []
        start = max(queued_to, now)  # behind (a late tick): never a backlog, only what is ahead
        frames = round((now + SILENCE_AHEAD_S - start) * 1000) // SILENCE_FRAME_MS
        if frames <= 0:
            return []
        ms = frames * SILENCE_FRAME_MS
        self.silence_to = start + ms / 1000
        return [SendPhone(tw.media_frame(self.stream_sid, tw.silence_payload(ms)), self.epoch)]

    def _recorded(self, frame: SendPhone, event: ag.ReplyAudio, now: float) -> list[Action]:
        data, reply_id = event.data, event.reply_id
        size = (len(data) * 3 >> 2) - (2 if data.endswith("==") else 1 if data.endswith("=") else 0)
        actions: list[Action] = [frame]
        if reply_id != self._reply_id:  # replies do not interleave: a new id is a new reply
            self._reply_id = reply_id
            self._reply_bytes = self._marked_bytes = 0
            actions.append(Fact(AudioWritten(reply_id, now)))
        self._reply_bytes += size
        if self._reply_bytes - self._marked_bytes >= _MARK_EVERY_BYTES:
            self._marked_bytes = self._reply_bytes
            actions.append(SendPhone(tw.mark_frame(self.stream_sid, self._new_mark("audio"))))
        return actions

    # --- turn events --------------------------------------------------------------------------

    def interrupt(self, reply_id: str) -> None:
        """The caller cut this reply: its later audio is dropped."""
        self._interrupted.append(reply_id)

    def clear(self, now: float) -> list[Action]:
        """Drop Twilio's unplayed audio: the epoch moves on, pending marks become flushed."""
        self.epoch += 1
        if self._pending:
            self._flushed.update(self._pending)
            self._pending.clear()
        self._all_heard_mark = None
        self.state = PlaybackState.IDLE
        if self.goodbye is GoodbyePhase.MARK_SENT:  # the goodbye was not heard: no hang-up
            self.goodbye = GoodbyePhase.NONE
            self._goodbye_mark = self._goodbye_deadline = None
        clear = SendPhone(tw.clear_frame(self.stream_sid))
        if not self.record:
            return [clear]
        return [clear, Fact(ClearSent(now))]

    def reply_completed(self, reply_id: str, now: float) -> list[Action]:
        """``reply.done`` (completed): the goodbye mark if this was the goodbye, else a mark that
        says when everything sent so far has been heard."""
        if self.goodbye is GoodbyePhase.AWAITING_REPLY and self._goodbye_reply == reply_id:
            return [self._send_goodbye_mark(now)]
        if self.state is PlaybackState.PLAYING and self.stream_sid:
            name = self._all_heard_mark = self._new_mark("played")
            return [SendPhone(tw.mark_frame(self.stream_sid, name))]
        return []

    def reply_interrupted(self, reply_id: str) -> list[Action]:
        """``reply.done`` (interrupted): its audio is dropped, and a goodbye it carried is off."""
        self._interrupted.append(reply_id)
        if self.goodbye is GoodbyePhase.AWAITING_REPLY and self._goodbye_reply == reply_id:
            self.goodbye = GoodbyePhase.NONE
            self._goodbye_reply = None
            return [Log(logging.INFO, "end_call cancelled: the caller interrupted the goodbye")]
        return []

    def end_call(self, reply_id: str | None, now: float) -> list[Action]:
        """The agent asked to end the call: hang up once the goodbye has been played."""
        if reply_id is None:  # asked outside a reply: the goodbye is already queued
            return [self._send_goodbye_mark(now)]
        self.goodbye = GoodbyePhase.AWAITING_REPLY
        self._goodbye_reply = reply_id
        return []

    def cancel_goodbye(self) -> None:
        """A last reply (idle goodbye) is off: the caller came back. Its mark, if sent, is an
        ordinary mark now; a hang-up already under way is not undone."""
        if self.goodbye is GoodbyePhase.AWAITING_REPLY or self.goodbye is GoodbyePhase.MARK_SENT:
            self.goodbye = GoodbyePhase.NONE
            self._goodbye_reply = self._goodbye_mark = self._goodbye_deadline = None

    def on_echo(self, name: str, now: float) -> list[Action]:
        """Twilio echoed a mark: played (it was pending) or flushed (a clear came after it)."""
        where = self._flushed.pop(name, None)
        if where is not None:
            actions: list[Action] = [Log(logging.DEBUG, f"mark {name} came back flushed by a clear")]
            if self.record and where[0]:
                actions.append(Fact(MarkPlayed(where[0], where[1], False, now)))
            return actions
        where = self._pending.pop(name, None)
        if where is None:
            return [Log(logging.DEBUG, f"ignored echo of unknown mark {name!r}")]
        actions = [Fact(MarkPlayed(where[0], where[1], True, now))] if self.record and where[0] else []
        if name == self._all_heard_mark:
            self._all_heard_mark = None
            self.state = PlaybackState.IDLE  # everything sent has been heard: nothing to barge into
        if name == self._goodbye_mark:
            self._goodbye_mark = self._goodbye_deadline = None
            self.goodbye = GoodbyePhase.HANGING_UP
            actions.append(HangUp("the goodbye was played"))
        return actions

    def on_tick(self, now: float) -> list[Action]:
        if self._goodbye_deadline is not None and now >= self._goodbye_deadline:
            self._goodbye_mark = self._goodbye_deadline = None
            self.goodbye = GoodbyePhase.HANGING_UP
            return [HangUp("the goodbye mark did not come back in time")]
        return []

    # --- marks --------------------------------------------------------------------------------

    def _new_mark(self, kind: str) -> str:
        """A new pending mark, placed (with records on) at the audio forwarded so far."""
        self._seq += 1
        name = f"{kind}-{self._seq}"
        reply_id = self._reply_id
        self._pending[name] = _NOWHERE if reply_id is None else (reply_id, self._reply_bytes // tw.BYTES_PER_MS)
        return name

    def _send_goodbye_mark(self, now: float) -> Action:
        self._goodbye_reply = None
        if not self.stream_sid:
            self.goodbye = GoodbyePhase.HANGING_UP
            return HangUp("end_call before the stream started")
        name = self._goodbye_mark = self._new_mark("goodbye")
        self._goodbye_deadline = now + self._end_call_deadline_s
        self.goodbye = GoodbyePhase.MARK_SENT
        return SendPhone(tw.mark_frame(self.stream_sid, name))
