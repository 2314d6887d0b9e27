"""What clients and servers agree on, written once: the audio a request may declare, the ASR
engines and languages it may name, the longest stream chunk, per-request endpointing and its presets, and the exit codes of the
client commands.

Light on purpose: the client install imports it, and nothing here imports beyond the standard
library.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

# The rates a request or stream may declare (SAMPLE_RATE): the server resamples to the models' 16 kHz.
SAMPLE_RATES = (8000, 16000)
# A request may carry this many interleaved channels (CHANNEL_COUNT), recognised as their mix or
# one by one (CHANNELS: "mix" or "separate").
MAX_CHANNELS = 8
CHANNEL_MODES = ("mix", "separate")
# What a stream's chunks carry (ENCODING on its START): float32 samples in AUDIO, or the bytes of
# 16-bit little-endian PCM, G.711 mu-law or A-law in AUDIO_BYTES, as telephony sends them.
ENCODINGS = ("float32", "pcm16", "mulaw", "alaw")

ENGINES = ("sensevoice", "parakeet")
LANGUAGES = ("auto", "zh", "en", "yue", "ja", "ko")
# The unit of every size limit and flag named in MB (max_inflight_audio_mb, --max-upload-mb, ...).
MiB = 1 << 20
# asr_stream refuses longer chunks; its `max_chunk_ms` parameter may lower this, never raise it
# past what the clients send.
MAX_CHUNK_MS = 2000


@dataclass(frozen=True)
class Endpointing:
    """How speech is cut into segments, chosen per request (asr_offline) or per stream (on
    asr_stream's START). None keeps the VAD model's own value (FunASR's: 800 ms, 60 s, 150 ms),
    with which a stream's segments equal the offline request's."""

    end_silence_ms: int | None = None  # the silence that ends a segment: what a final waits for
    max_segment_ms: int | None = None  # longer speech is cut into segments of at most this
    speech_start_ms: int | None = None  # speech in the VAD's 200 ms window that opens a segment

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            low, high = ENDPOINTING_LIMITS[f.name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or not low <= value <= high):
                raise ValueError(f"{f.name} must be a whole number of ms from {low} to {high}, got {value!r}")

    def inputs(self) -> dict[str, int]:
        """{input name: value} of every field, KEEP_MODEL_VALUE for those not set. All three go on
        every request: Triton batches only requests that carry the same inputs."""
        return {ENDPOINTING_INPUTS[f.name]: KEEP_MODEL_VALUE if getattr(self, f.name) is None else getattr(self, f.name)
                for f in fields(self)}


# Each Endpointing field's request input (INT32, optional; KEEP_MODEL_VALUE or absent: the VAD
# model's value) and its accepted range (ms).
KEEP_MODEL_VALUE = 0
ENDPOINTING_INPUTS = {"end_silence_ms": "END_SILENCE_MS", "max_segment_ms": "MAX_SEGMENT_MS",
                      "speech_start_ms": "SPEECH_START_MS"}
ENDPOINTING_LIMITS = {"end_silence_ms": (100, 10_000), "max_segment_ms": (1_000, 60_000),
                      "speech_start_ms": (20, 200)}
ENDPOINTING_PRESETS = {
    "default": Endpointing(),
    # Voice assistants answer a turn: finals fast, turns short.
    "assistant": Endpointing(end_silence_ms=300, max_segment_ms=15_000),
    # Dictation: thinking pauses stay inside the sentence.
    "dictation": Endpointing(end_silence_ms=1_500),
    # Live captions: lines that appear soon and stay short.
    "captions": Endpointing(end_silence_ms=500, max_segment_ms=10_000),
}

# The client commands' exit codes. 2 is argparse's own for a usage error.
EXIT_OK = 0
EXIT_FAILED = 1  # a request or file failed (each reported on stderr)
EXIT_USAGE = 2  # bad arguments, or a command this installation lacks the extra for
EXIT_DENIED = 3  # the server refused the caller's key
EXIT_UNREACHABLE = 4  # no server at the address, or the model is not loaded on it

# On SIGTERM `serve` and `gateway` refuse new work and give what is open (streams, requests in
# flight) this long to end before they stop: a rolling update loses no call shorter than it.
DRAIN_SECONDS = 120.0
