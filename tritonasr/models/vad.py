"""Speech segmentation: FSMN-VAD scores turned into speech segments.

The scores come from the exported `vad` graph (run in chunks, carrying its FSMN caches); the
speech/silence decisions are `tritonasr.models.endpointing`'s, FunASR's rules with the options of the
model's config.yaml (meta.json's `vad_post`), which a request may change (`Endpointing`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tritonasr.models.endpointing import EndpointOptions
from tritonasr.models.fbank import Frontend
from tritonasr.models.meta import read_meta

# FunASR scores whole files in 60 s chunks, carrying the FSMN caches between them.
VAD_CHUNK_FRAMES = 6000


@dataclass(frozen=True)
class VadSpec:
    """What the pipeline needs to know about the exported `vad` graph (its meta.json)."""

    frontend: Frontend
    endpoint: EndpointOptions  # from FunASR's config.yaml model_conf
    fsmn_layers: int
    proj_dim: int
    lorder: int
    cache_frames: int  # the FSMN cache length the graph carries: (lorder - 1) x lstride

    @staticmethod
    def meta(*, frontend: Mapping, vad_post: Mapping, fsmn_layers: int, proj_dim: int, lorder: int,
             cache_frames: int) -> dict:
        """The meta.json keys `load` reads. frontend: FunASR's frontend_conf; vad_post: its
        model_conf."""
        return {
            "frontend": dict(frontend),
            "vad_post": dict(vad_post),
            "encoder": {"fsmn_layers": fsmn_layers, "proj_dim": proj_dim, "lorder": lorder,
                        "cache_frames": cache_frames},
        }

    @classmethod
    def load(cls, model_dir: Path) -> "VadSpec":
        meta = read_meta(model_dir)
        enc = meta["encoder"]
        return cls(Frontend.from_config(meta["frontend"]), EndpointOptions.from_config(meta["vad_post"]),
                   enc["fsmn_layers"], enc["proj_dim"], enc["lorder"], enc.get("cache_frames", enc["lorder"] - 1))

    def zero_caches(self) -> list[np.ndarray]:
        shape = (1, self.proj_dim, self.cache_frames, 1)
        return [np.zeros(shape, dtype=np.float32) for _ in range(self.fsmn_layers)]


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
