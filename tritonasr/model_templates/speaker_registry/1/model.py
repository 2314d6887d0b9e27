"""speaker_registry: voiceprints of recordings, and the enrolled speakers (BLS over vad, speaker)."""
from tritonasr.runtime.triton_backend import SpeakerRegistryModel


class TritonPythonModel(SpeakerRegistryModel):
    pass
