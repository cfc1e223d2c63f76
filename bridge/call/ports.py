"""The interfaces a call session is driven through: the recorder it reports to.

Pure (no trio): the real implementations live in their own packages, the tests' fakes in
``tests/fakes.py``.
"""

from __future__ import annotations

from typing import Protocol

from bridge.agent import events as ag
from bridge.phone import media as tw
from bridge.records import facts


class CallRecorderPort(Protocol):
    """Builds the record of one call from what the session sees (``bridge/records/recorder.py``).

    Cost rule: nothing per media frame or audio chunk reaches it (marks come at most every
    250 ms of agent audio, ``AudioWritten`` once per reply). Every method only updates memory
    (no serialisation, no I/O) and must not raise; the session stops recording a call whose
    recorder raised, and the call goes on.
    """

    def phone(self, event: tw.TwilioEvent, now: float) -> None:
        """Every parsed Twilio event except ``Media``."""

    def agent(self, event: ag.AgentEvent, now: float) -> None:
        """Every parsed agent event except ``ReplyAudio``."""

    def fact(self, fact: facts.Fact) -> None:
        """A fact only the call core knows (marks heard or flushed, clears, tools, upstream time)."""

    def finish(self, now: float) -> None:
        """The call is over (after ``CallEnded``): hand the record to the store's bounded queue."""
