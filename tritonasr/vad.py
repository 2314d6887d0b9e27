"""Speech segmentation: FSMN-VAD scores turned into speech segments by FunASR's state machine.

The state machine (speech/noise decision, 200 ms window, end-silence and max-segment rules) is
funasr-onnx's `E2EVadModel`, the same logic FunASR runs; we only drive it chunk by chunk.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from funasr_onnx.utils.e2e_vad import E2EVadModel

from tritonasr.features import Frontend

# FunASR scores whole files in 60 s chunks, carrying the FSMN caches between them.
VAD_CHUNK_FRAMES = 6000


@dataclass(frozen=True)
class VadSpec:
    """What the pipeline needs to know about the exported `vad` graph (its meta.json)."""

    frontend: Frontend
    post: dict  # E2EVadModel options (FunASR config.yaml model_conf)
    fsmn_layers: int
    proj_dim: int
    lorder: int

    @classmethod
    def load(cls, model_dir: Path) -> "VadSpec":
        meta = json.loads((Path(model_dir) / "meta.json").read_text())
        enc = meta["encoder"]
        return cls(Frontend.from_config(meta["frontend"]), meta["vad_post"],
                   enc["fsmn_layers"], enc["proj_dim"], enc["lorder"])

    @property
    def max_end_silence_ms(self) -> int:
        return int(self.post["max_end_silence_time"])

    def zero_caches(self) -> list[np.ndarray]:
        shape = (1, self.proj_dim, self.lorder - 1, 1)
        return [np.zeros(shape, dtype=np.float32) for _ in range(self.fsmn_layers)]


class SegmentTracker:
    """Feeds one recording's VAD scores, in order, to a fresh FunASR state machine.

    Offline, it reports whole segments once they are complete. Online, it also reports a
    segment's start as soon as it is decided: (start_ms, -1), later (-1, end_ms), or
    (start_ms, end_ms) when both fall in one call. The decisions are the same in both modes."""

    def __init__(self, spec: VadSpec, online: bool = False):
        self.spec = spec
        self.online = online
        self.machine = E2EVadModel(spec.post)
        self.machine.decibel = _RecentFrames()

    def feed(self, scores: np.ndarray, waveform: np.ndarray, is_final: bool) -> list[tuple[int, int]]:
        """scores [T, C] for the next T frames, waveform: the samples those frames cover."""
        found = self.machine(scores[None], waveform[None], is_final=is_final,
                             max_end_sil=self.spec.max_end_silence_ms, online=self.online)
        if isinstance(self.machine.decibel, _RecentFrames):  # (a final call resets it to a list)
            self.machine.decibel.forget_before(self.machine.frm_cnt)
        return [(int(s), int(e)) for batch in found for s, e in batch]


class _RecentFrames:
    """The state machine's per-frame energies, indexed by frame number but holding only frames
    not yet decided: E2EVadModel itself keeps one value per 10 ms for the life of a stream
    (~3 MB an hour), and only ever reads the frames of the call in progress."""

    def __init__(self):
        self.values: list[float] = []
        self.first = 0

    def append(self, value: float) -> None:
        self.values.append(value)

    def __getitem__(self, frame: int) -> float:
        if frame < self.first:
            raise IndexError(f"frame {frame} was forgotten (kept from {self.first})")
        return self.values[frame - self.first]

    def forget_before(self, frame: int) -> None:
        del self.values[:frame - self.first]
        self.first = max(self.first, frame)


def chunk_bounds(frames: int, chunk: int = VAD_CHUNK_FRAMES) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, frames)) for start in range(0, frames, chunk)]


def chunk_samples(frontend: Frontend, start: int, stop: int, total_samples: int) -> slice:
    """The samples frames [start, stop) were computed from."""
    hop, win = frontend.samples_per_frame, frontend.samples_per_window
    return slice(start * hop, min(total_samples, (stop - 1) * hop + win))


def split_long_segments(segments: list[tuple[int, int]], max_ms: int, step_ms: int = 10) -> list[tuple[int, int]]:
    """Cut segments longer than `max_ms` into equal pieces (on `step_ms` boundaries):
    SenseVoice is trained on utterances up to 30 s, and long inputs are what runs servers
    out of memory."""
    out = []
    for start, end in segments:
        pieces = max(1, -(-(end - start) // max_ms))
        bounds = [start + round((end - start) * i / pieces / step_ms) * step_ms for i in range(pieces)] + [end]
        out.extend(zip(bounds[:-1], bounds[1:]))
    return out
