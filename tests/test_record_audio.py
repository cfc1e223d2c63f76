"""RECORD_AUDIO=on: the pure stereo timeline (tables), the μ-law -> PCM16 stereo codec, the WAV
writer, and a real call through the server whose WAV has the caller on the left and, on the
right, the agent as the caller heard it (cut at the barge-in)."""

from __future__ import annotations

import base64
import math
import os
import subprocess
import sys
import wave
from array import array
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from bridge.config import from_env
from bridge.phone import media as tw
from bridge.records import audio as au
from bridge.records.recording import MAX_ITEMS, Recordings, prune_files
from bridge.records.runtime import recordings_dir
from tests.harness import API_KEY, Running, running_bridge
from tests.test_record_e2e import stored_record
from tools import mulaw
from tools.fake_agent import FakeAgentConfig
from tools.fake_twilio import CallPlan

S = au.SILENCE
TOKEN = "console-token-audio-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parent.parent


def sil(n: int) -> bytes:
    return bytes([S]) * n


# --- the codec ----------------------------------------------------------------------------------


def test_the_timeline_module_is_pure() -> None:
    code = "import sys, bridge.records.audio; print(sorted({'trio', 'quart', 'hypercorn'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_decode_stereo_matches_the_reference_decoder_for_every_byte() -> None:
    every = bytes(range(256))
    backwards = every[::-1]
    pcm = array("h", au.decode_stereo(every, backwards))
    assert list(pcm[0::2]) == list(array("h", mulaw.decode(every)))
    assert list(pcm[1::2]) == list(array("h", mulaw.decode(backwards)))
    assert au.decode_stereo(b"", b"") == b""
    with pytest.raises(ValueError):
        au.decode_stereo(b"\x00", b"")


# --- the timeline -------------------------------------------------------------------------------


def test_caller_audio_is_final_as_it_comes_and_forgotten_once_taken() -> None:
    t = au.StereoTimeline()
    t.caller(b"A" * 160, 20)
    t.caller(b"B" * 160, 40)
    assert t.take() == (b"A" * 160 + b"B" * 160, sil(320))
    assert t.take() == (b"", b"")
    t.caller(b"C" * 160, 60)
    assert t.take() == (b"C" * 160, sil(160))


def test_agent_audio_plays_from_now_or_after_the_audio_before_it() -> None:
    t = au.StereoTimeline()
    t.caller(b"a" * 160, 20)
    t.agent(b"1" * 100, clock=160)  # written now: plays from the caller track's end
    t.agent(b"2" * 100, clock=160)  # a burst: queued behind the first
    assert t.take() == (b"a" * 160, sil(160))  # nothing of it is final yet (it plays from now on)
    t.caller(b"b" * 160, 40)
    assert t.take() == (b"b" * 160, b"1" * 100 + b"2" * 60)
    t.caller(b"c" * 160, 60)
    assert t.take() == (b"c" * 160, b"2" * 40 + sil(120))


def test_a_clear_cuts_what_was_not_played_and_never_what_was() -> None:
    t = au.StereoTimeline()
    t.caller(b"a" * 160, 20)
    t.agent(b"1" * 800, clock=160)  # 100 ms of agent audio from position 160
    t.caller(b"b" * 160, 40)  # 20 ms of it have played
    t.clear(clock=320)
    t.caller(b"c" * 160, 60)
    assert t.take(final=True) == (b"a" * 160 + b"b" * 160 + b"c" * 160, sil(160) + b"1" * 160 + sil(160))


def test_after_a_clear_the_next_reply_plays_from_now() -> None:
    t = au.StereoTimeline()
    t.caller(b"a" * 160, 20)
    t.agent(b"1" * 800, clock=160)
    t.clear(clock=160)  # nothing played
    t.agent(b"2" * 80, clock=160)
    t.caller(b"b" * 160, 40)
    assert t.take() == (b"a" * 160 + b"b" * 160, sil(160) + b"2" * 80 + sil(80))


