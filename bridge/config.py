"""Settings: read once from the environment (and an optional ``.env``), validated, frozen.

``from_env(mapping)`` is pure: it never touches ``os.environ``. Every error is a
:class:`ConfigError` whose message is one line naming the variable and the fix. Nothing below
this module reads the environment; the ``Settings`` object is passed down explicitly.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from bridge.errors import ConfigError

DEFAULT_VOICE_AGENT_URL = "wss://agents.assemblyai.com/v1/ws"
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly, helpful voice assistant on a phone call. Keep every answer to one or two "
    "short sentences, speak naturally, and never use lists or formatting."
)
DEFAULT_GREETING = "Hi, thanks for calling. How can I help?"
DEFAULT_OUTBOUND_GREETING = "Hi, this is an automated assistant calling. Do you have a moment?"
DEFAULT_VOICE = "ivy"
DEFAULT_FALLBACK_MESSAGE = "Sorry, our assistant is not available right now. Please try again later. Goodbye."
DEFAULT_BUSY_MESSAGE = "Sorry, all of our lines are busy right now. Please call again in a few minutes."
DEFAULT_VOICEMAIL_MESSAGE = (
    "Hello, this is an automated assistant calling. Sorry we missed you; we will try again later. Goodbye."
)
DEFAULT_RECORDS_URL = "sqlite:///data/calls.sqlite3"  # relative to the working directory

_E164 = re.compile(r"\+[1-9][0-9]{1,14}")  # fullmatch: "$" would accept a trailing newline
_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
_VOICE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_MODULE = re.compile(r"^[A-Za-z_][\w.]*$")
_HOOK = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_PARAM_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # a <Parameter name=...> of the stream
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_TOKEN_SECRET_LABEL = b"voice-agent-bridge/stream-token/v1"
_TWILIO_REGION = re.compile(r"[a-z]{2}[0-9]")  # us1, ie1, au1, ... (fullmatch)
_TWILIO_EDGE = re.compile(r"[a-z][a-z0-9-]{1,30}")  # ashburn, dublin, sao-paulo, ... (fullmatch)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class PublicBase:
    """The public origin Twilio uses to reach us (never derived from a request's Host header)."""

    secure: bool
    host: str  # host[:port]
    prefix: str = ""  # optional path prefix behind a reverse proxy, no trailing slash

    def http_url(self, path: str) -> str:
        """The URL Twilio requests (and signs) for a webhook at ``path``."""
        return f"{'https' if self.secure else 'http'}://{self.host}{self.prefix}{path}"

    def ws_url(self, path: str) -> str:
        """The URL Twilio opens (and signs) for a Media Stream at ``path``."""
        return f"{'wss' if self.secure else 'ws'}://{self.host}{self.prefix}{path}"


@dataclass(frozen=True, slots=True)
class TwilioApi:
    """Where Twilio's REST API is: the default host, a region/edge (data residency), or a
    replacement base URL (a fake API in tests). At most one of ``base_url`` and region/edge."""

    region: str | None = None
    edge: str | None = None
    base_url: str | None = None  # no trailing slash

    @property
    def host(self) -> str:
        """The API's host name as Twilio's SDK builds it (``api.{edge}.{region}.twilio.com``)."""
        if self.base_url:
            return urlsplit(self.base_url).netloc
        region = self.region or ("us1" if self.edge else None)  # the SDK's rule
        return ".".join(p for p in ("api", self.edge, region, "twilio.com") if p)


@dataclass(frozen=True, slots=True)
class Persona:
    """What the agent says and sounds like on one kind of call."""

    system_prompt: str
    greeting: str
    voice: str


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the service. Built once by :func:`from_env`; never mutated."""

    assemblyai_api_key: str = field(repr=False)
    public: PublicBase
    port: int = 3000
    bind_host: str = "0.0.0.0"
    voice_agent_url: str = DEFAULT_VOICE_AGENT_URL
    inbound: Persona = Persona(DEFAULT_SYSTEM_PROMPT, DEFAULT_GREETING, DEFAULT_VOICE)
    outbound: Persona = Persona(DEFAULT_SYSTEM_PROMPT, DEFAULT_OUTBOUND_GREETING, DEFAULT_VOICE)
    outbound_greeting_delay_ms: int = 500
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = field(default=None, repr=False)
    twilio_phone_number: str | None = None
    target_phone_number: str | None = None
    stream_token_secret: bytes = field(default=b"", repr=False)
    stream_token_secret_source: str = "generated at start-up"
    stream_token_ttl_s: float = 60.0
    max_concurrent_calls: int = 100
    max_call_seconds: float = 3600.0
    session_ready_timeout_s: float = 10.0
    tool_timeout_s: float = 30.0
    end_call_deadline_s: float = 15.0
    max_twilio_frame_bytes: int = 64 * 1024
    max_agent_frame_bytes: int = 1024 * 1024
    tools_module: str | None = None
    session_hook: str | None = None
    end_call_tool: bool = True
    transfer_number: str | None = None
    transfer_allowlist: tuple[str, ...] = ()
    fallback_message: str = DEFAULT_FALLBACK_MESSAGE
    fallback_twiml_url: str | None = None
    fallback_number: str | None = None
    busy_message: str = DEFAULT_BUSY_MESSAGE
    resume_window_s: float = 25.0
    caller_audio_burst_ms: float = 2000.0
    twilio_silence_s: float = 10.0
    workers: int = 1
    drain_seconds: float = 30.0
    max_pending_connections: int = 256
    max_pending_per_ip: int = 16
    trusted_proxies: tuple[IpNetwork, ...] = ()
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    console_token: str | None = field(default=None, repr=False)
    console_session_secret: bytes | None = field(default=None, repr=False)
    records: bool = True
    records_url: str = DEFAULT_RECORDS_URL
    records_retention_days: int = 30
    record_redact: tuple[str, ...] = ()
    record_webhook_url: str | None = None
    record_webhook_secret: str | None = field(default=None, repr=False)
    record_audio: bool = False
    recordings_dir: str | None = None  # None: next to the SQLite file, or data/recordings
    twilio_api: TwilioApi = TwilioApi()
    # A fleet's shared state (bridge/fleet/redis_state.py): None keeps it in this process.
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    cluster_max_calls: int = 0  # 0: no cluster-wide cap (each instance's MAX_CONCURRENT_CALLS only)
    lease_s: float = 15.0
    amd: bool = True
    amd_wait_s: float = 4.0
    voicemail_message: str = DEFAULT_VOICEMAIL_MESSAGE
    keypad_tool: bool = True
    dtmf_to_agent: bool = False
    idle_reprompt_s: float = 8.0
    idle_hangup_s: float = 15.0
    recovery: bool = True
    recovery_s: float = 5.0
    recovery_context_chars: int = 4000
    warnings: tuple[str, ...] = ()

    @property
    def verify_signatures(self) -> bool:
        return bool(self.twilio_auth_token)

    def secrets(self) -> tuple[str, ...]:
        """Every secret value, for tests and log scrubbing."""
        values = [self.assemblyai_api_key, self.stream_token_secret.hex()]
        if self.twilio_auth_token:
            values.append(self.twilio_auth_token)
        if self.console_token:
            values.append(self.console_token)
        if self.console_session_secret:
            values.append(self.console_session_secret.decode())
        if self.record_webhook_secret:
            values.append(self.record_webhook_secret)
        password = urlsplit(self.redis_url).password if self.redis_url else None
        if password:
            values += [password, unquote(password)]
        return tuple(v for v in values if v)

    def describe(self) -> list[str]:
        """Human-readable configuration lines with every secret masked."""
        lines = [
            f"  public URL            {self.public.http_url('')} (streams: {self.public.ws_url('')})",
            f"  listening on          {self.bind_host}:{self.port}",
            f"  ASSEMBLYAI_API_KEY    {mask(self.assemblyai_api_key)}",
            f"  VOICE_AGENT_URL       {self.voice_agent_url}",
            f"  VOICE                 {self.inbound.voice} (outbound: {self.outbound.voice})",
            f"  TWILIO_ACCOUNT_SID    {self.twilio_account_sid or '(not set)'}",
            f"  TWILIO_AUTH_TOKEN     {mask(self.twilio_auth_token) if self.twilio_auth_token else '(not set)'}",
            f"  TWILIO_PHONE_NUMBER   {self.twilio_phone_number or '(not set)'}",
            f"  stream tokens         secret {self.stream_token_secret_source}, valid {self.stream_token_ttl_s:g} s",
            f"  limits                {self.max_concurrent_calls} calls, {self.max_call_seconds:g} s per call",
        ]
        if self.redis_url:
            cap = f"{self.cluster_max_calls} calls" if self.cluster_max_calls else "none"
            shared = f"{redact_url(self.redis_url)} (cluster cap {cap}, lease {self.lease_s:g} s)"
            lines.append(f"  REDIS_URL             {shared}")
        if self.tools_module:
            lines.append(f"  BRIDGE_TOOLS          {self.tools_module}")
        if self.session_hook:
            lines.append(f"  BRIDGE_SESSION_HOOK   {self.session_hook}")
        return lines


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``****``, for logs and ``describe``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:****@{host}").geturl()


def mask(secret: str) -> str:
    """A recognisable but useless form of a secret: ``abcd…yz (32 chars)``."""
    if len(secret) < 12:
        return f"**** ({len(secret)} chars)"
    return f"{secret[:4]}…{secret[-2:]} ({len(secret)} chars)"


def load_environment(environ: Mapping[str, str], dotenv_path: str | Path | None = ".env") -> dict[str, str]:
    """Merge an optional ``.env`` file under the real environment (the environment always wins)."""
    merged: dict[str, str] = {}
    if dotenv_path is not None and Path(dotenv_path).is_file():
        from dotenv import dotenv_values

        merged.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged.update(environ)
    return merged


def from_env(
    env: Mapping[str, str],
    *,
    generate_secret: Callable[[], bytes] = lambda: secrets.token_bytes(32),
) -> Settings:
    """Build :class:`Settings` from a mapping of variables. Raises :class:`ConfigError`."""
    r = EnvReader(env)
    warnings: list[str] = []

    api_key = r.required(
        "ASSEMBLYAI_API_KEY", "get one at https://www.assemblyai.com/dashboard and set ASSEMBLYAI_API_KEY=..."
    )
    public, public_warning = parse_public_base(r)
    if public_warning:
        warnings.append(public_warning)

    inbound, outbound = _personas(r)
    auth_token = r.optional("TWILIO_AUTH_TOKEN")
    token_secret, token_source = _stream_token_secret(r, auth_token, generate_secret)
    if not auth_token:
        warnings.append(
            "TWILIO_AUTH_TOKEN is not set: Twilio signatures are NOT verified and anyone who finds "
            "this server can open calls. Set TWILIO_AUTH_TOKEN before exposing it to the internet."
        )

    transfer_number, allowlist = _transfer(r)
    fallback_url = _fallback_twiml_url(r)
    log_level, log_format = _logging(r)
    tools_module, session_hook = _extensions(r)
    voice_agent_url = _voice_agent_url(r)
    console_token, session_secret = _console(r)
    records_url, record_redact, webhook_url, webhook_secret = _records(r, warnings)
    redis_url, cluster_max_calls, lease_s = _fleet(r)

    return Settings(
        assemblyai_api_key=api_key,
        public=public,
        port=r.integer("PORT", 3000, 1, 65535),
        bind_host=r.text("BIND_HOST", "0.0.0.0"),
        voice_agent_url=voice_agent_url,
        inbound=inbound,
        outbound=outbound,
        outbound_greeting_delay_ms=r.integer("OUTBOUND_GREETING_DELAY_MS", 500, 0, 10_000),
        twilio_account_sid=r.account_sid("TWILIO_ACCOUNT_SID"),
        twilio_auth_token=auth_token,
        twilio_phone_number=r.e164("TWILIO_PHONE_NUMBER"),
        target_phone_number=r.e164("TARGET_PHONE_NUMBER"),
        stream_token_secret=token_secret,
        stream_token_secret_source=token_source,
        stream_token_ttl_s=r.number("STREAM_TOKEN_TTL_S", 60.0, 1.0, 3600.0),
        max_concurrent_calls=r.integer("MAX_CONCURRENT_CALLS", 100, 1, 100_000),
        max_call_seconds=r.number("MAX_CALL_SECONDS", 3600.0, 1.0, 4 * 3600.0),
        session_ready_timeout_s=r.number("SESSION_READY_TIMEOUT_S", 10.0, 0.1, 120.0),
        tool_timeout_s=r.number("TOOL_TIMEOUT_S", 30.0, 0.1, 300.0),
        end_call_deadline_s=r.number("END_CALL_DEADLINE_S", 15.0, 0.1, 300.0),
        max_twilio_frame_bytes=r.integer("MAX_TWILIO_FRAME_BYTES", 64 * 1024, 1024, 16 * 1024 * 1024),
        max_agent_frame_bytes=r.integer("MAX_AGENT_FRAME_BYTES", 1024 * 1024, 4096, 64 * 1024 * 1024),
        tools_module=tools_module,
        session_hook=session_hook,
        end_call_tool=r.boolean("END_CALL_TOOL", True),
        transfer_number=transfer_number,
        transfer_allowlist=allowlist,
        fallback_message=r.text("FALLBACK_MESSAGE", DEFAULT_FALLBACK_MESSAGE),
        fallback_twiml_url=fallback_url,
        fallback_number=r.e164("FALLBACK_NUMBER"),
        busy_message=r.text("BUSY_MESSAGE", DEFAULT_BUSY_MESSAGE),
        resume_window_s=r.number("RESUME_WINDOW_S", 25.0, 0.0, 30.0),
        caller_audio_burst_ms=r.number("CALLER_AUDIO_BURST_MS", 2000.0, 100.0, 3_600_000.0),
        twilio_silence_s=r.number("TWILIO_SILENCE_S", 10.0, 0.5, 600.0),
        workers=r.integer("WORKERS", 1, 1, 64),
        drain_seconds=r.number("DRAIN_SECONDS", 30.0, 0.0, 24 * 3600.0),
        max_pending_connections=r.integer("MAX_PENDING_CONNECTIONS", 256, 1, 1_000_000),
        max_pending_per_ip=r.integer("MAX_PENDING_PER_IP", 16, 1, 1_000_000),
        trusted_proxies=parse_trusted_proxies(r),
        log_level=log_level,
        log_format="json" if log_format == "json" else "text",
        console_token=console_token,
        console_session_secret=session_secret.encode() if session_secret else None,
        records=r.boolean("RECORDS", True),
        records_url=records_url,
        records_retention_days=r.integer("RECORDS_RETENTION_DAYS", 30, 0, 36_500),
        record_redact=record_redact,
        record_webhook_url=webhook_url,
        record_webhook_secret=webhook_secret,
        record_audio=r.boolean("RECORD_AUDIO", False),
        recordings_dir=r.optional("RECORDINGS_DIR"),
        twilio_api=parse_twilio_api(r),
        redis_url=redis_url,
        cluster_max_calls=cluster_max_calls,
        lease_s=lease_s,
        amd=r.boolean("AMD", True),
        amd_wait_s=r.number("AMD_WAIT_S", 4.0, 0.0, 60.0),
        voicemail_message=r.text("VOICEMAIL_MESSAGE", DEFAULT_VOICEMAIL_MESSAGE),
        keypad_tool=r.boolean("KEYPAD_TOOL", True),
        dtmf_to_agent=r.boolean("DTMF_TO_AGENT", False),
        idle_reprompt_s=r.number("IDLE_REPROMPT_S", 8.0, 0.0, 3600.0),
        idle_hangup_s=r.number("IDLE_HANGUP_S", 15.0, 0.0, 3600.0),
        recovery=r.boolean("RECOVERY", True),
        recovery_s=r.number("RECOVERY_S", 5.0, 0.5, 60.0),
        recovery_context_chars=r.integer("RECOVERY_CONTEXT_CHARS", 4000, 0, 100_000),
        warnings=tuple(warnings),
    )


def _personas(r: EnvReader) -> tuple[Persona, Persona]:
    """The inbound and outbound personas (the outbound one defaults to the inbound's)."""
    voice = r.voice("VOICE", DEFAULT_VOICE)
    inbound = Persona(
        system_prompt=r.text("SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT),
        greeting=r.text("GREETING", DEFAULT_GREETING),
        voice=voice,
    )
    outbound = Persona(
        system_prompt=r.text("OUTBOUND_SYSTEM_PROMPT", inbound.system_prompt),
        greeting=r.text("OUTBOUND_GREETING", DEFAULT_OUTBOUND_GREETING),
        voice=r.voice("OUTBOUND_VOICE", voice),
    )
    return inbound, outbound


def _stream_token_secret(
    r: EnvReader, auth_token: str | None, generate_secret: Callable[[], bytes]
) -> tuple[bytes, str]:
    """The stream tokens' HMAC key and where it came from."""
    token_secret_text = r.optional("STREAM_TOKEN_SECRET")
    if token_secret_text:
        if len(token_secret_text) < 16:
            raise ConfigError(
                "STREAM_TOKEN_SECRET is too short: use at least 16 random characters "
                '(e.g. python -c "import secrets; print(secrets.token_hex(32))")'
            )
        token_secret = token_secret_text.encode()
        token_source = "from STREAM_TOKEN_SECRET"
    elif auth_token:
        token_secret = hmac.new(auth_token.encode(), _TOKEN_SECRET_LABEL, hashlib.sha256).digest()
        token_source = "derived from TWILIO_AUTH_TOKEN"
    else:
        token_secret = generate_secret()
        token_source = "generated at start-up (set STREAM_TOKEN_SECRET to share it between instances)"
    return token_secret, token_source


def _transfer(r: EnvReader) -> tuple[str | None, tuple[str, ...]]:
    """TRANSFER_NUMBER and TRANSFER_ALLOWLIST."""
    transfer_number = r.e164("TRANSFER_NUMBER")
    allowlist = tuple(
        check_e164("TRANSFER_ALLOWLIST", n.strip()) for n in r.text("TRANSFER_ALLOWLIST", "").split(",") if n.strip()
    )
    return transfer_number, allowlist


def _fallback_twiml_url(r: EnvReader) -> str | None:
    """FALLBACK_TWIML_URL, an absolute http(s) URL."""
    fallback_url = r.optional("FALLBACK_TWIML_URL")
    if fallback_url and not fallback_url.startswith(("https://", "http://")):
        raise ConfigError("FALLBACK_TWIML_URL must be an absolute http(s) URL, e.g. https://example.com/fallback.xml")
    return fallback_url


def _logging(r: EnvReader) -> tuple[str, str]:
    """LOG_LEVEL and LOG_FORMAT."""
    log_format = r.text("LOG_FORMAT", "text").lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT={log_format!r} is not valid: use LOG_FORMAT=text or LOG_FORMAT=json")
    log_level = r.text("LOG_LEVEL", "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL={log_level!r} is not valid: use DEBUG, INFO, WARNING or ERROR")
    return log_level, log_format


def _extensions(r: EnvReader) -> tuple[str | None, str | None]:
    """BRIDGE_TOOLS and BRIDGE_SESSION_HOOK."""
    tools_module = r.optional("BRIDGE_TOOLS")
    if tools_module and not all(_MODULE.match(m.strip()) for m in tools_module.split(",")):
        raise ConfigError(f"BRIDGE_TOOLS={tools_module!r} is not a module path: use e.g. BRIDGE_TOOLS=mypackage.tools")
    session_hook = r.optional("BRIDGE_SESSION_HOOK")
    if session_hook and not _HOOK.match(session_hook):
        raise ConfigError(
            f"BRIDGE_SESSION_HOOK={session_hook!r} is not module:function: use e.g. "
            "BRIDGE_SESSION_HOOK=mypackage.hooks:persona"
        )
    return tools_module, session_hook


def _voice_agent_url(r: EnvReader) -> str:
    """VOICE_AGENT_URL, a WebSocket URL."""
    voice_agent_url = r.text("VOICE_AGENT_URL", DEFAULT_VOICE_AGENT_URL)
    if not voice_agent_url.startswith(("wss://", "ws://")) or not _hostname(voice_agent_url):
        raise ConfigError(
            f"VOICE_AGENT_URL={voice_agent_url!r} is not a WebSocket URL: use e.g. "
            f"VOICE_AGENT_URL={DEFAULT_VOICE_AGENT_URL}"
        )
    return voice_agent_url


def _console(r: EnvReader) -> tuple[str | None, str | None]:
    """CONSOLE_TOKEN and CONSOLE_SESSION_SECRET."""
    console_token = r.optional("CONSOLE_TOKEN")
    if console_token is not None and len(console_token) < 16:
        raise ConfigError(
            "CONSOLE_TOKEN is too short: use at least 16 random characters "
            '(e.g. python -c "import secrets; print(secrets.token_urlsafe(24))")'
        )
    session_secret = r.optional("CONSOLE_SESSION_SECRET")
    if session_secret is not None and len(session_secret) < 16:
        raise ConfigError(
            "CONSOLE_SESSION_SECRET is too short: use at least 16 random characters "
            '(e.g. python -c "import secrets; print(secrets.token_hex(32))")'
        )
    return console_token, session_secret


def _records(r: EnvReader, warnings: list[str]) -> tuple[str, tuple[str, ...], str | None, str | None]:
    """RECORDS_URL, RECORD_REDACT, RECORD_WEBHOOK_URL and RECORD_WEBHOOK_SECRET."""
    records_url = r.text("RECORDS_URL", DEFAULT_RECORDS_URL)
    if not (records_url.startswith("sqlite:///") and len(records_url) > 10) and not records_url.startswith(
        ("postgresql://", "postgres://")
    ):
        raise ConfigError(
            f"RECORDS_URL={records_url!r} is not a database URL: use RECORDS_URL={DEFAULT_RECORDS_URL} "
            "or RECORDS_URL=postgresql://user:password@host/dbname"
        )
    record_redact = tuple(n.strip() for n in r.text("RECORD_REDACT", "").split(",") if n.strip())
    if any(not _PARAM_NAME.fullmatch(n) for n in record_redact):
        raise ConfigError(
            "RECORD_REDACT must be comma-separated custom parameter names: use e.g. RECORD_REDACT=From,To,AccountPin"
        )
    webhook_url = r.optional("RECORD_WEBHOOK_URL")
    if webhook_url and (not webhook_url.startswith(("https://", "http://")) or not _hostname(webhook_url)):
        raise ConfigError(
            f"RECORD_WEBHOOK_URL={webhook_url!r} is not an http(s) URL: use e.g. "
            "RECORD_WEBHOOK_URL=https://example.com/call-records"
        )
    webhook_secret = r.optional("RECORD_WEBHOOK_SECRET")
    if webhook_secret is not None and len(webhook_secret) < 16:
        raise ConfigError(
            "RECORD_WEBHOOK_SECRET is too short: use at least 16 random characters "
            '(e.g. python -c "import secrets; print(secrets.token_hex(32))")'
        )
    if webhook_url and not webhook_secret:
        warnings.append("RECORD_WEBHOOK_URL is set without RECORD_WEBHOOK_SECRET: the records it gets are not signed.")
    if r.boolean("RECORD_AUDIO", False) and not r.boolean("RECORDS", True):
        warnings.append("RECORD_AUDIO=on does nothing with RECORDS=off: no call is recorded (set RECORDS=on).")
    return records_url, record_redact, webhook_url, webhook_secret


_REDIS_EXAMPLE = "REDIS_URL=redis://:password@redis.internal:6379/0 (or rediss:// for TLS)"


def _fleet(r: EnvReader) -> tuple[str | None, int, float]:
    """REDIS_URL, CLUSTER_MAX_CALLS and LEASE_S. The URL's value is never echoed (a password)."""
    redis_url = r.optional("REDIS_URL")
    if redis_url is not None:
        parse_redis_url(redis_url)
    cluster_max_calls = r.integer("CLUSTER_MAX_CALLS", 0, 0, 1_000_000)
    if cluster_max_calls and redis_url is None:
        raise ConfigError(
            "CLUSTER_MAX_CALLS needs a shared state to count in: set REDIS_URL=redis://... "
            "or unset CLUSTER_MAX_CALLS (MAX_CONCURRENT_CALLS caps each instance)"
        )
    lease_s = r.number("LEASE_S", 15.0, 1.0, 300.0)
    return redis_url, cluster_max_calls, lease_s


def parse_redis_url(url: str) -> tuple[str, int]:
    """Check a ``redis://`` or ``rediss://`` URL (pure; ConfigError without the URL's text, which
    may hold a password). Returns its host and port."""
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError:
        raise ConfigError(f"REDIS_URL is not a valid URL: use e.g. {_REDIS_EXAMPLE}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"REDIS_URL must start with redis:// or rediss://: use e.g. {_REDIS_EXAMPLE}")
    if not parts.hostname:
        raise ConfigError(f"REDIS_URL has no host: use e.g. {_REDIS_EXAMPLE}")
    if parts.path not in ("", "/") and not re.fullmatch(r"/\d{1,2}", parts.path):
        raise ConfigError(f"REDIS_URL's path must be a database number (/0 to /99): use e.g. {_REDIS_EXAMPLE}")
    if parts.fragment or any(c in url for c in " \r\n\t"):
        raise ConfigError(f"REDIS_URL is not a plain Redis URL: use e.g. {_REDIS_EXAMPLE}")
    return parts.hostname, port


def parse_trusted_proxies(r: EnvReader | Mapping[str, str]) -> tuple[IpNetwork, ...]:
    """``TRUSTED_PROXIES``: comma-separated IP addresses or CIDR blocks (pure; ConfigError)."""
    r = r if isinstance(r, EnvReader) else EnvReader(r)
    networks: list[IpNetwork] = []
    for item in (part.strip() for part in r.text("TRUSTED_PROXIES", "").split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                f"TRUSTED_PROXIES entry {item!r} is not an IP address or CIDR block: "
                "use e.g. TRUSTED_PROXIES=127.0.0.1,10.0.0.0/8"
            ) from None
    return tuple(networks)


def parse_twilio_api(r: EnvReader | Mapping[str, str]) -> TwilioApi:
    """Read ``TWILIO_REGION``, ``TWILIO_EDGE`` and ``TWILIO_API_BASE`` (pure; ConfigError)."""
    r = r if isinstance(r, EnvReader) else EnvReader(r)
    region = r.optional("TWILIO_REGION")
    edge = r.optional("TWILIO_EDGE")
    base = r.optional("TWILIO_API_BASE")
    if region is not None and not _TWILIO_REGION.fullmatch(region):
        raise ConfigError(f"TWILIO_REGION={region!r} is not a Twilio region: use e.g. TWILIO_REGION=ie1 (or us1, au1)")
    if edge is not None and not _TWILIO_EDGE.fullmatch(edge):
        raise ConfigError(
            f"TWILIO_EDGE={edge!r} is not a Twilio edge: use e.g. TWILIO_EDGE=dublin (or sydney, ashburn)"
        )
    if region is not None and edge is None:
        # api.{region}.twilio.com host names were retired in 2026 (reference twilio.md 6b).
        raise ConfigError(
            f"TWILIO_REGION={region} needs TWILIO_EDGE too: set e.g. TWILIO_EDGE=dublin for ie1, sydney for au1"
        )
    if base is None:
        return TwilioApi(region=region, edge=edge)
    if region is not None or edge is not None:
        raise ConfigError(
            "TWILIO_API_BASE replaces the whole REST URL: unset TWILIO_REGION and TWILIO_EDGE, or TWILIO_API_BASE"
        )
    try:
        parts = urlsplit(base)
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path.strip("/")
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
    ):
        raise ConfigError(
            f"TWILIO_API_BASE={base!r} is not a base URL: use e.g. TWILIO_API_BASE=http://127.0.0.1:8123"
        )
    return TwilioApi(base_url=base.rstrip("/"))


def parse_public_base(r: EnvReader | Mapping[str, str]) -> tuple[PublicBase, str | None]:
    """Read ``PUBLIC_HOSTNAME`` (preferred) or ``HOSTNAME`` into a :class:`PublicBase`.

    Returns the base and a warning when the value looks like a machine's own name (shells and
    containers set ``HOSTNAME`` to it), which would make Twilio dial ``wss://<container-id>/``.
    """
    reader = r if isinstance(r, EnvReader) else EnvReader(r)
    name = "PUBLIC_HOSTNAME" if reader.optional("PUBLIC_HOSTNAME") else "HOSTNAME"
    raw = reader.required(
        name, "set HOSTNAME (or PUBLIC_HOSTNAME) to your public URL, e.g. HOSTNAME=https://abc.ngrok.app"
    )
    text = raw.strip()
    has_scheme = "://" in text
    try:
        parts = urlsplit(text if has_scheme else f"https://{text}")
        parts.hostname  # noqa: B018 - validates a bracketed IPv6 host
    except ValueError:  # e.g. an unclosed "[" or a bracketed non-IPv6 host
        raise ConfigError(f"{name}={raw!r} is not a valid URL: use e.g. {name}=https://abc.ngrok.app") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "ws", "wss"):
        raise ConfigError(f"{name}={raw!r} has scheme {scheme!r}: use https://your-host (or http:// for local tests)")
    if not parts.hostname or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"{name}={raw!r} is not a plain public URL: use e.g. {name}=https://abc.ngrok.app")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(f"{name}={raw!r} has an invalid port: use e.g. {name}=https://example.com:8443") from None
    prefix = parts.path.rstrip("/")
    base = PublicBase(secure=scheme in ("https", "wss"), host=parts.netloc.lower(), prefix=prefix)
    warning = None
    host = parts.hostname
    if not has_scheme and "." not in host and host != "localhost" and ":" not in host:
        warning = (
            f"{name}={raw!r} looks like this machine's own name, not a public URL: Twilio would be "
            f"told to open {base.ws_url('/media-stream/…')}. Set PUBLIC_HOSTNAME=https://your-public-host."
        )
    return base, warning


class EnvReader:
    """Typed access to variables; empty strings count as unset (as in a copied .env.example)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def optional(self, name: str) -> str | None:
        value = self._env.get(name)
        if value is None or not value.strip():
            return None
        return value.strip()

    def required(self, name: str, fix: str) -> str:
        value = self.optional(name)
        if value is None:
            raise ConfigError(f"{name} is not set: {fix}")
        return value

    def text(self, name: str, default: str) -> str:
        value = self._env.get(name)
        return default if value is None or not value.strip() else value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.optional(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a whole number: use e.g. {name}={default}") from None
        if not low <= number <= high:
            raise ConfigError(f"{name}={number} is out of range: use a value from {low} to {high}")
        return number

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.optional(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a number: use e.g. {name}={default:g}") from None
        if not low <= number <= high:
            raise ConfigError(f"{name}={number:g} is out of range: use a value from {low:g} to {high:g}")
        return number

    def boolean(self, name: str, default: bool) -> bool:
        value = self.optional(name)
        if value is None:
            return default
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ConfigError(f"{name}={value!r} is not a boolean: use {name}=true or {name}=false")

    def voice(self, name: str, default: str) -> str:
        value = self.optional(name)
        if value is None:
            return default
        if not _VOICE.match(value):
            # Suggest only a valid id: the raw value may hold a newline (the error must stay one line).
            suggest = value != value.lower() and _VOICE.fullmatch(value.lower())
            hint = f" (voice names are case-sensitive: try {name}={value.lower()})" if suggest else ""
            raise ConfigError(f"{name}={value!r} is not a voice id: use a lower-case name such as {name}=ivy{hint}")
        return value

    def e164(self, name: str) -> str | None:
        value = self.optional(name)
        return None if value is None else check_e164(name, value)

    def account_sid(self, name: str) -> str | None:
        value = self.optional(name)
        if value is not None and not _ACCOUNT_SID.match(value):
            raise ConfigError(
                f"{name}={value!r} is not an Account SID: copy it from the Twilio console (AC + 32 hex digits)"
            )
        return value


def _hostname(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:  # urlsplit raises on an unclosed "[" or a bracketed non-IPv6 host
        return None


def check_e164(name: str, value: str) -> str:
    """Return ``value`` if it is an E.164 number, else raise a one-line ConfigError naming ``name``."""
    if not _E164.fullmatch(value):
        raise ConfigError(f"{name}={value!r} is not an E.164 phone number: use e.g. {name}=+14155550100")
    return value
