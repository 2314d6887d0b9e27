"""asr_stream: live audio chunks -> VAD endpointing -> SenseVoice -> segments as they end."""
from tritonasr.triton_models import StreamingAsrModel


class TritonPythonModel(StreamingAsrModel):
    pass
