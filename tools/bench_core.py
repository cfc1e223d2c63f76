"""Per-frame cost of the pure call core: ``CallState.on_phone`` for one 20 ms caller frame.

``python -m tools.bench_core [--frames N] [--runs R]`` prints the best of R runs of N frames, in
ns per frame. No sockets, no Trio: only the decisions every caller frame goes through (parse is
not included). Compare two trees with ``git worktree`` (or ``git archive``) and run it in each.
"""

from __future__ import annotations

import argparse
import base64
import time

import orjson

from bridge.agent import events as ag
from bridge.call.state import CallPolicy, CallState
from bridge.phone import media as tw

STREAM_SID = "MZ" + "0" * 32
CALL_SID = "CA" + "0" * 32


def _start() -> str:
    return orjson.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": STREAM_SID,
            "start": {
                "accountSid": "AC" + "0" * 32,
                "streamSid": STREAM_SID,
                "callSid": CALL_SID,
                "tracks": ["inbound"],
                "customParameters": {},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
    ).decode()


def measure(frames: int, runs: int) -> float:
    """Best ns per caller frame over ``runs`` runs of ``frames`` frames."""
    state = CallState(CallPolicy(twilio_silence_s=1e9, caller_burst_ms=1e12))
    state.on_phone(tw.parse(_start()), 0.0)
    ready = {"type": "session.ready", "session_id": "sess_" + "0" * 32, "timestamp": 0.0}
    state.on_agent(ag.parse(orjson.dumps(ready).decode()), 0.0)
    payload = base64.b64encode(b"\xff" * 160).decode()
    media = {"event": "media", "streamSid": STREAM_SID, "media": {"track": "inbound", "payload": payload}}
    event = tw.parse(orjson.dumps(media).decode())
    best = float("inf")
    now = 0.0
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(frames):
            now += 0.02
            state.on_phone(event, now)
        best = min(best, (time.perf_counter() - started) / frames)
    return best * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"{measure(args.frames, args.runs):.0f} ns per caller frame")


if __name__ == "__main__":
    main()
