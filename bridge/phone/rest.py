"""Twilio's REST API from Trio: place a call, hang it up, replace its TwiML (transfer).

Why an ``httpx``-based :class:`twilio.http.AsyncHttpClient` and not ``trio.to_thread`` around the
SDK's blocking ``requests`` client:

- **No thread per request.** httpx runs on Trio's own sockets (through anyio), so a burst of
  hang-ups at shutdown costs no threads and no thread-pool limit.
- **Cancellation works.** A cancelled call nursery cancels the HTTP request at its next await and
  closes the connection; a worker thread stuck in ``requests`` cannot be interrupted and would
  outlive its call (``to_thread.run_sync(abandon_on_cancel=True)`` only abandons it).
- **Deadlines are Trio's.** Each request runs under ``trio.fail_after``, so the deadline covers
  connect, TLS, send and read together and works with Trio's (virtual) clock in tests.

The SDK's bundled ``AsyncTwilioHttpClient`` is aiohttp, which needs asyncio, so it cannot be used.
The SDK builds URLs on ``https://api.twilio.com``; :class:`TrioHttpClient` rewrites that prefix
(``api_base``, ``TWILIO_API_BASE``) or takes an httpx transport, which is how tests point it at a
fake API. A region and edge (``TWILIO_REGION`` / ``TWILIO_EDGE``, data residency) are handed to the
SDK, which then builds ``https://api.{edge}.{region}.twilio.com``; the SDK's own reading of those
variables from ``os.environ`` stays off (configuration is read once, in ``bridge.config``).

Every failure leaves this module as :class:`bridge.errors.TwilioRestError`: Twilio's own error
(``status``, ``code``, message) or, for transport failures and deadlines, ``status`` 0 and
``code`` None. The auth token is only ever handed to httpx as Basic credentials; it never appears
in a log line or an error message.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http import AsyncHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from bridge.config import TwilioApi
from bridge.errors import TwilioRestError

TWILIO_API_BASE = "https://api.twilio.com"
# A REST call to Twilio normally answers in well under a second; 10 s covers a slow TLS handshake
# and Twilio's own p99 while still bounding a hang-up during a call's teardown.
DEFAULT_REQUEST_TIMEOUT_S = 10.0
DEFAULT_STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
# Asynchronous AMD (reference twilio.md 6b): the call connects at once and the result comes later;
# DetectMessageEnd waits for a machine's beep, so a voicemail left then is recorded whole.
AMD_MODE = "DetectMessageEnd"

_logger = logging.getLogger(__name__)
# The SDK prefixes Twilio's message with its own ("Unable to create record: <Twilio's message>").
_SDK_PREFIX = re.compile(r"^Unable to \w+ record(?:: )?")


class TrioHttpClient(AsyncHttpClient):  # type: ignore[misc]  # twilio ships no type hints
    """The SDK's HTTP client, on httpx under Trio, with a deadline on every request.

    Args:
        timeout_s: deadline of each request (connect, send and read together) unless the SDK
            passes its own ``timeout``.
        transport: an httpx transport to use instead of the network (e.g. ``httpx.MockTransport``).
        api_base: replaces the ``https://api.twilio.com`` prefix of every URL, e.g.
            ``http://127.0.0.1:8123`` for a fake API on loopback.
        logger: where requests are logged (at DEBUG, without credentials).

    The client owns an ``httpx.AsyncClient`` whose connections belong to the Trio run that first
    uses it; close it with :meth:`close` in that run.
    """

    def __init__(
        self,
        *,
        timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
        api_base: str | None = None,
        logger: logging.Logger = _logger,
    ) -> None:
        super().__init__(logger, True, timeout_s)
        self.timeout_s = timeout_s
        self.api_base = api_base.rstrip("/") if api_base else None
        # httpx's own timeouts stay off: the Trio deadline in request() is the single deadline.
        self._client = httpx.AsyncClient(transport=transport, timeout=None, trust_env=False)

    async def request(
        self,
        method: str,
        uri: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the SDK's interface; deadline below
        allow_redirects: bool = False,
    ) -> Response:
        """Send one request and return the SDK's ``Response`` (any HTTP status).

        Raises:
            TwilioRestError: with ``status`` 0 when Twilio could not be reached, the connection
                failed, or no answer came within the deadline.

        Cancellation aborts the request and drops its connection; nothing keeps running.
        """
        deadline_s = timeout if timeout is not None else self.timeout_s
        if deadline_s <= 0:
            raise ValueError(f"timeout must be positive, not {deadline_s!r}")
        url = self._rewrite(uri)
        origin = _origin(url)
        self.logger.debug("Twilio REST %s %s", method.upper(), url)
        try:
            with trio.fail_after(deadline_s):
                answer = await self._client.request(
                    method.upper(),
                    url,
                    params=params,  # type: ignore[arg-type]  # the SDK passes str/int values
                    data=data,  # lists become repeated keys (StatusCallbackEvent)
                    headers=headers,
                    auth=auth,
                    follow_redirects=allow_redirects,
                )
        except trio.TooSlowError as exc:
            raise TwilioRestError(
                0, None, f"the Twilio API at {origin} did not answer within {deadline_s:g} s"
            ) from exc
        except httpx.ConnectError as exc:
            raise TwilioRestError(
                0, None, f"cannot connect to the Twilio API at {origin} ({_describe(exc)})"
            ) from exc
        except httpx.HTTPError as exc:
            raise TwilioRestError(
                0, None, f"request to the Twilio API at {origin} failed ({_describe(exc)})"
            ) from exc
        self.logger.debug("Twilio REST %s %s -> %d", method.upper(), url, answer.status_code)
        return Response(answer.status_code, answer.text, dict(answer.headers))

    async def close(self) -> None:
        """Close the pooled connections. The client cannot be used afterwards."""
        await self._client.aclose()

    def _rewrite(self, uri: str) -> str:
        if self.api_base and uri.startswith(TWILIO_API_BASE):
            return self.api_base + uri[len(TWILIO_API_BASE) :]
        return uri


class TwilioRest:
    """The three REST operations the bridge needs, as Trio coroutines.

    Args:
        account_sid: ``AC…`` of the account placing and controlling calls.
        auth_token: its auth token (used for HTTP Basic auth only; never logged).
        http_client: the HTTP client to use; a :class:`TrioHttpClient` is made when omitted.
        api: where the API is (``Settings.twilio_api``): a region and edge, or a base URL that
            the made client rewrites to (an injected client keeps its own ``api_base``).

    ``TwilioRest`` owns its HTTP client (also an injected one) and closes it in :meth:`aclose`.
    Every method raises :class:`TwilioRestError` on failure; cancelling one aborts its request.
    """

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        http_client: TrioHttpClient | None = None,
        api: TwilioApi | None = None,
    ) -> None:
        api = api or TwilioApi()
        if http_client is None:
            http_client = TrioHttpClient(api_base=api.base_url)
        self.http_client = http_client
        self.api = api
        # A non-empty ``environment`` stops the SDK from reading os.environ: TWILIO_REGION or
        # TWILIO_EDGE there would silently rewrite the API host (and mangle a fake one). The
        # configured region and edge are passed explicitly instead.
        self._client = Client(
            account_sid,
            auth_token,
            region=api.region,
            edge=api.edge,
            http_client=self.http_client,
            environment={"TWILIO_EDGE": "", "TWILIO_REGION": ""},
        )

    async def place_call(
        self,
        *,
        to: str,
        from_: str,
        url: str,
        status_callback: str,
        status_callback_events: Sequence[str] = DEFAULT_STATUS_EVENTS,
        timeout_s: int = 30,
        time_limit_s: int | None = None,
        amd_status_callback: str | None = None,
    ) -> str:
        """Place an outbound call and return its Call SID (``CA…``).

        Args:
            to, from_: E.164 numbers (Twilio validates them: 21211 / 21212).
            url: the TwiML URL Twilio POSTs when the call is answered.
            status_callback: where Twilio POSTs the call's progress events.
            status_callback_events: which events to send (repeated ``StatusCallbackEvent``).
            timeout_s: how long Twilio lets the phone ring.
            time_limit_s: the call's maximum length; Twilio's default (4 h) when None.
            amd_status_callback: ask for asynchronous answering-machine detection
                (``MachineDetection=DetectMessageEnd``, ``AsyncAmd=true``) with its result
                POSTed here; None places the call without AMD.

        Raises:
            TwilioRestError: Twilio refused the call or could not be reached.

        If cancelled, the request is aborted; Twilio may still have created the call.
        """
        kwargs: dict[str, Any] = {
            "to": to,
            "from_": from_,
            "url": url,
            "method": "POST",
            "status_callback": status_callback,
            "status_callback_event": list(status_callback_events),
            "status_callback_method": "POST",
            "timeout": timeout_s,
        }
        if time_limit_s is not None:
            kwargs["time_limit"] = time_limit_s
        if amd_status_callback is not None:
            kwargs.update(
                machine_detection=AMD_MODE,
                async_amd="true",
                async_amd_status_callback=amd_status_callback,
                async_amd_status_callback_method="POST",
            )
        call = await self._sdk(self._client.calls.create_async(**kwargs))
        sid = getattr(call, "sid", None)
        if not isinstance(sid, str) or not sid:
            raise TwilioRestError(201, None, "Twilio created the call but sent no Call SID")
        return sid

    async def hang_up(self, call_sid: str) -> None:
        """End a live call (``Status=completed``); Twilio then ends its Media Stream.

        Raises:
            TwilioRestError: e.g. code 21220 when the call is no longer in progress.
        """
        await self._sdk(self._client.calls(call_sid).update_async(status="completed"))

    async def update_twiml(self, call_sid: str, twiml: str) -> None:
        """Replace a live call's TwiML (e.g. ``<Dial>`` for a transfer).

        Twilio stops the call's Media Stream (``stop``, then close) and runs ``twiml`` with the
        call still up: the stream's end is not the call's end.

        Raises:
            TwilioRestError: e.g. code 21220 when the call is no longer in progress.
        """
        await self._sdk(self._client.calls(call_sid).update_async(twiml=twiml))

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.http_client.close()

    async def __aenter__(self) -> TwilioRest:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @staticmethod
    async def _sdk(operation: Any) -> Any:
        """Await an SDK coroutine, translating its errors into TwilioRestError."""
        try:
            return await operation
        except TwilioRestException as exc:
            raise _from_rest_exception(exc) from exc
        except TwilioServiceException as exc:
            message = exc.detail or exc.title or "no error details in Twilio's answer"
            status = int(exc.status)
            raise TwilioRestError(status, _twilio_code(exc.code, status), message) from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TwilioRestError(0, None, "Twilio's answer was not valid JSON") from exc


def _from_rest_exception(exc: TwilioRestException) -> TwilioRestError:
    status = int(exc.status)
    text = str(exc.msg or "")
    detail = _SDK_PREFIX.sub("", text).strip()
    if not detail:
        detail = f"{text or 'request failed'} (no error details in Twilio's answer)"
    return TwilioRestError(status, _twilio_code(exc.code, status), detail)


def _twilio_code(code: object, status: object) -> int | None:
    # Without a code in the body the SDK repeats the HTTP status; Twilio's codes are 5 digits.
    if isinstance(code, int) and not isinstance(code, bool) and code != status:
        return code
    return None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__
