"""A call record as text for people (``make demo`` ends with it): one line per turn with its
latency, and for agent turns what was said vs what the caller heard. An agent turn without words
(a silent reply that only calls a tool) says so and names the tools called during it. Pure."""

from __future__ import annotations

from datetime import datetime
from typing import Any

_WIDTH = 100


def _clip(text: str, width: int = _WIDTH) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _moment(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _tools_during(turns: list[dict[str, Any]], index: int, tools: list[dict[str, Any]]) -> list[str]:
    """Names of the tools called from agent turn ``index``'s start until the next agent turn's
    (the record does not link a tool to its reply; a tool call arrives inside the reply that
    makes it, and a caller's turn may start before it)."""
    start = _moment(turns[index].get("started_at"))
    later = [t for t in turns[index + 1 :] if t.get("speaker") == "agent"]
    end = _moment(later[0].get("started_at")) if later else None
    if start is None:
        return []
    names = []
    for tool in tools:
        at = _moment(tool.get("started_at"))
        if at is not None and start <= at and (end is None or at < end):
            names.append(str(tool.get("name")))
    return names


def format_record(record: dict[str, Any]) -> str:
    """The record as a short human-readable report."""
    lines = [
        f"Call {record.get('call_sid')} ({record.get('direction')}, {record.get('call_id')})",
        f"  {record.get('started_at')} -> {record.get('ended_at') or 'live'}, {record.get('duration_s')} s, "
        f"outcome {record.get('outcome')} ({record.get('reason')})",
        f"  agent sessions {', '.join(record.get('agent_session_ids') or []) or '-'}; "
        f"upstream open {record.get('upstream_open_s')} s",
    ]
    said_ms = heard_ms = 0
    turns = record.get("turns") or []
    tools = record.get("tools") or []
    for index, turn in enumerate(turns):
        if turn.get("speaker") == "caller":
            lines.append(f"  caller: {_clip(turn.get('text', ''))}")
            continue
        timing = []
        if turn.get("first_audio_ms") is not None:
            timing.append(f"first audio {turn['first_audio_ms']} ms")
        if turn.get("response_ms") is not None:
            timing.append(f"response {turn['response_ms']} ms")
        said_ms += int(turn.get("said_ms") or 0)
        heard_ms += int(turn.get("heard_ms") or 0)
        flag = " [interrupted]" if turn.get("interrupted") else ""
        text = str(turn.get("text") or "")
        if not text.strip():
            called = _tools_during(turns, index, tools)
            words = f"(no words: called {', '.join(called)})" if called else "(no words)"
            lines.append(f"  agent{' (' + ', '.join(timing) + ')' if timing else ''}{flag}: {words}")
            continue
        lines.append(f"  agent ({', '.join(timing) or 'no audio timing'}){flag}: {_clip(text)}")
        if turn.get("heard_text") != turn.get("text"):
            lines.append(f"    heard ({turn.get('heard_ms')} ms): {_clip(turn.get('heard_text') or '(nothing)')}")
    for tool in tools:
        if tool.get("result") is None:  # still running, or the call ended first
            lines.append(f"  tool {tool.get('name')}: no result")
            continue
        status = "error" if tool.get("is_error") else "ok"
        lines.append(
            f"  tool {tool.get('name')} {status} in {tool.get('duration_ms')} ms: "
            f"{_clip(tool.get('result') or '(empty)', 60)}"
        )
    if record.get("dtmf"):
        lines.append("  keys: " + " ".join(d["digit"] for d in record["dtmf"]))
    lines.append(f"  agent audio said {said_ms / 1000:.2f} s, heard {heard_ms / 1000:.2f} s")
    return "\n".join(lines)


__all__ = ["format_record"]
