"""G.711 μ-law <-> PCM16 conversion and 8 kHz mono WAV files, in pure Python.

`audioop` is deprecated (removed in Python 3.13), so the codec is table-driven here. Speed
is fine for test clips and CLI files (a few hundred kB/s); the bridge itself never transcodes.

Invariants: μ-law silence is ``0xFF`` and decodes to PCM 0; ``encode(decode(b)) == b`` for every
byte except ``0x7F`` (negative zero), which re-encodes as ``0xFF``.
"""

from __future__ import annotations

import sys
import wave
from array import array
from pathlib import Path

SAMPLE_RATE_HZ = 8000
BYTES_PER_MS = 8
SILENCE_BYTE = 0xFF

_BIAS = 0x84
_CLIP = 32635

SOX_HINT = "convert it with: sox in.wav -r 8000 -c 1 -b 16 out.wav"


class WavFormatError(ValueError):
    """A WAV file is not 8 kHz mono 16-bit PCM."""


def _decode_byte(u: int) -> int:
    u = ~u & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return -magnitude if sign else magnitude


def _encode_sample(sample: int) -> int:
    sign = 0x80 if sample < 0 else 0
    magnitude = min(-sample if sign else sample, _CLIP) + _BIAS
    exponent = 7
    mask = 0x4000
    while exponent > 0 and not magnitude & mask:
        exponent -= 1
        mask >>= 1
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


_DECODE: tuple[int, ...] = tuple(_decode_byte(u) for u in range(256))
# Indexed by the sample as an unsigned 16-bit value, so lookups need no sign handling.
_ENCODE: bytes = bytes(_encode_sample(s - 65536 if s >= 32768 else s) for s in range(65536))


def decode(ulaw: bytes) -> bytes:
    """μ-law bytes -> little-endian PCM16 bytes (two bytes per input byte)."""
    pcm = array("h", [_DECODE[u] for u in ulaw])
    if sys.byteorder != "little":
        pcm.byteswap()
    return pcm.tobytes()


def encode(pcm16: bytes) -> bytes:
    """Little-endian PCM16 bytes -> μ-law bytes (one per sample); a trailing odd byte is ignored."""
    samples = array("h")
    samples.frombytes(pcm16[: len(pcm16) - len(pcm16) % 2])
    if sys.byteorder != "little":
        samples.byteswap()
    return bytes(_ENCODE[s & 0xFFFF] for s in samples)


def read_wav_ulaw(path: str | Path) -> bytes:
    """Read an 8 kHz mono PCM16 WAV file and return it as μ-law.

    Raises:
        WavFormatError: the file is not 8 kHz mono 16-bit PCM (the message says how to convert).
        wave.Error, OSError: the file is not a WAV file or can't be read.
    """
    with wave.open(str(path), "rb") as wav:
        rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
        if (rate, channels, width) != (SAMPLE_RATE_HZ, 1, 2):
            raise WavFormatError(
                f"{path}: {rate} Hz, {channels} channel(s), {8 * width}-bit; need 8000 Hz mono "
                f"16-bit PCM; {SOX_HINT}"
            )
        return encode(wav.readframes(wav.getnframes()))


def write_wav_from_ulaw(path: str | Path, ulaw: bytes) -> None:
    """Write μ-law audio as an 8 kHz mono PCM16 WAV file (decoded, playable anywhere)."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE_HZ)
        wav.writeframes(decode(ulaw))


def load_caller_audio(path: str | Path) -> bytes:
    """Load caller audio for a simulated call: ``.wav`` (8 kHz mono PCM16) or raw μ-law.

    Raises:
        WavFormatError, wave.Error, OSError: as for `read_wav_ulaw`, or the file can't be read.
    """
    p = Path(path)
    if p.suffix.lower() == ".wav":
        return read_wav_ulaw(p)
    return p.read_bytes()
