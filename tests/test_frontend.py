"""The front-end graphs (export/frontend.py) against today's CPU front ends.

Three configurations matter: kaldi fbank for SenseVoice and the VAD (hamming, int16 scale),
kaldi fbank for the speaker model (povey, [-1, 1] scale) and NeMo's log-mel for Parakeet. Each
is checked as a torch module and as an exported ONNX graph run by ONNX Runtime, on the committed
test speech and on batches of different lengths padded with garbage.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tritonasr.export.common import ort_session
from tritonasr.export.frontend import (
    KALDI_SHARE_DB,
    KaldiFbank,
    NemoMel,
    TOLERANCE,
    compare_to_reference,
    export_frontend_graph,
    pad_batch,
    parity_failures,
    read_speech,
    run_module,
    run_session,
)
from tritonasr.models.fbank import Frontend
from tritonasr.models.mel import MelFrontend, MelSpec
from tritonasr.models.speaker import FRONTEND as SPEAKER_FRONTEND
from tritonasr.paths import sample_audio, speech_dir

DATA = speech_dir()
SPEECH = [DATA / "one_phrase.wav", DATA / "pause_0.3s.wav", DATA / "speakers" / "utt01.wav",
          sample_audio()]
# What tritonasr/models/vad.py and the SenseVoice meta use (FunASR's frontend_conf; scale: int16 range).
SENSEVOICE = Frontend(window="hamming", n_mels=80, scale=32768.0)
CONFIGS = {
    "sensevoice": lambda: KaldiFbank(SENSEVOICE),
    "speaker": lambda: KaldiFbank(SPEAKER_FRONTEND),
    "parakeet": lambda: NemoMel(mel_frontend()),
}


def mel_frontend(spec: MelSpec = MelSpec()) -> MelFrontend:
    """Parakeet's front end without a checkpoint: its mel matrix as NeMo builds it, with librosa
    (an export-side dependency; the served front end reads the exported matrix)."""
    import librosa

    return MelFrontend(spec, librosa.filters.mel(sr=spec.sample_rate, n_fft=spec.n_fft, n_mels=spec.n_mels,
                                                 fmin=spec.lowfreq, fmax=spec.highfreq or spec.sample_rate / 2,
                                                 norm=spec.mel_norm))


# Ops the graphs may use: standard, TensorRT-supported, no Loop/If/STFT/DFT.
ALLOWED_OPS = {"Add", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Div", "Expand",
               "Gather", "Greater", "Less", "Log", "MatMul", "Max", "Min", "Mul", "Range",
               "ReduceSum", "Reshape", "Shape", "Slice", "Sqrt", "Sub", "Tile", "Unsqueeze", "Where"}


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    return [read_speech(p, 16000) for p in SPEECH]


@pytest.fixture(scope="module", params=list(CONFIGS))
def module(request):
    return CONFIGS[request.param]().eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (module, export summary, ONNX Runtime session), exported once."""
    out = {}
    for name, build in CONFIGS.items():
        module = build().eval()
        path = tmp_path_factory.mktemp(name) / "frontend" / "1" / "model.onnx"
        summary = export_frontend_graph(module, path, check_audio=SPEECH[:2], progress=lambda m: None)
        out[name] = (module, summary, ort_session(path))
    return out


def assert_matches_reference(module, wave: np.ndarray, features: np.ndarray) -> dict:
    result = compare_to_reference(module, wave, features)
    if isinstance(module, KaldiFbank):
        # Bins within 80 dB of their frame's energy: within 1e-3 of kaldi-native-fbank. Below
        # that knf's own float32 error (vs float64) reaches 1.6e-3; the graph stays within 1e-3
        # of float64 everywhere.
        assert result[f"max_abs_diff_within_{KALDI_SHARE_DB:g}dB"] <= TOLERANCE["vs_reference"], result
        assert result["max_abs_diff"] <= TOLERANCE["kaldi_all_bins"], result
        assert result["graph_vs_float64"] <= TOLERANCE["vs_float64"], result
    else:
        assert result["max_abs_diff"] <= TOLERANCE["vs_reference"], result
    return result


