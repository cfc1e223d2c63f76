"""Pure audio helpers for the fake Voice Agent server: G.711 tables, chunking, energy VAD.

Invariants:
- No I/O and no trio: every function is a pure function of its arguments, so the VAD
  can be tested with tables of (chunk, duration) -> events.
- Canned clips are G.711 mu-law, 8 kHz, mono. They are converted to the session's
  output encoding here (`audio/pcmu` passes through byte-identical).
- Time enters only as durations derived from byte counts (`chunk_ms`), never a clock.
"""

from __future__ import annotations

import array
import base64
import enum
import sys
from dataclasses import dataclass
from functools import lru_cache

PCMU = "audio/pcmu"
PCMA = "audio/pcma"
PCM = "audio/pcm"

#: Sample rate implied by each supported encoding (the API accepts no other rates).
SAMPLE_RATE_HZ: dict[str, int] = {PCMU: 8000, PCMA: 8000, PCM: 24000}
#: Bytes per second of audio for each encoding.
BYTES_PER_S: dict[str, int] = {PCMU: 8000, PCMA: 8000, PCM: 48000}
#: Byte value of digital silence in each encoding.
SILENCE_BYTE: dict[str, int] = {PCMU: 0xFF, PCMA: 0xD5, PCM: 0x00}


def _ulaw_to_linear(byte: int) -> int:
    """Decode one G.711 mu-law byte to a 16-bit linear sample."""
    byte = ~byte & 0xFF
    sign = byte & 0x80
    exponent = (byte >> 4) & 0x07
    mantissa = byte & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return -magnitude if sign else magnitude


def _alaw_to_linear(byte: int) -> int:
    """Decode one G.711 A-law byte to a 16-bit linear sample."""
    byte ^= 0x55
    sign = byte & 0x80
    exponent = (byte >> 4) & 0x07
    mantissa = byte & 0x0F
    segment_base = (mantissa << 4) + (8 if exponent == 0 else 0x108)
    magnitude = segment_base << max(exponent - 1, 0)
    return magnitude if sign else -magnitude


def _linear_to_alaw(sample: int) -> int:
    """Encode one 16-bit linear sample as G.711 A-law."""
    sign = 0x80 if sample >= 0 else 0x00
    # G.711 folds negatives as one's complement (-1 encodes like 0), matching the reference.
    magnitude = (sample if sample >= 0 else -sample - 1) >> 3
    if magnitude < 32:
        code = magnitude >> 1
    else:
        exponent = magnitude.bit_length() - 5
        code = (exponent << 4) | ((magnitude >> exponent) & 0x0F)
    return (sign | code) ^ 0x55


ULAW_TO_LINEAR: tuple[int, ...] = tuple(_ulaw_to_linear(b) for b in range(256))
ALAW_TO_LINEAR: tuple[int, ...] = tuple(_alaw_to_linear(b) for b in range(256))
# Absolute values, so the VAD's per-frame energy is one C-level sum over a table lookup.
_ULAW_ABS: tuple[int, ...] = tuple(abs(v) for v in ULAW_TO_LINEAR)
_ALAW_ABS: tuple[int, ...] = tuple(abs(v) for v in ALAW_TO_LINEAR)
_ULAW_TO_ALAW: bytes = bytes(_linear_to_alaw(v) for v in ULAW_TO_LINEAR)


def mean_abs_level(audio: bytes, encoding: str) -> float:
    """Mean absolute 16-bit sample value of `audio` in `encoding` (0.0 for empty input)."""
    if not audio:
        return 0.0
    if encoding == PCM:
        samples = array.array("h")
        samples.frombytes(audio[: len(audio) & ~1])
        if sys.byteorder == "big":
            samples.byteswap()
        return sum(map(abs, samples)) / max(len(samples), 1)
    table = _ALAW_ABS if encoding == PCMA else _ULAW_ABS
    return sum(map(table.__getitem__, audio)) / len(audio)


def duration_ms(audio_bytes: int, encoding: str) -> float:
    """Playback duration of `audio_bytes` bytes of `encoding`, in milliseconds."""
    return audio_bytes * 1000.0 / BYTES_PER_S[encoding]


