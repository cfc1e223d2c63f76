"""`make demo`'s flow, faster than real time: real processes, real speech clips, a WAV out."""

from __future__ import annotations

import subprocess
import sys
import wave
from pathlib import Path

from tools import mulaw

ROOT = Path(__file__).resolve().parent.parent


def test_demo_writes_a_wav_with_the_greeting_and_the_reply(tmp_path: Path) -> None:
    out = tmp_path / "demo-call.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.demo", "--speed", "4", "--out", str(out), "--logs", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "violations          : none" in proc.stdout
    assert "tool generate_random_number returned" in proc.stdout  # the agent's tool ran on our side
    assert "exit codes [0, 0]" in proc.stdout  # both servers stopped cleanly
    with wave.open(str(out)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (8000, 1, 2)
        heard = wav.readframes(wav.getnframes())
    greeting = mulaw.decode((ROOT / "tools/audio/greeting.ulaw").read_bytes())
    reply = mulaw.decode((ROOT / "tools/audio/reply.ulaw").read_bytes())
    assert greeting in heard  # the whole greeting, sample for sample
    assert reply in heard  # and the whole reply to the caller's question
