"""Simulate one phone call against a running bridge, as Twilio would place it.

    python -m tools.simulate_call --url http://127.0.0.1:3000 \\
        --public-url https://bridge.example.com --audio caller.wav --out heard.wav

Posts the signed voice webhook, opens the Media Stream, streams the caller audio (then
silence) on a 20 ms clock, plays the bridge's audio through Twilio's playback model, and
prints a timeline. Writes what the caller heard to ``--out`` (8 kHz mono PCM16 WAV).

Exit status: 0 ok; 1 the webhook failed, the stream handshake was refused or the bridge
violated the Media Streams protocol; 2 bad arguments or input audio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import wave
from collections.abc import Sequence
from typing import Any

import trio

from tools.fake_twilio import CallPlan, CallResult, FakeTwilio
from tools.mulaw import WavFormatError, load_caller_audio, write_wav_from_ulaw


def _dtmf(text: str) -> tuple[float, str]:
    at, sep, digit = text.partition(":")
    try:
        at_s = float(at)
    except ValueError:
        at_s = -1.0
    if not sep or at_s < 0 or len(digit) != 1 or digit not in "0123456789*#ABCDw":
        raise argparse.ArgumentTypeError(f"expected SECONDS:DIGIT like 2.5:7, got {text!r}")
    return at_s, digit


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.simulate_call",
        description="Place one simulated Twilio call against a running bridge.",
    )
    p.add_argument("--url", required=True, help="where the bridge listens, e.g. http://127.0.0.1:3000")
    p.add_argument("--public-url", help="the bridge's PUBLIC_BASE_URL (default: --url); "
                   "webhooks are signed over it and its stream URLs are mapped to --url")
    p.add_argument("--connect-url", help="WebSocket origin to connect to (default: --url as ws://)")
    p.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN"),
                   help="Twilio auth token for signatures (default: $TWILIO_AUTH_TOKEN)")
    p.add_argument("--audio", help="caller audio: 8 kHz mono 16-bit .wav, or raw μ-law "
                   ".ulaw/.raw (default: silence)")
    p.add_argument("--speed", type=_positive, default=1.0,
                   help="time scale (default 1 = real time)")
    p.add_argument("--duration", type=_positive, default=12.0,
                   help="hang up after this many call seconds if nothing else ended the call "
                   "(default 12)")
    p.add_argument("--dtmf", type=_dtmf, action="append", default=[], metavar="S:DIGIT",
                   help="press DIGIT at call time S, e.g. 2.5:7 (repeatable)")
    p.add_argument("--hangup-after", type=_positive, metavar="S", help="caller hangs up at S")
    p.add_argument("--abrupt", action="store_true", help="hang up by closing without `stop`")
    p.add_argument("--outbound", action="store_true",
                   help="simulate an answered outbound-api call (POST /outbound-twiml)")
    p.add_argument("--webhook-path", help="override the webhook path (default /twiml or "
                   "/outbound-twiml)")
    p.add_argument("--from", dest="from_", default="+14155550123", help="caller number")
    p.add_argument("--to", default="+14155550100", help="called number")
    p.add_argument("--out", help="write what the caller heard to this WAV file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


def failure(result: CallResult) -> str | None:
    """One line saying why the call counts as failed, or None."""
    if result.error is not None:
        return f"FAIL: {result.error}"
    if result.stream_url is not None and result.handshake_status != 101:
        status = result.handshake_status
        return (f"FAIL: stream handshake to {result.stream_url} refused "
                f"(HTTP {status if status is not None else 'none'}, Twilio 31920)")
    if result.violations:
        code, detail = result.violations[0]
        more = f" (+{len(result.violations) - 1} more)" if len(result.violations) > 1 else ""
        return f"FAIL: protocol violation {code}: {detail}{more}"
    return None


def format_report(result: CallResult, plan: CallPlan) -> str:
    r = result
    lines = [
        f"Call {r.call_sid} ({plan.direction})  webhook {r.webhook_status}  "
        f"stream {r.stream_url or '-'}  handshake {r.handshake_status or '-'}",
    ]
    if r.custom_parameters:
        params = ", ".join(f"{k}={v}" for k, v in r.custom_parameters.items())
        lines.append(f"custom parameters: {params}")
    lines.append(f"{'time(s)':>9}  {'event':<16} detail")
    for at_s, kind, detail in sorted(r.timeline, key=lambda e: e[0]):
        lines.append(f"{at_s:>9.3f}  {kind:<16} {detail}")
    played = sum(1 for _, how in r.marks_echoed if how == "played")
    cleared = len(r.marks_echoed) - played
    first = f"{r.first_audio_s:.3f} s" if r.first_audio_s is not None else "never"
    clears = ", ".join(f"{t:.2f}" for t in r.clears)
    dtmf = ", ".join(f"{d} at {t:.2f} s" for t, k, d in r.timeline if k == "dtmf")
    summary = [
        ("time to first audio", first),
        ("clears (barge-ins)", f"{len(r.clears)}" + (f" at {clears} s" if clears else "")),
        ("marks", f"{played} played, {cleared} cleared"
         + (f", {len(r.unechoed_marks)} never echoed" if r.unechoed_marks else "")),
        ("dtmf", dtmf or "none"),
        ("caller heard", f"{len(r.heard) / 8000:.2f} s of agent audio"),
        ("ended by", f"{r.ended_by}" + (f" (close code {r.close_code})" if r.close_code else "")),
        ("post-Connect verbs", ", ".join(r.post_connect_verbs) or "none"),
        ("violations", f"{len(r.violations)}" if r.violations else "none"),
    ]
    lines.append("Summary")
    lines += [f"  {name:<20}: {value}" for name, value in summary]
    lines += [f"  violation {code}: {detail}" for code, detail in r.violations]
    return "\n".join(lines)


def result_json(result: CallResult) -> dict[str, Any]:
    data = dataclasses.asdict(result)
    data.pop("heard")
    data["received_media_frames"] = len(data.pop("received_media_payloads"))
    data["heard_s"] = len(result.heard) / 8000
    return data


async def run(args: argparse.Namespace) -> int:
    """Run one call from parsed `args`; returns the exit status."""
    try:
        audio = load_caller_audio(args.audio) if args.audio else b""
    except (WavFormatError, wave.Error, EOFError, OSError) as exc:
        print(f"error: cannot use --audio {args.audio}: {exc}", file=sys.stderr)
        return 2
    fake = FakeTwilio(
        http_base=args.url,
        public_base=args.public_url or args.url,
        auth_token=args.auth_token,
        connect_base=args.connect_url,
    )
    plan = CallPlan(
        direction="outbound-api" if args.outbound else "inbound",
        from_=args.from_,
        to=args.to,
        caller_audio=audio,
        speed=args.speed,
        hangup_after_s=args.hangup_after,
        abrupt_close=args.abrupt,
        dtmf=list(args.dtmf),
        max_call_s=args.duration,
    )
    path = args.webhook_path or ("/outbound-twiml" if args.outbound else "/twiml")
    result = await fake.call(plan, webhook_path=path)
    if args.out:
        write_wav_from_ulaw(args.out, result.heard)
    if args.json:
        print(json.dumps(result_json(result), indent=2))
    else:
        print(format_report(result, plan))
        if args.out:
            print(f"wrote {args.out} ({len(result.heard) / 8000:.2f} s)")
    why = failure(result)
    if why is not None:
        print(why, file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return trio.run(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