def speech_batch(speech, rng, garbage=True):
    """Rows of different lengths cut from the speech, one shorter than a window; loud garbage
    (or zeros) past each row's length."""
    pool = np.concatenate(speech)
    rows = []
    for length in (37_000, 100, 15_999, 52_345, 320, 8_000):
        start = int(rng.integers(0, pool.size - length))
        rows.append(pool[start:start + length].copy())
    return rows, pad_batch(rows, garbage=rng if garbage else None, extra=517)


def valid(features: np.ndarray, frames: np.ndarray, row: int) -> np.ndarray:
    return features[row, : frames[row]]


# ---------------------------------------------------------------------------------------------
# Configurations


def test_sensevoice_config_is_the_served_one():
    from tritonasr.export.sensevoice import FRONTEND_CONF

    assert Frontend.from_config(FRONTEND_CONF).fbank_options_equal(SENSEVOICE)
    assert SPEAKER_FRONTEND.window == "povey" and SPEAKER_FRONTEND.scale == 1.0


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="dither"):
        KaldiFbank(Frontend(dither=1.0))
    with pytest.raises(ValueError, match="window"):
        KaldiFbank(Frontend(window="triangle"))


# ---------------------------------------------------------------------------------------------
# The torch modules


def test_module_matches_reference_on_speech(module, speech):
    for wave in speech:
        features, frames = run_module(module, *pad_batch([wave]))
        assert frames.tolist() == [module.num_frames(wave.size)]
        assert_matches_reference(module, wave, features[0])


def test_module_batch_equals_single_exactly(module, speech):
    """Each row of a garbage-padded batch equals the row alone, bit for bit (PyTorch), and past
    its frames the output is zero. The mel's per-utterance normalisation sums over the padded
    frame axis, whose vectorised reduction order follows the padded length on some CPUs (AMD
    EPYC: 1.4e-6 on 32% of the values): there, within TOLERANCE["batch"] as for ONNX Runtime."""
    rows, (batch, lengths) = speech_batch(speech, np.random.default_rng(1))
    features, frames = run_module(module, batch, lengths)
    assert frames.tolist() == [module.num_frames(len(r)) for r in rows]
    for b, row in enumerate(rows):
        assert not features[b, frames[b]:].any()
        if frames[b] < 2:  # (one frame alone goes through torch's GEMV, not its GEMM)
            continue
        single, _ = run_module(module, *pad_batch([row]))
        if isinstance(module, NemoMel):
            np.testing.assert_allclose(valid(features, frames, b), single[0], rtol=0, atol=TOLERANCE["batch"])
        else:
            np.testing.assert_array_equal(valid(features, frames, b), single[0])
        assert_matches_reference(module, row, valid(features, frames, b))


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_padding_content_changes_nothing(module, speech, poison):
    """Garbage, even NaN/inf, past a row's length gives the same output as zeros, bit for bit.
    For the mel this checks that pre-emphasis and the STFT's centre padding end at the row's own
    length."""
    rows, (batch, lengths) = speech_batch(speech, np.random.default_rng(2))
    zeros = np.where(np.arange(batch.shape[1])[None, :] < lengths[:, None], batch, 0)
    poisoned = batch.copy()
    poisoned[0, lengths[0] + 5] = poison
    clean, frames = run_module(module, zeros, lengths)
    for padded in (batch, poisoned):
        got, got_frames = run_module(module, padded, lengths)
        np.testing.assert_array_equal(got_frames, frames)
        np.testing.assert_array_equal(got, clean)


def test_frame_counts(module):
    """frames == the CPU front end's count for every length around the edges, 0 below a window,
    and T == the count for the padded width."""
    window = module.window if isinstance(module, KaldiFbank) else module.hop
    lengths = np.array(sorted({0, 1, window - 1, window, window + 1, 2 * window + 159, 1234, 4000}))
    batch = np.random.default_rng(3).uniform(-0.5, 0.5, (len(lengths), 4000)).astype(np.float32)
    features, frames = run_module(module, batch, lengths)
    assert frames.tolist() == [module.num_frames(int(n)) for n in lengths]
    assert features.shape[1] == module.num_frames(4000)
    assert frames[0] == 0 and module.num_frames(window - 1) == 0


