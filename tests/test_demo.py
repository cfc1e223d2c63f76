"""`make demo`'s flow, faster than real time: real processes, real speech clips, a WAV out."""

from __future__ import annotations

import re
import subprocess
import sys
import wave
from pathlib import Path

import orjson

from tools import mulaw
from tools.fake_agent import NUMBER_WORDS

ROOT = Path(__file__).resolve().parent.parent
AUDIO = ROOT / "tools" / "audio"


def test_demo_writes_a_wav_with_the_greeting_and_the_reply(tmp_path: Path) -> None:
    out = tmp_path / "demo-call.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.demo", "--speed", "4", "--out", str(out), "--logs", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "violations          : none" in proc.stdout
    assert "exit codes [0, 0]" in proc.stdout  # both servers stopped cleanly
    # The agent's tool ran on our side; the bridge's log says what it returned.
    [returned] = re.findall(r"tool generate_random_number returned: (\{.*\})$", proc.stdout, re.M)
    number = orjson.loads(returned)["result"]
    assert 1 <= number <= 10
    # What the agent says agrees with that result (issue 12 #4: it used to say "seven" always).
    said = re.findall(r"\] agent: (.*)$", proc.stdout, re.M)
    answer = f"Sure. Your random number is {NUMBER_WORDS[number - 1]}."
    assert said == ["Hi, thanks for calling. How can I help?", answer]
    with wave.open(str(out)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (8000, 1, 2)
        heard = wav.readframes(wav.getnframes())
    greeting = mulaw.decode((AUDIO / "greeting.ulaw").read_bytes())
    assert greeting in heard  # the whole greeting, sample for sample
    answers = {n: mulaw.decode((AUDIO / f"number_{n}.ulaw").read_bytes()) for n in range(1, 11)}
    # The caller heard the whole clip for the returned number, and no other number's clip.
    assert [n for n, clip in answers.items() if clip in heard] == [number]
