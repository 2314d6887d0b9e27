"""parakeet_decoder: greedy TDT decoding of every segment in the batch together, over NeMo's
decoder_joint graph (the loop is tritonasr.models.parakeet)."""
from tritonasr.runtime.parakeet_decoder import TdtDecoderModel


class TritonPythonModel(TdtDecoderModel):
    pass
