"""TwiML documents, built with twilio.twiml.voice_response (pure)."""

from __future__ import annotations

from collections.abc import Mapping

from twilio.twiml.voice_response import VoiceResponse

# Twilio: <Parameter> name + value must stay under 500 characters combined.
_MAX_PARAMETER_CHARS = 499


def connect_stream(
    stream_url: str,
    *,
    parameters: Mapping[str, str],
    status_callback: str | None,
    fallback_message: str,
    fallback_twiml_url: str | None = None,
    fallback_number: str | None = None,
) -> str:
    """``<Connect><Stream>`` to our Media Streams route, then the fallback path.

    The verbs after ``</Connect>`` run only when *we* close the stream (a caller hang-up ends the
    call first), so they are what a caller hears if the agent fails: a spoken apology and a
    hang-up, the apology and a ``<Dial>`` to ``FALLBACK_NUMBER`` (a human), or a redirect to
    ``FALLBACK_TWIML_URL``.
    """
    response = VoiceResponse()
    stream = response.connect().stream(
        url=stream_url,
        status_callback=status_callback,
        status_callback_method="POST" if status_callback else None,
    )
    for name, value in parameters.items():
        if value and len(name) + len(value) <= _MAX_PARAMETER_CHARS:
            stream.parameter(name=name, value=value)
    if fallback_twiml_url:
        response.redirect(fallback_twiml_url, method="POST")
    elif fallback_number:
        response.say(fallback_message)
        response.dial(fallback_number)
    else:
        response.say(fallback_message)
        response.hangup()
    return str(response)


def say_and_hang_up(message: str) -> str:
    """A polite refusal: e.g. all lines busy, or the server is draining."""
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return str(response)


def dial(number: str, *, announcement: str | None = None) -> str:
    """Hand the caller to ``number`` (used by the ``transfer_call`` tool through a REST update)."""
    response = VoiceResponse()
    if announcement:
        response.say(announcement)
    response.dial(number)
    return str(response)
