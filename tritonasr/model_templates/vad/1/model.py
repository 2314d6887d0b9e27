"""vad: FSMN-VAD frame scores through ONNX Runtime; the FSMN caches are explicit inputs and
outputs, so the caller (asr_offline, later asr_stream) keeps each stream's state."""
from tritonasr.runtime.triton_backend import OnnxLeafModel


class TritonPythonModel(OnnxLeafModel):
    pass
