"""The call records' settings: defaults, parsing, and one-line errors naming the setting."""

from __future__ import annotations

import pytest

from bridge.config import DEFAULT_RECORDS_URL, ConfigError, from_env

BASE = {"ASSEMBLYAI_API_KEY": "k" * 32, "HOSTNAME": "https://bridge.example.com"}


def settings(**env: str):  # type: ignore[no-untyped-def]
    return from_env({**BASE, **env}, generate_secret=lambda: b"s" * 32)


def test_defaults() -> None:
    s = settings()
    assert s.records is True and s.records_url == DEFAULT_RECORDS_URL == "sqlite:///data/calls.sqlite3"
    assert s.records_retention_days == 30 and s.record_redact == () and s.record_audio is False
    assert s.record_webhook_url is None and s.record_webhook_secret is None


def test_values_are_read() -> None:
    s = settings(
        RECORDS="off",
        RECORDS_URL="postgresql://u:p@db/records",
        RECORDS_RETENTION_DAYS="7",
        RECORD_REDACT=" From, AccountPin ,",
        RECORD_WEBHOOK_URL="https://hooks.example.com/records",
        RECORD_WEBHOOK_SECRET="x" * 20,
        RECORD_AUDIO="on",
    )
    assert (s.records, s.records_url, s.records_retention_days) == (False, "postgresql://u:p@db/records", 7)
    assert s.record_redact == ("From", "AccountPin") and s.record_audio is True
    assert s.record_webhook_url == "https://hooks.example.com/records"
    assert "x" * 20 in s.secrets() and "x" * 20 not in repr(s)


def test_a_webhook_without_secret_warns() -> None:
    assert any("RECORD_WEBHOOK_SECRET" in w for w in settings(RECORD_WEBHOOK_URL="https://h.example/r").warnings)


def test_record_audio_with_records_off_warns_and_recordings_dir_is_read() -> None:
    assert any("RECORD_AUDIO=on does nothing" in w for w in settings(RECORD_AUDIO="on", RECORDS="off").warnings)
    assert not any("RECORD_AUDIO" in w for w in settings(RECORD_AUDIO="on").warnings)
    assert settings().recordings_dir is None
    assert settings(RECORDINGS_DIR=" /srv/calls ").recordings_dir == "/srv/calls"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RECORDS", "maybe"),
        ("RECORDS_URL", "mysql://db/x"),
        ("RECORDS_URL", "sqlite:///"),
        ("RECORDS_RETENTION_DAYS", "-1"),
        ("RECORDS_RETENTION_DAYS", "a week"),
        ("RECORD_REDACT", "From,<script>"),
        ("RECORD_WEBHOOK_URL", "ftp://h/x"),
        ("RECORD_WEBHOOK_URL", "https://"),
        ("RECORD_WEBHOOK_SECRET", "short"),
        ("RECORD_AUDIO", "stereo"),
    ],
)
def test_malformed_values_name_the_setting(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(**{name: value})
    message = str(info.value)
    assert name in message and "\n" not in message
