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
from tritonasr.speakers import SpeakerStage
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
    """One segment -> SenseVoice's text and rich tags, and (with a speaker stage) the speaker's
    embedding, computed concurrently."""

    def __init__(self, asr: AsrSpec, run_asr: RunAsr, speakers: SpeakerStage | None = None):
        self.asr = asr
        self.run_asr = run_asr
        self.speakers = speakers

    async def recognize(self, feats: np.ndarray, start_ms: int, end_ms: int,
                        query: tuple[int, int]) -> Segment | None:
        if feats.shape[0] == 0:  # shorter than one 25 ms window
            return None
        token_ids, length = await self.run_asr(feats[None], *query)
        rich = self.asr.tokenizer.transcript(token_ids, length, self.asr.blank_id)
        return Segment(start_ms, end_ms, rich.text, rich.language, rich.emotion, rich.event)

    async def analyse(self, feats: np.ndarray, samples: np.ndarray, start_ms: int, end_ms: int,
                      query: tuple[int, int], with_speaker: bool) -> tuple[Segment | None, np.ndarray | None]:
        """(segment, speaker embedding or None) of a segment's ASR features and audio."""
        if not (with_speaker and self.speakers):
            return await self.recognize(feats, start_ms, end_ms, query), None
        segment, embedding = await asyncio.gather(self.recognize(feats, start_ms, end_ms, query),
                                                  self.speakers.embed(samples))
        return segment, embedding

    async def analyse_audio(self, samples: np.ndarray, start_ms: int, end_ms: int, query: tuple[int, int],
                            with_speaker: bool) -> tuple[Segment | None, np.ndarray | None]:
        return await self.analyse(self.asr.frontend.features(samples), samples, start_ms, end_ms, query,
                                  with_speaker)


def check_sample_rate(sample_rate: int) -> None:
    if sample_rate != SAMPLE_RATE:
        raise AudioError(f"audio must be {SAMPLE_RATE} Hz mono; got {sample_rate} Hz (resample it on the client)")


async def detect_speech(vad: VadSpec, run_vad: RunVad, samples: np.ndarray,
                        fbank: np.ndarray | None = None) -> list[tuple[int, int]]:
    """A whole recording's speech segments (ms), as FunASR's offline VAD finds them."""
    frontend = vad.frontend
    fbank = frontend.fbank(samples) if fbank is None else fbank
    tracker = SegmentTracker(vad)
    caches = vad.zero_caches()
    bounds = chunk_bounds(frontend.num_lfr_frames(fbank.shape[0]))
    segments: list[tuple[int, int]] = []
    for i, (start, stop) in enumerate(bounds):
        scores, caches = await run_vad(frontend.lfr(fbank, start, stop)[None], caches)
        wave = samples[chunk_samples(frontend, start, stop, samples.size)]
        segments += tracker.feed(scores[0], wave, is_final=i == len(bounds) - 1)
    return segments


class OfflinePipeline:
    def __init__(self, vad: VadSpec, recognizer: Recognizer, run_vad: RunVad,
                 max_audio_s: float = 7200.0, max_asr_segment_ms: int = MAX_ASR_SEGMENT_MS):
        self.vad = vad
        self.asr = recognizer.asr
        self.run_vad = run_vad
        self.recognizer = recognizer
        self.max_audio_s = max_audio_s
        self.max_asr_segment_ms = max_asr_segment_ms
        # Both models use the same kaldi fbank; when they do, SenseVoice's features are cut from
        # the fbank the VAD already computed (frames are local, so this is exact) instead of
        # computing it twice.
        self._share_fbank = vad.frontend.fbank_options_equal(self.asr.frontend)

    def check_audio(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        check_sample_rate(sample_rate)
        samples = validate_samples(samples)
        if samples.size > self.max_audio_s * SAMPLE_RATE:
            raise AudioError(f"audio is {samples.size / SAMPLE_RATE:.0f} s long; this server accepts at most "
                             f"{self.max_audio_s:.0f} s per request: split the file")
        return samples

    async def transcribe(self, samples: np.ndarray, language: str = "auto", use_itn: bool = False,
                         sample_rate: int = SAMPLE_RATE, with_speaker: bool = True,
                         return_embedding: bool = False) -> dict:
        """with_speaker: run the speaker stage (when deployed); False skips it for this request."""
        samples = self.check_audio(samples, sample_rate)
        query = self.asr.query_ids(language, use_itn)
        fbank = self.vad.frontend.fbank(samples)
        speech = await detect_speech(self.vad, self.run_vad, samples, fbank)
        pieces = split_long_segments(speech, self.max_asr_segment_ms)
        # All segments go out at once so the leaf models' batchers can batch them.
        speakers = self.recognizer.speakers.session(return_embedding) if with_speaker and self.recognizer.speakers else None
        results = await asyncio.gather(*(self.analyse(samples, fbank, s, e, query, speakers is not None)
                                         for s, e in pieces))
        segments = []
        for segment, embedding in results:  # in order: speaker labels are given in order of speech
            if segment is not None:
                segment.speaker = speakers.describe(embedding) if speakers else None
                segments.append(segment.to_dict())
        return {"duration_ms": int(samples.size * 1000 // SAMPLE_RATE), "segments": segments}

    async def analyse(self, samples: np.ndarray, fbank: np.ndarray, start_ms: int, end_ms: int,
                      query: tuple[int, int], with_speaker: bool) -> tuple[Segment | None, np.ndarray | None]:
        frontend = self.asr.frontend
        first, last = start_ms * SAMPLE_RATE // 1000, min(samples.size, end_ms * SAMPLE_RATE // 1000)
        if self._share_fbank and start_ms % frontend.frame_shift == 0:
            frame0 = start_ms // frontend.frame_shift
            seg_fbank = fbank[frame0: frame0 + frontend.num_frames(last - first)]
        else:
            seg_fbank = frontend.fbank(samples[first:last])
        return await self.recognizer.analyse(frontend.lfr(seg_fbank), samples[first:last], start_ms, end_ms,
                                             query, with_speaker)
