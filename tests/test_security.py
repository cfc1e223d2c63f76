"""Twilio signatures and stream tokens (bridge.phone.security); vectors from twilio.md §4.1."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import from_env
from bridge.phone import security
from bridge.phone.security import SignatureChecker, StreamGrant, check_token, mint_token
from tools.fake_twilio import twilio_signature

# twilio-python's unit-test vectors (reference §4.1), re-run on 9.13.0.
TOKEN = "12345"
FORM_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
FORM_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}
FORM_SIGNATURE = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
WS_URL = "wss://agent.example.com/media"
WS_SIGNATURE = "TCuyLsF3K3bRblNbw7eu4s9Zuks="

CALL_SID = "CA9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d"
SECRET = b"s" * 32


@pytest.fixture
def checker() -> SignatureChecker:
    return SignatureChecker(TOKEN)


def test_form_webhook_vector(checker: SignatureChecker) -> None:
    assert twilio_signature(TOKEN, FORM_URL, FORM_PARAMS) == FORM_SIGNATURE
    assert checker.valid(FORM_URL, FORM_PARAMS, FORM_SIGNATURE)


def test_websocket_upgrade_vector(checker: SignatureChecker) -> None:
    assert twilio_signature(TOKEN, WS_URL) == WS_SIGNATURE
    assert checker.valid(WS_URL, {}, WS_SIGNATURE)
    assert checker.valid(WS_URL, None, WS_SIGNATURE)


def test_upgrade_signature_does_not_validate_the_https_form(checker: SignatureChecker) -> None:
    """Twilio signs the wss:// URL from the TwiML; an https:// rebuild of it fails (§4.2)."""
    assert not checker.valid("https://agent.example.com/media", {}, WS_SIGNATURE)
    https_signature = twilio_signature(TOKEN, "https://agent.example.com/media")
    assert not checker.valid(WS_URL, {}, https_signature)


@pytest.mark.parametrize(
    ("signed_url", "checked_url", "ok"),
    [
        # validate() tries the URL with and without the default port (https: 443)
        (FORM_URL, "https://mycompany.com:443/myapp.php?foo=1&bar=2", True),
        ("https://mycompany.com:443/myapp.php?foo=1&bar=2", FORM_URL, True),
        # an explicit non-default port must be there on both sides
        ("https://mycompany.com:8443/myapp.php?foo=1&bar=2", "https://mycompany.com:8443/myapp.php?foo=1&bar=2", True),
        ("https://mycompany.com:8443/myapp.php?foo=1&bar=2", FORM_URL, False),
        # twilio-python also tries the request URL with *any* port removed, so a signature over the
        # port-less URL validates a ported request URL. We always check the configured public URL.
        (FORM_URL, "https://mycompany.com:8443/myapp.php?foo=1&bar=2", True),
        # anything else must be byte-identical
        (FORM_URL, "https://mycompany.com/myapp.php/?foo=1&bar=2", False),
        (FORM_URL, "https://mycompany.com/myapp.php?foo=1&bar=2&baz=3", False),
        (FORM_URL, "https://mycompany.com/myapp.php?bar=2&foo=1", False),
        (FORM_URL, "https://mycompany.com/myapp.php", False),
        (FORM_URL, "http://mycompany.com/myapp.php?foo=1&bar=2", False),
        (FORM_URL, "https://www.mycompany.com/myapp.php?foo=1&bar=2", False),
        ("https://bridge.example.com/twilio/voice", "https://bridge.example.com/twilio/voice/", False),
        ("https://bridge.example.com/twilio/voice/", "https://bridge.example.com/twilio/voice", False),
        # The port rule rebuilds the URL with urlunsplit, which drops an empty "?": the reason the
        # web layer appends "?" + query only when the query is non-empty (reference §4.3).
        ("https://bridge.example.com/twilio/voice", "https://bridge.example.com/twilio/voice?", True),
        ("https://bridge.example.com/a%20b", "https://bridge.example.com/a b", False),
    ],
)
def test_url_must_match_except_for_the_port_rule(
    checker: SignatureChecker, signed_url: str, checked_url: str, ok: bool
) -> None:
    signature = twilio_signature(TOKEN, signed_url, FORM_PARAMS)
    assert checker.valid(checked_url, FORM_PARAMS, signature) is ok


def test_params_are_signed(checker: SignatureChecker) -> None:
    assert not checker.valid(FORM_URL, {**FORM_PARAMS, "Digits": "4321"}, FORM_SIGNATURE)
    assert not checker.valid(FORM_URL, {**FORM_PARAMS, "Extra": "1"}, FORM_SIGNATURE)
    assert not checker.valid(FORM_URL, {}, FORM_SIGNATURE)


def test_other_token_fails() -> None:
    assert not SignatureChecker("54321").valid(FORM_URL, FORM_PARAMS, FORM_SIGNATURE)


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        " ",
        "x" * 257,
        FORM_SIGNATURE + "x" * 230,
        "!!!not-base64!!!",
        "é" * 28,
        "\x00",
        FORM_SIGNATURE[:-1],
        FORM_SIGNATURE.lower(),
    ],
)
def test_missing_overlong_or_garbage_signature_is_false(checker: SignatureChecker, signature: str | None) -> None:
    assert checker.valid(FORM_URL, FORM_PARAMS, signature) is False


@pytest.mark.parametrize(
    ("url", "params"),
    [
        ("https://[::1/x", {}),
        ("https://host:port/x", {}),
        ("not a url", {}),
        ("", {}),
        (FORM_URL, {"Digits": 1234}),
        (FORM_URL, {"Digits": None}),
        (FORM_URL, {"Digits": ["1", 2]}),
        ("https://h\udcff.example.com/", {"a": "\ud800"}),
    ],
)
def test_odd_inputs_never_raise(checker: SignatureChecker, url: str, params: dict[str, object]) -> None:
    assert checker.valid(url, params, FORM_SIGNATURE) is False  # type: ignore[arg-type]


