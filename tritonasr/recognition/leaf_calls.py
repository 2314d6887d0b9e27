"""Each leaf model's call, written once: what the pipelines feed the vad, ASR, speaker and front-end
models, and what they take from their outputs. A runtime supplies only `Infer`, how to run a
model on named inputs: Triton's BLS requests in the served pipelines (tritonasr.runtime.triton_backend),
ONNX Runtime in-process (tritonasr.runtime.in_process).

Inputs are shaped as the served configs declare them: a batch axis of one request first, and
per-request scalars as [1, 1] (dims [1]).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np

from tritonasr.models.fbank import Extract
from tritonasr.recognition.engines import padded_length
from tritonasr.recognition.settings import PipelineSettings

# infer(model name, {input name: array}, [output names]) -> the outputs, in that order.
Infer = Callable[[str, dict[str, np.ndarray], list[str]], Awaitable[list[np.ndarray]]]


def _scalar(value: int, dtype) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


class LeafCalls:
    """The calls of one pipeline instance. `pad_steps`: per ASR engine, the frame multiple its
    features are zero-padded to (GPU targets, so that native backends batch equal shapes; the
    true length travels beside them and the graphs mask by it); empty: no padding."""

    def __init__(self, infer: Infer, models: PipelineSettings, speaker_model: str = ""):
        self.infer = infer
        self.models = models
        self.speaker_model = speaker_model
        self.pad_steps: dict[str, int] = {}

    def _padded(self, feats: np.ndarray, engine: str) -> np.ndarray:
        frames = feats.shape[1]
        extra = padded_length(frames, self.pad_steps.get(engine, 0)) - frames
        return np.pad(feats, ((0, 0), (0, extra), (0, 0))) if extra else feats

    async def vad(self, feats: np.ndarray, caches: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """FSMN-VAD scores of `feats` [1, T, 400] and the FSMN caches to carry to the next call."""
        inputs = {"speech": feats, **{f"in_cache{i}": c for i, c in enumerate(caches)}}
        outputs = ["logits"] + [f"out_cache{i}" for i in range(len(caches))]
        scores, *caches = await self.infer(self.models.vad_model, inputs, outputs)
        return scores, caches

    async def sensevoice(self, feats: np.ndarray, language: int, textnorm: int) -> tuple[np.ndarray, int]:
        """SenseVoice's token ids of `feats` [1, T, 560] and how many of them are valid."""
        inputs = {
            "speech": self._padded(feats, "sensevoice"),
            "speech_lengths": _scalar(feats.shape[1], np.int32),
            "language": _scalar(language, np.int32),
            "textnorm": _scalar(textnorm, np.int32),
        }
        token_ids, lengths = await self.infer(self.models.sensevoice_model, inputs, ["token_ids", "encoder_out_lens"])
        return token_ids[0], int(lengths.reshape(-1)[0])

    async def parakeet_encoder(self, feats: np.ndarray) -> np.ndarray:
        """Parakeet's encoder frames [T', D] of mel `feats` [1, T, n_mels], the valid ones only."""
        inputs = {"features": self._padded(feats, "parakeet"), "length": _scalar(feats.shape[1], np.int64)}
        encoded, lengths = await self.infer(self.models.parakeet_encoder_model, inputs, ["encoded", "encoded_lengths"])
        return encoded[0, :int(lengths.reshape(-1)[0])]

    async def parakeet_decoder(self, encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy TDT decoding of `encoded` [1, T', D]: tokens, their frames and durations."""
        inputs = {"encoded": encoded, "encoded_lengths": _scalar(encoded.shape[1], np.int64)}
        tokens, frames, durations = await self.infer(self.models.parakeet_decoder_model, inputs,
                                                     ["tokens", "frames", "durations"])
        return tokens[0], frames[0], durations[0]

    async def speaker(self, feats: np.ndarray) -> np.ndarray:
        """The speaker embedding of fbank `feats` [1, T, 80]."""
        (embedding,) = await self.infer(self.speaker_model, {"feats": feats}, ["embedding"])
        return embedding[0]

    def frontend(self, model: str) -> Extract:
        """A served front-end model as an `Extract`: one waveform in, its valid feature frames out."""
        async def extract(samples: np.ndarray) -> np.ndarray:
            inputs = {"waveform": np.asarray(samples, dtype=np.float32)[None],
                      "lengths": _scalar(samples.size, np.int64)}
            features, frames = await self.infer(model, inputs, ["features", "frames"])
            return features[0, :int(frames.reshape(-1)[0])]

        return extract
