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
    # Issue 15 (bridge/call/conversation.py): the keypad, idle callers, answering machines.
    keypad_tool: bool = False  # collect_digits is offered and answered by the call core
    dtmf_to_agent: bool = False
    idle_reprompt_s: float = 0.0  # 0: off (the settings' defaults are 8 s and 15 s)
    idle_hangup_s: float = 0.0
    amd: bool = False  # outbound calls only: the greeting waits for Twilio's AnsweredBy
    amd_wait_s: float = 4.0
    voicemail_message: str = ""
    # A refused resume opens a fresh session carrying the conversation (bridge/call/recovery.py);
    # 0 is RECOVERY=off. The caller hears the agent within this many seconds, or the call ends.
    recovery_s: float = 0.0
    recovery_context_chars: int = 4000
