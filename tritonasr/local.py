"""The offline pipeline in-process over ONNX Runtime: the same graphs and logic the server runs,
without Triton. Used to find segments for benchmarks and as a reference in tests."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from tritonasr.onnx_runner import OnnxModel
from tritonasr.pipeline import AsrSpec, OfflinePipeline, Recognizer, detect_speech
from tritonasr.speakers import SpeakerSettings, build_speaker_stage
from tritonasr.streaming import LiveStream, StreamOptions, stream_factory
from tritonasr.vad import VadSpec


class LocalPipeline:
    """`speakers`: the speaker stage's settings (the served models' parameters); None leaves the
    stage out even when the speaker model is exported."""

    def __init__(self, repository: Path, intra_op_threads: int = 0, speakers: SpeakerSettings | None = None):
        repository = Path(repository)
        self.vad_model = OnnxModel(repository / "vad" / "1" / "model.onnx", intra_op_threads)
        self.asr_model = OnnxModel(repository / "sensevoice" / "1" / "model.onnx", intra_op_threads)
        self.vad = VadSpec.load(repository / "vad" / "1")
        stage = None
        if speakers is not None:
            self.speaker_model = OnnxModel(repository / speakers.model / "1" / "model.onnx", intra_op_threads)
            stage = build_speaker_stage(repository, speakers, self._run_speaker)
        recognizer = Recognizer(AsrSpec.load(repository / "sensevoice" / "1"), self._run_asr, stage)
        self.pipeline = OfflinePipeline(self.vad, recognizer, self._run_vad)
        self._new_stream = stream_factory(self.vad, recognizer, self._run_vad)

    async def _run_vad(self, feats, caches):
        feeds = {"speech": feats, **{f"in_cache{i}": c for i, c in enumerate(caches)}}
        out = self.vad_model.run(feeds, ["logits"] + [f"out_cache{i}" for i in range(len(caches))])
        return out["logits"], [out[f"out_cache{i}"] for i in range(len(caches))]

    async def _run_asr(self, feats, language, textnorm):
        out = self.asr_model.run({
            "speech": feats,
            "speech_lengths": np.array([feats.shape[1]], dtype=np.int32),
            "language": np.array([language], dtype=np.int32),
            "textnorm": np.array([textnorm], dtype=np.int32),
        }, ["token_ids", "encoder_out_lens"])
        return out["token_ids"][0], int(out["encoder_out_lens"][0])

    async def _run_speaker(self, feats):
        return self.speaker_model.run({"feats": feats}, ["embedding"])["embedding"][0]

    def transcribe(self, samples: np.ndarray, language: str = "auto", use_itn: bool = False,
                   return_embedding: bool = False) -> dict:
        return asyncio.run(self.pipeline.transcribe(samples, language, use_itn, return_embedding=return_embedding))

    def open_stream(self, options: StreamOptions = StreamOptions()) -> LiveStream:
        """A live stream whose `push` must be awaited inside one event loop."""
        return self._new_stream(0, options)

    def speech_segments(self, samples: np.ndarray) -> list[tuple[int, int]]:
        return asyncio.run(detect_speech(self.vad, self._run_vad, samples))
