"""asr_stream: live audio chunks -> VAD endpointing -> SenseVoice -> segments as they end."""
from tritonasr.runtime.triton_backend import StreamingAsrModel


class TritonPythonModel(StreamingAsrModel):
    pass
