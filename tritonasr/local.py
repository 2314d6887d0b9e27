"""The offline pipeline in-process over ONNX Runtime: the same graphs and logic the server runs,
without Triton. Used to find segments for benchmarks and as a reference in tests."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from tritonasr.onnx_runner import OnnxModel
from tritonasr.engines import EngineModels, build_engines
from tritonasr.pipeline import OfflinePipeline, Recognizer, detect_speech
from tritonasr.speakers import SpeakerSettings, build_speaker_stage
from tritonasr.streaming import LiveStream, StreamKey, StreamOptions, stream_factory
from tritonasr.vad import VadSpec


class LocalPipeline:
    """Every exported ASR engine, the default one first (as the server picks it).
    `speakers`: the speaker stage's settings (the served models' parameters); None leaves the
    stage out even when the speaker model is exported."""

    def __init__(self, repository: Path, intra_op_threads: int = 0, speakers: SpeakerSettings | None = None,
                 default_engine: str = ""):
        repository = Path(repository)
        self.repository = repository
        self.threads = intra_op_threads
        self._models: dict[str, OnnxModel] = {}
        self.vad = VadSpec.load(repository / "vad" / "1")
        self.speaker_model = speakers.model if speakers is not None else ""
        stage = build_speaker_stage(repository, speakers, self._run_speaker) if speakers is not None else None
        self.models = EngineModels()
        engines = build_engines(repository, self.models, self._run_sensevoice, self._run_parakeet_encoder,
                                self._run_parakeet_decoder)
        self.recognizer = Recognizer(engines, default_engine, stage)
        self.pipeline = OfflinePipeline(self.vad, self.recognizer, self._run_vad)
        self._new_stream = stream_factory(self.vad, self.recognizer, self._run_vad)

    def model(self, name: str, graph: str = "model.onnx") -> OnnxModel:
        """The ONNX Runtime session of served model `name`'s graph, opened on first use."""
        if name not in self._models:
            self._models[name] = OnnxModel(self.repository / name / "1" / graph, self.threads)
        return self._models[name]

    async def _run_vad(self, feats, caches):
        feeds = {"speech": feats, **{f"in_cache{i}": c for i, c in enumerate(caches)}}
        out = self.model("vad").run(feeds, ["logits"] + [f"out_cache{i}" for i in range(len(caches))])
        return out["logits"], [out[f"out_cache{i}"] for i in range(len(caches))]

    async def _run_sensevoice(self, feats, language, textnorm):
        out = self.model(self.models.sensevoice).run({
            "speech": feats,
            "speech_lengths": np.array([feats.shape[1]], dtype=np.int32),
            "language": np.array([language], dtype=np.int32),
            "textnorm": np.array([textnorm], dtype=np.int32),
        }, ["token_ids", "encoder_out_lens"])
        return out["token_ids"][0], int(out["encoder_out_lens"][0])

    async def _run_parakeet_encoder(self, feats):
        out = self.model(self.models.parakeet_encoder).run(
            {"features": feats, "length": np.array([feats.shape[1]], dtype=np.int64)}, ["encoded", "encoded_lengths"])
        return out["encoded"][0, :int(out["encoded_lengths"][0])]

    async def _run_parakeet_decoder(self, encoded):
        from tritonasr.tdt import DECODER_GRAPH, OnnxDecoderJoint, greedy_decode

        engine = self.recognizer.engines["parakeet"]
        decoder = OnnxDecoderJoint(self.model(self.models.parakeet_decoder, DECODER_GRAPH))
        (result,) = greedy_decode(encoded, np.array([encoded.shape[1]]), decoder, engine.spec.tdt)
        return result.tokens, result.frames, result.durations

    async def _run_speaker(self, feats):
        return self.model(self.speaker_model).run({"feats": feats}, ["embedding"])["embedding"][0]

    def transcribe(self, samples: np.ndarray, language: str = "auto", use_itn: bool = False,
                   return_embedding: bool = False, engine: str = "") -> dict:
        return asyncio.run(self.pipeline.transcribe(samples, language, use_itn, return_embedding=return_embedding,
                                                    engine=engine))

    def open_stream(self, options: StreamOptions = StreamOptions()) -> LiveStream:
        """A live stream whose `push` must be awaited inside one event loop."""
        return self._new_stream(StreamKey(0), options)

    def speech_segments(self, samples: np.ndarray) -> list[tuple[int, int]]:
        return asyncio.run(detect_speech(self.vad, self._run_vad, samples))