def test_final_take_includes_agent_audio_still_ahead() -> None:
    t = au.StereoTimeline()
    t.caller(b"a" * 160, 20)
    t.agent(b"1" * 400, clock=160)
    assert t.take(final=True) == (b"a" * 160 + sil(400), sil(160) + b"1" * 400)


@pytest.mark.parametrize(
    ("timestamps", "expected_left"),
    [
        ([20, 40, 60], b"x" * 480),  # in order
        ([20, 60, 80], b"x" * 160 + sil(160) + b"x" * 320),  # one frame lost: 20 ms of silence
        ([20, 40, 40], b"x" * 480),  # a repeated timestamp: appended, never overwritten
        ([20, 10_000_000, 10_000_020], b"x" * 480),  # a jump of hours is not believed
        ([20, None, 60], b"x" * 480),  # no timestamp: in order
    ],
)
def test_caller_timestamps_fill_short_gaps_only(timestamps: list[int | None], expected_left: bytes) -> None:
    t = au.StereoTimeline()
    for ts in timestamps:
        t.caller(b"x" * 160, ts)
    assert t.take()[0] == expected_left


def test_a_caller_track_that_stops_is_padded_to_the_clock_less_the_allowed_lag() -> None:
    t = au.StereoTimeline()
    t.caller(b"a" * 160, 20)
    lag = int(au.STALL_S * au.SAMPLE_RATE_HZ)
    t.tick(lag)  # within the allowed lag: nothing
    assert t.now == 160
    t.tick(lag + 8000)
    assert t.now == 8000
    t.agent(b"1" * 10, clock=lag + 8000)  # the clock is now: the agent plays there
    assert t.take(final=True) == (b"a" * 160 + sil(7840 + lag + 10), sil(lag + 8000) + b"1" * 10)


def test_when_caller_frames_come_late_the_clock_says_when_the_agent_played_and_was_cleared() -> None:
    t = au.StereoTimeline()
    t.caller(b"a" * 160, 20)
    t.agent(b"1" * 800, clock=800)  # the clock is 80 ms into the call, the caller track only 20
    t.clear(clock=1200)  # 50 ms of it played
    t.caller(b"b" * 1600, 40)  # the frames that were late
    assert t.take(final=True) == (b"a" * 160 + b"b" * 1600, sil(800) + b"1" * 400 + sil(560))


def test_agent_audio_too_far_ahead_is_dropped_and_counted() -> None:
    t = au.StereoTimeline()
    ahead = int(au.MAX_AHEAD_S * au.SAMPLE_RATE_HZ)
    t.agent(b"1" * ahead, clock=0)
    t.agent(b"2" * 8, clock=0)
    assert t.dropped_agent_samples == 8
    assert t.agent_end == ahead


# --- the writer ---------------------------------------------------------------------------------


def media(data: bytes, ts: int) -> tw.Media:
    return tw.Media("MZ1", base64.b64encode(data).decode(), "inbound", ts, None)


def sent(data: bytes) -> str:
    return tw.media_frame("MZ1", base64.b64encode(data).decode())


def read_wav(path: Path) -> tuple[Any, array[int], array[int]]:
    with wave.open(str(path), "rb") as w:
        params = w.getparams()
        frames = array("h", w.readframes(w.getnframes()))
    return params, frames[0::2], frames[1::2]


def pcm(data: bytes) -> list[int]:
    return list(array("h", mulaw.decode(data)))


