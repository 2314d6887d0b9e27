"""parakeet_decoder: greedy TDT decoding of every segment in the batch together, over NeMo's
decoder_joint graph (the loop is tritonasr.tdt)."""
from tritonasr.tdt_model import TdtDecoderModel


class TritonPythonModel(TdtDecoderModel):
    pass
