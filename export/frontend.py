"""Front-end graphs: batches of waveforms in, features out, for the server's GPU.

On the embedded CPU server the pipelines compute features in process: kaldi fbank with
kaldi-native-fbank (`tritonasr.models.fbank.Frontend`, for SenseVoice, the VAD and the speaker
model) and NeMo's log-mel in numpy (`tritonasr.models.mel.MelFrontend`, for Parakeet). On the GPU
targets of `tritonasr repo build` these modules serve instead, as front-end models: the same
features for a padded batch, as a graph of standard ONNX ops that a dynamic batcher can feed
and ONNX Runtime or TensorRT can run:

    waveform [B, S] float32 in [-1, 1], lengths [B] int64 (valid samples per row)
      -> features [B, T, n_mels] float32 (time-major), frames [B] int64

Rows are independent: a row's valid frames depend only on its first `lengths[b]` samples (what
lies past them, zeros, garbage or NaN, changes nothing, bit for bit), and each row goes
through the same arithmetic as it would alone: batch-of-N equals batch-of-1 bit for bit in
PyTorch (the mel's normalisation aside, on some CPUs), and to the last bit or two in ONNX
Runtime (see TOLERANCE["batch"]). Frames past a
row's `frames[b]` are zeros.

How the graphs are built (and why):

- Framing is a Gather of [T, window] sample indices (an exact copy); windowing and the DFT are
  one MatMul with the [window, 2F] matrix (cos; sin) x window, computed in float64 and rounded
  once to float32. For kaldi, the per-frame DC-offset removal and pre-emphasis are linear
  maps of the frame too, so they are folded into the same matrix. No torch.stft/DFT, no
  unfold/Loop/If: Shape, Range, Gather, MatMul, elementwise arithmetic, Max/Min, Clip (float),
  Log, Sqrt, Less/Greater, Where, ReduceSum (mel only), Concat, Tile, Expand, Slice, Reshape,
  Unsqueeze, Cast, ConstantOfShape (meta.json lists them).
- Only the FFT bins some mel filter uses are computed (kaldi's bank leaves out DC and Nyquist).
- T is computed from the input's shape (Shape -> Sub -> Max -> Div: the numerator is clamped
  at 0, so ONNX's truncating Div agrees with floor division); an input shorter than one
  window gives T = 0.

Accuracy (float32 graph; the numbers for the committed test audio are in meta.json and the
tests): against a float64 evaluation of Kaldi's algorithm the graph is within 1e-3 everywhere
(1.5e-4 to 8e-4 measured), as float32 kaldi-native-fbank is (7e-4 to 1.6e-3 measured): both
lose relative precision in mel bins that hold a tiny share (below about -80 dB) of their
frame's energy, where any float32 DFT's rounding is large against the bin. Against knf the
graph is within about 4e-4 on every bin within 80 dB of its frame's energy (`KALDI_SHARE_DB`),
and within 2e-3 on the rest. NeMo's mel: within 1e-4 of MelFrontend (float64).

The graphs must run in float32. FP16 overflows (kaldi's int16-range power spectrum reaches
1e14), and TF32 (10-bit mantissa inputs to MatMul) moves the features by up to 0.9 (kaldi)
and 0.1 (mel), simulated. TensorRT uses TF32 for FP32 layers unless the builder is told not
to (trtexec --noTF32; ONNX Runtime's TensorRT EP only through NVIDIA_TF32_OVERRIDE=0, which is
process-wide); ONNX Runtime's CUDA EP needs `use_tf32=0`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from tritonasr.export.common import (
    OPSET,
    Progress,
    Staging,
    export_onnx,
    ort_session,
    publish_export,
    stderr_progress,
    tensor_specs,
)
from tritonasr.models.fbank import Frontend
from tritonasr.models.mel import STD_EPSILON, MelFrontend
from tritonasr.models.meta import META_FILE

INPUT_NAMES = ("waveform", "lengths")
OUTPUT_NAMES = ("features", "frames")
DYNAMIC_AXES = {
    "waveform": {0: "batch", 1: "samples"},
    "lengths": {0: "batch"},
    "features": {0: "batch", 1: "frames"},
    "frames": {0: "batch"},
}
# Kaldi fbank parity vs kaldi-native-fbank is judged on mel bins holding at least this share of
# their frame's mel energy (in dB below the frame's total): below it, knf's own float32 error
# exceeds 1e-3 (see the module docstring). The tolerances below apply to valid frames.
KALDI_SHARE_DB = 80.0
TOLERANCE = {
    "onnx_vs_torch": 1e-3,  # two float32 runs of the same graph (kaldi: bins within KALDI_SHARE_DB)
    "vs_reference": 1e-3,   # kaldi: bins within KALDI_SHARE_DB; mel: all
    "kaldi_all_bins": 1e-2,  # kaldi: every bin, vs knf (the tiny-share bins)
    "vs_float64": 1e-3,     # kaldi: every bin vs a float64 evaluation of Kaldi's algorithm
    # Batch-of-N vs batch-of-1 (ONNX Runtime): the graph's arithmetic per row is the same, but
    # ONNX Runtime's vectorised Log rounds an element by its position in the flattened tensor
    # (1 ulp, 2e-6 on a log-mel) and its ReduceSum over frames by the padded length (mel
    # normalisation: about 1e-5). PyTorch is exact but for that same sum on some CPUs (its
    # reduction order follows the padded length); padding content changes nothing in either.
    "batch": 1e-4,
}
# Window types kaldi-native-fbank knows (it exits the process on any other).
KALDI_WINDOWS = ("hamming", "povey", "hanning", "hann", "sine", "rectangular", "blackman")


def _dft_matrices(n_fft: int, length: int, bins: range) -> tuple[np.ndarray, np.ndarray]:
    """cos and -sin of 2 pi k n / n_fft for k in `bins`, n < length, in float64 (the angle is
    reduced modulo n_fft in integers, so large k n lose nothing)."""
    k = np.asarray(bins, dtype=np.int64)[:, None]
    n = np.arange(length, dtype=np.int64)[None, :]
    angle = 2.0 * np.pi * ((k * n) % n_fft) / n_fft
    return np.cos(angle), -np.sin(angle)


def _used_bins(filterbank: np.ndarray) -> range:
    """The FFT bins [first, last] some mel filter weighs (the others need not be computed)."""
    used = np.flatnonzero(np.any(filterbank != 0, axis=0))
    if used.size == 0:
        raise ValueError("the mel filterbank is all zeros")
    return range(int(used[0]), int(used[-1]) + 1)


class _Spectrogram(torch.nn.Module):
    """Power spectrum of `frames` frames of `window` samples every `hop`: the frames are
    gathered (an exact copy), then one MatMul with the [window, 2F] matrix of real and
    imaginary DFT rows (of the FFT bins in `bins`) times the linear map `frame_map` applied to
    each frame (the window, and for kaldi DC removal and pre-emphasis).

    Frames are rows of the MatMul, so a frame's arithmetic does not depend on how many frames
    or rows the batch has (PyTorch's and ONNX Runtime's GEMMs are row-invariant, except
    PyTorch's one-row GEMV). A strided Conv1d computes the same, but im2col puts the frames in
    the GEMM's columns, whose tail blocks round differently as T changes (up to 6e-5 apart on
    low-energy bins, batch vs single)."""

    def __init__(self, frame_map: np.ndarray, n_fft: int, hop: int, bins: range):
        super().__init__()
        length = frame_map.shape[1]
        cos, sin = _dft_matrices(n_fft, length, bins)
        kernel = np.concatenate([cos, sin]) @ frame_map  # float64, rounded once
        self.register_buffer("kernel", torch.from_numpy(np.ascontiguousarray(kernel.T, np.float32)))
        self.register_buffer("offsets", torch.arange(length, dtype=torch.int64))
        self.hop = hop
        self.bins = len(bins)

    def forward(self, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """[B, S'] signal, `frames` (0-d int64, all within S') -> [B, frames, bins] power."""
        starts = torch.arange(frames, device=x.device, dtype=torch.int64) * self.hop
        spec = torch.matmul(x[:, starts.unsqueeze(1) + self.offsets], self.kernel)  # [B, T, 2F]
        real, imag = spec[..., : self.bins], spec[..., self.bins:]
        return real * real + imag * imag


def _num_samples(waveform: torch.Tensor) -> torch.Tensor:
    """S as a 0-d int64 tensor. While tracing for export, `shape[1]` already is one (Shape ->
    Gather in the graph, so T stays symbolic); in eager mode it is an int."""
    n = waveform.shape[1]
    return n if isinstance(n, torch.Tensor) else torch.tensor(n, dtype=torch.int64, device=waveform.device)


def _frame_mask(frames_in_batch: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: frame t of row b is valid (t < frames[b])."""
    index = torch.arange(frames_in_batch, device=frames.device, dtype=torch.int64)
    return index.unsqueeze(0) < frames.unsqueeze(1)


