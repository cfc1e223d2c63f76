"""The record store against real databases: SQLite on a temp file, and a real PostgreSQL server
(tests/pg.py). Faults: the database away -> records held (bounded), one warning, metrics, and
they land once it is back."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from bridge.agent import events as ag
from bridge.observe import Metrics
from bridge.phone import media as tw
from bridge.records import backends as bk
from bridge.records import facts as fx
from bridge.records import store as st
from bridge.records.record import MAX_TURNS, TRUNCATED_MARK, RecordBuilder
from tests.pg import PostgresServer

T0 = 1_800_000_000.0


def make_record(
    n: int, *, started: float | None = None, outcome: str = "caller_hung_up", text: str = "hello", turns: int = 1
) -> dict[str, Any]:
    b = RecordBuilder(f"c-{n}", "inbound", origin_mono=0.0, origin_wall=started if started is not None else T0 + n)
    start = tw.Start("MZ", sid(n), "AC", ("inbound",), {"From": "+14155550100"}, "audio/x-mulaw", 8000, 1, 1)
    b.phone(start, 0.0)
    for i in range(turns):
        b.agent(ag.TranscriptUser(f"u{i}", text if i == 0 else f"turn {i}"), 1.0)
    b.agent(ag.ReplyStarted("r1"), 1.5)
    b.agent(ag.TranscriptAgent("r1", f"reply to {text}", False), 1.6)
    b.agent(ag.ReplyDone("r1", False), 1.6)
    b.fact(fx.ToolStarted("t1", "dump", {"q": text}, 1.7))
    b.fact(fx.ToolFinished("t1", "y" * 1_000_000, False, 1.8))
    b.fact(fx.CallEnded(outcome, "test", 2.0))
    b.finish(2.0)
    return b.build(2.0)


def sid(n: int) -> str:
    return f"CA{n:032x}"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/records/calls.sqlite3"
    return str(request.getfixturevalue("pg_url"))


def test_schema_is_created_versioned_and_migrating_twice_is_harmless(url: str) -> None:
    backend = bk.open_backend(url)
    backend.migrate()
    backend.migrate()
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url[len("sqlite:///") :])
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(bk.SCHEMA_VERSION,)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    else:
        import psycopg

        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [(bk.SCHEMA_VERSION,)]
    backend.close()


HOSTILE = 'quote " \' newline\n NUL\x00 emoji 🎉 RTL \u202e\u05e9\u05dc\u05d5\u05dd %_\\ ; DROP TABLE call_records; --'


def test_records_round_trip_intact_hostile_text_and_big_results(url: str) -> None:
    backend = bk.open_backend(url)
    backend.migrate()
    record = make_record(1, text=HOSTILE)
    backend.write(record)
    got = backend.get(sid(1))
    assert got == record
    assert got["turns"][0]["text"] == HOSTILE
    assert got["tools"][0]["result"].endswith("more characters)") and TRUNCATED_MARK in got["tools"][0]["result"]
    # search finds the hostile text literally: % and _ are not wildcards
    items, _ = backend.list(bk.Query(text="NUL"))
    assert [i["call_sid"] for i in items] == [sid(1)]
    assert backend.list(bk.Query(text="%_\\"))[0][0]["call_sid"] == sid(1)
    backend.write(make_record(2, text="plain"))
    assert backend.list(bk.Query(text="x%x"))[0] == []
    assert [i["call_sid"] for i in backend.list(bk.Query(text="_"))[0]] == [sid(1)]
    assert backend.get("CA" + "0" * 32) is None
    assert backend.get("'; DROP TABLE call_records; --") is None
    assert backend.get(sid(1)) is not None
    backend.close()


def test_nul_in_a_callsid_outcome_or_search_is_stored_and_searched_not_refused(url: str) -> None:
    # PostgreSQL text cannot hold NUL: a column value with one would be refused and retried as
    # if the database were down. The record's JSON keeps it (escaped); columns and search do not.
    backend = bk.open_backend(url)
    backend.migrate()
    record = make_record(5, text="before\x00after", outcome="caller\x00hung_up")
    record["call_sid"] = "CA\x00" + "5" * 30
    backend.write(record)
    items, _ = backend.list(bk.Query(text="before\x00after"))
    assert [i["call_sid"] for i in items] == [record["call_sid"]]
    assert backend.list(bk.Query(text=record["call_sid"]))[0][0]["call_sid"] == record["call_sid"]
    assert backend.get("CA \x00") is None
    assert backend.get("CA " + "5" * 30) == record  # the column holds the sid with NUL as a space
    assert backend.list(bk.Query(outcome="caller hung_up"))[0][0]["outcome"] == "caller\x00hung_up"
    backend.close()


def test_ten_thousand_turns_are_stored_and_returned(url: str) -> None:
    backend = bk.open_backend(url)
    backend.migrate()
    record = make_record(3, turns=MAX_TURNS + 5)
    assert len(record["turns"]) == MAX_TURNS
    backend.write(record)
    assert backend.get(sid(3)) == record
    backend.close()


def test_list_newest_first_paged_filtered_and_searched(url: str) -> None:
    backend = bk.open_backend(url)
    backend.migrate()
    for n in range(1, 8):
        outcome = "agent_ended" if n % 2 else "caller_hung_up"
        backend.write(make_record(n, outcome=outcome, text=f"Booking number {n}" if n in (3, 6) else "other"))
    items, next_cursor = backend.list(bk.Query(limit=3))
    assert [i["call_sid"] for i in items] == [sid(7), sid(6), sid(5)]
    assert items[0]["turn_count"] == 2 and items[0]["outcome"] == "agent_ended" and "turns" not in items[0]
    assert next_cursor is not None
    page2, cursor2 = backend.list(bk.Query(limit=3, before=bk.parse_cursor(next_cursor)))
    assert [i["call_sid"] for i in page2] == [sid(4), sid(3), sid(2)]
    page3, cursor3 = backend.list(bk.Query(limit=3, before=bk.parse_cursor(cursor2 or "")))
    assert [i["call_sid"] for i in page3] == [sid(1)] and cursor3 is None
    assert [i["call_sid"] for i in backend.list(bk.Query(outcome="caller_hung_up"))[0]] == [sid(6), sid(4), sid(2)]
    ranged = backend.list(bk.Query(since_s=T0 + 2, until_s=T0 + 5))[0]
    assert [i["call_sid"] for i in ranged] == [sid(4), sid(3), sid(2)]
    assert [i["call_sid"] for i in backend.list(bk.Query(text="booking NUMBER"))[0]] == [sid(6), sid(3)]
    assert [i["call_sid"] for i in backend.list(bk.Query(text=sid(5)))[0]] == [sid(5)]
    backend.close()


def test_a_resent_record_replaces_its_row_and_prune_removes_old_ones(url: str) -> None:
    backend = bk.open_backend(url)
    backend.migrate()
    backend.write(make_record(1, outcome="stuck"))
    backend.write(make_record(1, outcome="agent_ended"))
    backend.write(make_record(2, started=T0 - 40 * 86400))
    assert len(backend.list(bk.Query())[0]) == 2
    assert backend.get(sid(1))["outcome"] == "agent_ended"  # type: ignore[index]
    assert backend.prune(T0 - 30 * 86400) == 1
    assert [i["call_sid"] for i in backend.list(bk.Query())[0]] == [sid(1)]
    backend.close()


@pytest.mark.parametrize("bad", ["", "x", "1.5", "1.5_", "_3", "nan_1", "inf_2", "1_-2", "1e999_1", "9" * 80 + "_1"])
def test_a_cursor_that_is_not_one_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        bk.parse_cursor(bad)


def test_urls() -> None:
    assert isinstance(bk.open_backend("sqlite:///data/calls.sqlite3"), bk.SqliteBackend)
    assert bk.open_backend("sqlite:///data/calls.sqlite3").path == "data/calls.sqlite3"  # type: ignore[attr-defined]
    assert bk.open_backend("sqlite:////var/lib/x.db").path == "/var/lib/x.db"  # type: ignore[attr-defined]
    assert isinstance(bk.open_backend("postgresql://u@h/db"), bk.PostgresBackend)
    for bad in ("mysql://x", "sqlite://", "sqlite:///", "calls.sqlite3"):
        with pytest.raises(ValueError):
            bk.open_backend(bad)


# --- the writer task --------------------------------------------------------------------------


class FlakyBackend:
    """A SQLite backend whose writes fail while ``down``."""

    def __init__(self, path: str) -> None:
        self.inner = bk.SqliteBackend(path)
        self.down = False
        self.attempts = 0

    def migrate(self) -> None:
        self.inner.migrate()

    def write(self, record: dict[str, Any]) -> None:
        self.attempts += 1
        if self.down:
            raise bk.StoreError("database is down")
        self.inner.write(record)

    def list(self, query: bk.Query) -> tuple[list[dict[str, Any]], str | None]:
        return self.inner.list(query)

    def get(self, call_sid: str) -> dict[str, Any] | None:
        return self.inner.get(call_sid)

    def prune(self, before_s: float) -> int:
        return self.inner.prune(before_s)

    def close(self) -> None:
        pass


async def wait_for(predicate: Any, timeout_s: float = 20.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.02)


async def test_the_writer_holds_records_while_down_drops_oldest_warns_once_and_catches_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FlakyBackend(str(tmp_path / "r.sqlite3"))
    metrics = Metrics()
    store = st.RecordStore(backend, max_pending=3, metrics=metrics, wall_clock=lambda: T0 + 100)
    caplog.set_level(logging.INFO, "bridge.records")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.ready.wait()
        store.submit(make_record(1))
        await wait_for(lambda: store.written == 1)
        backend.down = True
        for n in range(2, 7):
            store.submit(make_record(n))  # never blocks
        await wait_for(lambda: backend.attempts >= 4)
        assert store.pending == 3 and store.dropped == 2 and not store.up
        value = metrics.registry.get_sample_value
        assert value("bridge_records_pending") == 3
        assert value("bridge_records_dropped_total") == 2
        assert value("bridge_records_store_up") == 0
        backend.down = False
        await wait_for(lambda: store.pending == 0)
        assert value("bridge_records_store_up") == 1
        nursery.cancel_scope.cancel()
    stored = {i["call_sid"] for i in backend.list(bk.Query())[0]}
    assert stored == {sid(1), sid(4), sid(5), sid(6)}  # 2 and 3 were the oldest held: dropped
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "holding up to 3" in warnings[0].getMessage()
    assert any("is back" in r.getMessage() for r in caplog.records)


async def test_records_queued_at_shutdown_are_flushed(tmp_path: Path) -> None:
    backend = bk.SqliteBackend(str(tmp_path / "r.sqlite3"))
    store = st.RecordStore(backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.ready.wait()
        store.submit(make_record(1))
        nursery.cancel_scope.cancel()  # before the writer ran
    assert backend.get(sid(1)) is not None


async def test_retention_prunes_at_start(tmp_path: Path) -> None:
    backend = bk.SqliteBackend(str(tmp_path / "r.sqlite3"))
    backend.migrate()
    backend.write(make_record(1, started=T0 - 31 * 86400))
    backend.write(make_record(2, started=T0 - 29 * 86400))
    store = st.RecordStore(backend, retention_days=30, wall_clock=lambda: T0)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await wait_for(lambda: backend.get(sid(1)) is None)
        nursery.cancel_scope.cancel()
    assert backend.get(sid(2)) is not None


async def test_reads_raise_store_error_when_the_database_fails(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite3").mkdir()  # a directory where the file should be: cannot open
    store = st.RecordStore(bk.SqliteBackend(str(tmp_path / "dir.sqlite3")))
    with pytest.raises(bk.StoreError):
        await store.get(sid(1))
    with pytest.raises(bk.StoreError):
        await store.list(bk.Query())


async def test_postgres_stopped_then_back_the_record_lands(
    pg_url: str, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = st.open_store(pg_url)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.ready.wait()
        store.submit(make_record(1))
        await wait_for(lambda: store.written == 1)
        await trio.to_thread.run_sync(postgres_server.stop)
        store.submit(make_record(2))
        await wait_for(lambda: not store.up)
        assert store.pending == 1
        await trio.to_thread.run_sync(postgres_server.start)
        await wait_for(lambda: store.pending == 0, timeout_s=60)
        assert (await store.get(sid(2))) is not None
        nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "bridge.records"]
    assert len(warnings) == 1
