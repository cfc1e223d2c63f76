"""The call records API: ``GET /api/calls`` and ``GET /api/calls/<CallSid>``.

- ``GET /api/calls?limit=&before=&outcome=&since=&until=&q=``: summaries, newest first, as
  ``{"calls": [...], "next_before": <cursor> | null}``. ``limit`` 1-500 (default 50); ``before``
  the ``next_before`` of the previous page; ``outcome`` e.g. ``caller_hung_up``; ``since`` /
  ``until`` ISO 8601 dates or times (UTC unless they say otherwise) bounding ``started_at``;
  ``q`` text searched in the transcripts (said and heard, case-insensitive) or an exact CallSid.
  The first page (no ``before``) starts with the live calls of this instance that match
  (``"live": true``; they have no outcome yet); a page also lists the finished calls held (not yet
  written) that belong on it, so it may have a few more than ``limit`` entries.
- ``GET /api/calls/<CallSid>``: the whole record; a live call gives its record so far with
  ``"live": true``.

A finished call is readable at every moment: from its end until its row is written it is held in
the store's queue, and both routes answer from there (``"live": false``; listed once, on the page
where it belongs: ``bridge/records/store.py``). While the database is down, ``GET
/api/calls/<CallSid>`` still answers for the calls this instance holds (their records are not
lost, only not written yet), and the list's 503 carries ``calls``: this instance's live and held
calls (the rest of the list needs the database); a call held by another instance of a fleet is
readable once that instance has written it.

Privacy and auth: without ``CONSOLE_TOKEN`` every ``/api/`` route answers 404 (transcripts are
personal data). With it, a request needs ``Authorization: Bearer <CONSOLE_TOKEN>`` (compared in
constant time) or a console session cookie; otherwise 401. Hostile input (a malformed CallSid,
cursor, date or limit) is a 400 with a JSON reason, a database outage a 503: never a 500.
"""

from __future__ import annotations

import hmac
import logging
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from quart import Response, request
from quart_trio import QuartTrio

from bridge.phone.security import CALL_SID
from bridge.records.backends import Query, StoreError, parse_cursor
from bridge.records.record import summary
from bridge.records.store import held_matches

if TYPE_CHECKING:
    from bridge.web.app import BridgeApp

log = logging.getLogger("bridge.web")

_OUTCOME = re.compile(r"[a-z_]{1,32}")
MAX_QUERY_CHARS = 200
DEFAULT_LIMIT = 50
MAX_LIMIT = 500


class BadRequest(Exception):
    """The client's fault: the message says which parameter and why."""


def bearer_matches(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def parse_time(name: str, raw: str) -> float:
    """An ISO 8601 date or date-time (naive = UTC) -> epoch seconds. Raises BadRequest."""
    try:
        if len(raw) > 40:
            raise ValueError
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} must be an ISO 8601 date or time, e.g. 2026-12-03 or 2026-12-03T12:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_query(args: Any) -> Query:
    """The list query of ``GET /api/calls``' parameters. Raises BadRequest."""
    raw_limit = args.get("limit", "")
    try:
        limit = int(raw_limit) if raw_limit else DEFAULT_LIMIT
    except ValueError:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    before = None
    if args.get("before"):
        try:
            before = parse_cursor(args["before"])
        except ValueError:
            raise BadRequest("before must be the next_before of a previous page") from None
    outcome = args.get("outcome") or None
    if outcome is not None and not _OUTCOME.fullmatch(outcome):
        raise BadRequest("outcome must be an outcome name, e.g. caller_hung_up")
    since = parse_time("since", args["since"]) if args.get("since") else None
    until = parse_time("until", args["until"]) if args.get("until") else None
    text = args.get("q") or None
    if text is not None and len(text) > MAX_QUERY_CHARS:
        raise BadRequest(f"q must be at most {MAX_QUERY_CHARS} characters")
    return Query(limit=limit, before=before, outcome=outcome, since_s=since, until_s=until, text=text)


def _console_session_ok() -> bool:
    """A valid console session cookie also opens the API (the console's pages read it)."""
    try:
        from bridge.web.console import api_authorized
    except ImportError:  # the console is not part of this build
        return False
    return api_authorized()


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status=status, content_type="application/json")


def register_api(quart: QuartTrio, app: BridgeApp) -> None:
    """Add the records API routes to the app's Quart (see ``webhooks.build_quart``)."""

    def refusal() -> Response | None:
        token = app.settings.console_token
        if not token:
            return _json({"error": "not found"}, 404)
        if bearer_matches(request.headers.get("Authorization"), token):
            return None
        if _console_session_ok():
            return None
        return _json({"error": "missing or wrong token"}, 401)

    def records() -> Any:
        return getattr(app, "records", None)

    def store() -> Any:
        return getattr(app, "record_store", None)

    @quart.get("/api/calls")
    async def list_calls() -> Response:
        refused = refusal()
        if refused is not None:
            return refused
        if not app.settings.records:
            return _json({"error": "call records are off (RECORDS=off)"}, 503)
        try:
            query = parse_query(request.args)
        except BadRequest as exc:
            return _json({"error": str(exc)}, 400)
        live: list[dict[str, Any]] = []
        service = records()
        if query.before is None and service is not None:
            # (a live call has no outcome: an outcome filter leaves it out)
            live = [summary(r) for r in service.live_records() if held_matches(r, query)][: query.limit]
        live_sids = {s["call_sid"] for s in live}
        stored: list[dict[str, Any]] = []
        next_before = None
        if store() is not None:
            try:  # the store adds the finished records it still holds (no await before it looks)
                stored, next_before = await store().list(query)
            except StoreError as exc:
                log.warning("GET /api/calls: %s", exc)
                held = [s for s in store().held_summaries(query) if s.get("call_sid") not in live_sids]
                body = {"error": "the records database is not available", "live": live, "calls": live + held}
                return _json(body, 503)
        calls = live + [s for s in stored if s.get("call_sid") not in live_sids]
        return _json({"calls": calls, "next_before": next_before})

    @quart.get("/api/calls/<call_sid>")
    async def get_call(call_sid: str) -> Response:
        refused = refusal()
        if refused is not None:
            return refused
        if not CALL_SID.fullmatch(call_sid):
            return _json({"error": "not a CallSid (CA followed by 32 hex digits)"}, 400)
        if not app.settings.records:
            return _json({"error": "call records are off (RECORDS=off)"}, 503)
        service = records()
        record = service.live(call_sid) if service is not None else None
        if record is None and store() is not None:
            try:  # a finished call's record is held by the store until written: get answers it first
                record = await store().get(call_sid)
            except StoreError as exc:
                log.warning("GET /api/calls/%s: %s", call_sid, exc)
                return _json({"error": "the records database is not available"}, 503)
        if record is None:
            return _json({"error": "no record of this call", "call_sid": call_sid}, 404)
        return _json(record)


__all__ = ["CALL_SID", "BadRequest", "bearer_matches", "parse_query", "register_api"]
