"""sensevoice: SenseVoiceSmall through ONNX Runtime. Requests of different lengths are padded
into one batch (allow_ragged_batch); the graph returns argmax token ids, never logits."""
from tritonasr.runtime.triton_backend import OnnxLeafModel


class TritonPythonModel(OnnxLeafModel):
    pass
