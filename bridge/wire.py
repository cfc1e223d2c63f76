"""What both WebSocket peers send: JSON text frames holding one object (pure)."""

from __future__ import annotations

from typing import Any

import orjson


def json_object(frame: str | bytes, peer: str) -> dict[str, Any] | str:
    """The frame's JSON object, or a short reason why it is not one. Never raises."""
    if isinstance(frame, bytes):
        return f"binary frame ({peer} sends JSON text only)"
    try:
        msg = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return "not JSON"
    if type(msg) is not dict:
        return "not a JSON object"
    return msg
