"""Console sessions and CSRF tokens, pure (no I/O, time as an argument).

A session is a signed cookie value, ``v1.<expires_s>.<nonce>.<mac>``: nothing is stored on the
server, so any instance holding the same secret accepts it, and a restart with a random secret
invalidates every session. The MAC key is derived from the session secret AND the console
token, so changing ``CONSOLE_TOKEN`` signs everyone out too.

The CSRF token of a session is an HMAC of its nonce: the page gets it in a ``<meta>`` tag and
sends it back in ``X-CSRF-Token`` with every state-changing request. A cross-site page can
neither read it nor (``SameSite=Strict``) send the cookie, so this is a second lock.

Every comparison of a secret is constant-time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

SESSION_S = 12 * 3600  # a working day; then sign in again
_VERSION = "v1"
_KEY_LABEL = b"voice-agent-bridge/console-session/v1"
_NONCE_BYTES = 16


@dataclass(frozen=True, slots=True)
class Session:
    """A valid session: its nonce (for the CSRF token) and when it expires (epoch seconds)."""

    nonce: str
    expires_s: int


class SessionSigner:
    """Issues and checks session cookies and their CSRF tokens.

    Args:
        secret: ``CONSOLE_SESSION_SECRET`` as bytes, or random bytes per process.
        console_token: ``CONSOLE_TOKEN``; also what :meth:`token_matches` compares against.
    """

    def __init__(self, secret: bytes, console_token: str) -> None:
        token_digest = hashlib.sha256(console_token.encode()).digest()
        self._key = hmac.new(secret, _KEY_LABEL + token_digest, hashlib.sha256).digest()
        self._token_digest = token_digest

    def token_matches(self, candidate: str) -> bool:
        """Whether ``candidate`` is the console token. Digests are compared, so the time taken
        tells neither the token's content nor its length."""
        digest = hashlib.sha256(candidate.encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(digest, self._token_digest)

    def issue(self, now_s: float, nonce: str | None = None) -> str:
        """A new session cookie value, valid for :data:`SESSION_S` from ``now_s``."""
        nonce = nonce or secrets.token_hex(_NONCE_BYTES)
        expires = int(now_s) + SESSION_S
        body = f"{_VERSION}.{expires}.{nonce}"
        return f"{body}.{self._mac('session', body)}"

    def check(self, value: str | None, now_s: float) -> Session | None:
        """The session of a cookie value, or None when missing, malformed, forged or expired."""
        if not value or len(value) > 256:
            return None
        parts = value.split(".")
        if len(parts) != 4 or parts[0] != _VERSION:
            return None
        version, expires_text, nonce, mac = parts
        if not hmac.compare_digest(mac.encode(), self._mac("session", f"{version}.{expires_text}.{nonce}").encode()):
            return None
        try:
            expires = int(expires_text)
        except ValueError:
            return None
        if now_s >= expires:
            return None
        return Session(nonce, expires)

    def csrf_token(self, session: Session) -> str:
        """The CSRF token that goes with ``session`` (the page echoes it in ``X-CSRF-Token``)."""
        return self._mac("csrf", session.nonce)[:32]

    def csrf_matches(self, session: Session, candidate: str | None) -> bool:
        """Whether ``candidate`` is the session's CSRF token (constant time)."""
        if not candidate:
            return False
        return hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), self.csrf_token(session).encode())

    def _mac(self, purpose: str, body: str) -> str:
        return hmac.new(self._key, f"{purpose}|{body}".encode(), hashlib.sha256).hexdigest()


__all__ = ["SESSION_S", "Session", "SessionSigner"]
