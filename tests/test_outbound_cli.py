"""``python -m bridge call`` (bridge.phone.outbound.main) against the fake Twilio REST API.

``main`` runs its own ``trio.run``, so the async tests (which serve the fake) call it in a
thread; the tests that fail before any request are plain functions.
"""

from __future__ import annotations

import functools
import re
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import trio

from bridge.phone.outbound import main
from bridge.phone.rest import TrioHttpClient
from tools.fake_twilio_rest import DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN, FakeTwilioRest

TOKEN = DEFAULT_AUTH_TOKEN
ENV = {
    "TWILIO_ACCOUNT_SID": DEFAULT_ACCOUNT_SID,
    "TWILIO_AUTH_TOKEN": TOKEN,
    "TWILIO_PHONE_NUMBER": "+14155550100",
    "TARGET_PHONE_NUMBER": "+14155550123",
    "HOSTNAME": "https://bridge.example.com",
}
EVENTS = ["initiated", "ringing", "answered", "completed"]


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeTwilioRest:
    fake = FakeTwilioRest()
    await nursery.start(fake.serve)
    return fake


async def run_main(
    fake: FakeTwilioRest | str, argv: Sequence[str] = (), env: Mapping[str, str] | None = ENV
) -> int:
    api_base = fake if isinstance(fake, str) else fake.base_url
    call = functools.partial(main, list(argv), env, http_client=TrioHttpClient(api_base=api_base))
    with trio.fail_after(20):
        return await trio.to_thread.run_sync(call)