def _nonnegative(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0) as an ONNX Max (TensorRT takes integer Max; integer Clip it may not)."""
    return torch.maximum(x, torch.zeros_like(x))


class KaldiFbank(torch.nn.Module):
    """Kaldi fbank as kaldi-native-fbank computes it with `Frontend._options()`.

    Per frame (snip_edges: only whole windows, frame t = samples [t * shift, t * shift + window)):
    scale, remove the DC offset, pre-emphasis (x[0] -= p x[0] too), window, zero-pad to the
    FFT size (next power of two), power spectrum, Kaldi's mel banks (low_freq 20 Hz, high_freq
    Nyquist, mel = 1127 ln(1 + f/700)), log with the floor max(energy, FLT_EPSILON). The window
    and the mel matrix are kaldi-native-fbank's own (its FeatureWindowFunction and MelBanks).
    LFR stacking and CMVN are not here: they are the consumer's (as with `Frontend.fbank`).
    """

    kind = "kaldi_fbank"

    def __init__(self, frontend: Frontend = Frontend()):
        super().__init__()
        import kaldi_native_fbank as knf

        if frontend.dither != 0:
            raise ValueError(f"the fbank graph computes no dither (got dither={frontend.dither})")
        if frontend.window not in KALDI_WINDOWS:
            raise ValueError(f"unknown kaldi window type {frontend.window!r}; one of {KALDI_WINDOWS}")
        opts = frontend._options()
        unsupported = {name: value for name, value, wanted in (
            ("snip_edges", opts.frame_opts.snip_edges, True),
            ("use_energy", opts.use_energy, False),
            ("use_log_fbank", opts.use_log_fbank, True),
            ("use_log_floor", opts.use_log_floor, True),
            ("use_power", opts.use_power, True),
            ("htk_mode", opts.mel_opts.htk_mode, False),
            ("is_librosa", opts.mel_opts.is_librosa, False),
        ) if bool(value) != wanted}
        if unsupported:
            raise ValueError(f"fbank graph: unsupported kaldi options {unsupported}")
        self.frontend = frontend
        window = np.asarray(knf.FeatureWindowFunction(opts.frame_opts).window, dtype=np.float64)
        size = window.size
        if size != frontend.samples_per_window:
            raise ValueError(f"kaldi's window has {size} samples, Frontend says "
                             f"{frontend.samples_per_window}")
        n_fft = 1 << (size - 1).bit_length() if opts.frame_opts.round_to_power_of_two else size
        filterbank = knf.MelBanks(opts.mel_opts, opts.frame_opts, 1.0).get_matrix()  # [M, n_fft/2+1]
        bins = _used_bins(filterbank)

        # The per-frame processing before the FFT, as one matrix: window . preemphasis . DC removal.
        frame_map = np.eye(size)
        if opts.frame_opts.remove_dc_offset:
            frame_map = frame_map - 1.0 / size
        p = float(np.float32(opts.frame_opts.preemph_coeff))
        if p != 0.0:
            preemph = np.eye(size) - p * np.eye(size, k=-1)
            preemph[0, 0] = 1.0 - p
            frame_map = preemph @ frame_map
        frame_map = window[:, None] * frame_map

        self.window, self.shift, self.n_fft = size, frontend.samples_per_frame, n_fft
        self.scale = float(frontend.scale)
        self.floor = float(opts.eps)
        self.spectrogram = _Spectrogram(frame_map, n_fft, self.shift, bins)
        self.register_buffer("mel", torch.from_numpy(
            np.ascontiguousarray(filterbank[:, bins.start:bins.stop].T, dtype=np.float32)))

    def _frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Frontend.num_frames: 0 below one window, else 1 + (n - window) // shift. The
        numerator is clamped at 0, so the integer division never sees a negative number (ONNX
        Div truncates, torch's // floors)."""
        return _nonnegative(num_samples - (self.window - self.shift)) // self.shift

    def num_frames(self, num_samples: int) -> int:
        return self.frontend.num_frames(num_samples)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor):
        total = self._frames(_num_samples(waveform))  # T, 0-d
        power = self.spectrogram(waveform * self.scale, total)
        fbank = torch.log(torch.clamp(torch.matmul(power, self.mel), min=self.floor))
        frames = torch.minimum(self._frames(lengths.to(torch.int64)), total)
        mask = _frame_mask(total, frames).unsqueeze(-1)
        return torch.where(mask, fbank, torch.zeros_like(fbank)), frames

    def reference(self, waveform: np.ndarray) -> np.ndarray:
        """The CPU front end this graph reproduces: kaldi-native-fbank, [frames, n_mels]."""
        return self.frontend.fbank(waveform)

    def config(self) -> dict:
        f = self.frontend
        opts = f._options()
        return {
            "fs": f.fs, "window": f.window, "n_mels": f.n_mels, "frame_length": f.frame_length,
            "frame_shift": f.frame_shift, "dither": f.dither, "scale": f.scale,
            "snip_edges": True, "remove_dc_offset": bool(opts.frame_opts.remove_dc_offset),
            "preemph_coeff": float(np.float32(opts.frame_opts.preemph_coeff)),
            "window_samples": self.window, "shift_samples": self.shift, "n_fft": self.n_fft,
            "low_freq": float(opts.mel_opts.low_freq), "high_freq": float(opts.mel_opts.high_freq),
            "log_floor": self.floor,
        }


