#!/usr/bin/env bash
# Regenerates the speech in tritonasr/data/speech/ and tritonasr/data/sample.wav.
# Needs espeak-ng and sox (Debian: apt-get install espeak-ng sox); the outputs are committed,
# so the tests themselves need neither.
#
# Every file is 16 kHz mono 16-bit PCM WAV. Each utterance has espeak's own leading and
# trailing silence stripped, so the silences written here are exact and all-zero; the
# speech intervals of every file are written to layout.json (milliseconds).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SAMPLES_DIR="$HERE/.."
RATE=16000
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# -R: fixed random seed, -D: no dither, so reruns give identical bytes and silences stay zero.
SOX=(sox -R -D -V1)
FMT=(-r "$RATE" -c 1 -b 16 -e signed-integer)

LAYOUT="$WORK/layout.json"
first_entry=1

# speak OUT VOICE TEXT: one utterance, edge silence stripped, 16 kHz mono s16.
speak() {
  espeak-ng -v "$2" -w "$WORK/raw.wav" "$3"
  # gain -2: headroom so the resampler does not clip loud voices.
  "${SOX[@]}" "$WORK/raw.wav" "${FMT[@]}" "$1" \
    silence 1 1s 0 reverse silence 1 1s 0 reverse gain -2 rate -v "$RATE"
}

# ms SAMPLES: samples to milliseconds, rounded.
ms() { echo $((($1 * 1000 + RATE / 2) / RATE)); }

# build NAME ITEM...: concatenate items into NAME (relative to this directory). An item is either
# a silence length in milliseconds or "VOICE|TEXT".
build() {
  local name=$1; shift
  local parts=() offset=0 n=0 speech="" sep=""
  for item in "$@"; do
    local part="$WORK/part$((n++)).wav"
    if [[ $item =~ ^[0-9]+$ ]]; then
      "${SOX[@]}" -r "$RATE" -c 1 -n "${FMT[@]}" "$part" trim 0 "$((item * RATE / 1000))s"
    else
      local voice=${item%%|*} text=${item#*|}
      speak "$part" "$voice" "$text"
      local len; len=$(soxi -s "$part")
      local span="\"start_ms\": $(ms "$offset"), \"end_ms\": $(ms $((offset + len)))"
      speech+="$sep{$span, \"voice\": \"$voice\", \"text\": \"$text\"}"
      sep=$',\n      '
    fi
    parts+=("$part")
    offset=$((offset + $(soxi -s "$part")))
  done
  mkdir -p "$(dirname "$HERE/$name")"
  "${SOX[@]}" "${parts[@]}" "$HERE/$name"
  ((first_entry)) || printf ',\n' >>"$LAYOUT"
  first_entry=0
  # duration_ms is floored, as Audio.duration_ms does.
  printf '  "%s": {\n    "duration_ms": %d,\n    "speech": [\n      %s\n    ]\n  }' \
    "$name" "$((offset * 1000 / RATE))" "$speech" >>"$LAYOUT"
  echo "$name: $(soxi -d "$HERE/$name")" >&2
}

printf '{\n' >"$LAYOUT"

build one_phrase.wav 500 "en-us|The quick brown fox jumps over the lazy dog." 500

A="en-us|Please call Stella and ask her to bring these things from the store."
B="en-us|It is sunny today, so we will walk to the park."
build pause_0.3s.wav 500 "$A" 300 "$B" 500
build pause_1s.wav 500 "$A" 1000 "$B" 500
build pause_3s.wav 500 "$A" 3000 "$B" 500

build lead_trail_silence.wav 3000 "en-us|Speech begins only after three seconds of silence." 4000

# Gaps range from 0.2 s to 2.5 s; none sits at FSMN-VAD's 0.8 s end-silence threshold.
# The middle run (0.2-0.3 s gaps) is about 32 s of continuous speech: longer than the 30 s
# SenseVoice segment cap, so a pipeline must split it.
build long_70s.wav 500 \
  "en-us|Welcome to the weekly news summary from the city council." 1500 \
  "en-us|The new library on Market Street will open its doors next Monday morning." 200 \
  "en-us|It has more than forty thousand books, a children's corner, and a quiet reading room on the top floor." 600 \
  "en-us|Parking will be free for the first two hours." 2500 \
  "en-us|In other news, the river path is closed for repairs until the end of the month." 400 \
  "en-us|Cyclists should use the bridge road instead." 1000 \
  "en-us|The council thanks everyone for their patience." 2000 \
  "en-us|The summer festival returns this year with music, food stalls, and a fireworks show over the harbour, and the organisers expect more than ten thousand visitors over the three days of the event." 200 \
  "en-us|Tickets can be bought online or at the town hall." 300 \
  "en-us|Anyone interested should send an email to the festival office before the fifteenth." 200 \
  "en-us|The weather forecast for the weekend is mostly sunny, with a light breeze from the west." 250 \
  "en-us|Sunday may bring a few showers in the late afternoon." 200 \
  "en-us|Finally, the school football team won the regional championship for the second year in a row." 300 \
  "en-us|Congratulations to all the players and their coach." 1200 \
  "en-us|That is all for this week." 500 \
  "en-us|Thank you for listening, and see you next time." 500

# Distinct voices for streaming tests, 0.3 s of silence around each.
build speakers/utt01.wav 300 "en-us|Good morning, how can I help you today?" 300
build speakers/utt02.wav 300 "en-gb|I would like to book a table for two at eight o'clock." 300
build speakers/utt03.wav 300 "en+f3|The train to Cambridge leaves from platform nine." 300
build speakers/utt04.wav 300 "en+m4|Please remember to switch off the lights when you leave." 300
build speakers/utt05.wav 300 "en-gb-scotland|It has been raining all week long in Edinburgh and Glasgow." 300
build speakers/utt06.wav 300 "en-us+f2|Can you send me the quarterly report before Friday afternoon, and copy the whole team?" 300
build speakers/utt07.wav 300 "en-us-nyc|Three hundred and forty two people attended the meeting." 300
build speakers/utt08.wav 300 "cmn|今天天气很好，我们去散步吧。" 300

printf '\n}\n' >>"$LAYOUT"
cp "$LAYOUT" "$HERE/layout.json"

mkdir -p "$SAMPLES_DIR"
cp "$HERE/pause_1s.wav" "$SAMPLES_DIR/sample.wav"
