"""Settings from the environment (bridge.config): defaults, one-line errors, the public origin."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import (
    DEFAULT_BUSY_MESSAGE,
    DEFAULT_FALLBACK_MESSAGE,
    DEFAULT_GREETING,
    DEFAULT_OUTBOUND_GREETING,
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_VOICE_AGENT_URL,
    PublicBase,
    check_e164,
    from_env,
    load_environment,
    mask,
    parse_public_base,
)
from bridge.errors import ConfigError

API_KEY = "aai_0123456789abcdef0123456789abcdef"
AUTH_TOKEN = "f0e1d2c3b4a5968778695a4b3c2d1e0f"
ACCOUNT_SID = "AC0f1e2d3c4b5a69788796a5b4c3d2e1f0"
BASE = {"ASSEMBLYAI_API_KEY": API_KEY, "HOSTNAME": "https://bridge.example.com"}
FIXED_SECRET = b"\x01" * 32


def build(**env: str):  # type: ignore[no-untyped-def]
    return from_env({**BASE, **env}, generate_secret=lambda: FIXED_SECRET)


def test_defaults() -> None:
    s = build()
    assert s.assemblyai_api_key == API_KEY
    assert s.public == PublicBase(secure=True, host="bridge.example.com", prefix="")
    assert (s.port, s.bind_host, s.voice_agent_url) == (3000, "0.0.0.0", DEFAULT_VOICE_AGENT_URL)
    assert (s.inbound.system_prompt, s.inbound.greeting, s.inbound.voice) == (
        DEFAULT_SYSTEM_PROMPT,
        DEFAULT_GREETING,
        "ivy",
    )
    assert (s.outbound.system_prompt, s.outbound.greeting, s.outbound.voice) == (
        DEFAULT_SYSTEM_PROMPT,
        DEFAULT_OUTBOUND_GREETING,
        "ivy",
    )
    assert s.outbound_greeting_delay_ms == 500
    assert (s.twilio_account_sid, s.twilio_auth_token, s.twilio_phone_number, s.target_phone_number) == (
        None,
        None,
        None,
        None,
    )
    assert s.verify_signatures is False
    assert s.stream_token_secret == FIXED_SECRET
    assert s.stream_token_ttl_s == 60.0
    assert (s.max_concurrent_calls, s.max_call_seconds, s.session_ready_timeout_s) == (100, 3600.0, 10.0)
    assert (s.tool_timeout_s, s.end_call_deadline_s) == (30.0, 15.0)
    assert (s.max_twilio_frame_bytes, s.max_agent_frame_bytes) == (64 * 1024, 1024 * 1024)
    assert (s.tools_module, s.session_hook, s.end_call_tool) == (None, None, True)
    assert (s.transfer_number, s.transfer_allowlist) == (None, ())
    assert (s.fallback_message, s.fallback_twiml_url, s.busy_message) == (
        DEFAULT_FALLBACK_MESSAGE,
        None,
        DEFAULT_BUSY_MESSAGE,
    )
    assert (s.resume_window_s, s.caller_audio_burst_ms, s.drain_seconds) == (25.0, 2000.0, 30.0)
    assert (s.log_level, s.log_format) == ("INFO", "text")
    assert any("TWILIO_AUTH_TOKEN is not set" in w for w in s.warnings)


def test_every_variable_is_read() -> None:
    s = build(
        PORT="8080",
        BIND_HOST="127.0.0.1",
        VOICE_AGENT_URL="wss://agents.eu.assemblyai.com/v1/ws",
        VOICE="james",
        OUTBOUND_VOICE="tyler",
        SYSTEM_PROMPT="Be Acme.",
        GREETING="Acme, hello!",
        OUTBOUND_SYSTEM_PROMPT="Call for Acme.",
        OUTBOUND_GREETING="Hi from Acme.",
        OUTBOUND_GREETING_DELAY_MS="0",
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        TWILIO_PHONE_NUMBER="+14155550100",
        TARGET_PHONE_NUMBER="+14155550123",
        STREAM_TOKEN_TTL_S="30",
        MAX_CONCURRENT_CALLS="7",
        MAX_CALL_SECONDS="600",
        SESSION_READY_TIMEOUT_S="5.5",
        TOOL_TIMEOUT_S="12",
        END_CALL_DEADLINE_S="9",
        MAX_TWILIO_FRAME_BYTES="2048",
        MAX_AGENT_FRAME_BYTES="8192",
        BRIDGE_TOOLS="pkg.tools, other.tools",
        BRIDGE_SESSION_HOOK="pkg.hooks:persona",
        END_CALL_TOOL="off",
        TRANSFER_NUMBER="+14155550199",
        TRANSFER_ALLOWLIST=" +14155550198 ,+14155550197,",
        FALLBACK_TWIML_URL="https://example.com/fallback.xml",
        BUSY_MESSAGE="Busy.",
        FALLBACK_MESSAGE="Sorry.",
        RESUME_WINDOW_S="0",
        CALLER_AUDIO_BURST_MS="500",
        DRAIN_SECONDS="5",
        LOG_LEVEL="debug",
        LOG_FORMAT="JSON",
    )
    assert (s.port, s.bind_host, s.voice_agent_url) == (8080, "127.0.0.1", "wss://agents.eu.assemblyai.com/v1/ws")
    assert (s.inbound.voice, s.outbound.voice) == ("james", "tyler")
    assert (s.inbound.system_prompt, s.inbound.greeting) == ("Be Acme.", "Acme, hello!")
    assert (s.outbound.system_prompt, s.outbound.greeting) == ("Call for Acme.", "Hi from Acme.")
    assert s.outbound_greeting_delay_ms == 0
    assert (s.twilio_account_sid, s.twilio_auth_token) == (ACCOUNT_SID, AUTH_TOKEN)
    assert (s.twilio_phone_number, s.target_phone_number) == ("+14155550100", "+14155550123")
    assert s.verify_signatures is True
    assert not any("TWILIO_AUTH_TOKEN" in w for w in s.warnings)
    assert (s.stream_token_ttl_s, s.max_concurrent_calls, s.max_call_seconds) == (30.0, 7, 600.0)
    assert (s.session_ready_timeout_s, s.tool_timeout_s, s.end_call_deadline_s) == (5.5, 12.0, 9.0)
    assert (s.max_twilio_frame_bytes, s.max_agent_frame_bytes) == (2048, 8192)
    assert (s.tools_module, s.session_hook, s.end_call_tool) == ("pkg.tools, other.tools", "pkg.hooks:persona", False)
    assert (s.transfer_number, s.transfer_allowlist) == ("+14155550199", ("+14155550198", "+14155550197"))
    assert (s.fallback_twiml_url, s.busy_message, s.fallback_message) == (
        "https://example.com/fallback.xml",
        "Busy.",
        "Sorry.",
    )
    assert (s.resume_window_s, s.caller_audio_burst_ms, s.drain_seconds) == (0.0, 500.0, 5.0)
    assert (s.log_level, s.log_format) == ("DEBUG", "json")


def test_outbound_persona_inherits_the_inbound_prompt_and_voice() -> None:
    s = build(SYSTEM_PROMPT="Be Acme.", VOICE="james")
    assert (s.outbound.system_prompt, s.outbound.voice) == ("Be Acme.", "james")


def test_empty_values_count_as_unset() -> None:
    """A copied .env.example leaves ``NAME=`` lines: they must not override defaults."""
    s = build(PORT="", VOICE="  ", TWILIO_AUTH_TOKEN="", GREETING="", TRANSFER_NUMBER="")
    assert (s.port, s.inbound.voice, s.twilio_auth_token, s.inbound.greeting, s.transfer_number) == (
        3000,
        "ivy",
        None,
        DEFAULT_GREETING,
        None,
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("off", False),
    ],
)
def test_booleans(value: str, expected: bool) -> None:
    assert build(END_CALL_TOOL=value).end_call_tool is expected


# --- every malformed value: a one-line ConfigError naming the variable and a fix -------------------

MALFORMED = [
    ("ASSEMBLYAI_API_KEY", None),
    ("ASSEMBLYAI_API_KEY", "   "),
    ("HOSTNAME", None),
    ("HOSTNAME", "ftp://bridge.example.com"),
    ("HOSTNAME", "https://bridge.example.com/?x=1"),
    ("HOSTNAME", "https://bridge.example.com/#frag"),
    ("HOSTNAME", "https://user:pw@bridge.example.com"),
    ("HOSTNAME", "https://"),
    ("HOSTNAME", "https://bridge.example.com:99999"),
    ("HOSTNAME", "https://bridge.example.com:port"),
    ("HOSTNAME", "https://[::1"),
    ("HOSTNAME", "https://[not-ipv6]"),
    ("VOICE", "Ivy"),
    ("VOICE", "i vy"),
    ("VOICE", "ivy\nevil"),
    ("OUTBOUND_VOICE", "JAMES"),
    ("STREAM_TOKEN_SECRET", "too-short"),
    ("TRANSFER_NUMBER", "4155550199"),
    ("TRANSFER_NUMBER", "+0415555"),
    ("TRANSFER_ALLOWLIST", "+14155550198,555-0199"),
    ("FALLBACK_TWIML_URL", "ftp://example.com/x.xml"),
    ("FALLBACK_TWIML_URL", "/relative.xml"),
    ("LOG_FORMAT", "xml"),
    ("LOG_LEVEL", "verbose"),
    ("LOG_LEVEL", "INFO\nDEBUG"),
    ("BRIDGE_TOOLS", "my-tools"),
    ("BRIDGE_TOOLS", "a,,b"),
    ("BRIDGE_SESSION_HOOK", "pkg.hooks"),
    ("BRIDGE_SESSION_HOOK", "pkg.hooks:"),
    ("VOICE_AGENT_URL", "https://agents.assemblyai.com/v1/ws"),
    ("VOICE_AGENT_URL", "wss://"),
    ("VOICE_AGENT_URL", "wss://[bad"),
    ("PORT", "abc"),
    ("PORT", "0"),
    ("PORT", "65536"),
    ("PORT", "80.5"),
    ("OUTBOUND_GREETING_DELAY_MS", "-1"),
    ("OUTBOUND_GREETING_DELAY_MS", "10001"),
    ("TWILIO_ACCOUNT_SID", "AC123"),
    ("TWILIO_ACCOUNT_SID", "SK0f1e2d3c4b5a69788796a5b4c3d2e1f0"),
    ("TWILIO_PHONE_NUMBER", "14155550100"),
    ("TARGET_PHONE_NUMBER", "+1 415 555 0123"),
    ("STREAM_TOKEN_TTL_S", "0.5"),
    ("STREAM_TOKEN_TTL_S", "soon"),
    ("MAX_CONCURRENT_CALLS", "0"),
    ("MAX_CONCURRENT_CALLS", "1e3"),
    ("MAX_CALL_SECONDS", "nan"),
    ("MAX_CALL_SECONDS", "inf"),
    ("MAX_CALL_SECONDS", "0"),
    ("SESSION_READY_TIMEOUT_S", "0"),
    ("TOOL_TIMEOUT_S", "301"),
    ("END_CALL_DEADLINE_S", "x"),
    ("MAX_TWILIO_FRAME_BYTES", "100"),
    ("MAX_AGENT_FRAME_BYTES", "1"),
    ("END_CALL_TOOL", "maybe"),
    ("RESUME_WINDOW_S", "31"),
    ("CALLER_AUDIO_BURST_MS", "50"),
    ("DRAIN_SECONDS", "-1"),
    ("REDIS_URL", "http://redis.internal:6379"),
    ("REDIS_URL", "redis.internal:6379"),
    ("REDIS_URL", "redis://"),
    ("REDIS_URL", "redis://:pw@"),
    ("REDIS_URL", "redis://redis.internal:99999"),
    ("REDIS_URL", "redis://redis.internal:port"),
    ("REDIS_URL", "redis://redis.internal/cache"),
    ("REDIS_URL", "redis://redis.internal/0#x"),
    ("REDIS_URL", "redis://[::1"),
    ("CLUSTER_MAX_CALLS", "10"),  # without REDIS_URL: nowhere to count
    ("CLUSTER_MAX_CALLS", "-1"),
    ("CLUSTER_MAX_CALLS", "many"),
    ("LEASE_S", "0.5"),
    ("LEASE_S", "301"),
    ("LEASE_S", "soon"),
]


@pytest.mark.parametrize(("name", "value"), MALFORMED, ids=[f"{n}={v!r}" for n, v in MALFORMED])
def test_malformed_value_is_a_one_line_error_naming_the_variable(name: str, value: str | None) -> None:
    env = {**BASE, name: value} if value is not None else {k: v for k, v in BASE.items() if k != name}
    with pytest.raises(ConfigError) as info:
        from_env(env)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert name in message
    assert any(cue in message for cue in ("use ", "set ", "copy ", "e.g.")), message


def test_check_e164() -> None:
    assert check_e164("X", "+14155550100") == "+14155550100"
    arabic_digits = "+1\u0664\u0661\u0665\u0665\u0665\u0665\u0660\u0661\u0660\u0660"
    for bad in ("+1", "+1415555010012345", "+14155550100\n", "00441234567890", "", arabic_digits, " +14155550100"):
        with pytest.raises(ConfigError, match=r"^X="):
            check_e164("X", bad)


# --- the public origin ---------------------------------------------------------------------------

PUBLIC = [
    ("bridge.example.com", True, "bridge.example.com", ""),
    ("https://bridge.example.com", True, "bridge.example.com", ""),
    ("https://bridge.example.com/", True, "bridge.example.com", ""),
    ("  https://Bridge.Example.COM  ", True, "bridge.example.com", ""),
    ("HTTPS://bridge.example.com", True, "bridge.example.com", ""),
    ("https://bridge.example.com:443", True, "bridge.example.com:443", ""),
    ("https://bridge.example.com:8443/voice-bridge/", True, "bridge.example.com:8443", "/voice-bridge"),
    ("bridge.example.com/a/b", True, "bridge.example.com", "/a/b"),
    ("wss://bridge.example.com", True, "bridge.example.com", ""),
    ("http://localhost:3000", False, "localhost:3000", ""),
    ("ws://127.0.0.1:3000", False, "127.0.0.1:3000", ""),
]


@pytest.mark.parametrize(("raw", "secure", "host", "prefix"), PUBLIC)
def test_public_base(raw: str, secure: bool, host: str, prefix: str) -> None:
    base, warning = parse_public_base({"HOSTNAME": raw})
    assert base == PublicBase(secure=secure, host=host, prefix=prefix)
    assert warning is None


def test_public_urls() -> None:
    base, _ = parse_public_base({"HOSTNAME": "https://bridge.example.com:8443/vb/"})
    assert base.http_url("/twilio/voice") == "https://bridge.example.com:8443/vb/twilio/voice"
    assert base.ws_url("/media-stream/tok") == "wss://bridge.example.com:8443/vb/media-stream/tok"
    plain, _ = parse_public_base({"HOSTNAME": "http://localhost:3000"})
    assert plain.http_url("/twilio/voice") == "http://localhost:3000/twilio/voice"
    assert plain.ws_url("/media-stream/tok") == "ws://localhost:3000/media-stream/tok"


def test_public_hostname_wins_over_hostname() -> None:
    base, warning = parse_public_base({"HOSTNAME": "3f2a9c1b7d4e", "PUBLIC_HOSTNAME": "https://pub.example.com"})
    assert base.host == "pub.example.com" and warning is None
    # An empty PUBLIC_HOSTNAME (copied .env.example) falls back to HOSTNAME.
    base, _ = parse_public_base({"HOSTNAME": "https://bridge.example.com", "PUBLIC_HOSTNAME": ""})
    assert base.host == "bridge.example.com"


def test_public_hostname_errors_name_public_hostname() -> None:
    with pytest.raises(ConfigError, match="PUBLIC_HOSTNAME"):
        parse_public_base({"HOSTNAME": "https://ok.example.com", "PUBLIC_HOSTNAME": "ftp://x.example.com"})


@pytest.mark.parametrize("raw", ["3f2a9c1b7d4e", "3f2a9c1b7d4e:3000", "my-laptop"])
def test_machine_name_warning(raw: str) -> None:
    """Shells and containers set HOSTNAME to the machine's own name; Twilio cannot reach that."""
    _, warning = parse_public_base({"HOSTNAME": raw})
    assert warning is not None and "\n" not in warning
    assert "PUBLIC_HOSTNAME" in warning and raw in warning
    settings_ = build(HOSTNAME=raw)
    assert warning in settings_.warnings


