"""The offline pipeline: audio -> VAD segments -> SenseVoice -> segments with text and tags.

Model execution is injected as two async callables, so the same logic runs inside the Triton
BLS model (each call an inner inference request) and in-process over ONNX Runtime (tests,
benchmarks).
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np

from tritonasr.audio import AudioError, validate_samples
from tritonasr.features import Frontend
from tritonasr.transcript import Segment, Tokenizer
from tritonasr.vad import SegmentTracker, VadSpec, chunk_bounds, chunk_samples, split_long_segments

SAMPLE_RATE = 16000
# SenseVoice is trained on utterances of at most 30 s.
MAX_ASR_SEGMENT_MS = 30_000

# (features [1,T,400], caches) -> (scores [1,T,C], caches)
RunVad = Callable[[np.ndarray, list[np.ndarray]], Awaitable[tuple[np.ndarray, list[np.ndarray]]]]
# (features [1,T,560], language id, textnorm id) -> (token ids [T'], number of valid ids)
RunAsr = Callable[[np.ndarray, int, int], Awaitable[tuple[np.ndarray, int]]]


@dataclass(frozen=True)
class AsrSpec:
    """What the pipeline needs to know about the exported `sensevoice` graph (its meta.json)."""

    frontend: Frontend
    tokenizer: Tokenizer
    blank_id: int
    lid_dict: dict[str, int]
    textnorm_dict: dict[str, int]

    @classmethod
    def load(cls, model_dir: Path) -> "AsrSpec":
        meta = json.loads((Path(model_dir) / "meta.json").read_text())
        return cls(Frontend.from_config(meta["frontend"]), Tokenizer(Path(model_dir) / "tokenizer.model"),
                   int(meta.get("blank_id", 0)), meta["lid_dict"], meta["textnorm_dict"])

    def query_ids(self, language: str, use_itn: bool) -> tuple[int, int]:
        if language not in self.lid_dict:
            known = ", ".join(sorted(k for k in self.lid_dict if k != "nospeech"))
            raise AudioError(f"unknown language {language!r}; use one of: {known}")
        return self.lid_dict[language], self.textnorm_dict["withitn" if use_itn else "woitn"]


class Recognizer:
    """One segment's features -> SenseVoice -> text and rich tags."""

    def __init__(self, asr: AsrSpec, run_asr: RunAsr):
        self.asr = asr
        self.run_asr = run_asr

    async def recognize(self, feats: np.ndarray, start_ms: int, end_ms: int,
                        query: tuple[int, int]) -> Segment | None:
        if feats.shape[0] == 0:  # shorter than one 25 ms window
            return None
        token_ids, length = await self.run_asr(feats[None], *query)
        rich = self.asr.tokenizer.transcript(token_ids, length, self.asr.blank_id)
        return Segment(start_ms, end_ms, rich.text, rich.language, rich.emotion, rich.event)

    async def recognize_audio(self, samples: np.ndarray, start_ms: int, end_ms: int,
                              query: tuple[int, int]) -> Segment | None:
        return await self.recognize(self.asr.frontend.features(samples), start_ms, end_ms, query)


def check_sample_rate(sample_rate: int) -> None:
    if sample_rate != SAMPLE_RATE:
        raise AudioError(f"audio must be {SAMPLE_RATE} Hz mono; got {sample_rate} Hz (resample it on the client)")


class OfflinePipeline:
    def __init__(self, vad: VadSpec, asr: AsrSpec, run_vad: RunVad, run_asr: RunAsr,
                 max_audio_s: float = 7200.0, max_asr_segment_ms: int = MAX_ASR_SEGMENT_MS):
        self.vad = vad
        self.asr = asr
        self.run_vad = run_vad
        self.recognizer = Recognizer(asr, run_asr)
        self.max_audio_s = max_audio_s
        self.max_asr_segment_ms = max_asr_segment_ms
        # Both models use the same kaldi fbank; when they do, SenseVoice's features are cut from
        # the fbank the VAD already computed (frames are local, so this is exact) instead of
        # computing it twice.
        self._share_fbank = vad.frontend.fbank_options_equal(asr.frontend)

    def check_audio(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        check_sample_rate(sample_rate)
        samples = validate_samples(samples)
        if samples.size > self.max_audio_s * SAMPLE_RATE:
            raise AudioError(f"audio is {samples.size / SAMPLE_RATE:.0f} s long; this server accepts at most "
                             f"{self.max_audio_s:.0f} s per request: split the file")
        return samples

    async def transcribe(self, samples: np.ndarray, language: str = "auto", use_itn: bool = False,
                         sample_rate: int = SAMPLE_RATE) -> dict:
        samples = self.check_audio(samples, sample_rate)
        query = self.asr.query_ids(language, use_itn)
        fbank = self.vad.frontend.fbank(samples)
        speech = await self.detect_speech(samples, fbank)
        pieces = split_long_segments(speech, self.max_asr_segment_ms)
        # All segments go out at once so the sensevoice batcher can batch them.
        segments = await asyncio.gather(*(self.recognize(samples, fbank, s, e, query) for s, e in pieces))
        return {"duration_ms": int(samples.size * 1000 // SAMPLE_RATE),
                "segments": [seg.to_dict() for seg in segments if seg is not None]}

    async def detect_speech(self, samples: np.ndarray, fbank: np.ndarray) -> list[tuple[int, int]]:
        frontend = self.vad.frontend
        tracker = SegmentTracker(self.vad)
        caches = self.vad.zero_caches()
        frames = frontend.num_lfr_frames(fbank.shape[0])
        bounds = chunk_bounds(frames)
        segments: list[tuple[int, int]] = []
        for i, (start, stop) in enumerate(bounds):
            feats = frontend.lfr(fbank, start, stop)[None]
            scores, caches = await self.run_vad(feats, caches)
            wave = samples[chunk_samples(frontend, start, stop, samples.size)]
            segments += tracker.feed(scores[0], wave, is_final=i == len(bounds) - 1)
        return segments

    async def recognize(self, samples: np.ndarray, fbank: np.ndarray, start_ms: int, end_ms: int,
                        query: tuple[int, int]) -> Segment | None:
        frontend = self.asr.frontend
        first, last = start_ms * SAMPLE_RATE // 1000, min(samples.size, end_ms * SAMPLE_RATE // 1000)
        if self._share_fbank and start_ms % frontend.frame_shift == 0:
            frame0 = start_ms // frontend.frame_shift
            seg_fbank = fbank[frame0: frame0 + frontend.num_frames(last - first)]
        else:
            seg_fbank = frontend.fbank(samples[first:last])
        return await self.recognizer.recognize(frontend.lfr(seg_fbank), start_ms, end_ms, query)
