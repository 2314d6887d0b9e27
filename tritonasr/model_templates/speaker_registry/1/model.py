"""speaker_registry: voiceprints of recordings, and the enrolled speakers (BLS over vad, speaker)."""
from tritonasr.triton_models import SpeakerRegistryModel


class TritonPythonModel(SpeakerRegistryModel):
    pass
