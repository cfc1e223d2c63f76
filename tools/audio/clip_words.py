"""Word timings of an espeak-ng clip, from espeak-ng itself (used by make_clips.sh).

The espeak-ng CLI prints no word timing for its own voices (``--pho`` is for mbrola voices
only), but the library it is built on reports a word event with the sample position of every
word it synthesises. This script synthesises the text again through libespeak-ng with the
CLI's settings, checks that the samples are the ones the CLI wrote to the WAV (they are the
same synthesis; the CLI only appends trailing silence), and prints one JSON line::

    {"name": "reply", "text": "...", "words": [["Sure.", 13, 438], ["Your", 788, 953], ...]}

A word runs from its first to its last non-zero sample between its own word event and the next
word's (espeak-ng's pauses are exact zeros), in ms from the clip's first sample. sox's
resampling to 8 kHz and ``norm`` keep those times. ``--merge FILE...`` joins such lines into the
``words.json`` the fake agent reads (sorted, so reruns are byte-identical).

Needs only the standard library and libespeak-ng.so.1 (Debian: espeak-ng).
"""

from __future__ import annotations

import array
import ctypes
import json
import sys
import wave
from typing import Any

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE = 1
_POS_CHARACTER = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_WORDS_PER_MINUTE = 160  # make_clips.sh runs espeak-ng -s 160


class _Event(ctypes.Structure):
    # espeak_EVENT from speak_lib.h (the union `id` is 8 bytes wide).
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


def synthesise(voice: str, text: str) -> tuple[int, array.array[int], list[tuple[int, int]]]:
    """(sample rate, samples, [(1-based text position, sample index) per word event])."""
    lib = ctypes.CDLL("libespeak-ng.so.1")
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0)
    if rate <= 0:
        raise SystemExit("clip_words: espeak_Initialize failed")
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise SystemExit(f"clip_words: unknown voice {voice!r}")
    lib.espeak_SetParameter(_ESPEAK_RATE, _WORDS_PER_MINUTE, 0)
    samples: array.array[int] = array.array("h")
    words: list[tuple[int, int]] = []

    def on_audio(wav: Any, n: int, events: Any) -> int:
        if wav and n > 0:
            samples.extend(wav[:n])
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            if events[i].type == _EVENT_WORD:
                words.append((events[i].text_position, events[i].sample))
            i += 1
        return 0

    callback = _Callback(on_audio)  # kept alive until synthesis is over
    lib.espeak_SetSynthCallback(callback)
    data = text.encode()
    lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, 0, None, None)
    lib.espeak_Synchronize()
    return rate, samples, words


def word_timings(text: str, rate: int, samples: array.array[int], events: list[tuple[int, int]]) -> list[list[Any]]:
    """[[token, start_ms, end_ms], ...] for the whitespace-separated tokens of `text`."""
    tokens: list[tuple[str, int]] = []  # (token, 1-based position of its first character)
    pos = 0
    for token in text.split():
        pos = text.index(token, pos)
        tokens.append((token, pos + 1))
        pos += len(token)
    starts: list[int] = []
    for token, first in tokens:
        inside = [s for p, s in events if first <= p < first + len(token)]
        if not inside:
            raise SystemExit(f"clip_words: espeak-ng reported no word event for {token!r}")
        starts.append(min(inside))
    out: list[list[Any]] = []
    for i, (token, _) in enumerate(tokens):
        lo, hi = starts[i], starts[i + 1] if i + 1 < len(starts) else len(samples)
        loud = [j for j in range(lo, hi) if samples[j] != 0]
        if not loud:
            raise SystemExit(f"clip_words: no audio for {token!r}")
        start_ms = loud[0] * 1000 // rate
        end_ms = -(-(loud[-1] + 1) * 1000 // rate)  # ceiling: the word's last sample is inside
        out.append([token, start_ms, end_ms])
    for i in range(len(out) - 1):  # ms rounding must not make neighbours overlap
        out[i][2] = min(out[i][2], out[i + 1][1])
    return out


def main(argv: list[str]) -> int:
    """``NAME VOICE TEXT WAV`` prints one clip's line; ``--merge FILE...`` prints words.json."""
    if argv[:1] == ["--merge"]:
        clips: dict[str, Any] = {}
        for path in argv[1:]:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    entry = json.loads(line)
                    clips[entry["name"]] = {"text": entry["text"], "words": entry["words"]}
        lines = [f"{json.dumps(k)}: {json.dumps(clips[k], ensure_ascii=False)}" for k in sorted(clips)]
        print("{\n" + ",\n".join(lines) + "\n}")  # one clip a line: readable diffs
        return 0
    name, voice, text, wav_path = argv
    rate, samples, events = synthesise(voice, text)
    with wave.open(wav_path) as wav:
        cli = array.array("h", wav.readframes(wav.getnframes()))
        if wav.getframerate() != rate or wav.getsampwidth() != 2:
            raise SystemExit("clip_words: the CLI's WAV is not 16-bit at espeak-ng's rate")
    if sys.byteorder == "big":
        cli.byteswap()
    if cli[: len(samples)] != samples or any(cli[len(samples) :]):
        raise SystemExit(f"clip_words: libespeak-ng's samples differ from the CLI's for {name!r}")
    print(json.dumps({"name": name, "text": text, "words": word_timings(text, rate, samples, events)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