@lru_cache(maxsize=32)
def convert_ulaw(ulaw: bytes, encoding: str) -> bytes:
    """Convert 8 kHz mu-law to `encoding` (PCM output is upsampled to 24 kHz by interpolation)."""
    if encoding == PCMU:
        return ulaw
    if encoding == PCMA:
        return ulaw.translate(_ULAW_TO_ALAW)
    linear = [ULAW_TO_LINEAR[b] for b in ulaw]
    out = array.array("h")
    for i, sample in enumerate(linear):
        nxt = linear[i + 1] if i + 1 < len(linear) else sample
        out.extend((sample, (2 * sample + nxt) // 3, (sample + 2 * nxt) // 3))
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()


@lru_cache(maxsize=32)
def reply_chunks_b64(
    ulaw: bytes, encoding: str, chunk_bytes: int, leading_silence_ms: int
) -> tuple[str, ...]:
    """Base64 `reply.audio` payloads for a canned clip: leading silence, then the clip.

    `chunk_bytes` is the chunk size in the output encoding (300 B = 37.5 ms of mu-law).
    """
    body = convert_ulaw(ulaw, encoding)
    silence_bytes = BYTES_PER_S[encoding] * leading_silence_ms // 1000
    if encoding == PCM:
        silence_bytes &= ~1
    audio = bytes([SILENCE_BYTE[encoding]]) * silence_bytes + body
    return tuple(
        base64.b64encode(audio[i : i + chunk_bytes]).decode("ascii")
        for i in range(0, len(audio), chunk_bytes)
    )


@dataclass(frozen=True, slots=True)
class WordTiming:
    """One word of a reply and when it is spoken, in ms against the clip (or reply) audio."""

    word: str
    start_ms: int
    end_ms: int

    def shifted(self, offset_ms: int) -> WordTiming:
        """The same word `offset_ms` later (the reply's leading silence)."""
        return WordTiming(self.word, self.start_ms + offset_ms, self.end_ms + offset_ms)


#: 10 ms analysis windows; a window counts as speech above this mean |sample| (16-bit). The
#: clips' pauses are digital silence (0xFF), their speech is normalised to -3 dBFS.
_SPAN_WINDOW_BYTES = 80
_SPAN_LEVEL = 64.0


def speech_span_ms(ulaw: bytes) -> tuple[int, int]:
    """(first, last) ms of a mu-law clip that hold speech; (0, duration) if none is loud.

    Scans in from both ends, so the cost is the silence, not the clip (tests play minutes).
    """
    windows = range(0, len(ulaw), _SPAN_WINDOW_BYTES)

    def loud(i: int) -> bool:
        return mean_abs_level(ulaw[i : i + _SPAN_WINDOW_BYTES], PCMU) > _SPAN_LEVEL

    first = next((i for i in windows if loud(i)), None)
    if first is None:
        return 0, len(ulaw) // 8
    last = next(i for i in reversed(windows) if loud(i))
    return first // 8, min(last + _SPAN_WINDOW_BYTES, len(ulaw)) // 8


def proportional_words(text: str, ulaw: bytes) -> tuple[WordTiming, ...]:
    """Word timings for a clip whose own timings are unknown: the clip's speech span (after its
    leading silence, before its trailing silence) split across the words of `text` in
    proportion to their length in characters. An estimate, not a measurement: the tools/audio
    clips carry measured timings (words.json); this is for any other audio a test passes."""
    words = text.split()
    if not words:
        return ()
    start_ms, end_ms = speech_span_ms(ulaw)
    total = sum(len(w) for w in words)
    out: list[WordTiming] = []
    done = 0
    for word in words:
        lo = start_ms + (end_ms - start_ms) * done // total
        done += len(word)
        out.append(WordTiming(word, lo, start_ms + (end_ms - start_ms) * done // total))
    return tuple(out)


def spoken_words(words: tuple[WordTiming, ...], heard_ms: float) -> tuple[WordTiming, ...]:
    """The words wholly inside the first `heard_ms` of the reply audio (barge-in truncation)."""
    return tuple(w for w in words if w.end_ms <= heard_ms)


class VadEvent(enum.Enum):
    """What the energy detector decided after a chunk."""

    SPEECH_STARTED = "speech_started"
    SPEECH_STOPPED = "speech_stopped"


@dataclass(slots=True)
class EnergyVad:
    """Energy-threshold voice activity detector over consecutive input chunks.

    Speech starts after `onset_ms` of consecutive loud audio and stops after
    `hangover_ms` of consecutive quiet audio. Durations come from the chunk sizes,
    so the detector follows audio time, not wall time.
    """

    threshold: float = 300.0
    onset_ms: float = 100.0
    hangover_ms: float = 500.0
    in_speech: bool = False
    _loud_ms: float = 0.0
    _quiet_ms: float = 0.0

    def feed(self, level: float, chunk_ms: float) -> VadEvent | None:
        """Account for one chunk with mean level `level` lasting `chunk_ms`; return any edge."""
        if level >= self.threshold:
            self._loud_ms += chunk_ms
            self._quiet_ms = 0.0
            if not self.in_speech and self._loud_ms >= self.onset_ms:
                self.in_speech = True
                return VadEvent.SPEECH_STARTED
        else:
            self._quiet_ms += chunk_ms
            if not self.in_speech:
                self._loud_ms = 0.0
            elif self._quiet_ms >= self.hangover_ms:
                self.in_speech = False
                self._loud_ms = 0.0
                return VadEvent.SPEECH_STOPPED
        return None
