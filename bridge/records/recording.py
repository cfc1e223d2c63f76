"""``RECORD_AUDIO=on``: one stereo WAV per call (caller left, agent right as heard), the I/O shell
around the pure :class:`~bridge.records.audio.StereoTimeline`.

The call's hot path only appends: :meth:`CallAudio.caller` keeps the parsed Twilio ``Media``
event (already made; nothing is decoded), :meth:`CallAudio.played` a (message, time) pair per
``media`` message the session's Twilio writer has just sent (so agent audio is placed when it was
written, and audio dropped before that never counts), :meth:`CallAudio.clear` the time of a
``clear``. ONE writer task per process (:meth:`Recordings.run`) wakes every ``FLUSH_S``, takes
each live call's list, and in ONE worker thread for all calls parses and decodes, places the
audio on the timeline, turns what is final into PCM16 stereo and appends it to the call's WAV.
:mod:`wave` rewrites the header's sizes after every append, so the file on disk is always a
valid WAV of everything final so far; a finished call gets its last append and its file closed
on the next pass (woken at once).

Bounds: at most ``MAX_ITEMS`` appended items per call wait for the writer (about 20 s of audio;
a writer that far behind means the disk is stuck): later ones are dropped and counted, and the
caller's ``timestamp`` turns the hole into silence. The timeline holds at most the agent audio
queued ahead of playback (``audio.MAX_AHEAD_S``) plus a pass of caller audio.

Errors: a file that cannot be written (disk full, permissions) stops that call's recording with
one warning; calls never notice. A recording that gets no audio for ``IDLE_S`` (its call's
recorder was dropped after a bug) is closed as it is.

Files: ``<directory>/<YYYY-MM-DD>/<CallSid>-<call_id>.wav`` (the CallSid reduced to letters and
digits: a hostile one cannot name another path). Retention: files whose last write is older than
``retention_days`` are deleted at start-up and daily, the records' cut-off.

Cancellation of :meth:`Recordings.run` (server shutdown): every live recording gets a last,
shielded write of at most ``CLOSE_S`` and is closed.
"""

from __future__ import annotations

import binascii
import logging
import re
import time
import wave
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import orjson
import trio

from bridge.phone import media as tw
from bridge.records.audio import SAMPLE_RATE_HZ, StereoTimeline, decode_stereo

log = logging.getLogger("bridge.records")

FLUSH_S = 1.0  # memory per call is about this much caller audio; a WAV lags the call by as much
CLOSE_S = 5.0  # at shutdown: the last write of every live recording
IDLE_S = 60.0  # a live call always has caller audio (Twilio sends it continuously)
PRUNE_EVERY_S = 24 * 3600.0
# Items (caller frames at 20 ms, agent chunks, clears) waiting for the writer per call: 1000 is
# about 20 s of a call; at FLUSH_S a healthy writer never holds more than ~100.
MAX_ITEMS = 1000
_UNSAFE = re.compile(r"[^A-Za-z0-9]")

_Item = tw.Media | tuple[str, float] | float