def unreachable() -> TrioHttpClient:
    """For failures that must happen before any request: a request would fail loudly."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return TrioHttpClient(api_base=f"http://127.0.0.1:{port}")


def one_line(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    return text.rstrip("\n")


def outputs(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    out, err = capsys.readouterr()
    assert TOKEN not in out and TOKEN not in err
    return out, err


# -- success ----------------------------------------------------------------------------------


async def test_call_uses_the_configured_numbers_and_prints_the_sid(
    fake: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_main(fake) == 0

    out, err = outputs(capsys)
    [sid] = fake.calls
    assert one_line(out) == f"Calling +14155550123 from +14155550100: {sid}"
    assert err == ""
    [request] = fake.requests
    assert request.auth_ok
    assert request.get("To") == "+14155550123"
    assert request.get("From") == "+14155550100"
    assert request.get("Url") == "https://bridge.example.com/outbound-twiml"
    assert request.get("StatusCallback") == "https://bridge.example.com/call-status"
    assert request.get_all("StatusCallbackEvent") == EVENTS
    assert request.get("StatusCallbackMethod") == "POST"


async def test_flags_override_the_environment(
    fake: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--to", "+442071838750", "--from", "+14155550199"]
    assert await run_main(fake, argv) == 0

    [call] = fake.calls.values()
    assert (call.to, call.from_) == ("+442071838750", "+14155550199")
    out, _ = outputs(capsys)
    assert one_line(out) == f"Calling +442071838750 from +14155550199: {call.sid}"


async def test_numbers_may_come_only_from_flags_and_the_key_is_not_needed(
    fake: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {k: v for k, v in ENV.items() if "PHONE_NUMBER" not in k}
    assert "ASSEMBLYAI_API_KEY" not in env
    assert await run_main(fake, ["--to", "+14155550123", "--from", "+14155550100"], env) == 0
    assert len(fake.calls) == 1
    outputs(capsys)


async def test_public_hostname_with_a_path_prefix(
    fake: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**ENV, "PUBLIC_HOSTNAME": "https://proxy.example.com/voice/", "HOSTNAME": "buildbox"}
    assert await run_main(fake, env=env) == 0

    [call] = fake.calls.values()
    assert call.url == "https://proxy.example.com/voice/outbound-twiml"
    assert call.status_callback == "https://proxy.example.com/voice/call-status"
    outputs(capsys)


async def test_environ_defaults_to_os_environ_over_dotenv(
    fake: FakeTwilioRest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    dotenv = "".join(f"{k}={v}\n" for k, v in ENV.items() if k != "TARGET_PHONE_NUMBER")
    (tmp_path / ".env").write_text(dotenv + "TARGET_PHONE_NUMBER=+15005550006\n")
    monkeypatch.chdir(tmp_path)
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PUBLIC_HOSTNAME", raising=False)
    monkeypatch.setenv("TARGET_PHONE_NUMBER", "+14155550777")  # the environment wins

    assert await run_main(fake, env=None) == 0

    [call] = fake.calls.values()
    assert call.to == "+14155550777"
    outputs(capsys)


# -- failures before any request --------------------------------------------------------------


@pytest.mark.parametrize(
    ("missing", "argv"),
    [
        ("TWILIO_ACCOUNT_SID", []),
        ("TWILIO_AUTH_TOKEN", []),
        ("HOSTNAME", []),
        ("TARGET_PHONE_NUMBER", []),
        ("TWILIO_PHONE_NUMBER", []),
    ],
)
def test_missing_variable_is_named_on_one_line(
    missing: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    env = {k: v for k, v in ENV.items() if k != missing}

    assert main(argv, env, http_client=unreachable()) == 1

    out, err = outputs(capsys)
    line = one_line(err)
    assert line.startswith(f"{missing} is not set: ")
    assert out == ""


def test_missing_target_says_how_to_fix(capsys: pytest.CaptureFixture[str]) -> None:
    env = {k: v for k, v in ENV.items() if k != "TARGET_PHONE_NUMBER"}
    assert main([], env, http_client=unreachable()) == 1
    _, err = outputs(capsys)
    assert one_line(err) == (
        "TARGET_PHONE_NUMBER is not set: pass --to +14155550123 "
        "or set TARGET_PHONE_NUMBER=+14155550123"
    )


@pytest.mark.parametrize(
    ("argv", "env_update", "named", "status"),
    [
        (["--to", "4155550123"], {}, "--to", 2),
        (["--from", "+1 415 555 0100"], {}, "--from", 2),
        ([], {"TARGET_PHONE_NUMBER": "(415) 555-0123"}, "TARGET_PHONE_NUMBER", 1),
        ([], {"TWILIO_PHONE_NUMBER": "14155550100"}, "TWILIO_PHONE_NUMBER", 1),
    ],
)
def test_number_not_in_e164_is_named(
    argv: list[str],
    env_update: dict[str, str],
    named: str,
    status: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(argv, {**ENV, **env_update}, http_client=unreachable()) == status
    _, err = outputs(capsys)
    line = one_line(err)
    assert line.startswith(f"{named}=")
    assert "is not an E.164 phone number" in line


def test_malformed_account_sid_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    env = {**ENV, "TWILIO_ACCOUNT_SID": "SK0123"}
    assert main([], env, http_client=unreachable()) == 1
    _, err = outputs(capsys)
    assert one_line(err).startswith("TWILIO_ACCOUNT_SID='SK0123' is not an Account SID")


def test_machine_hostname_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # Docker and some shells export HOSTNAME=<container id>: Twilio could never fetch the TwiML.
    env = {**ENV, "HOSTNAME": "3f2a9c1b7d4e"}
    assert main([], env, http_client=unreachable()) == 1
    _, err = outputs(capsys)
    line = one_line(err)
    assert "HOSTNAME='3f2a9c1b7d4e'" in line and "PUBLIC_HOSTNAME" in line


def test_unknown_flag_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--too", "+14155550123"], ENV, http_client=unreachable()) == 2
    out, err = outputs(capsys)
    line = one_line(err)
    assert line.startswith("python -m bridge call: unrecognized arguments: --too")
    assert out == ""


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"], ENV, http_client=unreachable()) == 0
    out, _ = outputs(capsys)
    assert "--to NUMBER" in out and "--from NUMBER" in out


# -- failures reported by Twilio or the network -----------------------------------------------


async def test_twilio_error_code_and_message_are_printed(
    fake: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fail_next_create_with = (
        400,
        21211,
        "The 'To' number +15005550001 is not a valid phone number.",
    )
    assert await run_main(fake, ["--to", "+15005550001"]) == 1

    out, err = outputs(capsys)
    assert out == ""
    assert one_line(err) == (
        "Twilio error 21211: The 'To' number +15005550001 is not a valid phone number."
    )


async def test_auth_failure_hints_at_the_credentials_without_printing_them(
    fake: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    assert await run_main(fake, env={**ENV, "TWILIO_AUTH_TOKEN": wrong}) == 1

    out, err = outputs(capsys)
    line = one_line(err)
    assert line.startswith("Twilio error 20003: Authenticate (check TWILIO_ACCOUNT_SID and ")
    assert "TWILIO_AUTH_TOKEN" in line
    assert wrong not in out + err
    assert not fake.requests[0].auth_ok


async def test_server_error_without_details(
    fake: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fail_next_create_with = (503, None, "Service Unavailable")
    assert await run_main(fake) == 1
    _, err = outputs(capsys)
    assert one_line(err) == (
        "Twilio answered HTTP 503: Unable to create record (no error details in Twilio's answer)"
    )


async def test_unreachable_api(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert await run_main(f"http://127.0.0.1:{port}") == 1
    out, err = outputs(capsys)
    assert out == ""
    assert re.fullmatch(
        rf"Could not reach Twilio: cannot connect to the Twilio API at "
        rf"http://127\.0\.0\.1:{port} \(.+\)",
        one_line(err),
    )


# -- what the command imports -----------------------------------------------------------------


def test_call_command_does_not_import_the_server() -> None:
    code = (
        "import sys, bridge.phone.outbound; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('quart', 'quart_trio', 'hypercorn') "
        "or m == 'bridge.web' or m == 'bridge.server']; print(bad)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.stdout.strip() == "[]"


# -- answering-machine detection and the REST endpoint (issue 15) ----------------------------


async def test_the_call_asks_for_async_amd_by_default(
    fake: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_main(fake) == 0
    [request] = fake.requests
    assert request.get("MachineDetection") == "DetectMessageEnd"
    assert request.get("AsyncAmd") == "true"
    assert request.get("AsyncAmdStatusCallback") == "https://bridge.example.com/amd-status"
    assert request.get("AsyncAmdStatusCallbackMethod") == "POST"
    outputs(capsys)


@pytest.mark.parametrize(("argv", "env"), [([], {"AMD": "off"}), (["--no-amd"], {}), (["--no-amd"], {"AMD": "on"})])
async def test_amd_off_or_no_amd_places_the_call_without_detection(
    fake: FakeTwilioRest, capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str]
) -> None:
    assert await run_main(fake, argv, {**ENV, **env}) == 0
    [request] = fake.requests
    for name in ("MachineDetection", "AsyncAmd", "AsyncAmdStatusCallback"):
        assert request.get(name) is None
    outputs(capsys)


async def test_twilio_api_base_reaches_the_fake_without_an_injected_client(
    fake: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fake.base_url is not None
    env = {**ENV, "TWILIO_API_BASE": fake.base_url}
    with trio.fail_after(20):
        status = await trio.to_thread.run_sync(functools.partial(main, [], env))
    assert status == 0 and len(fake.calls) == 1
    outputs(capsys)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"TWILIO_REGION": "Ireland"}, "TWILIO_REGION='Ireland' is not a Twilio region"),
        ({"TWILIO_REGION": "ie1"}, "TWILIO_REGION=ie1 needs TWILIO_EDGE too"),
        ({"TWILIO_API_BASE": "not a url"}, "TWILIO_API_BASE='not a url' is not a base URL"),
        ({"AMD": "sometimes"}, "AMD='sometimes' is not a boolean"),
    ],
)
def test_bad_endpoint_or_amd_settings_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], says: str
) -> None:
    assert main([], {**ENV, **env}, http_client=unreachable()) == 1
    _, err = outputs(capsys)
    assert says in one_line(err)
