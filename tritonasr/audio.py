"""Audio input: any file soundfile reads, brought to what the models take (16 kHz mono float32)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from tritonasr.contract import ENCODINGS
from tritonasr.errors import AudioError

SAMPLE_RATE = 16000
# Largest |sample| accepted: full scale and a little overshoot (float files, resampling filters).
# Far beyond it the samples are not audio in [-1, 1] (unscaled integer PCM, garbage), and huge
# values overflow the features.
MAX_ABS_SAMPLE = 1.01
# Source rates a file may declare. Resampling multiplies the samples by 16000/rate, so a header
# claiming 1 Hz turned a 115 KB file into 3.7 GB; one claiming 2**31 Hz into no samples at all.
MIN_SOURCE_RATE, MAX_SOURCE_RATE = 4000, 768000
SFE_BAD_FILE = 7  # libsndfile: "File does not exist or is not a regular file (possibly a pipe?)"


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32 in [-1, 1] at sample_rate: mono, or [frames, channels] (keep_channels)
    sample_rate: int
    source_rate: int
    source_channels: int

    @property
    def duration_ms(self) -> int:
        return len(self.samples) * 1000 // self.sample_rate  # (len: frames, whatever the channels)


def validate_samples(samples: np.ndarray, allow_empty: bool = False) -> np.ndarray:
    """Checks that samples are usable audio and returns them as a float32 array.

    Shared by the client and the server so both reject the same inputs with the same words.
    """
    samples = np.asarray(samples)
    if not np.issubdtype(samples.dtype, np.floating):
        # Integer PCM passed as-is would be 32768 times too loud.
        raise AudioError(
            f"audio samples must be floating point in [-1, 1], got {samples.dtype}"
        )
    if samples.ndim != 1:
        raise AudioError(f"audio must be 1-D (mono samples), got shape {samples.shape}")
    if samples.size == 0 and not allow_empty:  # (a stream's chunks may be empty)
        raise AudioError("audio is empty (0 samples)")
    bad = np.count_nonzero(~np.isfinite(samples))
    if bad:
        raise AudioError(f"audio contains {bad} NaN or infinite samples")
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak > MAX_ABS_SAMPLE:
        raise AudioError(f"audio samples must be in [-1, 1]; got one of magnitude {peak:.4g} "
                         "(scale integer PCM by 1/32768)")
    return samples.astype(np.float32, copy=False)


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """Resamples mono float audio from `rate` to SAMPLE_RATE; a no-op at SAMPLE_RATE."""
    if rate == SAMPLE_RATE:
        return samples
    # The filter can overshoot full scale on loud input.
    return np.clip(soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ"), -1.0, 1.0).astype(np.float32, copy=False)


class StreamResampler:
    """`resample` for audio that arrives in pieces: the pieces' outputs, joined, are exactly
    `resample` of the whole (soxr keeps the filter's state between them)."""

    def __init__(self, rate: int):
        self._soxr = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32",
                                                                           quality="HQ")

    def feed(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        """The 16 kHz samples `samples` completes (`last`: the rest, too)."""
        if self._soxr is None:
            return samples
        return np.clip(self._soxr.resample_chunk(samples, last=last), -1.0, 1.0).astype(np.float32, copy=False)


# libsndfile's subtype of each byte encoding of contract.ENCODINGS.
ENCODING_SUBTYPES = {"pcm16": "PCM_16", "mulaw": "ULAW", "alaw": "ALAW"}
_SAMPLE_BYTES = {"pcm16": 2, "mulaw": 1, "alaw": 1}


def check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise AudioError(f"unknown audio encoding {encoding[:40]!r}; use one of: {', '.join(ENCODINGS)}")


def sample_bytes(encoding: str) -> int:
    """Bytes per sample of a byte encoding."""
    return _SAMPLE_BYTES[encoding]


def decode(data: bytes, encoding: str) -> np.ndarray:
    """Samples in [-1, 1] (float32) of `data`: 16-bit little-endian PCM, G.711 mu-law or A-law."""
    check_encoding(encoding)
    if len(data) % _SAMPLE_BYTES[encoding]:
        raise AudioError(f"{encoding} audio of {len(data)} bytes does not hold whole samples")
    if not data:
        return np.zeros(0, np.float32)
    # libsndfile decodes G.711 itself; the rate does not change the samples.
    return sf.read(io.BytesIO(data), samplerate=SAMPLE_RATE, channels=1, format="RAW", subtype=ENCODING_SUBTYPES[encoding],
                   endian="LITTLE", dtype="float32")[0]


def encode(samples: np.ndarray, encoding: str) -> bytes:
    """`decode`'s inverse (float32 samples in [-1, 1] -> bytes)."""
    check_encoding(encoding)
    out = io.BytesIO()
    sf.write(out, np.asarray(samples, np.float32), SAMPLE_RATE, format="RAW", subtype=ENCODING_SUBTYPES[encoding],
             endian="LITTLE")
    return out.getvalue()


def load_audio(path: str | os.PathLike, keep_rates: tuple[int, ...] = (), keep_channels: bool = False) -> Audio:
    """Reads wav/flac/ogg/mp3 (whatever libsndfile reads), downmixes and resamples to 16 kHz
    (a file at one of `keep_rates` keeps its rate; with `keep_channels`, a multi-channel file's
    samples are [frames, channels]).

    Every AudioError message starts with the path, so callers can print it as it is.
    """
    try:
        # Opened here so that missing or unreadable paths get the OS's own reason.
        f = open(path, "rb")
    except OSError as e:
        raise AudioError(f"{path}: {e.strerror}") from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise AudioError(f"{path} is an empty file (0 bytes)")
        try:
            with sf.SoundFile(f) as sound:
                rate = sound.samplerate
                if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:  # checked before anything is read
                    raise AudioError(f"{path}: a sample rate of {rate} Hz is outside {MIN_SOURCE_RATE} .. "
                                     f"{MAX_SOURCE_RATE} Hz (a damaged header?)")
                data = sound.read(dtype="float32", always_2d=True)
        except sf.LibsndfileError as e:
            # libsndfile's MP3 probe reports garbage that looks like an MPEG frame as a file that
            # "does not exist or is not a regular file": this one was opened above, its data is at fault.
            reason = "Format not recognised" if e.code == SFE_BAD_FILE else e.error_string.rstrip(".")
            raise AudioError(f"{path} is not a readable audio file ({reason})") from None
    channels = data.shape[1]
    if keep_channels and channels > 1:
        audio = data
    else:
        audio = data[:, 0] if channels == 1 else data.mean(axis=1, dtype=np.float32)
    try:
        # Float files can go past full scale: clipped; NaN and infinities are refused (clipping
        # would have passed an infinity as full scale).
        validate_samples(np.clip(audio, -1.0, 1.0, out=audio, where=np.isfinite(audio)).reshape(-1))
    except AudioError as e:
        raise AudioError(f"{path}: {e}") from None
    audio = audio.astype(np.float32, copy=False)
    if rate in keep_rates:
        return Audio(audio, rate, rate, channels)
    return Audio(resample(audio, rate), SAMPLE_RATE, rate, channels)