def test_localhost_and_explicit_schemes_do_not_warn() -> None:
    for raw in ("localhost", "localhost:3000", "https://3f2a9c1b7d4e", "[::1]:3000"):
        assert parse_public_base({"HOSTNAME": raw})[1] is None, raw


# --- .env -------------------------------------------------------------------------------------------


def test_dotenv_is_merged_under_the_environment(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# comment\nASSEMBLYAI_API_KEY=from-file-key-0123\nHOSTNAME=https://file.example.com\nVOICE=james\n"
        'GREETING="Hello from the file"\nEMPTY=\n'
    )
    merged = load_environment({"VOICE": "tyler", "PORT": "8080"}, dotenv)
    assert merged["VOICE"] == "tyler"  # the environment wins
    assert merged["PORT"] == "8080"
    assert merged["HOSTNAME"] == "https://file.example.com"
    assert merged["GREETING"] == "Hello from the file"
    s = from_env(merged)
    assert (s.assemblyai_api_key, s.inbound.voice, s.port) == ("from-file-key-0123", "tyler", 8080)


def test_missing_or_disabled_dotenv_is_just_the_environment(tmp_path: Path) -> None:
    env = {"A": "1"}
    assert load_environment(env, tmp_path / "missing.env") == env
    assert load_environment(env, None) == env
    assert load_environment(env, tmp_path) == env  # a directory is not a file


