"""The project's exceptions. Protocol errors say whose fault they are."""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(BridgeError):
    """A setting is missing or malformed. The message is one line naming the variable and the fix."""


class UpstreamError(BridgeError):
    """The Voice Agent API could not be reached, refused us, or failed a session.

    ``code`` is the service's ``session.error`` code when there was one (lower-cased), else a
    short reason of ours such as ``"connect_failed"`` or ``"ready_timeout"``.
    """

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


class TwilioRestError(BridgeError):
    """Twilio's REST API answered with an error (or could not be reached)."""

    def __init__(self, status: int, code: int | None, message: str) -> None:
        if code is not None:
            label = f"Twilio error {code}"
        elif status == 0:
            label = "Twilio API unreachable"
        else:
            label = f"HTTP {status}"
        super().__init__(f"{label}: {message}")
        self.status = status
        self.code = code
        self.message = message
