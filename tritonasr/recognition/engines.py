"""ASR engines: one segment's audio -> its transcript, by SenseVoice or by Parakeet TDT.

The pipelines (offline and streaming) take any engine; which one runs is chosen per request
among those the deployment exported. Model execution is injected as async callables, as for the
VAD, so the same engines run in the Triton BLS models and in-process.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Awaitable, Callable, Protocol

import numpy as np

from tritonasr.errors import InputError
from tritonasr.models.fbank import Extract, Frontend, in_process
from tritonasr.models.meta import META_FILE
from tritonasr.models.parakeet import ParakeetSpec, TdtResult
from tritonasr.models.sensevoice import SenseVoiceSpec
from tritonasr.models.transcript import Segment
from tritonasr.recognition.settings import PipelineSettings

# (features [1,T,560], language id, textnorm id) -> (token ids [T'], number of valid ids)
RunSenseVoice = Callable[[np.ndarray, int, int], Awaitable[tuple[np.ndarray, int]]]
# (mel features [1,T,128]) -> (encoder output [T',D] of the valid frames)
RunParakeetEncoder = Callable[[np.ndarray], Awaitable[np.ndarray]]
# (encoder output [1,T',D]) -> (token ids, their frames, their durations in frames)
RunParakeetDecoder = Callable[[np.ndarray], Awaitable[tuple[np.ndarray, np.ndarray, np.ndarray]]]


def pad_step(frame_ms: float, pad_ms: int) -> int:
    """Frames per padding step: segments padded to whole `pad_ms` come in few shapes, which the
    native backends (no ragged batching) can batch. 0: no padding."""
    return math.ceil(pad_ms / frame_ms) if pad_ms > 0 else 0


def padded_length(frames: int, step: int) -> int:
    return -(-frames // step) * step if step else frames


class AsrEngine(Protocol):
    name: str

    def query(self, language: str, use_itn: bool):
        """The engine's form of the request's options; InputError when it cannot honour them."""

    def shares_fbank(self, frontend: Frontend) -> bool:
        """Whether `transcribe` can take the VAD's fbank rows (computed with `frontend`)."""

    async def transcribe(self, samples: np.ndarray, start_ms: int, end_ms: int, query,
                         fbank: np.ndarray | None = None) -> Segment | None: ...


class SenseVoiceEngine:
    """SenseVoiceSmall: greedy CTC text with language, emotion and event tags."""

    name = "sensevoice"

    def __init__(self, spec: SenseVoiceSpec, run: RunSenseVoice, fbank: Extract | None = None):
        self.spec = spec
        self.run = run
        self.fbank = fbank or in_process(spec.frontend.fbank)

    @property
    def frame_ms(self) -> float:
        """The time step of the features the model takes."""
        return self.spec.frontend.frame_ms

    def query(self, language: str, use_itn: bool) -> tuple[int, int]:
        return self.spec.query_ids(language, use_itn)

    def shares_fbank(self, frontend: Frontend) -> bool:
        return frontend.fbank_options_equal(self.spec.frontend)

    async def transcribe(self, samples: np.ndarray, start_ms: int, end_ms: int, query: tuple[int, int],
                         fbank: np.ndarray | None = None) -> Segment | None:
        feats = self.spec.frontend.lfr(await self.fbank(samples) if fbank is None else fbank)
        if feats.shape[0] == 0:  # shorter than one 25 ms window
            return None
        token_ids, length = await self.run(feats[None], *query)
        rich = self.spec.tokenizer.transcript(token_ids, length, self.spec.blank_id)
        return Segment(start_ms, end_ms, rich.text, rich.language, rich.emotion, rich.event)


class ParakeetEngine:
    """Parakeet TDT (English): text, and each word's start and end from the token durations."""

    name = "parakeet"

    def __init__(self, spec: ParakeetSpec, run_encoder: RunParakeetEncoder, run_decoder: RunParakeetDecoder,
                 mel: Extract | None = None):
        self.spec = spec
        self.run_encoder = run_encoder
        self.run_decoder = run_decoder
        self.mel = mel or in_process(spec.frontend.features)

    @property
    def frame_ms(self) -> float:
        return self.spec.frontend.spec.hop_ms

    def query(self, language: str, use_itn: bool) -> None:
        if language not in ("auto", "en"):
            raise InputError(f"the parakeet engine transcribes English only; language must be auto or en, "
                             f"got {language!r}")
        return None  # Parakeet writes punctuation and capitals itself: use_itn changes nothing

    def shares_fbank(self, frontend: Frontend) -> bool:
        return False  # NeMo's mel features are not kaldi's

    async def transcribe(self, samples: np.ndarray, start_ms: int, end_ms: int, query: None,
                         fbank: np.ndarray | None = None) -> Segment | None:
        feats = await self.mel(samples)
        if feats.shape[0] == 0:
            return None
        encoded = await self.run_encoder(feats[None])
        result = TdtResult(*await self.run_decoder(encoded[None]))
        words = [{**w, "start_ms": w["start_ms"] + start_ms, "end_ms": min(end_ms, w["end_ms"] + start_ms)}
                 for w in self.spec.words(result)]
        return Segment(start_ms, end_ms, self.spec.text(result), language="en", words=words)


def build_engines(repository: Path, models: PipelineSettings, run_sensevoice: RunSenseVoice,
                  run_parakeet_encoder: RunParakeetEncoder, run_parakeet_decoder: RunParakeetDecoder,
                  fbank: Extract | None = None, mel: Extract | None = None) -> dict[str, AsrEngine]:
    """The engines whose models are exported in `repository` (their meta.json is there).
    fbank, mel: served front ends (default: in-process); `fbank` must compute SenseVoice's fbank."""
    repository = Path(repository)
    engines: dict[str, AsrEngine] = {}
    if (repository / models.sensevoice_model / "1" / META_FILE).is_file():
        spec = SenseVoiceSpec.load(repository / models.sensevoice_model / "1")
        engines["sensevoice"] = SenseVoiceEngine(spec, run_sensevoice, fbank)
    if (repository / models.parakeet_decoder_model / "1" / META_FILE).is_file():
        spec = ParakeetSpec.load(repository / models.parakeet_decoder_model / "1")
        engines["parakeet"] = ParakeetEngine(spec, run_parakeet_encoder, run_parakeet_decoder, mel)
    return engines
