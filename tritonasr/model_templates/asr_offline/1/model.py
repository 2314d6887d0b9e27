"""asr_offline: whole recordings -> VAD segments -> SenseVoice -> segments JSON (BLS)."""
from tritonasr.runtime.triton_backend import OfflineAsrModel


class TritonPythonModel(OfflineAsrModel):
    pass
