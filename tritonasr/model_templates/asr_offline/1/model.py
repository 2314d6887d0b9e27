"""asr_offline: whole recordings -> VAD segments -> SenseVoice -> segments JSON (BLS)."""
from tritonasr.triton_models import OfflineAsrModel


class TritonPythonModel(OfflineAsrModel):
    pass