def test_load_environment_does_not_mutate_its_input(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("B=2\n")
    env = {"A": "1"}
    assert load_environment(env, tmp_path / ".env") == {"A": "1", "B": "2"}
    assert env == {"A": "1"}


# --- secrets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["", "abc", "0123456789a", "0123456789ab", API_KEY, AUTH_TOKEN])
def test_mask_never_reveals_the_secret(secret: str) -> None:
    masked = mask(secret)
    assert f"({len(secret)} chars)" in masked
    if secret:
        assert secret not in masked
    assert sum(c.isalnum() for c in masked.split(" (")[0]) <= 6


@settings(max_examples=200)
@given(st.text(alphabet="0123456789abcdefABCDEF_-", min_size=8, max_size=80))
def test_mask_never_contains_the_secret(secret: str) -> None:
    assert secret not in mask(secret)


def test_derived_stream_token_secret_is_stable_and_not_the_token() -> None:
    a = from_env({**BASE, "TWILIO_AUTH_TOKEN": AUTH_TOKEN})
    b = from_env({**BASE, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "PORT": "9000"})
    assert a.stream_token_secret == b.stream_token_secret
    assert len(a.stream_token_secret) == 32
    assert a.stream_token_secret != AUTH_TOKEN.encode()
    assert AUTH_TOKEN.encode() not in a.stream_token_secret
    assert AUTH_TOKEN not in a.stream_token_secret.hex()
    assert "derived from TWILIO_AUTH_TOKEN" in a.stream_token_secret_source
    other = from_env({**BASE, "TWILIO_AUTH_TOKEN": "0" * 32})
    assert other.stream_token_secret != a.stream_token_secret


def test_explicit_stream_token_secret_wins() -> None:
    s = build(TWILIO_AUTH_TOKEN=AUTH_TOKEN, STREAM_TOKEN_SECRET="0123456789abcdef0123")
    assert s.stream_token_secret == b"0123456789abcdef0123"
    assert "STREAM_TOKEN_SECRET" in s.stream_token_secret_source


def test_generated_secret_differs_per_start() -> None:
    a, b = from_env(BASE), from_env(BASE)
    assert len(a.stream_token_secret) == 32 and a.stream_token_secret != b.stream_token_secret


def test_describe_contains_no_secret() -> None:
    s = build(
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        BRIDGE_TOOLS="pkg.tools",
        BRIDGE_SESSION_HOOK="pkg.hooks:persona",
    )
    text = "\n".join(s.describe())
    assert set(s.secrets()) == {API_KEY, AUTH_TOKEN, s.stream_token_secret.hex()}
    for secret in s.secrets():
        assert secret not in text
    assert "bridge.example.com" in text and "pkg.tools" in text and "pkg.hooks:persona" in text


def test_repr_contains_no_secret() -> None:
    """A Settings object that ends up in a log line or a traceback must not leak a secret."""
    s = build(TWILIO_AUTH_TOKEN=AUTH_TOKEN)
    for secret in (*s.secrets(), repr(s.stream_token_secret)):
        assert secret not in repr(s)


VARIABLES = sorted({name for name, _ in MALFORMED} | {"PUBLIC_HOSTNAME", "SYSTEM_PROMPT", "GREETING", "BIND_HOST"})


ODD_VALUES = ["https://[::1", "wss://[x]", "http://a:0", "+14155550100", "1e400", "-0", "nan", "0x10", "\u0661\u0662"]


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(VARIABLES), st.text(max_size=40) | st.sampled_from([*ODD_VALUES, "\u00b2"])))
def test_from_env_raises_only_config_errors(env: dict[str, str]) -> None:
    """Whatever the environment holds, start-up fails with a one-line ConfigError or succeeds."""
    env = {k: v for k, v in env.items() if "\x00" not in v}
    try:
        from_env({**BASE, **env}, generate_secret=lambda: FIXED_SECRET)
    except ConfigError as exc:
        assert "\n" not in str(exc)