def test_input_shorter_than_a_window(module):
    width = 120  # below kaldi's window (400) and NeMo's hop (160)
    features, frames = run_module(module, np.zeros((2, width), np.float32), np.array([width, 7]))
    assert features.shape == (2, 0, module.mel.shape[1]) and frames.tolist() == [0, 0]


def test_mel_single_frame_and_silence():
    """One valid frame has std 0 (features 0); all-zero audio gives exactly 0, not rounding
    noise amplified by 1/1e-5."""
    module = NemoMel(mel_frontend())
    rng = np.random.default_rng(4)
    one = rng.uniform(-0.3, 0.3, 200).astype(np.float32)  # 200 samples: 1 frame
    silence = np.zeros(16000, np.float32)
    features, frames = run_module(module, *pad_batch([one, silence], garbage=rng))
    assert frames.tolist() == [1, 100]
    reference = mel_frontend()
    np.testing.assert_allclose(valid(features, frames, 0), reference.features(one), atol=1e-6)
    assert not features.any()
    np.testing.assert_allclose(reference.features(silence), 0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The exported graphs (ONNX Runtime)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_writes_graph_and_meta(exported, name):
    module, summary, session = exported[name]
    assert summary["opset"] >= 17
    assert set(summary["ops"]) <= ALLOWED_OPS, set(summary["ops"]) - ALLOWED_OPS
    tensors = summary["tensors"]
    assert list(tensors["inputs"]) == ["waveform", "lengths"]
    assert list(tensors["outputs"]) == ["features", "frames"]
    assert tensors["inputs"]["waveform"] == ["batch", "samples"]
    assert tensors["outputs"]["features"][1:] == ["frames", module.mel.shape[1]]
    meta = json.loads(Path(summary["meta"]).read_text())
    assert meta["frontend"] == module.kind and meta["options"] == json.loads(json.dumps(module.config()))
    assert parity_failures(module, meta["parity"]) == []
    assert meta["parity"]["garbage_vs_zero_padding"] == 0.0
    assert Path(summary["model"]).parent == Path(summary["meta"]).parent


@pytest.mark.parametrize("name", list(CONFIGS))
def test_onnx_matches_reference_and_torch(exported, name, speech):
    module, _, session = exported[name]
    rng = np.random.default_rng(5)
    rows, (batch, lengths) = speech_batch(speech, rng)
    got, frames = run_session(session, batch, lengths)
    want, want_frames = run_module(module, batch, lengths)
    np.testing.assert_array_equal(frames, want_frames)
    assert got.shape == want.shape
    for b, row in enumerate(rows):
        assert not got[b, frames[b]:].any()
        assert_matches_reference(module, row, valid(got, frames, b))
        single, single_frames = run_session(session, *pad_batch([row]))
        assert single_frames[0] == frames[b]
        # Same arithmetic per row; ONNX Runtime's Log/ReduceSum round by position (see TOLERANCE).
        np.testing.assert_allclose(valid(got, frames, b), single[0], rtol=0, atol=TOLERANCE["batch"])
    # Past the rows' lengths: garbage or zeros, the same output bit for bit.
    zeros = np.where(np.arange(batch.shape[1])[None, :] < lengths[:, None], batch, 0)
    np.testing.assert_array_equal(run_session(session, zeros, lengths)[0], got)
    # A whole long recording in one row.
    wave = speech[1]
    got, frames = run_session(session, *pad_batch([wave]))
    assert_matches_reference(module, wave, got[0])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_onnx_short_inputs(exported, name):
    module, _, session = exported[name]
    features, frames = run_session(session, np.zeros((3, 100), np.float32), np.array([100, 0, 50]))
    assert features.shape == (3, 0, module.mel.shape[1]) and frames.tolist() == [0, 0, 0]
    window = module.window if isinstance(module, KaldiFbank) else module.hop
    batch = np.random.default_rng(6).uniform(-0.5, 0.5, (2, window)).astype(np.float32)
    features, frames = run_session(session, batch, np.array([window, window - 1]))
    assert frames.tolist() == [1, 0] and not features[1].any()
