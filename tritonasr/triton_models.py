"""The Python-backend models, kept here so each model_repository/*/1/model.py is a thin adapter.

Only the Triton Python backend stub can import `triton_python_backend_utils`; this module is
imported from those model.py files and nowhere else.
"""
from __future__ import annotations

import asyncio
import json
import logging
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonasr.audio import AudioError
from tritonasr.onnx_runner import OnnxModel
from tritonasr.pipeline import AsrSpec, OfflinePipeline
from tritonasr.vad import VadSpec

log = logging.getLogger("tritonasr")


def _parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _version_dir(args: dict) -> Path:
    return Path(args["model_repository"]) / args["model_version"]


class OnnxLeafModel:
    """A leaf model (vad, sensevoice): the batch the dynamic batcher formed runs as one ONNX
    Runtime call. Per-request tensors carry a leading batch dimension of 1."""

    def initialize(self, args: dict) -> None:
        params = _parameters(args)
        self.model = OnnxModel(
            _version_dir(args) / "model.onnx",
            intra_op_threads=int(params.get("intra_op_threads", "0")),
            ragged_inputs=[name for name in params.get("ragged_inputs", "").split(",") if name],
        )
        self.output_names = [o["name"] for o in json.loads(args["model_config"])["output"]]

    def execute(self, requests):
        feeds = []
        for request in requests:
            feeds.append({name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                          for name in self.model.input_names})
        try:
            results = self.model.run_batch(feeds, self.output_names)
        except Exception as exc:  # one bad batch must not take the model down
            log.error("onnx run failed: %s", traceback.format_exc())
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in result.items()])
                for result in results]


class OfflineAsrModel:
    """asr_offline: whole recordings in, segments out (JSON), through the vad and sensevoice
    models. Each request's inner calls are awaited concurrently with every other request's."""

    def initialize(self, args: dict) -> None:
        params = _parameters(args)
        repository = Path(args["model_repository"]).parent
        self.vad_model = params.get("vad_model", "vad")
        self.asr_model = params.get("asr_model", "sensevoice")
        self.pipeline = OfflinePipeline(
            VadSpec.load(repository / self.vad_model / "1"),
            AsrSpec.load(repository / self.asr_model / "1"),
            run_vad=self._run_vad,
            run_asr=self._run_asr,
            max_audio_s=float(params.get("max_audio_seconds", "7200")),
        )

    async def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
            requested_output_names=outputs,
        )
        response = await request.async_exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs]

    async def _run_vad(self, feats, caches):
        inputs = {"speech": feats, **{f"in_cache{i}": c for i, c in enumerate(caches)}}
        outputs = ["logits"] + [f"out_cache{i}" for i in range(len(caches))]
        scores, *caches = await self._infer(self.vad_model, inputs, outputs)
        return scores, caches

    async def _run_asr(self, feats, language, textnorm):
        inputs = {
            "speech": feats,
            "speech_lengths": np.array([[feats.shape[1]]], dtype=np.int32),
            "language": np.array([[language]], dtype=np.int32),
            "textnorm": np.array([[textnorm]], dtype=np.int32),
        }
        token_ids, lengths = await self._infer(self.asr_model, inputs, ["token_ids", "encoder_out_lens"])
        return token_ids[0], int(lengths.reshape(-1)[0])

    async def _handle(self, request):
        try:
            audio = pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy()
            result = await self.pipeline.transcribe(
                audio.reshape(-1) if audio.ndim == 2 and audio.shape[0] == 1 else audio,
                language=_optional_str(request, "LANGUAGE", "auto"),
                use_itn=bool(_optional_scalar(request, "USE_ITN", False)),
                sample_rate=int(_optional_scalar(request, "SAMPLE_RATE", 16000)),
            )
        except AudioError as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        except Exception as exc:
            log.error("asr_offline failed: %s", traceback.format_exc())
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {exc}"))
        payload = np.array([[json.dumps(result, ensure_ascii=False).encode()]], dtype=np.object_)
        return pb_utils.InferenceResponse([pb_utils.Tensor("RESULT", payload)])

    async def execute(self, requests):
        return list(await asyncio.gather(*(self._handle(r) for r in requests)))


def _optional_scalar(request, name: str, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0]


def _optional_str(request, name: str, default: str) -> str:
    value = _optional_scalar(request, name, default)
    return value.decode() if isinstance(value, bytes) else str(value)