REDIS_PASSWORD = "s3cret-redis-password-xyz"


def test_fleet_settings_default_to_one_process() -> None:
    s = build()
    assert (s.redis_url, s.cluster_max_calls, s.lease_s) == (None, 0, 15.0)
    assert not any("REDIS_URL" in line for line in s.describe())


@pytest.mark.parametrize(
    "url",
    [
        "redis://redis.internal",
        "redis://redis.internal:6380/2",
        f"redis://:{REDIS_PASSWORD}@10.0.0.5:6379/0",
        f"rediss://bridge:{REDIS_PASSWORD}@redis.example.com:6380",
        "redis://[::1]:6379/",
    ],
)
def test_fleet_settings_are_read(url: str) -> None:
    s = build(REDIS_URL=url, CLUSTER_MAX_CALLS="250", LEASE_S="6")
    assert (s.redis_url, s.cluster_max_calls, s.lease_s) == (url, 250, 6.0)
    assert build(REDIS_URL=url).cluster_max_calls == 0  # unset: no cluster cap, per instance only


def test_the_redis_password_is_a_secret_everywhere() -> None:
    s = build(REDIS_URL=f"redis://:{REDIS_PASSWORD}@redis.internal:6379/0", CLUSTER_MAX_CALLS="5")
    assert REDIS_PASSWORD in s.secrets()  # so the log filter scrubs it
    assert REDIS_PASSWORD not in repr(s)
    text = "\n".join(s.describe())
    assert REDIS_PASSWORD not in text
    assert "redis://:****@redis.internal:6379/0 (cluster cap 5 calls, lease 15 s)" in text


@pytest.mark.parametrize(
    "url", [f"http://:{REDIS_PASSWORD}@r:6379", f"redis://:{REDIS_PASSWORD}@r:99999", f"redis://:{REDIS_PASSWORD}@r/x"]
)
def test_a_bad_redis_url_is_refused_without_echoing_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(REDIS_URL=url)
    assert "REDIS_URL" in str(info.value) and REDIS_PASSWORD not in str(info.value)
