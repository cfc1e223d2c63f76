"""The call records API through the app's Quart: auth (404 without CONSOLE_TOKEN, 401 on a wrong
one), list and get, a live call's record so far, hostile input never a 500."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.agent import events as ag
from bridge.config import from_env
from bridge.phone import media as tw
from bridge.records import backends as bk
from bridge.records.recorder import Records
from bridge.records.store import RecordStore
from bridge.web import Collaborators, create_app
from bridge.web.api import bearer_matches
from tests.test_store import make_record, sid

TOKEN = "console-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE_ENV = {"ASSEMBLYAI_API_KEY": "k" * 32, "HOSTNAME": "https://bridge.example.com"}


async def _no_agent(nursery: Any) -> Any:
    raise AssertionError("no calls in these tests")


def make_app(tmp_path: Path, **env: str) -> Any:
    settings = from_env({**BASE_ENV, **env})
    app = create_app(settings, Collaborators(connect_agent=_no_agent))
    backend = bk.SqliteBackend(str(tmp_path / "calls.sqlite3"))
    backend.migrate()
    for n in range(1, 5):
        backend.write(make_record(n, outcome="agent_ended" if n % 2 else "caller_hung_up", text=f"hello {n}"))
    app.record_store = RecordStore(backend)  # type: ignore[attr-defined]
    app.records = Records(clock=lambda: 10.0, sinks=(app.record_store,))  # type: ignore[attr-defined]
    return app


async def test_without_console_token_everything_under_api_is_404(tmp_path: Path) -> None:
    client = make_app(tmp_path).quart.test_client()
    for path in ("/api/calls", f"/api/calls/{sid(1)}", "/api/calls/not-a-sid", "/api/nothing"):
        response = await client.get(path, headers=AUTH)
        assert response.status_code == 404, path
        assert "hello" not in (await response.get_data(as_text=True))


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN},
     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer "}],
)
async def test_a_wrong_or_missing_token_is_401(tmp_path: Path, headers: dict[str, str]) -> None:
    client = make_app(tmp_path, CONSOLE_TOKEN=TOKEN).quart.test_client()
    for path in ("/api/calls", f"/api/calls/{sid(1)}"):
        response = await client.get(path, headers=headers)
        assert response.status_code == 401
        assert "hello" not in (await response.get_data(as_text=True))


def test_bearer_matches() -> None:
    assert bearer_matches(f"Bearer {TOKEN}", TOKEN) and bearer_matches(f"bearer  {TOKEN} ", TOKEN)
    assert not bearer_matches(None, TOKEN) and not bearer_matches(f"Bearer {TOKEN[:-1]}", TOKEN)
    assert not bearer_matches("Bearer é", TOKEN)  # non-ASCII: compared as bytes, no TypeError


async def test_list_and_get(tmp_path: Path) -> None:
    client = make_app(tmp_path, CONSOLE_TOKEN=TOKEN).quart.test_client()
    page = await (await client.get("/api/calls?limit=2", headers=AUTH)).get_json()
    assert [c["call_sid"] for c in page["calls"]] == [sid(4), sid(3)]
    assert page["next_before"]
    page2 = await (await client.get(f"/api/calls?limit=2&before={page['next_before']}", headers=AUTH)).get_json()
    assert [c["call_sid"] for c in page2["calls"]] == [sid(2), sid(1)] and page2["next_before"] is None
    hung_up = await (await client.get("/api/calls?outcome=caller_hung_up", headers=AUTH)).get_json()
    assert [c["call_sid"] for c in hung_up["calls"]] == [sid(4), sid(2)]
    found = await (await client.get("/api/calls?q=HELLO%203", headers=AUTH)).get_json()
    assert [c["call_sid"] for c in found["calls"]] == [sid(3)]
    ranged = await client.get("/api/calls?since=2027-01-15T08:00:02Z&until=2027-01-15T08:00:04", headers=AUTH)
    assert [c["call_sid"] for c in (await ranged.get_json())["calls"]] == [sid(3), sid(2)]
    response = await client.get(f"/api/calls/{sid(2)}", headers=AUTH)
    assert response.status_code == 200 and response.content_type == "application/json"
    record = await response.get_json()
    assert record["live"] is False and record["turns"][0]["text"] == "hello 2" and record["outcome"] == "caller_hung_up"
    missing = await client.get(f"/api/calls/CA{'f' * 32}", headers=AUTH)
    assert missing.status_code == 404


async def test_a_live_call_shows_live_true_in_get_and_first_in_the_list(tmp_path: Path) -> None:
    app = make_app(tmp_path, CONSOLE_TOKEN=TOKEN)
    recorder = app.records.new_call("c-live", "inbound")
    live_sid = "CA" + "e" * 32
    recorder.phone(tw.Start("MZ", live_sid, "AC", ("inbound",), {}, "audio/x-mulaw", 8000, 1, 1), 10.0)
    recorder.agent(ag.TranscriptUser("u", "still talking"), 10.0)
    client = app.quart.test_client()
    record = await (await client.get(f"/api/calls/{live_sid}", headers=AUTH)).get_json()
    assert record["live"] is True and record["turns"][0]["text"] == "still talking" and record["ended_at"] is None
    listing = await (await client.get("/api/calls", headers=AUTH)).get_json()
    assert listing["calls"][0]["call_sid"] == live_sid and listing["calls"][0]["live"] is True
    assert len(listing["calls"]) == 5
    filtered = await (await client.get("/api/calls?outcome=agent_ended", headers=AUTH)).get_json()
    assert live_sid not in [c["call_sid"] for c in filtered["calls"]]
    searched = await (await client.get("/api/calls?q=still", headers=AUTH)).get_json()
    assert [c["call_sid"] for c in searched["calls"]] == [live_sid]


@pytest.mark.parametrize(
    "path",
    [
        "/api/calls/not-a-callsid",
        "/api/calls/CA123",
        "/api/calls/CA" + "g" * 32,
        "/api/calls/%27%3B%20DROP%20TABLE%20call_records%3B--",
        "/api/calls/CA" + "a" * 32 + "%0A",
        "/api/calls/" + "A" * 5000,
        "/api/calls?limit=0",
        "/api/calls?limit=99999",
        "/api/calls?limit=ten",
        "/api/calls?before=garbage",
        "/api/calls?before=nan_1",
        "/api/calls?outcome=%27%20OR%201%3D1",
        "/api/calls?since=yesterday",
        "/api/calls?until=2026-13-45",
        "/api/calls?q=" + "x" * 500,
    ],
)
async def test_hostile_input_is_a_4xx_never_a_500(tmp_path: Path, path: str) -> None:
    client = make_app(tmp_path, CONSOLE_TOKEN=TOKEN).quart.test_client()
    response = await client.get(path, headers=AUTH)
    assert response.status_code in (400, 404), (path, response.status_code)
    body = await response.get_json()
    assert isinstance(body["error"], str)


async def test_hostile_search_text_is_a_parameter_not_sql(tmp_path: Path) -> None:
    client = make_app(tmp_path, CONSOLE_TOKEN=TOKEN).quart.test_client()
    for q in ["%", "_", "' OR '1'='1", "\\", "%25"]:
        response = await client.get("/api/calls", query_string={"q": q}, headers=AUTH)
        assert response.status_code == 200
        assert (await response.get_json())["calls"] == []


async def test_a_database_outage_is_a_503(tmp_path: Path) -> None:
    app = make_app(tmp_path, CONSOLE_TOKEN=TOKEN)
    (tmp_path / "gone").mkdir()
    app.record_store = RecordStore(bk.SqliteBackend(str(tmp_path / "gone")))
    client = app.quart.test_client()
    assert (await client.get("/api/calls", headers=AUTH)).status_code == 503
    assert (await client.get(f"/api/calls/{sid(1)}", headers=AUTH)).status_code == 503


async def test_records_off_is_a_503(tmp_path: Path) -> None:
    client = make_app(tmp_path, CONSOLE_TOKEN=TOKEN, RECORDS="off").quart.test_client()
    assert (await client.get("/api/calls", headers=AUTH)).status_code == 503


async def test_a_finished_call_the_store_still_holds_is_readable_and_listed_once(tmp_path: Path) -> None:
    # The store's writer is not running (make_app): a finished record stays in its queue, as in
    # the moments between a call's end and its row being written, or while the database is down.
    app = make_app(tmp_path, CONSOLE_TOKEN=TOKEN)
    recorder = app.records.new_call("c-ended", "inbound")
    ended_sid = "CA" + "d" * 32
    recorder.phone(tw.Start("MZ", ended_sid, "AC", ("inbound",), {}, "audio/x-mulaw", 8000, 1, 1), 10.0)
    recorder.agent(ag.TranscriptUser("u", "goodbye then"), 10.5)
    recorder.finish(11.0)
    assert app.records.live(ended_sid) is None and app.record_store.pending == 1
    client = app.quart.test_client()
    response = await client.get(f"/api/calls/{ended_sid}", headers=AUTH)
    assert response.status_code == 200
    record = await response.get_json()
    assert record["live"] is False and record["turns"][0]["text"] == "goodbye then" and record["ended_at"]
    listing = await (await client.get("/api/calls", headers=AUTH)).get_json()
    assert [c["call_sid"] for c in listing["calls"]].count(ended_sid) == 1
    assert next(c for c in listing["calls"] if c["call_sid"] == ended_sid)["live"] is False
    searched = await (await client.get("/api/calls?q=GOODBYE", headers=AUTH)).get_json()
    assert [c["call_sid"] for c in searched["calls"]] == [ended_sid]
    # Its row written while it is still held (the writer commits, then takes it off the queue):
    # still listed once.
    app.record_store.backend.write(record)
    listing = await (await client.get("/api/calls", headers=AUTH)).get_json()
    assert [c["call_sid"] for c in listing["calls"]].count(ended_sid) == 1


async def test_while_the_database_is_down_a_held_call_is_still_readable(tmp_path: Path) -> None:
    app = make_app(tmp_path, CONSOLE_TOKEN=TOKEN)
    (tmp_path / "gone").mkdir()
    app.record_store = RecordStore(bk.SqliteBackend(str(tmp_path / "gone")))  # every statement fails
    app.records.sinks = (app.record_store,)
    recorder = app.records.new_call("c-held", "inbound")
    held_sid = "CA" + "c" * 32
    recorder.phone(tw.Start("MZ", held_sid, "AC", ("inbound",), {}, "audio/x-mulaw", 8000, 1, 1), 10.0)
    recorder.finish(11.0)
    client = app.quart.test_client()
    response = await client.get(f"/api/calls/{held_sid}", headers=AUTH)
    assert response.status_code == 200 and (await response.get_json())["live"] is False
    assert (await client.get(f"/api/calls/{sid(1)}", headers=AUTH)).status_code == 503  # not held: unknown
    listing = await client.get("/api/calls", headers=AUTH)
    assert listing.status_code == 503  # the list needs the database...
    body = await listing.get_json()
    assert [c["call_sid"] for c in body["calls"]] == [held_sid]  # ...but says what this instance holds
    assert body["calls"][0]["live"] is False and body["live"] == []
