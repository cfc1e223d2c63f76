"""Finished records the store still holds (queued, not yet written) are readable: the pure rules
(``held_matches``: a held record answers a query as its row would; ``merge_held``: which page it
goes on, never twice), and a real SQLite store whose writer has not run yet, walked page by page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.records import backends as bk
from bridge.records.record import iso, summary
from bridge.records.store import RecordStore, held_matches, merge_held

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def rec(n: int, *, started: float | None = None, outcome: str | None = "caller_hung_up", text: str = "hello") -> dict:
    return {
        "call_sid": f"CA{n:032x}", "call_id": f"c-{n}", "started_at": iso(T0 + n if started is None else started),
        "outcome": outcome, "live": outcome is None,
        "turns": [{"speaker": "caller", "text": text}, {"speaker": "agent", "text": "ok", "heard_text": "o"}],
    }


@pytest.mark.parametrize(
    ("query", "record", "expected"),
    [
        (bk.Query(), rec(1), True),
        (bk.Query(outcome="caller_hung_up"), rec(1), True),
        (bk.Query(outcome="agent_ended"), rec(1), False),
        (bk.Query(outcome="caller_hung_up"), rec(1, outcome=None), False),  # a live call has no outcome
        (bk.Query(since_s=T0 + 1), rec(1), True),  # since is inclusive, as the SQL's >=
        (bk.Query(since_s=T0 + 1.001), rec(1), False),
        (bk.Query(until_s=T0 + 1), rec(1), False),  # until is exclusive, as the SQL's <
        (bk.Query(until_s=T0 + 1.001), rec(1), True),
        (bk.Query(before=(T0 + 2, 7)), rec(1), True),
        (bk.Query(before=(T0 + 1, 7)), rec(1), False),  # a tie goes to the earlier page
        (bk.Query(text="HELLO"), rec(1, text="well hello there"), True),
        (bk.Query(text="o"), rec(1, text="x"), True),  # the heard text is searched too
        (bk.Query(text="bye"), rec(1), False),
        (bk.Query(text=f"CA{1:032x}"), rec(1), True),  # the exact CallSid
        (bk.Query(text="a\x00b"), rec(1, text="a b"), True),  # NUL as the store keeps it
    ],
)
def test_a_held_record_matches_a_query_as_its_row_would(query: bk.Query, record: dict, expected: bool) -> None:
    assert held_matches(record, query) is expected


def sids(page: list[dict[str, Any]]) -> list[int]:
    return [int(str(s["call_sid"])[2:], 16) for s in page]


@pytest.mark.parametrize(
    ("stored", "next_before", "held", "expected"),
    [
        ([], None, [], []),
        ([rec(3), rec(1)], None, [rec(2)], [3, 2, 1]),  # in order, on the last page
        ([rec(3), rec(1)], None, [rec(5), rec(0)], [5, 3, 1, 0]),
        # more pages follow: a held record older than the page's last row belongs on a later page
        ([rec(5), rec(4)], bk.cursor(T0 + 4, 9), [rec(6), rec(2)], [6, 5, 4]),
        ([rec(5), rec(4)], bk.cursor(T0 + 4, 9), [rec(4, started=T0 + 4)], [5, 4]),  # its own row: once
        ([rec(5), rec(3)], bk.cursor(T0 + 3, 9), [rec(4)], [5, 4, 3]),
        # the row was committed while the page was read: the same (CallSid, call id) is listed once
        ([rec(2), rec(1)], None, [rec(2)], [2, 1]),
    ],
)
def test_merge_held_places_each_held_record_on_one_page(
    stored: list[dict], next_before: str | None, held: list[dict], expected: list[int]
) -> None:
    page = merge_held([summary(s) for s in stored], next_before, [summary(h) for h in held])
    assert sids(page) == expected


async def test_walking_the_pages_of_a_store_with_held_records_shows_each_call_once(tmp_path: Path) -> None:
    backend = bk.SqliteBackend(str(tmp_path / "calls.sqlite3"))
    backend.migrate()
    for n in (1, 3, 4, 6, 8, 9):
        backend.write(rec(n))
    store = RecordStore(backend)  # its writer is not running: what is submitted stays held
    for n in (0, 2, 5, 7, 10):
        store.submit(rec(n))
    store.submit(rec(4))  # re-sent: held and stored at once (its row is replaced once written)
    for limit in (1, 2, 3, 50):
        seen: list[int] = []
        query = bk.Query(limit=limit)
        while True:
            page, next_before = await store.list(query)
            assert sids(page) == sorted(sids(page), reverse=True)
            seen += sids(page)
            if next_before is None:
                break
            query = bk.Query(limit=limit, before=bk.parse_cursor(next_before))
        assert seen == list(range(10, -1, -1)), (limit, seen)
    assert (await store.get(f"CA{5:032x}")) == rec(5)  # from the queue
    assert (await store.get(f"CA{3:032x}")) == rec(3)  # from the database
    assert sids(store.held_summaries(bk.Query(outcome="caller_hung_up", since_s=T0 + 5))) == [10, 7, 5]
