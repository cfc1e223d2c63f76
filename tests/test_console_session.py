"""Console sessions (pure): signed cookies, expiry, forgery, CSRF tokens; the console settings."""

from __future__ import annotations

import pytest

from bridge.config import from_env
from bridge.console.session import SESSION_S, SessionSigner
from bridge.errors import ConfigError

TOKEN = "console-token-0123456789"
SECRET = b"session-secret-0123456789abcdef"


def signer(secret: bytes = SECRET, token: str = TOKEN) -> SessionSigner:
    return SessionSigner(secret, token)


def test_a_session_is_valid_until_it_expires() -> None:
    s = signer()
    value = s.issue(1000.0)
    session = s.check(value, 1000.0 + SESSION_S - 1)
    assert session is not None and session.expires_s == 1000 + SESSION_S
    assert s.check(value, 1000.0 + SESSION_S) is None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda v: v[:-1] + ("0" if v[-1] != "0" else "1"),  # MAC changed
        lambda v: v.replace("v1.", "v2.", 1),
        lambda v: ".".join([v.split(".")[0], str(int(v.split(".")[1]) + 10**6), *v.split(".")[2:]]),  # expiry pushed
        lambda v: v + ".x",
        lambda v: "",
        lambda v: "v1." + "9" * 300,
        lambda v: v.split(".", 1)[1],
    ],
)
def test_a_forged_or_malformed_cookie_is_refused(mutate: object) -> None:
    s = signer()
    value = s.issue(0.0)
    assert callable(mutate)
    assert s.check(mutate(value), 1.0) is None


def test_another_secret_or_another_token_invalidates_sessions() -> None:
    value = signer().issue(0.0)
    assert signer().check(value, 1.0) is not None
    assert signer(secret=b"another-secret-0123456789abcdef").check(value, 1.0) is None  # a restart
    assert signer(token="another-console-token-0123").check(value, 1.0) is None


def test_token_matches_only_the_token() -> None:
    s = signer()
    assert s.token_matches(TOKEN)
    assert not s.token_matches(TOKEN + " ")
    assert not s.token_matches("")
    assert not s.token_matches(TOKEN[:-1])
    assert not s.token_matches("\udcff")  # a lone surrogate from a broken form does not crash


def test_csrf_token_belongs_to_its_session() -> None:
    s = signer()
    a = s.check(s.issue(0.0), 1.0)
    b = s.check(s.issue(0.0), 1.0)
    assert a is not None and b is not None and a.nonce != b.nonce
    assert s.csrf_matches(a, s.csrf_token(a))
    assert not s.csrf_matches(a, s.csrf_token(b))
    assert not s.csrf_matches(a, None) and not s.csrf_matches(a, "")


BASE = {"ASSEMBLYAI_API_KEY": "k" * 20, "HOSTNAME": "https://bridge.example.com"}


def test_console_settings_default_off_and_are_secrets() -> None:
    assert from_env(BASE).console_token is None
    settings = from_env({**BASE, "CONSOLE_TOKEN": TOKEN, "CONSOLE_SESSION_SECRET": SECRET.decode()})
    assert settings.console_token == TOKEN and settings.console_session_secret == SECRET
    assert TOKEN in settings.secrets() and SECRET.decode() in settings.secrets()
    assert TOKEN not in repr(settings)


@pytest.mark.parametrize("name", ["CONSOLE_TOKEN", "CONSOLE_SESSION_SECRET"])
def test_short_console_secrets_are_refused_with_one_line_naming_the_setting(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_env({**BASE, name: "short"})
    message = str(info.value)
    assert message.startswith(name) and "\n" not in message and "16" in message
