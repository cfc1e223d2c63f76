"""CallPolicy: the per-call knobs the call state machine needs, taken from Settings (pure data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class CallPolicy:
    """The per-call knobs the state machine needs (from Settings)."""

    ready_timeout_s: float = 10.0
    max_call_s: float = 3600.0
    end_call_deadline_s: float = 15.0
    tool_hold_max_s: float = 5.0
    end_call_enabled: bool = True
    transfer_numbers: tuple[str, ...] = ()  # first one is the default target
    outbound: bool = False
    greeting_pad_ms: int = 0
    voice: str = ""
    # Caller audio allowed ahead of real time before frames are dropped (the service itself drops
    # audio sent faster than ~real time, and a flood must not cost upstream bandwidth).
    caller_burst_ms: float = 2000.0
    # Upstream drops are resumed within this window (the service holds a session for 30 s).
    resume_window_s: float = 25.0
    # Twilio sends media every 20 ms for the whole call: this much silence on the socket means
    # the peer is gone (or hostile), even if its TCP connection stays open.
    twilio_silence_s: float = 10.0
