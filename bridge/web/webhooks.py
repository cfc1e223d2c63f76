"""The webhooks: Quart-Trio routes for Twilio's HTTP callbacks, health and metrics.

Routes: ``POST /twiml``, ``POST /outbound-twiml``, ``POST /call-status``, ``POST /stream-status``,
``POST /amd-status``, ``GET /healthz``, ``GET /metrics``. Thin: each validates (signature against the configured public
URL, never the Host header) and hands off to the app.
``GET /readyz`` (readiness) answers what :func:`readiness` decides.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Literal

from quart import Response, request
from quart_trio import QuartTrio

from bridge.call.amd import parse_answered_by
from bridge.call.signals import AmdResult
from bridge.phone import twiml
from bridge.phone.security import CALL_SID, mint_token
from bridge.phone.stream import STREAM_PREFIX
from bridge.web.console import register_console

if TYPE_CHECKING:
    from bridge.web.app import BridgeApp

log = logging.getLogger("bridge.web")

_MAX_FORM_BYTES = 64 * 1024  # Twilio's webhook bodies are ~1-2 KB
_CLOSE = {"Connection": "close"}  # we did not read the body: the connection cannot be reused
# Twilio's CallStatus values (reference twilio.md §3): the metric's labels; anything else is "other".
CALL_STATUSES = frozenset(
    {"queued", "initiated", "ringing", "in-progress", "completed", "busy", "failed", "no-answer", "canceled"}
)
_CALL_STATUS_LOG = {
    "busy": logging.WARNING,
    "failed": logging.WARNING,
    "no-answer": logging.WARNING,
    "canceled": logging.WARNING,
}


async def verified_form(app: BridgeApp, route: str) -> tuple[dict[str, str], Response | None]:
    """The webhook's form, or a 4xx response if it is too big or not signed by Twilio."""
    if (request.content_length or 0) > _MAX_FORM_BYTES:
        app.metrics.webhooks.labels(route, "too_large").inc()
        return {}, Response("Request too large\n", status=413, mimetype="text/plain", headers=_CLOSE)
    try:
        form = await request.form
    except Exception:
        app.metrics.webhooks.labels(route, "bad_request").inc()
        return {}, Response("Unreadable form body\n", status=400, mimetype="text/plain", headers=_CLOSE)
    if app.signatures is not None:
        query = request.query_string.decode("latin-1")
        url = app.settings.public.http_url(request.path + (f"?{query}" if query else ""))
        if not app.signatures.valid(url, form, request.headers.get("X-Twilio-Signature")):
            app.metrics.webhooks.labels(route, "forbidden").inc()
            log.warning("refused %s: missing or invalid X-Twilio-Signature", route)
            return {}, Response("Forbidden\n", status=403, mimetype="text/plain")
    app.metrics.webhooks.labels(route, "ok").inc()
    return {k: form.get(k, "") for k in form}, None

async def stream_twiml(app: BridgeApp, form: dict[str, str], direction: Literal["inbound", "outbound"]) -> Response:
    s = app.settings
    call_sid = form.get("CallSid", "")
    now = app.deps.wall_clock()
    if not CALL_SID.fullmatch(call_sid):
        return Response("Missing or malformed CallSid\n", status=400, mimetype="text/plain")
    token = mint_token(s.stream_token_secret, call_sid, direction, now=now, ttl_s=s.stream_token_ttl_s)
    # The slot is held by the shared state, so the cap holds across WORKERS (bridge/fleet/).
    refused = await app.reserve_call(token, expires_at=now + s.stream_token_ttl_s)
    if refused is not None:
        log.warning("call %s refused: %s", call_sid, refused)
        return _xml(twiml.say_and_hang_up(s.busy_message))
    params = {"CallSid": call_sid, "From": form.get("From", ""), "To": form.get("To", ""), "Direction": direction}
    document = twiml.connect_stream(
        s.public.ws_url(STREAM_PREFIX + token),
        parameters=params,
        status_callback=s.public.http_url("/stream-status"),
        fallback_message=s.fallback_message,
        fallback_twiml_url=s.fallback_twiml_url,
        fallback_number=s.fallback_number,
    )
    log.info("%s call %s from %s to %s: streaming", direction, call_sid, form.get("From", "?"), form.get("To", "?"))
    return _xml(document)



def readiness(app: BridgeApp) -> tuple[int, dict[str, object]]:
    """What ``GET /readyz`` answers: the one place that decides whether to send us calls.

    503 ``draining`` from the first moment of a drain, so a load balancer stops sending webhooks
    (live calls go on; ``/healthz`` stays 200). 200 ``degraded`` while the shared state is down:
    new calls are still admitted with the per-instance guarantees. Else 200 ``ok``.
    """
    body: dict[str, object] = {"status": "ok", "active_calls": app.active_calls}
    if app.calls.draining:
        return 503, body | {"status": "draining"}
    if not app.shared.up:
        return 200, body | {"status": "degraded", "shared_state": "down"}
    return 200, body