async def test_the_wav_is_valid_after_every_pass_and_closed_when_the_call_ends(tmp_path: Path) -> None:
    now = [100.0]
    rec = Recordings(tmp_path / "rec", clock=lambda: now[0], wall_clock=lambda: 1_790_000_000.0)
    audio = rec.new_call("c-1")
    path = Path(audio.start("CA../../etc/passwd", 100.0))
    assert path.parent.parent == (tmp_path / "rec").absolute() and path.name == "CAetcpasswd-c1.wav"
    caller = bytes(range(0, 160))
    agent = bytes(range(96, 256))
    audio.caller(media(caller, 20))
    audio.played(sent(agent), 100.02)
    audio.caller(media(caller, 40))
    now[0] = 100.04
    await rec.flush()
    params, left, right = read_wav(path)  # readable while the call goes on
    assert (params.nchannels, params.sampwidth, params.framerate) == (2, 2, 8000)
    assert list(left) == pcm(caller + caller)
    assert list(right) == pcm(sil(160) + agent)
    audio.caller(tw.Media("MZ1", "!!!notbase64", "inbound", 60, None))  # a broken payload is skipped, counted
    audio.played('{"event":"media"}', 100.05)  # and so is a message without one
    audio.finish()
    await rec.flush()
    assert rec.live_count == 0 and rec.files_written == 1 and audio.invalid_payloads == 2
    params, left, right = read_wav(path)
    assert len(left) == 320


async def test_items_beyond_the_bound_are_dropped_and_counted_a_clear_never(tmp_path: Path) -> None:
    rec = Recordings(tmp_path, clock=lambda: 0.0)
    audio = rec.new_call("c-2")
    audio.start("CA" + "0" * 32, 0.0)
    for n in range(MAX_ITEMS + 5):
        audio.caller(media(b"x" * 160, 20 * (n + 1)))
    audio.clear(0.0)
    assert audio.dropped_items == 5 and audio._items[-1] == 0.0


async def test_a_file_that_cannot_be_written_stops_that_recording_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("not a directory")
    rec = Recordings(tmp_path / "file", clock=lambda: 0.0)
    audio = rec.new_call("c-3")
    audio.start("CA" + "1" * 32, 0.0)
    for _ in range(3):
        audio.caller(media(b"x" * 160, 20))
        await rec.flush()
    assert [r.levelname for r in caplog.records if "recording c-3" in r.message] == ["WARNING"]
    assert rec.failures == 1


def test_prune_deletes_old_files_and_empty_days_only(tmp_path: Path) -> None:
    old_day, new_day = tmp_path / "2026-01-01", tmp_path / "2026-12-01"
    old_day.mkdir()
    new_day.mkdir()
    (old_day / "a.wav").write_bytes(b"x")
    (new_day / "b.wav").write_bytes(b"x")
    (new_day / "keep.txt").write_bytes(b"x")
    os.utime(old_day / "a.wav", (1000, 1000))
    assert prune_files(tmp_path, cutoff_s=2000) == 1
    assert not old_day.exists() and (new_day / "b.wav").exists() and (new_day / "keep.txt").exists()
    assert prune_files(tmp_path / "missing", cutoff_s=2000) == 0


def test_recordings_dir_follows_the_settings() -> None:
    base = {"ASSEMBLYAI_API_KEY": "k" * 32, "HOSTNAME": "https://bridge.example.com"}
    assert recordings_dir(from_env(base)) == Path("data/recordings")
    assert recordings_dir(from_env({**base, "RECORDS_URL": "sqlite:////var/lib/b/calls.db"})) == Path(
        "/var/lib/b/recordings"
    )
    assert recordings_dir(from_env({**base, "RECORDS_URL": "postgresql://u@h/db"})) == Path("data/recordings")
    assert recordings_dir(from_env({**base, "RECORDINGS_DIR": "/srv/wav"})) == Path("/srv/wav")


# --- a real call --------------------------------------------------------------------------------


def tone(seconds: float, hz: float = 440.0) -> bytes:
    n = int(seconds * 8000)
    samples = array("h", (int(8000 * math.sin(2 * math.pi * hz * i / 8000)) for i in range(n)))
    return mulaw.encode(samples.tobytes())


def find(haystack: list[int], needle: list[int]) -> int:
    h = array("h", haystack).tobytes()
    index = h.find(array("h", needle).tobytes())
    while index >= 0 and index % 2:
        index = h.find(array("h", needle).tobytes(), index + 1)
    return index // 2 if index >= 0 else -1


