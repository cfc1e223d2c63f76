"""The call's stereo recording as a timeline, pure (no I/O, no trio): caller μ-law on the left,
the agent's μ-law on the right *as the caller heard it*, cut into final chunks for the WAV writer
(``bridge/records/recording.py``), and the μ-law -> PCM16 stereo codec for the file.

Positions are samples (8 kHz, one μ-law byte each) from the stream's start.

Invariants:
- Caller audio is appended in arrival order; a Twilio ``timestamp`` that jumps ahead by at most
  ``MAX_GAP_S`` (lost frames) is filled with silence first, a bigger jump is not believed (a
  hostile or broken timestamp never makes us write minutes of silence).
- "Now" on the timeline is the later of where the caller track ends and the call's own clock
  (since the stream started). Twilio sends caller audio continuously in real time, so the two
  agree within network jitter; the clock wins when caller frames come late (a burst, a reader
  that fell behind), the caller track when a test plays the call faster than real time. When the
  caller track lags the clock by more than ``STALL_S`` (Twilio stopped sending), it is padded
  with silence up to that lag, so the file keeps moving.
- Agent audio plays as Twilio plays it: from when it was written to Twilio, or right after the
  audio written before it, whichever is later. A ``clear`` at now drops every agent sample
  placed at or after now (Twilio's unplayed buffer), never one before it.
- Everything before the caller track's end is final (a later clear cannot reach back before
  now): :meth:`StereoTimeline.take` hands it out and forgets it, so memory holds only the agent
  audio still ahead (at most ``MAX_AHEAD_S``; more is dropped and counted) and the caller audio
  since the last take.
"""

from __future__ import annotations

SAMPLE_RATE_HZ = 8000
SAMPLES_PER_MS = SAMPLE_RATE_HZ // 1000
SILENCE = 0xFF  # μ-law silence (decodes to 0)
MAX_GAP_S = 2.0  # lost caller frames: a gap up to this is silence; Twilio's own gaps are far shorter
STALL_S = 1.0  # the caller track may lag the clock this much (network jitter) before it is padded
# Agent audio queued ahead of playback: a long reply sent faster than real time. 120 s is 960 KB
# per call and longer than any reply; anything beyond is dropped from the file and counted.
MAX_AHEAD_S = 120.0

_MAX_GAP = int(MAX_GAP_S * SAMPLE_RATE_HZ)
_STALL = int(STALL_S * SAMPLE_RATE_HZ)
_MAX_AHEAD = int(MAX_AHEAD_S * SAMPLE_RATE_HZ)


def _decode_byte(u: int) -> int:
    u = ~u & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = ((((u & 0x0F) << 3) + 0x84) << exponent) - 0x84
    return -magnitude if u & 0x80 else magnitude


_PCM = [_decode_byte(u) & 0xFFFF for u in range(256)]
# bytes.translate tables: the low and the high byte of each μ-law byte's PCM16 sample. Decoding a
# chunk is then four C-speed passes (two translates per channel, four strided copies) whatever
# its length, instead of a Python loop per sample.
_LOW = bytes(s & 0xFF for s in _PCM)
_HIGH = bytes(s >> 8 for s in _PCM)


def decode_stereo(left: bytes, right: bytes) -> bytes:
    """Two equally long μ-law channels -> interleaved little-endian PCM16 stereo (4 bytes/sample).

    Raises:
        ValueError: the channels differ in length.
    """
    if len(left) != len(right):
        raise ValueError("both channels must have the same number of samples")
    out = bytearray(4 * len(left))
    out[0::4] = left.translate(_LOW)
    out[1::4] = left.translate(_HIGH)
    out[2::4] = right.translate(_LOW)
    out[3::4] = right.translate(_HIGH)
    return bytes(out)


class StereoTimeline:
    """Places caller and agent audio on one timeline; see the module docstring.

    Inputs come in the order the call saw them. ``clock`` arguments are the call's clock as
    samples since the stream started (``(now - started) * 8000``).
    """

    __slots__ = ("_base", "_left", "_right", "_ts_offset", "dropped_agent_samples", "ignored_gaps")

    def __init__(self) -> None:
        self._base = 0  # position of _left[0] and _right[0]: everything before it was taken
        self._left = bytearray()
        self._right = bytearray()
        self._ts_offset: int | None = None  # caller position minus Twilio timestamp (in samples)
        self.dropped_agent_samples = 0
        self.ignored_gaps = 0

    @property
    def now(self) -> int:
        """Where the caller track ends (everything before it is final)."""
        return self._base + len(self._left)

    @property
    def agent_end(self) -> int:
        return self._base + len(self._right)

    def caller(self, data: bytes, timestamp_ms: int | None = None) -> None:
        """One Twilio media frame's μ-law (``timestamp_ms``: its ``media.timestamp``)."""
        if timestamp_ms is not None:
            at = timestamp_ms * SAMPLES_PER_MS
            if self._ts_offset is None:
                self._ts_offset = self.now - at
            else:
                gap = at + self._ts_offset - self.now
                if 0 < gap <= _MAX_GAP:
                    self._left += bytes([SILENCE]) * gap
                elif gap > _MAX_GAP:
                    self.ignored_gaps += 1
                    self._ts_offset = self.now - at  # not believed: re-anchor on this frame
        self._left += data

    def agent(self, data: bytes, clock: int) -> None:
        """Agent audio written to Twilio when the call's clock read ``clock``."""
        self.tick(clock)
        now = max(self.now, clock)
        start = max(self.agent_end, now)
        if start + len(data) - now > _MAX_AHEAD:
            self.dropped_agent_samples += len(data)
            return
        if start > self.agent_end:
            self._right += bytes([SILENCE]) * (start - self.agent_end)
        self._right += data

    def clear(self, clock: int) -> None:
        """We sent Twilio a ``clear``: the agent audio not yet played is gone."""
        self.tick(clock)
        keep = max(self.now, clock) - self._base
        if len(self._right) > keep:
            del self._right[keep:]

    def tick(self, clock: int) -> None:
        """The call's clock moved: a caller track lagging it by more than ``STALL_S`` is padded."""
        behind = clock - _STALL - self.now
        if behind > 0:
            self._left += bytes([SILENCE]) * behind

    def take(self, *, final: bool = False) -> tuple[bytes, bytes]:
        """The final samples since the last take, as (left, right) of equal length; forgotten here.

        ``final``: the call is over; everything, including agent audio still ahead, is final.
        """
        end = max(self.now, self.agent_end) if final else self.now
        n = end - self._base
        left = bytes(self._left[:n])
        right = bytes(self._right[:n])
        if len(left) < n:
            left += bytes([SILENCE]) * (n - len(left))
        if len(right) < n:
            right += bytes([SILENCE]) * (n - len(right))
        del self._left[:n]
        del self._right[:n]
        self._base = end
        return left, right


__all__ = ["MAX_AHEAD_S", "MAX_GAP_S", "SAMPLE_RATE_HZ", "SILENCE", "STALL_S", "StereoTimeline", "decode_stereo"]
