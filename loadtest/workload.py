"""The audio every system under test gets: the same clips and streams, built from the package's
speech corpus (real espeak-ng speech with real pauses), deterministic."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from tritonasr.audio import SAMPLE_RATE, load_audio
from tritonasr.paths import speech_dir

DATA = speech_dir()
SPEECH_FILES = [str(p) for p in sorted((DATA / "speakers").glob("*.wav")) + sorted(DATA.glob("pause_*.wav"))]
GAP_MS = 1000  # longer than FSMN-VAD's 800 ms end silence: every file ends a segment
CLIP_VARIANTS = 4  # different clips per length, so that callers do not all send the same bytes


@lru_cache(maxsize=1)
def speech() -> tuple[np.ndarray, ...]:
    return tuple(load_audio(f).samples for f in SPEECH_FILES)


def joined_speech(audios: tuple[np.ndarray, ...] | list[np.ndarray], index: int, seconds: float,
                  gap_ms: int = GAP_MS) -> np.ndarray:
    """The files from a different starting point per `index`, joined by `gap_ms` of silence,
    until at least `seconds` long."""
    gap = np.zeros(gap_ms * SAMPLE_RATE // 1000, np.float32)
    parts, total, i = [], 0, index
    while total < seconds * SAMPLE_RATE:
        samples = audios[i % len(audios)]
        parts += [gap, samples] if parts else [samples]
        total += samples.size + (gap.size if len(parts) > 1 else 0)
        i += 1
    return np.concatenate(parts)


def clip(seconds: float, variant: int) -> np.ndarray:
    """Exactly `seconds` of joined speech (the last file may be cut short), variant
    `variant % CLIP_VARIANTS` of that length."""
    return joined_speech(speech(), variant % CLIP_VARIANTS, seconds)[: int(seconds * SAMPLE_RATE)]


def all_clips(lengths) -> list[np.ndarray]:
    """Every clip the offline users send, for measurements that must see the same audio."""
    return [clip(s, v) for s in lengths for v in range(CLIP_VARIANTS)]


def stream_audio(seconds: float, variant: int) -> np.ndarray:
    """A caller's audio for one live stream: about `seconds` of joined speech, whole files only."""
    return joined_speech(speech(), variant, seconds)


def seconds(samples: np.ndarray) -> float:
    return samples.size / SAMPLE_RATE
