"""parakeet_encoder: NeMo's FastConformer encoder through ONNX Runtime. Feature sequences of
different lengths are zero-padded into one batch (allow_ragged_batch); the graph masks by length."""
from tritonasr.runtime.triton_backend import OnnxLeafModel


class TritonPythonModel(OnnxLeafModel):
    pass
