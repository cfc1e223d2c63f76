"""A call record as text for people (``make demo`` ends with it): one line per turn with its
latency, and for agent turns what was said vs what the caller heard. Pure."""

from __future__ import annotations

from typing import Any

_WIDTH = 100


def _clip(text: str, width: int = _WIDTH) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


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
    for turn in record.get("turns") or []:
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
        lines.append(f"  agent ({', '.join(timing) or 'no audio timing'}){flag}: {_clip(turn.get('text', ''))}")
        if turn.get("heard_text") != turn.get("text"):
            lines.append(f"    heard ({turn.get('heard_ms')} ms): {_clip(turn.get('heard_text') or '(nothing)')}")
    for tool in record.get("tools") or []:
        status = "error" if tool.get("is_error") else "ok"
        lines.append(
            f"  tool {tool.get('name')} {status} in {tool.get('duration_ms')} ms: {_clip(tool.get('result') or '', 60)}"
        )
    if record.get("dtmf"):
        lines.append("  keys: " + " ".join(d["digit"] for d in record["dtmf"]))
    lines.append(f"  agent audio said {said_ms / 1000:.2f} s, heard {heard_ms / 1000:.2f} s")
    return "\n".join(lines)


__all__ = ["format_record"]
