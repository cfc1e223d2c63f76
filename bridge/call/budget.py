"""The caller-audio budget: at most about real time goes upstream. A pure sub-machine of ``CallState``.

Twilio sends 20 ms of caller audio every 20 ms; a peer that floods (or a burst after a network
stall) must not cost upstream bandwidth, and the Voice Agent API drops audio sent faster than
real time anyway (``audio_rate_violation``). A token bucket in milliseconds of audio decides.

Invariants:
- The bucket refills at real time (1 ms of audio per ms of ``now``) and never holds more than
  ``burst_ms``; it starts full and is filled again by :meth:`CallerAudioBudget.refill` (a new
  upstream session starts with a full allowance).
- A frame goes when the bucket holds at least the frame's length (exact, from its base64 size);
  then its length is taken out. A frame that does not fit is dropped whole and takes nothing.
- Time going backwards (never on a monotonic clock) adds nothing.

Hot path: one call per caller frame, a few float operations, no allocation.
"""

from __future__ import annotations


class CallerAudioBudget:
    """One call's allowance of caller audio, in ms (see the module docstring)."""

    __slots__ = ("_at", "_ms", "burst_ms")

    def __init__(self, burst_ms: float, now: float = 0.0) -> None:
        self.burst_ms = burst_ms
        self._ms = burst_ms
        self._at = now

    @property
    def available_ms(self) -> float:
        return self._ms

    def refill(self, now: float) -> None:
        """Full again from ``now`` (the stream started, or an upstream session became ready)."""
        self._ms = self.burst_ms
        self._at = now

    def take(self, payload: str, now: float) -> bool:
        """Whether the frame with this base64 ``payload`` goes (its ms are then taken)."""
        elapsed = now - self._at
        bucket = self._ms + (elapsed * 1000.0 if elapsed > 0 else 0.0)
        self._at = now
        pad = 2 if payload.endswith("==") else 1 if payload.endswith("=") else 0
        frame_ms = ((len(payload) * 3 >> 2) - pad) * 0.125  # exact bytes / 8 bytes per ms
        if bucket > self.burst_ms:
            bucket = self.burst_ms
        if bucket < frame_ms:
            self._ms = bucket
            return False
        self._ms = bucket - frame_ms
        return True