class CallAudio:
    """One call's recording (``bridge.call.ports.AudioRecorderPort``).

    The event loop calls ``caller``/``played``/``clear``/``start``/``finish``; only the writer (in
    its thread) touches the timeline and the file.
    """

    __slots__ = (
        "_failed",
        "_file",
        "_idle_since",
        "_items",
        "_origin",
        "_owner",
        "_timeline",
        "_wav",
        "call_id",
        "dropped_items",
        "finished",
        "invalid_payloads",
        "path",
        "written_samples",
    )

    def __init__(self, owner: Recordings, call_id: str) -> None:
        self._owner = owner
        self.call_id = call_id
        self._items: list[_Item] = []
        self._origin = 0.0  # the call's clock at the stream's start
        self._idle_since: float | None = None
        self.path: Path | None = None
        self.finished = False
        self.dropped_items = 0
        self.invalid_payloads = 0
        self.written_samples = 0
        self._timeline = StereoTimeline()
        self._wav: wave.Wave_write | None = None
        self._file: BinaryIO | None = None
        self._failed = False

    # --- the port (event loop) ----------------------------------------------------------------

    def caller(self, event: tw.Media) -> None:
        """One Twilio media frame (its payload is decoded by the writer, not here)."""
        items = self._items
        if len(items) < MAX_ITEMS:
            items.append(event)
        else:
            self.dropped_items += 1

    def played(self, frame: str, now: float) -> None:
        """A ``media`` message written to Twilio at ``now`` (parsed by the writer, not here)."""
        items = self._items
        if len(items) < MAX_ITEMS:
            items.append((frame, now))
        else:
            self.dropped_items += 1

    def clear(self, now: float) -> None:
        """A ``clear`` went to Twilio: its unplayed agent audio is not in the file."""
        self._items.append(now)  # never dropped: a lost clear would put unheard audio in the file

    def start(self, call_sid: str, now: float) -> str:
        """The stream started: the file's name and the clock's origin. Returns the path."""
        self._origin = now
        self.path = self._owner.path_for(call_sid, self.call_id)
        self._owner.started(self)
        return str(self.path)

    def finish(self) -> None:
        """The call is over: the writer closes the file on its next pass (woken now)."""
        if not self.finished:
            self.finished = True
            self._owner.wake()

    # --- the writer (worker thread) -----------------------------------------------------------

    def write(self, items: list[_Item], now: float, final: bool) -> None:
        """Place ``items``, append what is final to the WAV (opened on first use); ``final``
        appends everything and closes it. Raises OSError / wave.Error when the file fails."""
        if self._failed or self.path is None:
            return
        timeline, origin, rate = self._timeline, self._origin, SAMPLE_RATE_HZ
        a2b = binascii.a2b_base64
        for item in items:
            kind = type(item)
            try:
                if kind is tuple:
                    frame, at = item  # type: ignore[misc]
                    payload = orjson.loads(frame)["media"]["payload"]
                    timeline.agent(a2b(payload), round((at - origin) * rate))
                elif kind is float:
                    timeline.clear(round((item - origin) * rate))  # type: ignore[operator]
                else:
                    timeline.caller(a2b(item.payload), item.timestamp_ms)  # type: ignore[union-attr]
            except (binascii.Error, ValueError, KeyError, TypeError):  # orjson's errors are ValueErrors
                self.invalid_payloads += 1
        timeline.tick(round((now - origin) * rate))
        left, right = timeline.take(final=final)
        wav = self._wav
        if wav is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Both stay open across passes (one call's file); _close closes them.
            self._file = open(self.path, "wb")  # noqa: SIM115
            wav = wave.open(self._file, "wb")  # noqa: SIM115
            wav.setnchannels(2)
            wav.setsampwidth(2)
            wav.setframerate(rate)
            self._wav = wav
        if left:
            wav.writeframes(decode_stereo(left, right))  # then the header's sizes are rewritten
            self.written_samples += len(left)
            assert self._file is not None
            self._file.flush()  # a reader (the console) sees a valid WAV of everything so far
        if final:
            self._close()

    def fail(self) -> None:
        """Writing failed: no more of this call is recorded; the file keeps what was written."""
        self._failed = True
        with suppress(OSError, wave.Error):
            self._close()

    def _close(self) -> None:
        wav, self._wav = self._wav, None
        file, self._file = self._file, None
        try:
            if wav is not None:
                wav.close()  # the final header; the file is ours to close
        finally:
            if file is not None:
                file.close()


class Recordings:
    """The recordings of one process: a :class:`CallAudio` per call and the one writer task.

    Args:
        directory: where the WAV files go (``RECORDINGS_DIR``).
        retention_days: files older than this are deleted (0 keeps them for ever).
        clock: the calls' monotonic clock; wall_clock: epoch seconds (file dates, retention).
    """

    def __init__(
        self,
        directory: Path,
        *,
        retention_days: int = 30,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory.absolute()
        self.retention_days = retention_days
        self.clock = clock
        self.wall_clock = wall_clock
        self._live: dict[CallAudio, None] = {}  # started, not yet closed (insertion-ordered set)
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(1)  # one writer thread: the timelines are not shared
        self.files_written = 0
        self.failures = 0

    def new_call(self, call_id: str) -> CallAudio:
        return CallAudio(self, call_id)

    def path_for(self, call_sid: str, call_id: str) -> Path:
        day = datetime.fromtimestamp(self.wall_clock(), tz=UTC).strftime("%Y-%m-%d")
        sid = _UNSAFE.sub("", call_sid)[:40] or "unknown"
        return self.directory / day / f"{sid}-{_UNSAFE.sub('', call_id)[:40]}.wav"

    def started(self, audio: CallAudio) -> None:
        self._live[audio] = None

    def wake(self) -> None:
        self._wake.set()

    @property
    def live_count(self) -> int:
        return len(self._live)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer, until cancelled (see the module docstring for cancellation)."""
        task_status.started()
        try:
            await self._check_directory()
            next_prune = trio.current_time()
            while True:
                if self.retention_days and trio.current_time() >= next_prune:
                    await self._prune()
                    next_prune = trio.current_time() + PRUNE_EVERY_S
                with trio.move_on_after(FLUSH_S):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self.flush()
        finally:
            with trio.move_on_after(CLOSE_S, shield=True):
                await self.flush(final=True)

    async def flush(self, *, final: bool = False) -> None:
        """One pass over the live recordings (``final``: close them all)."""
        now = self.clock()
        jobs: list[tuple[CallAudio, list[_Item], bool]] = []
        for audio in list(self._live):
            items, audio._items = audio._items, []
            if items:
                audio._idle_since = None
            elif audio._idle_since is None:
                audio._idle_since = now
            done = final or audio.finished or (audio._idle_since is not None and now - audio._idle_since >= IDLE_S)
            if done:
                del self._live[audio]
            jobs.append((audio, items, done))
        if jobs:
            await trio.to_thread.run_sync(self._write, jobs, now, limiter=self._limiter)

    def _write(self, jobs: list[tuple[CallAudio, list[_Item], bool]], now: float) -> None:
        for audio, items, done in jobs:
            try:
                audio.write(items, now, done)
            except (OSError, wave.Error) as exc:
                self.failures += 1
                log.warning("recording %s: cannot write %s (%s); no more of it is kept", audio.call_id, audio.path, exc)
                audio.fail()
                continue
            if done and not audio._failed:
                self.files_written += 1
                if audio.dropped_items or audio.invalid_payloads:
                    log.warning(
                        "recording %s: %d audio item(s) dropped (the writer was behind), %d invalid payload(s)",
                        audio.call_id,
                        audio.dropped_items,
                        audio.invalid_payloads,
                    )

    async def _check_directory(self) -> None:
        try:
            await trio.Path(self.directory).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning(
                "RECORD_AUDIO=on but %s cannot be created (%s): set RECORDINGS_DIR to a writable directory",
                self.directory,
                exc,
            )

    async def _prune(self) -> None:
        cutoff = self.wall_clock() - self.retention_days * 86400.0
        removed = await trio.to_thread.run_sync(prune_files, self.directory, cutoff, abandon_on_cancel=True)
        if removed:
            log.info("recordings: deleted %d file(s) older than %d days", removed, self.retention_days)


def prune_files(directory: Path, cutoff_s: float) -> int:
    """Delete ``<directory>/<day>/*.wav`` last written before ``cutoff_s`` (and emptied day
    directories). Blocking; errors on single files are skipped (tried again next time)."""
    removed = 0
    try:
        days = [d for d in directory.iterdir() if d.is_dir()]
    except OSError:
        return 0
    for day in days:
        try:
            files = list(day.glob("*.wav"))
            for path in files:
                try:
                    if path.stat().st_mtime < cutoff_s:
                        path.unlink()
                        removed += 1
                except OSError:
                    continue
            if not any(day.iterdir()):
                day.rmdir()
        except OSError:
            continue
    return removed


__all__ = ["CLOSE_S", "FLUSH_S", "MAX_ITEMS", "CallAudio", "Recordings", "prune_files"]
