import json

import numpy as np
import pytest
import soundfile as sf
import soxr

from tritonasr.audio import SAMPLE_RATE, SUPPORTED_FORMATS, AudioError, load_audio, validate_samples
from tritonasr.paths import sample_audio, speech_dir

DATA = speech_dir()
LAYOUT = json.loads((DATA / "layout.json").read_text(encoding="utf-8"))
PHRASE = DATA / "one_phrase.wav"


@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_committed_files_match_their_layout(name):
    info = sf.info(DATA / name)
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    audio = load_audio(DATA / name)
    expected = LAYOUT[name]
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert (audio.sample_rate, audio.source_rate, audio.source_channels) == (16000, 16000, 1)
    assert audio.duration_ms == expected["duration_ms"]

    # The layout is what tests reason with: speech where it says, digital silence elsewhere.
    silence = np.ones(len(audio.samples), dtype=bool)
    for seg in expected["speech"]:
        start, end = seg["start_ms"] * 16, seg["end_ms"] * 16
        assert np.sqrt(np.mean(audio.samples[start:end] ** 2)) > 0.01, seg["text"]
        silence[max(start - 16, 0):end + 16] = False  # the layout is rounded to 1 ms
    assert not np.any(audio.samples[silence])


def test_fixture_durations_are_as_specified():
    assert 68_000 <= LAYOUT["long_70s.wav"]["duration_ms"] <= 72_000
    for i in range(1, 9):
        (seg,) = LAYOUT[f"speakers/utt{i:02d}.wav"]["speech"]
        assert 2_000 <= seg["end_ms"] - seg["start_ms"] <= 6_000
    for name, gap in [("pause_0.3s.wav", 300), ("pause_1s.wav", 1000), ("pause_3s.wav", 3000)]:
        first, second = LAYOUT[name]["speech"]
        assert abs(second["start_ms"] - first["end_ms"] - gap) <= 1


def test_sample_is_the_one_second_pause_file():
    assert sample_audio().read_bytes() == (DATA / "pause_1s.wav").read_bytes()


@pytest.mark.parametrize("rate", [8000, 22050, 48000])
def test_other_rates_are_resampled_to_16k(tmp_path, rate):
    original = load_audio(PHRASE).samples
    path = tmp_path / f"phrase_{rate}.wav"
    sf.write(path, soxr.resample(original, SAMPLE_RATE, rate), rate, subtype="FLOAT")
    audio = load_audio(path)
    assert (audio.sample_rate, audio.source_rate) == (SAMPLE_RATE, rate)
    assert abs(len(audio.samples) - len(original)) <= 1
    n = min(len(audio.samples), len(original))
    # 8 kHz loses everything above 4 kHz; the waveform must still line up with the original.
    assert np.corrcoef(audio.samples[:n], original[:n])[0, 1] > (0.9 if rate == 8000 else 0.999)


def test_stereo_is_averaged_to_mono(tmp_path):
    mono = load_audio(PHRASE).samples
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([mono, 0.5 * mono], axis=1), SAMPLE_RATE, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.source_channels == 2
    np.testing.assert_allclose(audio.samples, 0.75 * mono, atol=1e-6)


@pytest.mark.parametrize("fmt,subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"),
                                         ("MP3", "MPEG_LAYER_III")])
def test_compressed_formats_are_readable(tmp_path, fmt, subtype):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot handle {fmt}")
    original = load_audio(PHRASE)
    path = tmp_path / f"phrase.{fmt.lower()}"
    sf.write(path, original.samples, SAMPLE_RATE, format=fmt, subtype=subtype)
    audio = load_audio(path)
    assert abs(audio.duration_ms - original.duration_ms) <= 30  # codec frame padding
    assert np.sqrt(np.mean(audio.samples**2)) > 0.01


def test_float_file_beyond_full_scale_is_clipped(tmp_path):
    path = tmp_path / "loud.wav"
    sf.write(path, np.array([0.0, 1.5, -2.0, 0.5], np.float32), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path).samples, [0.0, 1.0, -1.0, 0.5])


def _bad_file(tmp_path, kind):
    path = tmp_path / {"text": "notes.txt"}.get(kind, f"{kind}.wav")
    if kind == "zero_bytes":
        path.touch()
    elif kind == "text":
        path.write_text("this is not audio\n")
    elif kind == "no_samples":
        sf.write(path, np.zeros((0, 1), np.float32), SAMPLE_RATE)
    elif kind == "nan":
        sf.write(path, np.array([0.1, np.nan, np.inf, 0.2], np.float32), SAMPLE_RATE,
                 subtype="FLOAT")
    return path


@pytest.mark.parametrize("kind,message", [
    ("missing", "missing.wav: No such file or directory"),
    ("zero_bytes", "zero_bytes.wav is an empty file (0 bytes)"),
    ("text", "notes.txt is not a readable audio file (Format not recognised; supported formats: "
             f"{SUPPORTED_FORMATS})"),
    ("no_samples", "no_samples.wav: audio is empty (0 samples)"),
    ("nan", "nan.wav: audio contains 2 NaN or infinite samples"),
])
def test_bad_files_raise_clear_errors(tmp_path, kind, message):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert str(err.value) == f"{tmp_path}/{message}"
    assert isinstance(err.value, ValueError)


def test_directory_is_not_audio(tmp_path):
    with pytest.raises(AudioError, match="Is a directory"):
        load_audio(tmp_path)


def test_validate_samples_returns_float32():
    out = validate_samples(np.array([0.0, 0.5, -0.5], dtype=np.float64))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [0.0, 0.5, -0.5])
    same = np.zeros(4, np.float32)
    assert validate_samples(same) is same


@pytest.mark.parametrize("samples,message", [
    (np.array([1, 2], dtype=np.int16), "must be floating point in [-1, 1], got int16"),
    (np.zeros((2, 10), np.float32), "must be 1-D (mono samples), got shape (2, 10)"),
    (np.zeros(0, np.float32), "audio is empty (0 samples)"),
    (np.array([0.0, np.inf], np.float32), "audio contains 1 NaN or infinite samples"),
])
def test_validate_samples_rejects_bad_arrays(samples, message):
    with pytest.raises(AudioError) as err:
        validate_samples(samples)
    assert message in str(err.value)
