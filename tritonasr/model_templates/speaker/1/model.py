"""speaker: ERes2NetV2 speaker embeddings through ONNX Runtime. Only windows of equal length
batch together (no padding: the statistics pooling would average it in)."""
from tritonasr.runtime.triton_backend import OnnxLeafModel


class TritonPythonModel(OnnxLeafModel):
    pass