def _xml(document: str) -> Response:
    return Response(document, status=200, mimetype="text/xml")


def build_quart(app: BridgeApp) -> QuartTrio:
    quart = QuartTrio("bridge")
    quart.config["MAX_CONTENT_LENGTH"] = _MAX_FORM_BYTES

    @quart.post("/twiml")
    async def inbound_twiml() -> Response:
        form, refusal = await verified_form(app, "/twiml")
        return refusal or await stream_twiml(app, form, "inbound")

    @quart.post("/outbound-twiml")
    async def outbound_twiml() -> Response:
        form, refusal = await verified_form(app, "/outbound-twiml")
        return refusal or await stream_twiml(app, form, "outbound")

    @quart.post("/call-status")
    async def call_status() -> Response:
        form, refusal = await verified_form(app, "/call-status")
        if refusal:
            return refusal
        call_sid = form.get("CallSid", "")[:64] or "?"
        status = form.get("CallStatus", "")[:32]
        app.metrics.call_statuses.labels(status if status in CALL_STATUSES else "other").inc()
        event = form.get("StatusCallbackEvent", "")[:32] or status
        level = _CALL_STATUS_LOG.get(status, logging.INFO)
        details = (("duration", form.get("CallDuration")), ("sip", form.get("SipResponseCode")))
        extra = "".join(f" {k}={v[:16]}" for k, v in details if v)
        hint = " (the callee did not pick up)" if status in ("busy", "no-answer") else ""
        log.log(level, "call %s status %s (event %s)%s%s", call_sid, status or "?", event, extra, hint)
        return Response("", status=204)

    @quart.post("/stream-status")
    async def stream_status() -> Response:
        form, refusal = await verified_form(app, "/stream-status")
        if refusal:
            return refusal
        # Bounded: without TWILIO_AUTH_TOKEN anyone may post here, and a form holds up to 64 KB.
        event = form.get("StreamEvent", "")[:32]
        level = logging.WARNING if event == "stream-error" else logging.INFO
        error = form.get("StreamError", "")[:300]
        call_sid = form.get("CallSid", "")[:64] or "?"
        log.log(level, "call %s stream %s%s", call_sid, event or "?", f": {error}" if error else "")
        return Response("", status=204)

    @quart.post("/amd-status")
    async def amd_status() -> Response:
        # Twilio's asynchronous answering-machine result (reference twilio.md 6b): handed to the
        # CallSid's live call (or kept for it), whose session decides (bridge.call.amd).
        form, refusal = await verified_form(app, "/amd-status")
        if refusal:
            return refusal
        call_sid = form.get("CallSid", "")
        if not CALL_SID.fullmatch(call_sid):
            app.metrics.webhooks.labels("/amd-status", "bad_request").inc()
            return Response("Missing or malformed CallSid\n", status=400, mimetype="text/plain")
        raw = form.get("AnsweredBy", "")[:40]
        answered_by = parse_answered_by(raw)
        if answered_by is None:
            # Still 204: Twilio would retry a 4xx/5xx, and a retry would say the same.
            log.warning("call %s: AMD result with an undocumented AnsweredBy %r: ignored", call_sid, raw)
            return Response("", status=204)
        duration = form.get("MachineDetectionDuration", "")
        detection_ms = int(duration) if duration.isascii() and duration.isdigit() and len(duration) <= 9 else None
        # Routed through the shared state: with WORKERS or a fleet the stream may be elsewhere.
        where = await app.deliver_amd(AmdResult(call_sid, answered_by.value, detection_ms))
        log.info(
            "call %s answered by %s%s (%s)",
            call_sid,
            answered_by.value,
            f" (detected in {detection_ms} ms)" if detection_ms is not None else "",
            where,
        )
        return Response("", status=204)

    @quart.get("/healthz")
    async def healthz() -> Response:
        # Liveness: 200 until the process exits, also while draining (a restart would cut the
        # calls the drain is finishing). Readiness is /readyz.
        status = "draining" if app.calls.draining else "ok"
        body = f'{{"status":"{status}","active_calls":{app.active_calls},"pid":{os.getpid()}}}'
        return Response(body, status=200, mimetype="application/json")

    @quart.get("/readyz")
    async def readyz() -> Response:
        status, body = readiness(app)
        return Response(json.dumps(body), status=status, mimetype="application/json")

    @quart.get("/metrics")
    async def metrics() -> Response:
        return Response(app.metrics.render(), status=200, mimetype="text/plain; version=0.0.4")

    @quart.errorhandler(404)
    async def not_found(_: Exception) -> Response:
        return Response("Not found\n", status=404, mimetype="text/plain")

    @quart.errorhandler(405)
    async def not_allowed(_: Exception) -> Response:
        return Response("Method not allowed\n", status=405, mimetype="text/plain")

    @quart.errorhandler(Exception)
    async def internal(exc: Exception) -> Response:
        log.exception("webhook failed: %s", type(exc).__name__)
        return Response("Internal error\n", status=500, mimetype="text/plain")

    register_console(quart, app)
    return quart


