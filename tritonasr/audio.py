"""Audio input: the files libsndfile reads (wav, flac, ogg, mp3) and, through PyAV (FFmpeg's
libraries), the recordings phones and browsers make (m4a/mp4/aac, webm/opus), brought to what the
models take (16 kHz mono float32)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from tritonasr.contract import ENCODINGS
from tritonasr.errors import AudioError, AudioTooLongError, UnsupportedFormatError

SAMPLE_RATE = 16000
# Largest |sample| accepted: full scale and a little overshoot (float files, resampling filters).
# Far beyond it the samples are not audio in [-1, 1] (unscaled integer PCM, garbage), and huge
# values overflow the features.
MAX_ABS_SAMPLE = 1.01
# Source rates a file may declare. Resampling multiplies the samples by 16000/rate, so a header
# claiming 1 Hz turned a 115 KB file into 3.7 GB; one claiming 2**31 Hz into no samples at all.
MIN_SOURCE_RATE, MAX_SOURCE_RATE = 4000, 768000
# What load_audio reads, as a refusal (UnsupportedFormatError) names it.
SUPPORTED_FORMATS = "wav, flac, mp3, ogg (vorbis, opus), m4a/mp4 (aac), webm (opus)"
# Their file name extensions: what a directory or pattern gives (`tritonasr transcribe DIR`, path
# jobs). A file named on its own is read whatever its name (the decoder goes by the contents).
AUDIO_EXTENSIONS = frozenset({".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".mp4",
                              ".aac", ".webm", ".mka"})
# libsndfile's errors for data it does not take for any format it reads (the others mean a file
# of a format it reads, damaged: reported as they are).
SFE_UNRECOGNISED_FORMAT = 1  # "Format not recognised"
# "File does not exist or is not a regular file (possibly a pipe?)": what libsndfile's MP3 probe
# reports for garbage that looks like an MPEG frame (the file was opened here: its data is at fault).
SFE_BAD_FILE = 7
# FFmpeg demuxers PyAV may use on what libsndfile does not recognise (FFmpeg's format_whitelist):
# mov is mp4/m4a/3gp, matroska is webm/mkv, aac is a bare ADTS stream. Data that FFmpeg's probe
# takes for anything else (a video, an image, a subtitle or playlist file) is refused before a
# demuxer parses it.
PYAV_DEMUXERS = "mov,matroska,aac,mp3,ogg,wav,flac"
# How the containers load_audio reads begin: data that starts as one of them but that no decoder
# reads is a damaged file of that format (AudioError); anything else is a format not read here
# (UnsupportedFormatError).
_SIGNATURES = ((0, b"RIFF", "WAV"), (0, b"RF64", "WAV"), (0, b"fLaC", "FLAC"), (0, b"OggS", "Ogg"),
               (0, b"ID3", "MP3"), (4, b"ftyp", "MP4/M4A"), (0, b"\x1a\x45\xdf\xa3", "WebM/Matroska"))
# PyAV's integer sample formats (packed names) and the factor to [-1, 1]; float ones pass as they are.
_INTEGER_SCALE = {"s16": 1 / 32768, "s32": 1 / 2**31}


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32 in [-1, 1] at sample_rate: mono, or [frames, channels] (keep_channels)
    sample_rate: int
    source_rate: int
    source_channels: int
    subtype: str | None = None  # libsndfile's subtype ("PCM_16", "ULAW", …); None: decoded by PyAV

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


def load_audio(source: str | os.PathLike | BinaryIO, keep_rates: tuple[int, ...] = (),
               keep_channels: bool = False, *, name: str | None = None,
               max_seconds: float | None = None) -> Audio:
    """Reads an audio file, downmixes and resamples it to 16 kHz (a file at one of `keep_rates`
    keeps its rate; with `keep_channels`, a multi-channel file's samples are [frames, channels]).

    `source` is a path or a binary file object (an upload, io.BytesIO), read whole from its start.
    What libsndfile reads (wav, flac, ogg/vorbis, ogg/opus, mp3) it decodes; data it does not
    recognise goes to PyAV (FFmpeg), which reads m4a/mp4/aac, webm/opus and mkv (their main audio
    stream, as FFmpeg picks it). Both find the format from the data, never from a file name.

    Audio longer than `max_seconds` is refused as soon as that is known: before reading (libsndfile
    knows the length), or as soon as decoding passes it (PyAV), so that a small compressed file
    cannot fill the memory with hours of samples.

    Every AudioError message starts with `name` (default: the path, or the file object's name), so
    callers can print it as it is. Data that neither decoder takes for audio, or a container without
    an audio stream, raises UnsupportedFormatError (naming SUPPORTED_FORMATS); a damaged, empty, too
    long or out-of-range file of a format read here raises a plain AudioError.
    """
    if isinstance(source, (str, bytes, os.PathLike)):
        label = name or str(source)
        try:
            # Opened here so that missing or unreadable paths get the OS's own reason.
            f = open(source, "rb")
        except OSError as e:
            raise AudioError(f"{label}: {e.strerror}") from None
        with f:
            return _load(f, os.fstat(f.fileno()).st_size, label, keep_rates, keep_channels, max_seconds)
    label = name or _name_of(source)
    f, size = _rewound(source)
    return _load(f, size, label, keep_rates, keep_channels, max_seconds)


def _name_of(f: BinaryIO) -> str:
    """A file object's name for messages: its own where it has one (open() gives the path)."""
    own = getattr(f, "name", None)
    return own if isinstance(own, str) and own else "audio"


def _rewound(f: BinaryIO) -> tuple[BinaryIO, int]:
    """The file object at its start and its size; one that cannot seek (a pipe) is read into memory."""
    try:
        f.seek(0, io.SEEK_END)
        size = f.tell()
        f.seek(0)
        return f, size
    except (AttributeError, OSError, ValueError):  # (io.UnsupportedOperation is both)
        data = f.read()
        if not isinstance(data, bytes):
            raise TypeError(f"load_audio reads binary files, got {type(f).__name__} giving "
                            f"{type(data).__name__}") from None
        return io.BytesIO(data), len(data)


def _load(f: BinaryIO, size: int, label: str, keep_rates: tuple[int, ...], keep_channels: bool,
          max_seconds: float | None) -> Audio:
    if size == 0:
        raise AudioError(f"{label} is an empty file (0 bytes)")
    read = _read_sndfile(f, label, max_seconds)
    if read is None:
        f.seek(0)
        read = _read_pyav(f, label, keep_channels, max_seconds)
    data, rate, channels, subtype = read
    if keep_channels and data.shape[1] > 1:
        audio = data
    else:
        audio = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    try:
        # Float files can go past full scale: clipped; NaN and infinities are refused (clipping
        # would have passed an infinity as full scale).
        validate_samples(np.clip(audio, -1.0, 1.0, out=audio, where=np.isfinite(audio)).reshape(-1))
    except AudioError as e:
        raise AudioError(f"{label}: {e}") from None
    audio = audio.astype(np.float32, copy=False)
    if rate in keep_rates:
        return Audio(audio, rate, rate, channels, subtype)
    return Audio(resample(audio, rate), SAMPLE_RATE, rate, channels, subtype)


def _check_rate(label: str, rate: int) -> None:
    if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise AudioError(f"{label}: a sample rate of {rate} Hz is outside {MIN_SOURCE_RATE} .. "
                         f"{MAX_SOURCE_RATE} Hz (a damaged header?)")


def _too_long(label: str, max_seconds: float, seconds: float | None = None) -> AudioTooLongError:
    length = f" ({seconds:.1f} s)" if seconds is not None else ""
    return AudioTooLongError(f"{label}: the audio{length} is longer than the {max_seconds:g} s accepted")


def _read_sndfile(f: BinaryIO, label: str, max_seconds: float | None) -> tuple[np.ndarray, int, int, str] | None:
    """([frames, channels] float32, rate, channels, subtype) of what libsndfile reads; None for
    data it does not recognise."""
    try:
        sound = sf.SoundFile(f)
    except sf.LibsndfileError as e:
        if e.code in (SFE_UNRECOGNISED_FORMAT, SFE_BAD_FILE):
            return None
        raise AudioError(f"{label} is not a readable audio file ({e.error_string.rstrip('.')})") from None
    with sound:
        rate = sound.samplerate
        _check_rate(label, rate)  # checked before anything is read
        if max_seconds is not None and sound.frames > max_seconds * rate:
            raise _too_long(label, max_seconds, sound.frames / rate)
        try:
            data = sound.read(dtype="float32", always_2d=True)
        except sf.LibsndfileError as e:
            raise AudioError(f"{label} is not a readable audio file ({e.error_string.rstrip('.')})") from None
        return data, rate, sound.channels, sound.subtype


class _Contents:
    """A file object's bytes without its name: FFmpeg then finds the format from the data only,
    never from a file name's extension (and the file stays open when PyAV is done)."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def read(self, size: int = -1) -> bytes:
        return self._f.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


def _unsupported(label: str, problem: str = "is not a readable audio file (Format not recognised") -> AudioError:
    """The refusal of a format not read here: `problem` follows the name and leaves a parenthesis
    open for the formats that are."""
    return UnsupportedFormatError(f"{label} {problem}; supported formats: {SUPPORTED_FORMATS})")


def _read_pyav(f: BinaryIO, label: str, keep_channels: bool,
               max_seconds: float | None) -> tuple[np.ndarray, int, int, None]:
    """What _read_sndfile returns, decoded by PyAV: the main audio stream; without keep_channels
    downmixed frame by frame (a [frames, 1] array), so that stereo costs no more memory than mono."""
    try:
        import av  # here: the server's model processes import this module but never decode files
    except ImportError:
        raise _unsupported(label, "is not a readable audio file (Format not recognised by libsndfile, and "
                                  "PyAV, which reads m4a and webm, is not installed: pip install av") from None
    try:
        container = av.open(_Contents(f), "r", container_options={"format_whitelist": PYAV_DEMUXERS},
                            metadata_errors="replace")
    except av.error.ArgumentError:  # FFmpeg took it for a format not in PYAV_DEMUXERS
        raise _unsupported(label) from None
    except av.error.FFmpegError as e:
        f.seek(0)
        head = f.read(16)
        kind = next((kind for at, magic, kind in _SIGNATURES if head[at:at + len(magic)] == magic), None)
        if kind is None:
            raise _unsupported(label) from None
        raise AudioError(f"{label} is not a readable audio file (damaged or truncated {kind}: {e.strerror})") from None
    with container:
        stream = container.streams.best("audio")
        if stream is None:
            raise _unsupported(label, "has no audio stream (a video or data container")
        decoder = stream.codec_context
        if decoder is None:
            raise _unsupported(label, f"is not a readable audio file (no decoder for its {stream.codec.name} audio")
        if decoder.sample_rate:  # as declared; the frames' own rate is checked as they come
            _check_rate(label, decoder.sample_rate)
        chunks: list[np.ndarray] = []
        rate = channels = 0
        limit, total = None, 0
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    if not rate:
                        rate, channels = frame.sample_rate, frame.layout.nb_channels
                        _check_rate(label, rate)
                        limit = None if max_seconds is None else max_seconds * rate
                    elif frame.sample_rate != rate:
                        raise AudioError(f"{label}: the sample rate changes from {rate} to {frame.sample_rate} Hz "
                                         "inside the audio")
                    samples = _frame_samples(frame, label)
                    if keep_channels and samples.shape[1] != channels:
                        raise AudioError(f"{label}: the channel count changes from {channels} to "
                                         f"{samples.shape[1]} inside the audio")
                    total += len(samples)
                    if limit is not None and total > limit:
                        raise _too_long(label, max_seconds)
                    if not keep_channels and samples.shape[1] > 1:
                        samples = samples.mean(axis=1, dtype=np.float32, keepdims=True)
                    chunks.append(samples)
        except av.error.FFmpegError as e:
            raise AudioError(f"{label} is not a readable audio file (damaged {decoder.name} audio: "
                             f"{e.strerror})") from None
    width = channels if keep_channels else 1
    data = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
    return data, rate or decoder.sample_rate, channels or decoder.layout.nb_channels, None


def _frame_samples(frame, label: str) -> np.ndarray:
    """A decoded PyAV frame as [frames, channels] float32 (a copy: the decoder reuses its buffers)."""
    fmt = frame.format
    kind = fmt.packed.name
    if kind not in _INTEGER_SCALE and kind not in ("u8", "flt", "dbl"):
        raise _unsupported(label, f"is not a readable audio file (its audio decodes to {fmt.name} samples")
    channels = frame.layout.nb_channels
    if channels < 1:
        raise AudioError(f"{label} is not a readable audio file (an audio frame without channels)")
    array = frame.to_ndarray()  # planar: [channels, frames]; packed: [1, frames * channels]
    array = array.T if fmt.is_planar else array.reshape(-1, channels)
    samples = np.array(array, dtype=np.float32, order="C")
    if kind == "u8":
        samples -= 128
        samples *= 1 / 128
    elif kind in _INTEGER_SCALE:
        samples *= _INTEGER_SCALE[kind]
    return samples


def is_audio_name(name: str) -> bool:
    """Whether a file's name is one of AUDIO_EXTENSIONS's."""
    return os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS
