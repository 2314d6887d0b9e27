"""Kaldi fbank and low-frame-rate (LFR) stacking, as FunASR's WavFrontend computes them.

CMVN is not here: the exported graphs apply it themselves, so the server ships no am.mvn.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

import kaldi_native_fbank as knf
import numpy as np


# A front end as the pipelines call it: one waveform in [-1, 1] -> its features [frames, bins].
# On CPU it runs in-process (kaldi-native-fbank, numpy); on GPU targets it is a served front-end
# model, which batches the waveforms of many requests on the device.
Extract = Callable[[np.ndarray], Awaitable[np.ndarray]]


def in_process(compute: Callable[[np.ndarray], np.ndarray]) -> Extract:
    async def extract(samples: np.ndarray) -> np.ndarray:
        return compute(samples)

    return extract


def in_pieces(extract: Extract, frontend: "Frontend", piece_s: float = 60.0) -> Extract:
    """A served kaldi fbank for long audio: a kaldi frame (snip_edges) depends only on its own
    window, so a recording's fbank is its pieces' fbanks end to end, each piece reaching one
    window past its last frame's start. Pieces of equal length batch together on the device,
    and a two-hour file never travels, or sits on the GPU, in one piece."""
    hop, window = frontend.samples_per_frame, frontend.samples_per_window
    piece_frames = max(1, int(piece_s * frontend.fs) // hop)

    async def extract_in_pieces(samples: np.ndarray) -> np.ndarray:
        total = frontend.num_frames(samples.size)
        if total <= piece_frames:
            return await extract(samples)
        pieces = [samples[first * hop:(min(first + piece_frames, total) - 1) * hop + window]
                  for first in range(0, total, piece_frames)]
        return np.concatenate(await asyncio.gather(*(extract(piece) for piece in pieces)))

    return extract_in_pieces


@dataclass(frozen=True)
class Frontend:
    fs: int = 16000
    window: str = "hamming"
    n_mels: int = 80
    frame_length: int = 25
    frame_shift: int = 10
    lfr_m: int = 1
    lfr_n: int = 1
    dither: float = 0.0
    # FunASR feeds kaldi the int16 range; 3D-Speaker feeds the waveform as is, in [-1, 1].
    scale: float = 32768.0

    @classmethod
    def from_config(cls, conf: dict) -> "Frontend":
        """Build from a FunASR `frontend_conf` mapping, ignoring keys we do not use (cmvn_file…)."""
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in conf.items() if k in known})

    @property
    def frame_ms(self) -> int:
        """The time step of the (LFR) features: what one row the models take stands for."""
        return self.frame_shift * self.lfr_n

    @property
    def samples_per_frame(self) -> int:
        return self.fs * self.frame_shift // 1000

    @property
    def samples_per_window(self) -> int:
        return self.fs * self.frame_length // 1000

    @property
    def dim(self) -> int:
        return self.n_mels * self.lfr_m

    def fbank_options_equal(self, other: "Frontend") -> bool:
        fields = ("fs", "window", "n_mels", "frame_length", "frame_shift", "dither", "scale")
        return all(getattr(self, f) == getattr(other, f) for f in fields)

    def online_fbank(self) -> knf.OnlineFbank:
        return knf.OnlineFbank(self._options())

    def _options(self) -> knf.FbankOptions:
        opts = knf.FbankOptions()
        opts.frame_opts.samp_freq = self.fs
        opts.frame_opts.dither = self.dither
        opts.frame_opts.window_type = self.window
        opts.frame_opts.frame_shift_ms = float(self.frame_shift)
        opts.frame_opts.frame_length_ms = float(self.frame_length)
        opts.frame_opts.snip_edges = True
        opts.mel_opts.num_bins = self.n_mels
        opts.energy_floor = 0.0
        return opts

    def num_frames(self, num_samples: int) -> int:
        """Frames kaldi produces for `num_samples` with snip_edges (only whole windows)."""
        if num_samples < self.samples_per_window:
            return 0
        return 1 + (num_samples - self.samples_per_window) // self.samples_per_frame

    def fbank(self, waveform: np.ndarray) -> np.ndarray:
        """[T, n_mels] float32 log-mel fbank of a float waveform in [-1, 1]."""
        fbank = self.online_fbank()
        fbank.accept_waveform(self.fs, np.asarray(waveform, dtype=np.float32) * self.scale)
        fbank.input_finished()
        count = fbank.num_frames_ready
        out = np.empty((count, self.n_mels), dtype=np.float32)
        for i in range(count):
            out[i] = fbank.get_frame(i)
        return out

    def lfr(self, fbank: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
        """LFR frames [start, stop): `lfr_m` fbank frames stacked every `lfr_n` frames.

        FunASR pads both edges by repeating the first and last frame; clipping the frame
        index into [0, T-1] is the same thing, and lets a caller take any range of rows
        without building the whole (large) matrix."""
        frames = fbank.shape[0]
        total = self.num_lfr_frames(frames)
        stop = total if stop is None else min(stop, total)
        if frames == 0 or stop <= start:
            return np.zeros((0, self.dim), dtype=np.float32)
        index = self.lfr_index(start, stop, frames)
        return fbank[index].reshape(stop - start, self.dim).astype(np.float32, copy=False)

    def lfr_index(self, start: int, stop: int, fbank_frames: int) -> np.ndarray:
        """[stop - start, lfr_m] fbank frame numbers stacked into LFR frames [start, stop)."""
        m, n = self.lfr_m, self.lfr_n
        index = np.arange(start, stop)[:, None] * n + np.arange(m)[None, :] - (m - 1) // 2
        return np.clip(index, 0, fbank_frames - 1, out=index)

    def lfr_frames_ready(self, fbank_frames: int) -> int:
        """LFR frames computable from the first `fbank_frames` of audio that is still growing:
        each needs its right-hand context (lfr_m // 2 frames) to exist."""
        right = self.lfr_m - 1 - (self.lfr_m - 1) // 2
        return max(0, (fbank_frames - 1 - right) // self.lfr_n + 1)

    def num_lfr_frames(self, fbank_frames: int) -> int:
        return -(-fbank_frames // self.lfr_n)

    def features(self, waveform: np.ndarray) -> np.ndarray:
        """LFR features (before CMVN) of a waveform: what the exported graphs take."""
        return self.lfr(self.fbank(waveform))
