"""Twilio request signatures and stream tokens (pure; no I/O).

- Signatures: ``X-Twilio-Signature`` checked with the ``twilio`` library's validator against the
  *public* URL from configuration (never the Host header). For the Media Streams upgrade the
  signed string is the ``wss://`` URL from our TwiML with no params (reference twilio.md §4.2).
- Stream tokens: the id in ``/media-stream/<token>`` is minted by the signed webhook: an HMAC over
  direction, CallSid, expiry and a nonce with the server secret. Stateless, so any instance with
  the same secret accepts it; single use is enforced at admission by the shared state
  (``bridge/fleet/``: per process, across the WORKERS of a machine through their parent).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from twilio.request_validator import RequestValidator

Direction = Literal["inbound", "outbound"]
# A Twilio CallSid (reference twilio.md §3). Use fullmatch: match() with "$" accepts a trailing newline.
CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")
_TOKEN = re.compile(rf"(i|o)\.({CALL_SID.pattern})\.(\d{{1,12}})\.([0-9a-f]{{16}})\.([0-9a-f]{{32}})")
_MAX_TOKEN_CHARS = 128


class SignatureChecker:
    """Validates ``X-Twilio-Signature`` headers for one auth token."""

    def __init__(self, auth_token: str) -> None:
        self._validator = RequestValidator(auth_token)

    def valid(self, url: str, params: Mapping[str, Any] | None, signature: str | None) -> bool:
        """True if ``signature`` is Twilio's for ``url`` (+ form ``params``). Never raises."""
        if not signature or len(signature) > 256:
            return False
        try:
            return bool(self._validator.validate(url, params or {}, signature))
        except (TypeError, ValueError, UnicodeError):
            return False


@dataclass(frozen=True, slots=True)
class StreamGrant:
    """What a valid stream token says: which call may open this stream, until when."""

    token: str
    call_sid: str
    direction: Direction
    expires_at: int


def mint_token(secret: bytes, call_sid: str, direction: Direction, *, now: float, ttl_s: float) -> str:
    """A short-lived, unguessable stream id bound to ``call_sid``. URL-path safe."""
    expiry = math.ceil(now + ttl_s)  # int() would cut up to 1 s off the TTL (all of it at TTL 1 s)
    body = f"{direction[0]}.{call_sid}.{expiry}.{secrets.token_hex(8)}"
    return f"{body}.{_mac(secret, body)}"


def check_token(secret: bytes, token: str, *, now: float) -> StreamGrant | str:
    """The grant, or a short reason why the token is refused (malformed, forged, expired)."""
    if len(token) > _MAX_TOKEN_CHARS:
        return "malformed"
    match = _TOKEN.fullmatch(token)
    if match is None:
        return "malformed"
    body, mac = token.rsplit(".", 1)
    if not hmac.compare_digest(mac, _mac(secret, body)):
        return "bad signature"
    expiry = int(match.group(3))
    if now > expiry:
        return "expired"
    direction: Direction = "inbound" if match.group(1) == "i" else "outbound"
    return StreamGrant(token, match.group(2), direction, expiry)


def _mac(secret: bytes, body: str) -> str:
    return hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()[:32]