async def finished_recording(bridge: Running) -> Recordings:
    runtime = bridge.app.records_runtime
    assert runtime is not None and runtime.recordings is not None
    with trio.fail_after(20):
        while runtime.recordings.files_written < 1:
            await trio.sleep(0.05)
    return runtime.recordings


async def test_a_real_call_leaves_a_stereo_wav_caller_left_agent_right_cut_at_the_barge_in() -> None:
    caller = tone(1.0)
    config = FakeAgentConfig(api_key=API_KEY, vad=False)
    async with running_bridge(agent_config=config, env={"RECORD_AUDIO": "on", "CONSOLE_TOKEN": TOKEN}) as bridge:

        async def barge_in() -> None:
            session = await bridge.agent.wait_for_session(1)
            with trio.fail_after(20):
                while not session.replies_sent:
                    await trio.sleep(0.02)
            await trio.sleep(1.0)  # 1 s of the greeting
            await bridge.agent.barge_in(session.session_id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(barge_in)
            with trio.fail_after(60):
                result = await bridge.twilio.call(CallPlan(speed=1.0, hangup_after_s=3.0, caller_audio=caller))
        record = await stored_record(bridge, result.call_sid)
        recordings = await finished_recording(bridge)
        greeting = bridge.agent.greeting_audio
        async with httpx.AsyncClient(base_url=bridge.http_base) as http:  # the console's route to it
            served = await http.get(f"/console/calls/{result.call_sid}/recording", headers=AUTH)
            refused = await http.get(f"/console/calls/{result.call_sid}/recording")
    assert result.clears, "the barge-in sent a clear"
    path = Path(record["recording"])
    assert await trio.Path(path).is_file() and path.suffix == ".wav"
    assert path.is_relative_to(recordings.directory) and result.call_sid in path.name
    assert served.status_code == 200 and served.headers["content-type"] == "audio/wav"
    assert served.content == await trio.Path(path).read_bytes() and refused.status_code == 401
    params, left, right = read_wav(path)
    assert (params.nchannels, params.sampwidth, params.framerate) == (2, 2, 8000)
    # The call lasted 3 s: the file is that long, to a frame or two.
    assert abs(len(left) - 3 * 8000) <= 3 * 160

    # Left: the caller, exactly, from the stream's first frame; the agent is not on it.
    assert list(left[: len(caller)]) == pcm(caller)
    assert find(list(left), pcm(greeting[4000:4800])) == -1

    # Right: the greeting from when it played, then cut where the caller barged in.
    g0 = next(i for i, b in enumerate(greeting) if b != S)
    at = find(list(right), pcm(greeting[g0 : g0 + 800]))
    assert at >= 0, "the greeting is on the right channel"
    start = at - g0
    assert result.first_audio_s is not None
    # Placed when it played (the fake agent sends leading silence before the clip). The fake's
    # call time starts before the bridge sees `start`; on a loaded machine that gap alone is
    # a few hundred ms, so this is loose; the cut below is measured from here and is not.
    lead = config.leading_silence_ms * 8
    assert abs(start - lead - result.first_audio_s * 8000) <= 0.5 * 8000, (start - lead, result.first_audio_s * 8000)
    expected = pcm(greeting)
    played = 0
    while start + played < len(right) and played < len(expected) and right[start + played] == expected[played]:
        played += 1
    # What the fake Twilio actually played of the greeting before the clear.
    h0 = result.heard.find(greeting[g0 : g0 + 800]) - g0
    assert h0 >= 0
    heard = 0
    while h0 + heard < len(result.heard) and heard < len(greeting) and result.heard[h0 + heard] == greeting[heard]:
        heard += 1
    assert 0 < played < len(greeting) - 8000, "the greeting is cut, not whole"
    assert abs(played - heard) <= 0.3 * 8000, (played, heard)
    assert find(list(right), pcm(greeting[played + 800 : played + 1600])) == -1  # never played, not in the file
    assert all(s == 0 for s in right[start + played + 800 :]), "nothing after the cut (no reply was asked for)"