class NemoMel(torch.nn.Module):
    """NeMo's log-mel with per-feature normalisation, as `MelFrontend.features` computes it for
    each row's own samples: pre-emphasis from the row's first sample and ending at its length,
    centred STFT zero-padded by n_fft // 2 on both sides of the row's own samples, symmetric
    Hann window, power, the model's mel matrix, log(x + guard), then each mel bin minus its
    mean over the row's valid frames, over (unbiased std + 1e-5); one frame has std 0."""

    kind = "nemo_mel"

    def __init__(self, reference: MelFrontend):
        super().__init__()
        spec = reference.spec
        if spec.mag_power <= 0:
            raise ValueError(f"mel graph: mag_power must be positive, not {spec.mag_power}")
        self.spec = spec
        self._reference = reference
        filterbank = reference.filterbank.astype(np.float32)  # NeMo's float32 matrix
        bins = _used_bins(filterbank)
        # Only the middle win_length samples of each n_fft frame are windowed (see mel.py).
        start = (spec.n_fft - spec.win_length) // 2
        half = spec.n_fft // 2
        self.pad_left = half - start
        self.pad_right = start + spec.win_length - half
        self.hop = spec.hop_length
        self.preemph = None if spec.preemph is None else float(spec.preemph)
        self.guard = float(spec.log_zero_guard_value)
        self.spectrogram = _Spectrogram(np.diag(reference.window), spec.n_fft, self.hop, bins)
        self.register_buffer("mel", torch.from_numpy(
            np.ascontiguousarray(filterbank[:, bins.start:bins.stop].T)))

    def _frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """MelFrontend.num_frames (FilterbankFeatures.get_seq_len), numerator clamped at 0."""
        spec = self.spec
        return _nonnegative(num_samples + (spec.n_fft // 2 * 2 - spec.n_fft)) // self.hop

    def num_frames(self, num_samples: int) -> int:
        return self._reference.num_frames(num_samples)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor):
        spec = self.spec
        lengths = lengths.to(torch.int64)
        index = torch.arange(waveform.shape[1], device=waveform.device, dtype=torch.int64)
        valid = index.unsqueeze(0) < lengths.unsqueeze(1)  # [B, S]
        zeros = torch.zeros_like(waveform)
        x = torch.where(valid, waveform, zeros)  # (where, not a product: garbage may be inf/nan)
        if self.preemph is not None:
            x = torch.cat([x[:, :1], x[:, 1:] - self.preemph * x[:, :-1]], dim=1)
            x = torch.where(valid, x, zeros)  # the row ends at its length: no -p * x[n-1] after it
        # The centred STFT (n_fft // 2 zeros on each side) has one frame more than
        # `_frames(S)`, which NeMo drops; only the middle win_length samples of each are used.
        # (zeros and Concat rather than F.pad, whose exported pads are a chain of ops that the
        # exporter's constant folding leaves in the graph)
        zero = torch.zeros_like(x[:, :1])
        x = torch.cat([zero.repeat(1, self.pad_left), x, zero.repeat(1, self.pad_right)], dim=1)
        total = self._frames(_num_samples(waveform))  # T, 0-d
        power = self.spectrogram(x, total)  # [B, T, bins]
        if spec.mag_power != 2.0:
            power = torch.pow(power, spec.mag_power / 2.0)
        logmel = torch.log(torch.matmul(power, self.mel) + self.guard)  # [B, T, n_mels]

        frames = torch.minimum(self._frames(lengths), total)  # [B]
        mask = _frame_mask(total, frames).unsqueeze(-1)  # [B, T, 1]
        count = frames.view(-1, 1, 1)
        n = count.to(logmel.dtype)
        # Shifted data: deviations from the row's first frame, so a constant bin is exactly 0
        # and float32 keeps the precision of the deviations, not of the (large) log values.
        deviation = torch.where(mask, logmel - logmel[:, :1], torch.zeros_like(logmel))
        mean = deviation.sum(dim=1, keepdim=True) / torch.clamp(n, min=1.0)
        centred = torch.where(mask, deviation - mean, torch.zeros_like(logmel))
        var = (centred * centred).sum(dim=1, keepdim=True) / torch.clamp(n - 1.0, min=1.0)
        std = torch.where(count > 1, torch.sqrt(var), torch.zeros_like(var))
        features = torch.where(mask, centred / (std + STD_EPSILON), torch.zeros_like(logmel))
        return features, frames

    def reference(self, waveform: np.ndarray) -> np.ndarray:
        """The CPU front end this graph reproduces: MelFrontend (float64), [frames, n_mels]."""
        return self._reference.features(waveform)

    def config(self) -> dict:
        return {**self.spec.to_config(), "std_epsilon": STD_EPSILON}


FrontendGraph = KaldiFbank | NemoMel


# ---------------------------------------------------------------------------------------------
# References and measures


def kaldi_fbank_float64(frontend: Frontend, waveform: np.ndarray) -> np.ndarray:
    """Kaldi's fbank algorithm in float64 (numpy), on the same float32 input and with the same
    window and mel matrix as kaldi-native-fbank: the yardstick for both float32 implementations."""
    import kaldi_native_fbank as knf

    opts = frontend._options()
    window = np.asarray(knf.FeatureWindowFunction(opts.frame_opts).window, dtype=np.float64)
    filterbank = knf.MelBanks(opts.mel_opts, opts.frame_opts, 1.0).get_matrix().astype(np.float64)
    size, shift = window.size, frontend.samples_per_frame
    n_fft = 1 << (size - 1).bit_length()
    x = np.asarray(waveform, np.float32).astype(np.float64) * frontend.scale
    frames = frontend.num_frames(x.size)
    if frames == 0:
        return np.zeros((0, frontend.n_mels))
    windows = np.lib.stride_tricks.sliding_window_view(x, size)[::shift][:frames]
    windows = windows - windows.mean(axis=1, keepdims=True)
    p = float(np.float32(opts.frame_opts.preemph_coeff))
    windows = np.concatenate([windows[:, :1] * (1 - p), windows[:, 1:] - p * windows[:, :-1]], 1)
    power = np.abs(np.fft.rfft(windows * window, n=n_fft)) ** 2
    return np.log(np.maximum(power @ filterbank.T, float(opts.eps)))


def kaldi_share_db(fbank: np.ndarray) -> np.ndarray:
    """dB of each mel bin's energy below its frame's total mel energy (from log energies)."""
    fbank = np.asarray(fbank, np.float64)
    total = np.logaddexp.reduce(fbank, axis=1, keepdims=True) if fbank.size else fbank
    return (total - fbank) * (10.0 / np.log(10.0))


def _diff(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    d = np.abs(a - b)
    if where is not None:
        d = d[where]
    return float(d.max()) if d.size else 0.0


def compare_to_reference(module: FrontendGraph, waveform: np.ndarray, features: np.ndarray) -> dict:
    """Max abs differences of one row's valid `features` [frames, n_mels] from the CPU reference."""
    reference = module.reference(waveform)
    if reference.shape != features.shape:
        raise RuntimeError(f"the graph gives {features.shape[0]} frames where the reference has "
                           f"{reference.shape[0]}")
    out = {"frames": int(reference.shape[0]), "max_abs_diff": _diff(features, reference)}
    if isinstance(module, KaldiFbank):
        strong = kaldi_share_db(reference) <= KALDI_SHARE_DB
        exact = kaldi_fbank_float64(module.frontend, waveform)
        out.update({
            f"max_abs_diff_within_{KALDI_SHARE_DB:g}dB": _diff(features, reference, strong),
            "entries_over_1e-3": int(np.count_nonzero(np.abs(features - reference) > 1e-3)),
            "entries": int(reference.size),
            "graph_vs_float64": _diff(features, exact),
            "reference_vs_float64": _diff(reference, exact),
        })
    return out


def graph_vs_graph(module: FrontendGraph, got: np.ndarray, want: np.ndarray,
                   frames: np.ndarray) -> float:
    """Max abs diff of two runs of the graph over valid frames; for kaldi only over mel bins
    within KALDI_SHARE_DB of their frame's energy (in `want`), where float32 results are stable
    (the bins below differ between any two float32 implementations, as with knf)."""
    valid = np.arange(want.shape[1])[None, :] < np.asarray(frames)[:, None]
    if isinstance(module, KaldiFbank):
        mask = valid[..., None] & (kaldi_share_db(want.reshape(-1, want.shape[-1])).reshape(
            want.shape) <= KALDI_SHARE_DB)
    else:
        mask = np.broadcast_to(valid[..., None], want.shape)
    return _diff(got, want, mask)


def _merge(results: Iterable[dict]) -> dict:
    """Worst case over several `compare_to_reference` results (sums for counts)."""
    merged: dict = {}
    for result in results:
        for key, value in result.items():
            if key in ("frames", "entries", "entries_over_1e-3"):
                merged[key] = merged.get(key, 0) + value
            else:
                merged[key] = max(merged.get(key, 0.0), value)
    return merged


def pad_batch(waveforms: Sequence[np.ndarray], garbage: np.random.Generator | None = None,
              extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[B, S] float32 batch and [B] int64 lengths; past each row's length zeros, or with
    `garbage`, loud random values (which must not change any valid frame)."""
    lengths = np.array([len(w) for w in waveforms], dtype=np.int64)
    width = int(lengths.max(initial=0)) + extra
    if garbage is None:
        batch = np.zeros((len(waveforms), width), np.float32)
    else:
        batch = garbage.uniform(-4.0, 4.0, (len(waveforms), width)).astype(np.float32)
    for row, w in zip(batch, waveforms):
        row[: len(w)] = w
    return batch, lengths


def run_module(module: FrontendGraph, waveform: np.ndarray, lengths: np.ndarray):
    with torch.no_grad():
        features, frames = module(torch.from_numpy(waveform), torch.from_numpy(lengths))
    return features.numpy(), frames.numpy()


def run_session(session, waveform: np.ndarray, lengths: np.ndarray):
    features, frames = session.run(list(OUTPUT_NAMES), {
        "waveform": np.ascontiguousarray(waveform, np.float32),
        "lengths": np.ascontiguousarray(lengths, np.int64),
    })
    return features, frames


# ---------------------------------------------------------------------------------------------
# Export


def default_check_audio() -> list[Path]:
    """The speech the parity checks run on: the package's sample and its speech corpus (top
    level only: the long and short files, silences included)."""
    from tritonasr.paths import sample_audio, speech_dir

    return [sample_audio(), *sorted(speech_dir().glob("*.wav"))]


def read_speech(path: Path, fs: int) -> np.ndarray:
    import soundfile as sf

    samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    if rate != fs:
        raise ValueError(f"{path}: {rate} Hz, the front end takes {fs} Hz")
    return samples.mean(axis=1).astype(np.float32) if samples.shape[1] > 1 else samples[:, 0]


def sample_rate(module: FrontendGraph) -> int:
    return module.frontend.fs if isinstance(module, KaldiFbank) else module.spec.sample_rate


def check_parity(module: FrontendGraph, session, audio: Sequence[Path], seed: int = 0) -> dict:
    """ONNX Runtime vs the torch module and vs the CPU reference, on speech and on a random
    batch; batch-of-N vs batch-of-1. All numbers are max abs differences over valid frames."""
    fs = sample_rate(module)
    rng = np.random.default_rng(seed)
    speech = {str(p): read_speech(p, fs) for p in audio}

    # Speech, one file at a time: ONNX vs reference and vs torch.
    per_file, onnx_vs_torch = {}, 0.0
    for name, wave in speech.items():
        batch, lengths = pad_batch([wave])
        got, frames = run_session(session, batch, lengths)
        want, want_frames = run_module(module, batch, lengths)
        if not np.array_equal(frames, want_frames):
            raise RuntimeError(f"frames differ: onnx {frames} vs torch {want_frames}")
        onnx_vs_torch = max(onnx_vs_torch, graph_vs_graph(module, got, want, frames))
        per_file[Path(name).name] = compare_to_reference(module, wave, got[0, : frames[0]])

    # A random batch: slices of the speech and white noise, of different lengths (one shorter
    # than a window: no frames), loud garbage past each row's length.
    pool = (np.concatenate(list(speech.values())) if speech
            else rng.uniform(-0.5, 0.5, fs).astype(np.float32))
    rows = []
    for length in (fs // 200, fs // 2 + 123, 2 * fs + 7, fs + fs // 3, 3 * fs // 4):
        start = int(rng.integers(0, max(1, pool.size - length)))
        rows.append(pool[start:start + length].copy())
    rows.append(rng.uniform(-0.5, 0.5, fs + 1).astype(np.float32))
    batch, lengths = pad_batch(rows, garbage=rng, extra=333)
    got, frames = run_session(session, batch, lengths)
    want, want_frames = run_module(module, batch, lengths)
    expected = [module.num_frames(len(r)) for r in rows]
    if frames.tolist() != expected or want_frames.tolist() != expected:
        raise RuntimeError(f"frames {frames.tolist()} (torch {want_frames.tolist()}), "
                           f"expected {expected}")
    if np.any(got[np.arange(got.shape[1])[None, :] >= frames[:, None]] != 0):
        raise RuntimeError("frames past a row's length are not zero")
    # What lies past a row's length changes nothing: the same batch zero-padded, bit for bit.
    zero_padded = np.where(np.arange(batch.shape[1])[None, :] < lengths[:, None], batch, 0)
    padding_diff = _diff(run_session(session, zero_padded, lengths)[0], got)
    batch_vs_single = 0.0
    random_vs_reference = []
    for b, row in enumerate(rows):
        single, _ = run_session(session, *pad_batch([row]))
        batch_vs_single = max(batch_vs_single, _diff(got[b, : frames[b]], single[0]))
        random_vs_reference.append(compare_to_reference(module, row, got[b, : frames[b]]))

    speech_all = _merge(per_file.values())
    random_all = _merge(random_vs_reference)
    return {
        "audio": list(speech),
        "speech_vs_reference": speech_all,
        "speech_vs_reference_per_file": per_file,
        "speech_onnx_vs_torch": onnx_vs_torch,
        "random_batch": {"lengths": lengths.tolist(), "frames": frames.tolist(),
                         "padding": "uniform(-4, 4) garbage"},
        "random_vs_reference": random_all,
        "random_onnx_vs_torch": graph_vs_graph(module, got, want, frames),
        "batch_vs_single": batch_vs_single,
        "garbage_vs_zero_padding": padding_diff,
        "tolerance": dict(TOLERANCE, kaldi_share_db=KALDI_SHARE_DB),
    }


def parity_failures(module: FrontendGraph, parity: dict) -> list[str]:
    """The checks of `check_parity`'s numbers against TOLERANCE that fail (empty: all pass)."""
    failures = []

    def check(name: str, value: float, tolerance: float) -> None:
        if not value <= tolerance:
            failures.append(f"{name} {value:.3e} > {tolerance:g}")

    check("onnx vs torch (speech)", parity["speech_onnx_vs_torch"], TOLERANCE["onnx_vs_torch"])
    check("onnx vs torch (random batch)", parity["random_onnx_vs_torch"], TOLERANCE["onnx_vs_torch"])
    check("batch-of-N vs batch-of-1", parity["batch_vs_single"], TOLERANCE["batch"])
    check("garbage vs zero padding", parity["garbage_vs_zero_padding"], 0.0)
    for where in ("speech_vs_reference", "random_vs_reference"):
        result = parity[where]
        if isinstance(module, KaldiFbank):
            check(f"{where} within {KALDI_SHARE_DB:g} dB",
                  result[f"max_abs_diff_within_{KALDI_SHARE_DB:g}dB"], TOLERANCE["vs_reference"])
            check(f"{where} all bins", result["max_abs_diff"], TOLERANCE["kaldi_all_bins"])
            check(f"{where} graph vs float64", result["graph_vs_float64"], TOLERANCE["vs_float64"])
        else:
            check(where, result["max_abs_diff"], TOLERANCE["vs_reference"])
    return failures


def export_served_frontend(source: Path, name: str, path: Path) -> int:
    """`tritonasr repo build`'s served front end `name` (see SERVED_FRONTENDS) for the exports in
    the repository `source`, exported to `path` and checked; returns its feature bins."""
    from tritonasr.models.parakeet import ParakeetSpec
    from tritonasr.models.speaker import SpeakerSpec
    from tritonasr.models.vad import VadSpec

    modules = {
        "fbank": lambda: KaldiFbank(VadSpec.load(source / "vad" / "1").frontend),
        "speaker_fbank": lambda: KaldiFbank(SpeakerSpec.load(source / "speaker" / "1").frontend),
        "parakeet_mel": lambda: NemoMel(ParakeetSpec.load(source / "parakeet_decoder" / "1").frontend),
    }
    module = modules[name]()
    export_frontend_graph(module, path)
    return module.mel.shape[1]


def export_frontend_graph(
    module: FrontendGraph,
    path: Path,
    check_audio: Sequence[Path] | None = None,
    progress: Progress = stderr_progress,
    seed: int = 0,
) -> dict:
    """Export `module` to the ONNX file `path` (opset OPSET, dynamic batch and sample axes),
    check it with ONNX Runtime against the torch module and the CPU reference, and publish it
    with a meta.json beside it. Raises RuntimeError if a parity check fails (nothing is
    published then). Returns a summary: paths, tensor specs, parity numbers."""
    import onnx

    path = Path(path)
    audio = [Path(p) for p in (check_audio if check_audio is not None else default_check_audio())]
    if not audio:
        raise ValueError("no speech to check the front end on (check_audio is empty)")
    module = module.eval()
    fs = sample_rate(module)
    dummy = pad_batch([np.zeros(fs // 2, np.float32), np.zeros(fs // 3, np.float32)])
    with Staging(path.parent) as staging:
        target = staging.path(path.name)
        progress(f"exporting the {module.kind} front end to {path}…")
        started = time.perf_counter()
        export_onnx(module, tuple(torch.from_numpy(a) for a in dummy), target, INPUT_NAMES,
                    OUTPUT_NAMES, DYNAMIC_AXES)
        export_seconds = time.perf_counter() - started
        ops = sorted({node.op_type for node in onnx.load(str(target)).graph.node})

        progress("checking parity (ONNX Runtime vs PyTorch and the CPU front end)…")
        session = ort_session(target)
        parity = check_parity(module, session, audio, seed)
        speech = parity["speech_vs_reference"]
        extra = ""
        if isinstance(module, KaldiFbank):
            extra = (f" ({speech[f'max_abs_diff_within_{KALDI_SHARE_DB:g}dB']:.2e} within "
                     f"{KALDI_SHARE_DB:g} dB of the frame energy; float64 Kaldi: graph "
                     f"{speech['graph_vs_float64']:.2e}, knf {speech['reference_vs_float64']:.2e})")
        progress(f"  speech vs the CPU front end: max abs diff {speech['max_abs_diff']:.2e}{extra} "
                 f"over {speech['frames']} frames of {len(audio)} files")
        progress(f"  random batch vs the CPU front end: "
                 f"{parity['random_vs_reference']['max_abs_diff']:.2e}; onnx vs torch "
                 f"{max(parity['speech_onnx_vs_torch'], parity['random_onnx_vs_torch']):.2e}; "
                 f"batch-of-N vs batch-of-1 {parity['batch_vs_single']:.2e}")
        failures = parity_failures(module, parity)
        if failures:
            raise RuntimeError(f"{module.kind} front-end parity failed: {'; '.join(failures)}")

        meta = {
            "frontend": module.kind,
            "reference": ("kaldi_native_fbank.OnlineFbank (tritonasr.models.fbank.Frontend.fbank)"
                          if isinstance(module, KaldiFbank) else "tritonasr.models.mel.MelFrontend"),
            "options": module.config(),
            "graph": {
                "inputs": {"waveform": ["batch", "samples"], "lengths": ["batch"]},
                "outputs": {"features": ["batch", "frames", module.mel.shape[1]],
                            "frames": ["batch"]},
                "dtype": "float32 (not FP16; no TF32)",
                "opset": OPSET,
                "ops": ops,
            },
            "parity": parity,
        }
        specs = tensor_specs(session)
        paths = publish_export(staging, meta, progress)
    return {
        "model": paths[path.name],
        "meta": paths[META_FILE],
        "opset": OPSET,
        "ops": ops,
        "export_seconds": round(export_seconds, 2),
        "tensors": specs,
        "parity": parity,
    }
