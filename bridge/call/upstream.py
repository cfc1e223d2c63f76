"""The upstream (Voice Agent) session's lifecycle decisions, pure: when a failed connect is worth
another attempt, and how long to wait before it.

Invariants:
- A connect attempt is retried only when every error it raised is retryable: one error that no
  retry will cure (a refused key, a bad certificate) ends it, whatever else went wrong with it.
- Waits grow from ``RESUME_BACKOFF_S`` by doubling and never exceed ``MAX_BACKOFF_S``; the whole
  loop is bounded by the state's ready and resume deadlines, not here.
"""

from __future__ import annotations

from collections.abc import Sequence

from bridge.errors import UpstreamError

RESUME_BACKOFF_S = 0.25
MAX_BACKOFF_S = 2.0


def backoff_s(attempt: int) -> float:
    """The wait before attempt ``attempt`` (1 = the first retry)."""
    return min(RESUME_BACKOFF_S * 2.0 ** max(attempt - 1, 0), MAX_BACKOFF_S)


def rejected_is_retryable(status: int) -> bool:
    """A handshake refused with this HTTP status: the service's trouble (5xx) or a rate limit."""
    return status >= 500 or status == 429


def retry_connect(errors: Sequence[UpstreamError]) -> bool:
    """Whether a connect attempt that raised ``errors`` (all of them, in order) is tried again."""
    return bool(errors) and all(error.retryable for error in errors)
