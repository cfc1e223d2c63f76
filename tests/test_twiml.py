"""TwiML documents (bridge.phone.twiml), checked by parsing the XML as Twilio would (twilio.md §2)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from bridge.phone.twiml import connect_stream, dial, say_and_hang_up

STREAM_URL = "wss://bridge.example.com/media-stream/i.CA0.1060.0123456789abcdef.0123"
STATUS_URL = "https://bridge.example.com/twilio/stream-status"


def parse(text: str) -> ET.Element:
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(text.encode())
    assert root.tag == "Response"
    return root


def children(element: ET.Element) -> list[str]:
    return [child.tag for child in element]


def test_connect_stream_with_parameters_and_spoken_fallback() -> None:
    root = parse(
        connect_stream(
            STREAM_URL,
            parameters={"session": "s-7f3a", "lang": "en-US"},
            status_callback=STATUS_URL,
            fallback_message="Sorry, the assistant is unavailable. Goodbye.",
        )
    )
    assert children(root) == ["Connect", "Say", "Hangup"]
    (stream,) = list(root.find("Connect"))  # type: ignore[arg-type]
    assert stream.tag == "Stream"
    assert stream.attrib == {"url": STREAM_URL, "statusCallback": STATUS_URL, "statusCallbackMethod": "POST"}
    assert [(p.tag, p.attrib) for p in stream] == [
        ("Parameter", {"name": "session", "value": "s-7f3a"}),
        ("Parameter", {"name": "lang", "value": "en-US"}),
    ]
    assert root.find("Say").text == "Sorry, the assistant is unavailable. Goodbye."  # type: ignore[union-attr]


def test_stream_url_has_no_query_string() -> None:
    """A query string on the stream URL fails the handshake (31920); parameters travel in <Parameter>."""
    root = parse(connect_stream(STREAM_URL, parameters={"a": "1"}, status_callback=None, fallback_message="x"))
    url = root.find("Connect/Stream").get("url")  # type: ignore[union-attr]
    assert url is not None and url.startswith("wss://") and "?" not in url


def test_without_status_callback_no_callback_attributes() -> None:
    root = parse(connect_stream(STREAM_URL, parameters={}, status_callback=None, fallback_message="Bye."))
    stream = root.find("Connect/Stream")
    assert stream is not None and stream.attrib == {"url": STREAM_URL}
    assert list(stream) == []


@pytest.mark.parametrize(
    ("name", "value", "kept"),
    [
        ("p", "v" * 498, True),  # 499 chars combined: under 500
        ("p", "v" * 499, False),  # 500: too long, skipped rather than failing the stream
        ("n" * 300, "v" * 300, False),
        ("empty", "", False),
    ],
)
def test_long_or_empty_parameters_are_skipped(name: str, value: str, kept: bool) -> None:
    root = parse(
        connect_stream(
            STREAM_URL, parameters={"session": "s-1", name: value}, status_callback=None, fallback_message="x"
        )
    )
    params = {p.get("name"): p.get("value") for p in root.iter("Parameter")}
    assert params.get("session") == "s-1"
    assert (name in params) is kept
    assert all(len(k or "") + len(v or "") < 500 for k, v in params.items())


def test_parameter_values_are_escaped() -> None:
    tricky = "<b> & \"quotes\" 'apos' ünïcode"
    root = parse(
        connect_stream(
            STREAM_URL, parameters={"note": tricky}, status_callback=None, fallback_message='Say <this> & "that"'
        )
    )
    assert root.find("Connect/Stream/Parameter").get("value") == tricky  # type: ignore[union-attr]
    assert root.find("Say").text == 'Say <this> & "that"'  # type: ignore[union-attr]


def test_fallback_redirect_replaces_say_and_hangup() -> None:
    root = parse(
        connect_stream(
            STREAM_URL,
            parameters={},
            status_callback=None,
            fallback_message="unused",
            fallback_twiml_url="https://example.com/fallback.xml?x=1&y=2",
        )
    )
    assert children(root) == ["Connect", "Redirect"]
    redirect = root.find("Redirect")
    assert redirect is not None
    assert redirect.text == "https://example.com/fallback.xml?x=1&y=2"
    assert redirect.get("method") == "POST"


def test_busy_twiml() -> None:
    root = parse(say_and_hang_up("Sorry, all of our lines are busy right now."))
    assert children(root) == ["Say", "Hangup"]
    assert root.find("Say").text == "Sorry, all of our lines are busy right now."  # type: ignore[union-attr]


def test_dial_with_and_without_announcement() -> None:
    root = parse(dial("+14155550199", announcement="Transferring you now."))
    assert children(root) == ["Say", "Dial"]
    assert root.find("Say").text == "Transferring you now."  # type: ignore[union-attr]
    assert root.find("Dial").text == "+14155550199"  # type: ignore[union-attr]
    assert children(parse(dial("+14155550199"))) == ["Dial"]


def test_dial_fits_a_rest_update() -> None:
    """calls(sid).update(twiml=...) takes at most 4000 characters (reference §5)."""
    assert len(dial("+14155550199", announcement="x" * 500)) < 4000


def test_fallback_number_dials_a_human_after_the_apology() -> None:
    from bridge.phone import twiml

    doc = twiml.connect_stream(
        "wss://h/media-stream/t", parameters={}, status_callback=None, fallback_message="Sorry.",
        fallback_number="+14155550199",
    )
    assert doc.index("</Connect>") < doc.index("<Say>Sorry.</Say>") < doc.index("<Dial>+14155550199</Dial>")
    assert "<Hangup" not in doc
