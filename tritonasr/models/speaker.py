"""Speaker embeddings of segments: 3D-Speaker's front end, fixed-length windows, one vector each.

A segment's embedding is the mean of its windows' unit embeddings. Windows, not whole segments,
go to the `speaker` model because ERes2NetV2 has no length mask: padding a short segment to
batch it with a long one would change its embedding. Window lengths come in 500 ms steps up to
`window_ms`, so the windows of all segments and streams fall into a few shapes the dynamic
batcher can batch, and nothing is ever padded.
"""
from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np

from tritonasr.models.fbank import Extract, Frontend, in_process
from tritonasr.models.meta import read_meta

# (features [1, T, n_mels], utterance mean removed) -> embedding [D]
RunSpeaker = Callable[[np.ndarray], Awaitable[np.ndarray]]

WINDOW_STEP_MS = 500
# 3D-Speaker's FBank(80, 16000, mean_nor=True) before the mean: torchaudio's kaldi.fbank with its
# defaults (povey window, pre-emphasis 0.97, DC removal, no dither, snip edges, mel bins from
# 20 Hz to Nyquist) on the waveform as it is, in [-1, 1]; kaldi-native-fbank's defaults are the
# same options.
FRONTEND = Frontend(fs=16000, window="povey", n_mels=80, frame_length=25, frame_shift=10,
                    dither=0.0, scale=1.0)


@dataclass(frozen=True)
class SpeakerSpec:
    """What the pipeline needs to know about the exported `speaker` graph (its meta.json)."""

    frontend: Frontend
    embedding_dim: int
    min_frames: int = 1  # the shortest window the graph takes

    @staticmethod
    def meta(*, frontend: Frontend, embedding_dim: int, min_frames: int) -> dict:
        """The meta.json keys `from_meta` reads (the front end without LFR: it has none)."""
        return {"frontend": {k: v for k, v in asdict(frontend).items() if not k.startswith("lfr_")},
                "embedding_dim": embedding_dim, "min_frames": min_frames}

    @classmethod
    def from_meta(cls, meta: Mapping) -> "SpeakerSpec":
        return cls(Frontend.from_config(meta["frontend"]), int(meta["embedding_dim"]),
                   int(meta.get("min_frames", 1)))

    @classmethod
    def load(cls, model_dir: Path) -> "SpeakerSpec":
        return cls.from_meta(read_meta(model_dir))


def speaker_features(samples: np.ndarray, frontend: Frontend = FRONTEND) -> np.ndarray:
    """3D-Speaker's features: kaldi fbank of the [-1, 1] waveform minus its mean over time."""
    return centre(frontend.fbank(samples))


def centre(fbank: np.ndarray) -> np.ndarray:
    return fbank - fbank.mean(axis=0, keepdims=True) if fbank.size else fbank


def window_starts(frames: int, window: int) -> list[int]:
    """Windows of `window` frames covering [0, frames): back to back, the last one flush with
    the end (so it may overlap the one before). Each frame is embedded about once: on a CPU the
    speaker model costs several times what SenseVoice does per second of audio."""
    starts = list(range(0, frames - window + 1, window))
    if starts[-1] != frames - window:
        starts.append(frames - window)
    return starts


class Embedder:
    """One segment's audio -> its unit-length speaker embedding (None when too short)."""

    def __init__(self, spec: SpeakerSpec, run_speaker: RunSpeaker, min_segment_ms: int = 1000,
                 window_ms: int = 3000, fbank: Extract | None = None):
        if min_segment_ms < WINDOW_STEP_MS or window_ms < WINDOW_STEP_MS:
            raise ValueError(f"speaker segments and windows must be at least {WINDOW_STEP_MS} ms")
        self.spec = spec
        self.run_speaker = run_speaker
        self.fbank = fbank or in_process(spec.frontend.fbank)
        self.min_segment_ms = min_segment_ms
        shift = spec.frontend.frame_shift
        self.min_frames = min_segment_ms // shift
        self.window_frames = window_ms // shift
        self.step_frames = WINDOW_STEP_MS // shift

    def windows(self, frames: int) -> list[tuple[int, int]]:
        if frames < max(self.min_frames, self.step_frames):
            return []
        window = min(self.window_frames, frames // self.step_frames * self.step_frames)
        return [(start, start + window) for start in window_starts(frames, window)]

    async def embed(self, samples: np.ndarray) -> np.ndarray | None:
        fbank = await self.fbank(samples)
        windows = self.windows(fbank.shape[0])
        if not windows:
            return None
        # The windows go out together, so the speaker model's batcher sees them at once.
        vectors = await asyncio.gather(*(self.run_speaker(centre(fbank[a:b])[None]) for a, b in windows))
        return unit(np.mean([unit(v) for v in vectors], axis=0))


def unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
