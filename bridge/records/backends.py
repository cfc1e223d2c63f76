"""Where records are kept: SQLite (the default, embedded) and PostgreSQL (fleets). Blocking code,
run only in worker threads by :mod:`bridge.records.store`.

Both backends hold the same schema (versioned in ``schema_version``, migrated at start-up) and
run the same parameterised SQL: values never become SQL text (a search string goes into a LIKE
pattern parameter, with ``%``, ``_`` and ``\\`` escaped). Errors of the database libraries are
translated into :class:`StoreError` here.

Rows: one per (call_sid, call_id) — a re-sent record replaces its row — with the summary and the
whole record as JSON text, the transcript text for search (without NUL: PostgreSQL text cannot
hold it; the record keeps it, JSON-escaped), and ``started_s`` (epoch seconds) for ordering,
paging, date filters and retention.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from bridge.errors import BridgeError
from bridge.records.record import search_text, summary

SCHEMA_VERSION = 1
CONNECT_TIMEOUT_S = 5  # a database that does not answer within this is "down" for this attempt
STATEMENT_TIMEOUT_MS = 10_000
_LIST_MAX = 500


class StoreError(BridgeError):
    """The records database failed (down, slow, full, or refused a statement)."""


@dataclass(frozen=True, slots=True)
class Query:
    """A list query: newest first; ``before`` is the cursor of the last row of the previous page."""

    limit: int = 50
    before: tuple[float, int] | None = None
    outcome: str | None = None
    since_s: float | None = None
    until_s: float | None = None
    text: str | None = None


def parse_cursor(raw: str) -> tuple[float, int]:
    """``"<started_s>_<id>"`` -> (started_s, id). Raises ValueError when it is not one."""
    started, sep, row = raw.partition("_")
    value, row_id = float(started), int(row)
    if not sep or not math.isfinite(value) or row_id < 0 or len(raw) > 64:
        raise ValueError("not a cursor")
    return value, row_id


def cursor(started_s: float, row_id: int) -> str:
    return f"{started_s!r}_{row_id}"


def started_epoch(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["started_at"]).replace("Z", "+00:00")).timestamp()


class Backend(Protocol):
    def migrate(self) -> None: ...
    def write(self, record: dict[str, Any]) -> None: ...
    def list(self, query: Query) -> tuple[list[dict[str, Any]], str | None]: ...
    def get(self, call_sid: str) -> dict[str, Any] | None: ...
    def prune(self, before_s: float) -> int: ...
    def close(self) -> None: ...


_COLUMNS = "call_sid, call_id, started_s, outcome, summary, transcript, record"
_UPSERT = (
    f"INSERT INTO call_records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (call_sid, call_id) DO UPDATE SET started_s = excluded.started_s, outcome = excluded.outcome, "
    "summary = excluded.summary, transcript = excluded.transcript, record = excluded.record"
)


def _row(record: dict[str, Any]) -> tuple[Any, ...]:
    try:
        encoded = orjson.dumps(record).decode()
        summary_json = orjson.dumps(summary(record)).decode()
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise ValueError(f"the record cannot be written as JSON: {exc}") from exc
    outcome = record.get("outcome")
    return (
        _text(str(record["call_sid"])),
        _text(str(record["call_id"])),
        started_epoch(record),
        _text(str(outcome)) if outcome is not None else None,
        summary_json,
        search_text(record),
        encoded,
    )


def _text(value: str) -> str:
    # A column value (not the record's JSON, where NUL is escaped): PostgreSQL text cannot hold
    # NUL, and a value it refuses would be retried as if the database were down.
    return value.replace("\x00", " ")


def _like(text: str) -> str:
    text = _text(text)  # as search_text stores it
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _list_sql(query: Query, like: str) -> tuple[str, list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if query.before is not None:
        where.append("(started_s < ? OR (started_s = ? AND id < ?))")
        params += [query.before[0], query.before[0], query.before[1]]
    if query.outcome:
        where.append("outcome = ?")
        params.append(query.outcome)
    if query.since_s is not None:
        where.append("started_s >= ?")
        params.append(query.since_s)
    if query.until_s is not None:
        where.append("started_s < ?")
        params.append(query.until_s)
    if query.text:
        where.append(f"(transcript {like} ? ESCAPE '\\' OR call_sid = ?)")
        params += [_like(query.text), _text(query.text)]
    sql = "SELECT id, started_s, summary FROM call_records"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY started_s DESC, id DESC LIMIT ?"
    params.append(max(1, min(query.limit, _LIST_MAX)) + 1)  # one more: is there a next page?
    return sql, params


def _page(rows: list[tuple[Any, ...]], limit: int) -> tuple[list[dict[str, Any]], str | None]:
    limit = max(1, min(limit, _LIST_MAX))
    items = [orjson.loads(r[2]) for r in rows[:limit]]
    next_cursor = cursor(float(rows[limit - 1][1]), int(rows[limit - 1][0])) if len(rows) > limit else None
    return items, next_cursor


# --- SQLite -----------------------------------------------------------------------------------

_SQLITE_MIGRATIONS = {
    1: [
        "CREATE TABLE call_records (id INTEGER PRIMARY KEY AUTOINCREMENT, call_sid TEXT NOT NULL, "
        "call_id TEXT NOT NULL, started_s REAL NOT NULL, outcome TEXT, summary TEXT NOT NULL, "
        "transcript TEXT NOT NULL, record TEXT NOT NULL, UNIQUE (call_sid, call_id))",
        "CREATE INDEX call_records_started ON call_records (started_s DESC, id DESC)",
        "CREATE INDEX call_records_sid ON call_records (call_sid)",
    ],
}


class SqliteBackend:
    """One file, WAL mode (readers never wait for the writer). A connection per operation: cheap
    for SQLite, and safe across the worker threads that run them."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=CONNECT_TIMEOUT_S, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        return conn

    def _run(self, fn: Any) -> Any:
        conn = self._connect()
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite {self.path}: {exc}") from exc
        finally:
            conn.close()

    def migrate(self) -> None:
        def step(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
                current = row[0] or 0
                for version in sorted(v for v in _SQLITE_MIGRATIONS if v > current):
                    for sql in _SQLITE_MIGRATIONS[version]:
                        conn.execute(sql)
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        self._run(step)

    def write(self, record: dict[str, Any]) -> None:
        row = _row(record)
        self._run(lambda conn: conn.execute(_UPSERT, row))

    def list(self, query: Query) -> tuple[list[dict[str, Any]], str | None]:
        sql, params = _list_sql(query, "LIKE")
        rows = self._run(lambda conn: conn.execute(sql, params).fetchall())
        return _page(rows, query.limit)

    def get(self, call_sid: str) -> dict[str, Any] | None:
        if "\x00" in call_sid:
            return None  # never stored (see _text)
        sql = "SELECT record FROM call_records WHERE call_sid = ? ORDER BY id DESC LIMIT 1"
        row = self._run(lambda conn: conn.execute(sql, (call_sid,)).fetchone())
        return orjson.loads(row[0]) if row else None

    def prune(self, before_s: float) -> int:
        sql = "DELETE FROM call_records WHERE started_s < ?"
        return int(self._run(lambda conn: conn.execute(sql, (before_s,)).rowcount))

    def close(self) -> None:
        pass


# --- PostgreSQL -------------------------------------------------------------------------------

_PG_MIGRATIONS = {
    1: [
        "CREATE TABLE call_records (id BIGSERIAL PRIMARY KEY, call_sid TEXT NOT NULL, "
        "call_id TEXT NOT NULL, started_s DOUBLE PRECISION NOT NULL, outcome TEXT, summary TEXT NOT NULL, "
        "transcript TEXT NOT NULL, record TEXT NOT NULL, UNIQUE (call_sid, call_id))",
        "CREATE INDEX call_records_started ON call_records (started_s DESC, id DESC)",
        "CREATE INDEX call_records_sid ON call_records (call_sid)",
    ],
}
_PG_MIGRATION_LOCK = 0x62726964  # pg_advisory_xact_lock key: instances starting together migrate once


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")  # our SQL has no literal '?' or '%': values are parameters


class PostgresBackend:
    """psycopg 3's sync pool (its async API does not run under Trio), used from worker threads.

    After a failure the pool is closed and a new one is made on the next operation: a restarted
    server is picked up without waiting for the pool's own reconnect schedule.
    """

    def __init__(self, url: str, max_connections: int = 4) -> None:
        self.url = url
        self._max = max_connections
        self._pool: Any = None
        self._lock = threading.Lock()  # guards _pool between the worker threads

    def _get_pool(self) -> Any:
        from psycopg_pool import ConnectionPool

        with self._lock:
            if self._pool is None:
                pool = ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self._max,
                    open=False,
                    timeout=CONNECT_TIMEOUT_S,
                    check=ConnectionPool.check_connection,
                    kwargs={
                        "autocommit": True,
                        "connect_timeout": CONNECT_TIMEOUT_S,
                        "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                    },
                )
                pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
                self._pool = pool
            return self._pool

    def _reset(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=1.0)

    def _run(self, fn: Any) -> Any:
        import psycopg
        import psycopg_pool

        try:
            with self._get_pool().connection() as conn:
                return fn(conn)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed) as exc:
            self._reset()
            raise StoreError(f"PostgreSQL unavailable: {str(exc).strip() or type(exc).__name__}") from exc
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL: {str(exc).strip() or type(exc).__name__}") from exc

    def migrate(self) -> None:
        def step(conn: Any) -> None:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_MIGRATION_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                current = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
                for version in sorted(v for v in _PG_MIGRATIONS if v > current):
                    for sql in _PG_MIGRATIONS[version]:
                        conn.execute(sql)
                    conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))

        self._run(step)

    def write(self, record: dict[str, Any]) -> None:
        row = _row(record)
        self._run(lambda conn: conn.execute(_pg(_UPSERT), row))

    def list(self, query: Query) -> tuple[list[dict[str, Any]], str | None]:
        sql, params = _list_sql(query, "ILIKE")
        rows = self._run(lambda conn: conn.execute(_pg(sql), params).fetchall())
        return _page(rows, query.limit)

    def get(self, call_sid: str) -> dict[str, Any] | None:
        if "\x00" in call_sid:
            return None  # never stored (see _text)
        sql = "SELECT record FROM call_records WHERE call_sid = %s ORDER BY id DESC LIMIT 1"
        row = self._run(lambda conn: conn.execute(sql, (call_sid,)).fetchone())
        return orjson.loads(row[0]) if row else None

    def prune(self, before_s: float) -> int:
        sql = "DELETE FROM call_records WHERE started_s < %s"
        return int(self._run(lambda conn: conn.execute(sql, (before_s,)).rowcount))

    def close(self) -> None:
        self._reset()


def open_backend(url: str) -> Backend:
    """``sqlite:///relative/path``, ``sqlite:////absolute/path`` or ``postgresql://…``.

    Raises:
        ValueError: any other URL.
    """
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path:
            raise ValueError("sqlite:/// needs a file path")
        return SqliteBackend(path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresBackend(url)
    raise ValueError("not a sqlite:/// or postgresql:// URL")


__all__ = [
    "SCHEMA_VERSION",
    "Backend",
    "PostgresBackend",
    "Query",
    "SqliteBackend",
    "StoreError",
    "cursor",
    "open_backend",
    "parse_cursor",
]
