"""What a call is, as seen by tools and session hooks (pure data)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class CallContext:
    """Facts about one call. A tool receives it by declaring a parameter of this type.

    ``call_id`` is ours (it tags every log line of the call); ``call_sid`` and ``stream_sid`` are
    Twilio's. ``custom_parameters`` are the ``<Parameter>`` values from the TwiML.
    """

    call_id: str
    call_sid: str
    direction: Literal["inbound", "outbound"]
    from_number: str = ""
    to_number: str = ""
    stream_sid: str = ""
    custom_parameters: Mapping[str, str] = field(default_factory=dict)
