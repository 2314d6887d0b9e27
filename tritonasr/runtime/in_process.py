"""The pipelines in-process over ONNX Runtime: the same graphs and logic the server runs, without
Triton (LocalPipeline), and Parakeet's two graphs batched as the served models batch them
(LocalParakeet). Used by benchmarks, the export's parity checks and as a reference in tests."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from tritonasr.contract import Endpointing
from tritonasr.models.parakeet import DECODER_GRAPH, OnnxDecoderJoint, ParakeetSpec, TdtResult, decode_padded
from tritonasr.models.vad import VadSpec
from tritonasr.recognition.engines import build_engines
from tritonasr.recognition.leaf_calls import LeafCalls
from tritonasr.recognition.offline import OfflinePipeline, Recognizer, detect_speech
from tritonasr.recognition.settings import PipelineSettings, SpeakerSettings
from tritonasr.recognition.speakers import build_speaker_stage
from tritonasr.recognition.streaming import LiveStream, StreamKey, StreamOptions, stream_factory
from tritonasr.runtime.onnx_session import OnnxModel


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
        self.calls = LeafCalls(self._infer, PipelineSettings(), speaker_model=speakers.model if speakers else "")
        self.vad = VadSpec.load(repository / self.calls.models.vad_model / "1")
        stage = build_speaker_stage(repository, speakers, self.calls.speaker) if speakers is not None else None
        calls = self.calls
        engines = build_engines(repository, calls.models, calls.sensevoice, calls.parakeet_encoder,
                                calls.parakeet_decoder)
        self.recognizer = Recognizer(engines, default_engine, stage)
        self.pipeline = OfflinePipeline(self.vad, self.recognizer, calls.vad)
        self._new_stream = stream_factory(self.vad, self.recognizer, calls.vad)

    def model(self, name: str, graph: str = "model.onnx") -> OnnxModel:
        """The ONNX Runtime session of served model `name`'s graph, opened on first use."""
        if name not in self._models:
            self._models[name] = OnnxModel(self.repository / name / "1" / graph, self.threads)
        return self._models[name]

    async def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        if model == self.calls.models.parakeet_decoder_model:  # a Python-backend model: its loop, here
            return self._decode(inputs)
        (result,) = self.model(model).run_batch([inputs], outputs)
        return [result[name] for name in outputs]

    def _decode(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        decoder = OnnxDecoderJoint(self.model(self.calls.models.parakeet_decoder_model, DECODER_GRAPH))
        length = int(inputs["encoded_lengths"].reshape(-1)[0])
        (result,) = decode_padded([inputs["encoded"][0, :length]], decoder, self.recognizer.engines["parakeet"].spec.tdt)
        return [result.tokens[None], result.frames[None], result.durations[None]]

    def transcribe(self, samples: np.ndarray, language: str = "auto", use_itn: bool = False,
                   return_embedding: bool = False, engine: str = "", endpointing: Endpointing = Endpointing(),
                   channels: int = 1, separate_channels: bool = False) -> dict:
        return asyncio.run(self.pipeline.transcribe(samples, language, use_itn, return_embedding=return_embedding,
                                                    engine=engine, endpointing=endpointing, channels=channels,
                                                    separate_channels=separate_channels))

    def open_stream(self, options: StreamOptions = StreamOptions()) -> LiveStream:
        """A live stream whose `push` must be awaited inside one event loop."""
        return self._new_stream(StreamKey(0), options)

    def speech_segments(self, samples: np.ndarray) -> list[tuple[int, int]]:
        return asyncio.run(detect_speech(self.vad, self.calls.vad, samples))


class LocalParakeet:
    """parakeet_encoder + parakeet_decoder over local ONNX Runtime, batched the way the served
    models batch: the encoder pads ragged features (OnnxModel.run_batch, as OnnxLeafModel does),
    the decoder decodes every sequence of the batch together."""

    def __init__(self, encoder: OnnxModel, decoder: OnnxModel, spec: ParakeetSpec):
        self.encoder = encoder
        self.decoder_joint = OnnxDecoderJoint(decoder)
        self.spec = spec

    @classmethod
    def from_repository(cls, repository: Path, intra_op_threads: int = 0) -> "LocalParakeet":
        repository = Path(repository)
        encoder = OnnxModel(repository / "parakeet_encoder" / "1" / "model.onnx", intra_op_threads,
                            ragged_inputs=["features"])
        decoder = OnnxModel(repository / "parakeet_decoder" / "1" / DECODER_GRAPH, intra_op_threads)
        return cls(encoder, decoder, ParakeetSpec.load(repository / "parakeet_decoder" / "1"))

    def encode(self, features: list[np.ndarray]) -> list[np.ndarray]:
        """[T_i, n_mels] each -> the encoder's valid output frames [T'_i, D] each. The encoder
        graph needs at least one feature frame (hop_length samples of audio)."""
        if any(f.shape[0] == 0 for f in features):
            raise ValueError("a segment has no feature frames (shorter than one 10 ms hop)")
        requests = [{"features": f[None], "length": np.array([[f.shape[0]]], np.int64)} for f in features]
        results = self.encoder.run_batch(requests, ["encoded", "encoded_lengths"])
        return [r["encoded"][0, :int(r["encoded_lengths"].reshape(-1)[0])] for r in results]

    def transcribe(self, waveforms: list[np.ndarray]) -> list[TdtResult]:
        encoded = self.encode([self.spec.frontend.features(w) for w in waveforms])
        return decode_padded(encoded, self.decoder_joint, self.spec.tdt)
