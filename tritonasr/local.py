"""The offline pipeline in-process over ONNX Runtime: the same graphs and logic the server runs,
without Triton. Used to find segments for benchmarks and as a reference in tests."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from tritonasr.onnx_runner import OnnxModel
from tritonasr.pipeline import AsrSpec, OfflinePipeline
from tritonasr.streaming import LiveStream, StreamOptions, stream_factory
from tritonasr.vad import VadSpec


class LocalPipeline:
    def __init__(self, repository: Path, intra_op_threads: int = 0):
        repository = Path(repository)
        self.vad_model = OnnxModel(repository / "vad" / "1" / "model.onnx", intra_op_threads)
        self.asr_model = OnnxModel(repository / "sensevoice" / "1" / "model.onnx", intra_op_threads)
        vad, asr = VadSpec.load(repository / "vad" / "1"), AsrSpec.load(repository / "sensevoice" / "1")
        self.pipeline = OfflinePipeline(vad, asr, self._run_vad, self._run_asr)
        self._new_stream = stream_factory(vad, asr, self._run_vad, self._run_asr)

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

    def transcribe(self, samples: np.ndarray, language: str = "auto", use_itn: bool = False) -> dict:
        return asyncio.run(self.pipeline.transcribe(samples, language, use_itn))

    def open_stream(self, options: StreamOptions = StreamOptions()) -> LiveStream:
        """A live stream whose `push` must be awaited inside one event loop."""
        return self._new_stream(0, options)

    def speech_segments(self, samples: np.ndarray) -> list[tuple[int, int]]:
        fbank = self.pipeline.vad.frontend.fbank(samples)
        return asyncio.run(self.pipeline.detect_speech(samples, fbank))