@settings(max_examples=300)
@given(st.text(), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4), st.text(max_size=300))
def test_valid_never_raises(url: str, params: dict[str, str], signature: str) -> None:
    assert SignatureChecker(TOKEN).valid(url, params, signature) in (True, False)


# --- stream tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_token_round_trip(direction: str) -> None:
    token = mint_token(SECRET, CALL_SID, direction, now=1000.0, ttl_s=60.0)  # type: ignore[arg-type]
    assert re.fullmatch(r"[A-Za-z0-9._\-]+", token) and len(token) <= 128  # URL-path safe
    assert check_token(SECRET, token, now=1000.0) == StreamGrant(token, CALL_SID, direction, 1060)  # type: ignore[arg-type]


def test_tokens_are_unique() -> None:
    tokens = {mint_token(SECRET, CALL_SID, "inbound", now=1000.0, ttl_s=60.0) for _ in range(100)}
    assert len(tokens) == 100


def test_expiry_boundary_is_exact() -> None:
    token = mint_token(SECRET, CALL_SID, "inbound", now=1000.0, ttl_s=60.0)
    assert isinstance(check_token(SECRET, token, now=1060.0), StreamGrant)
    assert check_token(SECRET, token, now=1060.000001) == "expired"
    assert check_token(SECRET, token, now=5000.0) == "expired"


def _swap(token: str, index: int, value: str) -> str:
    parts = token.split(".")
    parts[index] = value
    return ".".join(parts)


def test_forged_tokens_are_refused() -> None:
    token = mint_token(SECRET, CALL_SID, "inbound", now=1000.0, ttl_s=60.0)
    mac = token.rsplit(".", 1)[1]
    flipped = mac[:-1] + ("0" if mac[-1] != "0" else "1")
    assert check_token(SECRET, token[: -len(mac)] + flipped, now=1000.0) == "bad signature"
    assert check_token(SECRET, _swap(token, 0, "o"), now=1000.0) == "bad signature"  # direction changed
    assert check_token(SECRET, _swap(token, 1, "CA" + "0" * 32), now=1000.0) == "bad signature"  # other call
    assert check_token(SECRET, _swap(token, 2, "9999999999"), now=1000.0) == "bad signature"  # longer life
    assert check_token(b"other secret", token, now=1000.0) == "bad signature"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "i." + CALL_SID,
        "x." + CALL_SID + ".1060.0123456789abcdef." + "0" * 32,
        "i.CA123.1060.0123456789abcdef." + "0" * 32,
        "i." + CALL_SID + ".1060.0123456789ABCDEF." + "0" * 32,
        "i." + CALL_SID + ".1060.0123456789abcdef." + "0" * 31,
        "i." + CALL_SID + ".-1.0123456789abcdef." + "0" * 32,
        "i." + CALL_SID + ".1060.0123456789abcdef." + "0" * 32 + "." + "0" * 100,
        "a" * 10_000,
    ],
)
def test_malformed_tokens(token: str) -> None:
    assert check_token(SECRET, token, now=1000.0) == "malformed"


def test_trailing_newline_is_not_accepted() -> None:
    token = mint_token(SECRET, CALL_SID, "inbound", now=1000.0, ttl_s=60.0)
    assert not isinstance(check_token(SECRET, token + "\n", now=1000.0), StreamGrant)


NEAR_TOKENS = r"(i|o)\.CA[0-9a-f]{32}\.[0-9\u0660-\u0669]{1,12}\.[0-9a-f]{16}\.[0-9a-f]{32}\n?"


@settings(max_examples=300)
@given(st.text(max_size=200) | st.from_regex(NEAR_TOKENS, fullmatch=True))
def test_check_token_never_raises(token: str) -> None:
    result = check_token(SECRET, token, now=1000.0)
    assert result in ("malformed", "bad signature", "expired")


def test_token_minted_by_one_instance_is_accepted_by_another() -> None:
    """Behind a load balancer the webhook and the stream can land on different instances."""
    env = {
        "ASSEMBLYAI_API_KEY": "k" * 32,
        "HOSTNAME": "https://bridge.example.com",
        "TWILIO_AUTH_TOKEN": "0123456789abcdef0123456789abcdef",
    }
    webhook_instance, stream_instance = from_env(env), from_env(env)
    token = mint_token(webhook_instance.stream_token_secret, CALL_SID, "outbound", now=1000.0, ttl_s=60.0)
    grant = check_token(stream_instance.stream_token_secret, token, now=1030.0)
    assert grant == StreamGrant(token, CALL_SID, "outbound", 1060)
    unrelated = from_env({**env, "TWILIO_AUTH_TOKEN": "f" * 32})
    assert check_token(unrelated.stream_token_secret, token, now=1030.0) == "bad signature"


@pytest.mark.parametrize(
    ("text", "is_sid"),
    [
        ("CA" + "0123456789abcdef" * 2, True),
        ("CA" + "0123456789ABCDEF" * 2, True),
        ("CA" + "0" * 31, False),
        ("CA" + "0" * 33, False),
        ("CA" + "0" * 32 + "\n", False),
        ("ca" + "0" * 32, False),
        ("AC" + "0" * 32, False),
        ("CA" + "g" * 32, False),
    ],
)
def test_call_sid_is_exactly_ca_and_32_hex_digits(text: str, is_sid: bool) -> None:
    assert bool(security.CALL_SID.fullmatch(text)) is is_sid
