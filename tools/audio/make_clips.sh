#!/usr/bin/env bash
# Regenerate the fake agent's canned audio clips.
#
# Output: raw G.711 mu-law, 8000 Hz, mono, no header (byte-identical to what
# Twilio Media Streams and the Voice Agent API exchange with `audio/pcmu`).
# Also writes words.json: each clip's text and word timings (ms from the clip's first sample),
# which clip_words.py gets from libespeak-ng's word events for the same synthesis.
# Needs espeak-ng, sox and python3 (apt-get install espeak-ng sox).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

make_clip() {
  # $1 = output name (without extension), $2 = voice, $3 = text
  local name="$1" voice="$2" text="$3"
  espeak-ng -v "$voice" -s 160 -w "$tmp/$name.wav" "$text"
  # -D: no dither, so reruns are byte-identical. -G: guard against clipping.
  # norm -3: comparable levels across clips.
  sox -D -G "$tmp/$name.wav" -r 8000 -c 1 -t raw -e mu-law "$here/$name.ulaw" norm -3
  python3 "$here/clip_words.py" "$name" "$voice" "$text" "$tmp/$name.wav" >>"$tmp/words.jsonl"
  printf '%-14s %6d bytes  %s\n' "$name.ulaw" "$(stat -c %s "$here/$name.ulaw")" "$text"
}

make_clip greeting en-us   "Hi, thanks for calling. How can I help?"
make_clip reply    en-us   "Sure. Your random number is seven."
make_clip goodbye  en-us   "Thanks for calling, goodbye!"
# The answer after a tool result: one clip per number generate_random_number can return
# (1-10), so what the caller hears agrees with the result; "found" for any other result.
numbers=(one two three four five six seven eight nine ten)
for i in "${!numbers[@]}"; do
  make_clip "number_$((i + 1))" en-us "Sure. Your random number is ${numbers[$i]}."
done
make_clip found    en-us   "Here is what I found."
# make demo's keypad entry: the agent asks for an order number (collect_digits), then answers.
make_clip order_ask   en-us "Sure. Please type your four digit order number."
make_clip order_found en-us "Thanks. That order ships on Monday."
# A different voice for the caller, so demo recordings tell the two sides apart.
make_clip caller   en-us+m3 "Hi, can you pick a random number between one and ten?"
make_clip caller_order en-us+m3 "Can you also check my order?"
python3 "$here/clip_words.py" --merge "$tmp/words.jsonl" >"$here/words.json"
