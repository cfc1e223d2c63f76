"""Settings of issue 15 (keep the conversation going): AMD, Twilio regions, keypad, idle, recovery."""

from __future__ import annotations

import pytest

from bridge.config import DEFAULT_VOICEMAIL_MESSAGE, Settings, TwilioApi, from_env, parse_twilio_api
from bridge.errors import ConfigError

BASE = {"ASSEMBLYAI_API_KEY": "aai_0123456789abcdef0123456789abcdef", "HOSTNAME": "https://bridge.example.com"}


def build(**env: str) -> Settings:
    return from_env({**BASE, **env}, generate_secret=lambda: b"\x01" * 32)


def test_defaults() -> None:
    s = build()
    assert s.twilio_api == TwilioApi() and s.twilio_api.host == "api.twilio.com"
    assert (s.amd, s.amd_wait_s, s.voicemail_message) == (True, 4.0, DEFAULT_VOICEMAIL_MESSAGE)
    assert (s.keypad_tool, s.dtmf_to_agent) == (True, False)
    assert (s.idle_reprompt_s, s.idle_hangup_s) == (8.0, 15.0)
    assert (s.recovery, s.recovery_s, s.recovery_context_chars) == (True, 5.0, 4000)


def test_every_variable_is_read() -> None:
    s = build(
        AMD="off",
        AMD_WAIT_S="2.5",
        VOICEMAIL_MESSAGE="Call Acme back.",
        KEYPAD_TOOL="off",
        DTMF_TO_AGENT="on",
        IDLE_REPROMPT_S="0",
        IDLE_HANGUP_S="30",
        RECOVERY="off",
        RECOVERY_S="2",
        RECOVERY_CONTEXT_CHARS="0",
        TWILIO_REGION="ie1",
        TWILIO_EDGE="dublin",
    )
    assert (s.amd, s.amd_wait_s, s.voicemail_message) == (False, 2.5, "Call Acme back.")
    assert (s.keypad_tool, s.dtmf_to_agent, s.idle_reprompt_s, s.idle_hangup_s) == (False, True, 0.0, 30.0)
    assert (s.recovery, s.recovery_s, s.recovery_context_chars) == (False, 2.0, 0)
    assert s.twilio_api == TwilioApi(region="ie1", edge="dublin")


@pytest.mark.parametrize(
    ("env", "host"),
    [
        ({"TWILIO_REGION": "ie1", "TWILIO_EDGE": "dublin"}, "api.dublin.ie1.twilio.com"),
        ({"TWILIO_REGION": "au1", "TWILIO_EDGE": "sydney"}, "api.sydney.au1.twilio.com"),
        ({"TWILIO_EDGE": "ashburn"}, "api.ashburn.us1.twilio.com"),  # the SDK's default region
        ({"TWILIO_API_BASE": "http://127.0.0.1:8123/"}, "127.0.0.1:8123"),
        ({}, "api.twilio.com"),
    ],
)
def test_twilio_api_host(env: dict[str, str], host: str) -> None:
    assert parse_twilio_api(env).host == host


def test_api_base_loses_its_trailing_slash() -> None:
    assert parse_twilio_api({"TWILIO_API_BASE": "https://twilio.internal:8443/"}).base_url == "https://twilio.internal:8443"


MALFORMED = [
    ("TWILIO_REGION", "ireland", "is not a Twilio region"),
    ("TWILIO_REGION", "IE1", "is not a Twilio region"),
    ("TWILIO_REGION", "ie1\nus1", "is not a Twilio region"),
    ("TWILIO_EDGE", "Dublin", "is not a Twilio edge"),
    ("TWILIO_EDGE", "dub lin", "is not a Twilio edge"),
    ("TWILIO_API_BASE", "127.0.0.1:8123", "is not a base URL"),
    ("TWILIO_API_BASE", "ftp://x.example", "is not a base URL"),
    ("TWILIO_API_BASE", "http://x.example/2010-04-01", "is not a base URL"),
    ("TWILIO_API_BASE", "http://x.example?a=1", "is not a base URL"),
    ("TWILIO_API_BASE", "http://x.example:99999", "is not a base URL"),
    ("TWILIO_API_BASE", "http://[::1", "is not a base URL"),
    ("AMD", "maybe", "is not a boolean"),
    ("AMD_WAIT_S", "61", "out of range"),
    ("AMD_WAIT_S", "-1", "out of range"),
    ("KEYPAD_TOOL", "2", "is not a boolean"),
    ("DTMF_TO_AGENT", "yes please", "is not a boolean"),
    ("IDLE_REPROMPT_S", "-1", "out of range"),
    ("IDLE_HANGUP_S", "soon", "is not a number"),
    ("RECOVERY", "sometimes", "is not a boolean"),
    ("RECOVERY_S", "0", "out of range"),
    ("RECOVERY_S", "nan", "out of range"),
    ("RECOVERY_CONTEXT_CHARS", "4k", "is not a whole number"),
    ("RECOVERY_CONTEXT_CHARS", "100001", "out of range"),
]


@pytest.mark.parametrize(("name", "value", "says"), MALFORMED, ids=[f"{n}={v!r}" for n, v, _ in MALFORMED])
def test_malformed_value_is_a_one_line_error_naming_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(**{name: value})
    message = str(info.value)
    assert message.startswith(name) and says in message and "\n" not in message


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"TWILIO_REGION": "ie1"}, "TWILIO_REGION=ie1 needs TWILIO_EDGE too"),
        (
            {"TWILIO_API_BASE": "http://127.0.0.1:1", "TWILIO_EDGE": "dublin"},
            "TWILIO_API_BASE replaces the whole REST URL",
        ),
    ],
)
def test_contradictory_twilio_api_settings(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        build(**env)
