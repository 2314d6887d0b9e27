"""parakeet_decoder's Triton Python model: greedy TDT decoding (tritonasr.models.parakeet) of every request
in the batch Triton formed, together, over NeMo's decoder_joint graph.

Only the Triton Python backend stub can import `triton_python_backend_utils`; this module is
imported from model_templates/parakeet_decoder/1/model.py and nowhere else.
"""
from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonasr.models.meta import read_meta
from tritonasr.models.parakeet import DECODER_GRAPH, OnnxDecoderJoint, TdtSpec, decode_padded
from tritonasr.runtime.access import Access
from tritonasr.runtime.onnx_session import OnnxModel, instance_providers
from tritonasr.runtime.triton_backend import refuse_outsiders, with_refusals

log = logging.getLogger("tritonasr")


class TdtDecoderModel:
    """Inputs per request: encoded [1, T, D] (parakeet_encoder's output, maybe padded) and
    encoded_lengths [1]; outputs tokens, frames, durations [1, N] (int32)."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        runner = OnnxModel(version_dir / DECODER_GRAPH, intra_op_threads=int(params.get("intra_op_threads", "1")),
                           providers=instance_providers(args))
        self.decoder_joint = OnnxDecoderJoint(runner)
        self.spec = TdtSpec.from_meta(read_meta(version_dir))
        self.access = Access.from_environment()

    def execute(self, requests):
        refusals, requests = refuse_outsiders(self.access, requests)
        return with_refusals(refusals, self._decode(requests) if requests else [])

    def _decode(self, requests) -> list:
        responses: list = [None] * len(requests)
        encoded, rows = [], []
        for i, request in enumerate(requests):
            try:
                encoded.append(self._read(request))
                rows.append(i)
            except ValueError as exc:  # a malformed request fails alone
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        try:
            results = decode_padded(encoded, self.decoder_joint, self.spec)
        except Exception as exc:  # one bad batch must not take the model down
            log.error("parakeet_decoder failed: %s", traceback.format_exc())
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [r or pb_utils.InferenceResponse(error=error) for r in responses]
        for i, result in zip(rows, results):
            responses[i] = pb_utils.InferenceResponse([
                pb_utils.Tensor(name, values[None]) for name, values in
                (("tokens", result.tokens), ("frames", result.frames), ("durations", result.durations))])
        return responses

    def _read(self, request) -> np.ndarray:
        """This request's valid encoder frames [T, D]."""
        encoded = pb_utils.get_input_tensor_by_name(request, "encoded").as_numpy()
        length = int(pb_utils.get_input_tensor_by_name(request, "encoded_lengths").as_numpy().reshape(-1)[0])
        d_model = self.spec.d_model
        if encoded.ndim != 3 or encoded.shape[0] != 1 or encoded.shape[2] != d_model:
            raise ValueError(f"encoded must be [1, frames, {d_model}], got {list(encoded.shape)}")
        if not 0 <= length <= encoded.shape[1]:
            raise ValueError(f"encoded_lengths {length} is outside 0..{encoded.shape[1]}")
        return encoded[0, :length]
