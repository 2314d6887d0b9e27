"""NeMo's log-mel front end (AudioToMelSpectrogramPreprocessor, i.e. FilterbankFeatures) in numpy.

The features Parakeet was trained on, as NeMo computes them in eval mode (no dither):
pre-emphasis, power spectrum of a centred, zero-padded STFT with a symmetric Hann window,
the model's own mel filterbank (the matrix NeMo built, saved by the export as
`mel_filterbank.npy`), log with an additive guard, and mean/std normalisation of each mel bin
over the utterance ("per_feature").

That last step makes a segment's features depend on the whole segment, so the front end takes
one waveform at a time (the pipeline calls it once per segment) and returns exactly its valid
frames, time-major: [frames, n_mels].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

# NeMo's normalize_batch adds this to the std (features.CONSTANT), whatever the config says.
STD_EPSILON = 1e-5
# The filterbank file next to a Parakeet graph: float32 [n_mels, n_fft // 2 + 1].
FILTERBANK_FILE = "mel_filterbank.npy"


@dataclass(frozen=True)
class MelSpec:
    """The preprocessor settings the front end reproduces (parakeet-tdt-0.6b-v2's defaults).

    Only what the Parakeet family uses is supported; anything else is refused here rather than
    computed differently from NeMo.
    """

    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms
    n_mels: int = 128
    window: str = "hann"
    preemph: float | None = 0.97
    lowfreq: float = 0.0
    highfreq: float | None = None  # None: sample_rate / 2
    mel_norm: str | None = "slaney"
    mag_power: float = 2.0
    log_zero_guard_type: str = "add"
    log_zero_guard_value: float = 2.0**-24
    normalize: str = "per_feature"

    def __post_init__(self):
        unsupported = {name: value for name, value, wanted in (
            ("window", self.window, "hann"),
            ("log_zero_guard_type", self.log_zero_guard_type, "add"),
            ("normalize", self.normalize, "per_feature"),
        ) if value != wanted}
        if unsupported or self.win_length > self.n_fft:
            raise ValueError(f"mel front end: unsupported preprocessor settings {unsupported or asdict(self)}")

    @classmethod
    def from_config(cls, conf: dict) -> "MelSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in conf.items() if k in known})

    def to_config(self) -> dict:
        return asdict(self)

    @property
    def hop_ms(self) -> float:
        return self.hop_length * 1000 / self.sample_rate


class MelFrontend:
    def __init__(self, spec: MelSpec, filterbank: np.ndarray):
        """filterbank: the model's mel matrix [n_mels, n_fft // 2 + 1] (NeMo's float32 one)."""
        shape = (spec.n_mels, spec.n_fft // 2 + 1)
        if np.shape(filterbank) != shape:
            raise ValueError(f"mel front end: the filterbank is {np.shape(filterbank)}, the settings need {shape}")
        self.spec = spec
        # torch.hann_window(win_length, periodic=False), as NeMo builds it.
        self.window = np.hanning(spec.win_length)
        self.filterbank = np.asarray(filterbank, dtype=np.float64)

    @classmethod
    def load(cls, spec: MelSpec, model_dir: Path) -> "MelFrontend":
        path = Path(model_dir) / FILTERBANK_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: export the model again with this version "
                                    "(tritonasr export parakeet)")
        return cls(spec, np.load(path, allow_pickle=False))

    def num_frames(self, num_samples: int) -> int:
        """FilterbankFeatures.get_seq_len: the STFT (center=True) has one frame more, which NeMo
        masks out and leaves out of the normalisation."""
        n_fft = self.spec.n_fft
        return max(0, (num_samples + n_fft // 2 * 2 - n_fft) // self.spec.hop_length)

    def features(self, waveform: np.ndarray) -> np.ndarray:
        """float32 [frames, n_mels] of one mono waveform at spec.sample_rate, in [-1, 1]."""
        spec = self.spec
        x = np.asarray(waveform, dtype=np.float64).reshape(-1)
        frames = self.num_frames(x.size)
        if frames == 0:
            return np.zeros((0, spec.n_mels), np.float32)
        if spec.preemph is not None:
            x = np.concatenate([x[:1], x[1:] - spec.preemph * x[:-1]])
        # torch.stft(center=True, pad_mode="constant"): n_fft // 2 zeros each side. NeMo's window
        # is win_length long, zero-padded to n_fft in the middle, so only the middle win_length
        # samples of each n_fft frame count; transforming just those (zero-padded to n_fft)
        # shifts the frame, which changes the phase but not the power.
        x = np.pad(x, spec.n_fft // 2)
        start = (spec.n_fft - spec.win_length) // 2
        windows = np.lib.stride_tricks.sliding_window_view(x[start:], spec.win_length)
        windows = windows[::spec.hop_length][:frames]
        power = np.abs(np.fft.rfft(windows * self.window, n=spec.n_fft)) ** spec.mag_power
        logmel = np.log(power @ self.filterbank.T + spec.log_zero_guard_value)
        # normalize_batch("per_feature"): unbiased std (n - 1); a single frame has std 0.
        mean = logmel.mean(axis=0)
        std = logmel.std(axis=0, ddof=1) if frames > 1 else np.zeros_like(mean)
        return ((logmel - mean) / (std + STD_EPSILON)).astype(np.float32)
