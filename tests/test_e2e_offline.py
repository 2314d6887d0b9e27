"""asr_offline end to end: the real tritonserver over gRPC, against FunASR run in-process."""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
import tritonclient.grpc as grpcclient

from tritonasr.audio import AudioError, load_audio
from tritonasr.client.offline import OfflineClient, TranscriptionError
from tritonasr.models.vad import split_long_segments
from tritonasr.paths import speech_dir
from tritonasr.recognition.offline import MAX_ASR_SEGMENT_MS
from tritonasr.runtime.access import ADMIN_HEADER

from conftest import TEST_ADMIN_KEY

SPEECH_FILES = ["one_phrase.wav", "pause_0.3s.wav", "pause_1s.wav", "pause_3s.wav",
                "lead_trail_silence.wav", "long_70s.wav"]
BOUNDARY_TOLERANCE_MS = 50
DATA = speech_dir()


def spans(result: dict) -> list[tuple[int, int]]:
    return [(s["start_ms"], s["end_ms"]) for s in result["segments"]]


@pytest.fixture(scope="session")
def funasr_vad():
    from funasr import AutoModel

    from tritonasr.export.weights import fetch_vad_weights

    return AutoModel(model=str(fetch_vad_weights()), device="cpu", disable_update=True, log_level="ERROR")


@pytest.mark.parametrize("name", SPEECH_FILES)
def test_vad_segments_match_funasr(client, funasr_vad, name):
    samples = load_audio(DATA / name).samples
    served = spans(client.transcribe(samples))
    # FunASR tapers the end-silence threshold unless it is given: pin it to config's 800 ms.
    vad = [tuple(seg) for seg in funasr_vad.generate(input=samples, max_end_silence_time=800)[0]["value"]]
    # The pipeline then cuts segments over 30 s for SenseVoice (long_70s.wav has a 32.8 s run).
    expected = split_long_segments(vad, MAX_ASR_SEGMENT_MS)
    assert len(served) == len(expected), (served, expected)
    for got, want in zip(served, expected):
        assert abs(got[0] - want[0]) <= BOUNDARY_TOLERANCE_MS and abs(got[1] - want[1]) <= BOUNDARY_TOLERANCE_MS, (got, want)


def test_vad_finds_the_known_pauses(client, layout):
    """Sanity against the generated layout, independent of FunASR: 1 s and 3 s pauses split."""
    for name in ("pause_1s.wav", "pause_3s.wav"):
        assert len(client.transcribe_file(DATA / name)["segments"]) == len(layout[name]["speech"])


@pytest.fixture(scope="session")
def torch_sensevoice(model_repository):
    from tritonasr.export.sensevoice import TorchSenseVoice

    meta = json.loads((model_repository / "sensevoice" / "1" / "meta.json").read_text())
    return TorchSenseVoice(meta["model_dir"])


@pytest.mark.parametrize("name", SPEECH_FILES)
def test_served_text_equals_funasr_pytorch(client, torch_sensevoice, model_repository, name):
    from tritonasr.models.sensevoice import SenseVoiceSpec

    spec = SenseVoiceSpec.load(model_repository / "sensevoice" / "1")
    samples = load_audio(DATA / name).samples
    served = client.transcribe(samples)
    assert served["segments"], "no speech found"
    for seg in served["segments"]:
        audio = samples[seg["start_ms"] * 16: seg["end_ms"] * 16]
        token_ids, length = torch_sensevoice.greedy_ids(audio, language="auto", use_itn=False)
        expected = spec.tokenizer.transcript(token_ids, length, spec.blank_id)
        assert (seg["text"], seg["language"], seg["emotion"], seg["event"]) == (
            expected.text, expected.language, expected.emotion, expected.event)


def test_concurrent_segments_equal_single_and_run_alone_on_a_cpu(server, model_repository):
    """Segments of different lengths sent at once give the same tokens as each sent alone, and on
    the CPU config each runs alone (no dynamic batcher: no padding, no waiting for a batch's
    longest). Padded batches of the graph: tests/test_export.py."""
    from tritonasr.models.fbank import Frontend
    from tritonasr.models.sensevoice import SenseVoiceSpec

    spec = SenseVoiceSpec.load(model_repository / "sensevoice" / "1")
    samples = load_audio(DATA / "long_70s.wav").samples
    frontend: Frontend = spec.frontend
    feats = [frontend.features(samples[a: a + n]) for a, n in
             [(0, 16000 * 3), (48000, 16000 * 7), (160000, 16000 * 2), (400000, 16000 * 11), (700000, 24000)] * 3]

    def infer(feat):
        client = grpcclient.InferenceServerClient(server.grpc_url)
        inputs = []
        for name, value, dtype in [("speech", feat[None], "FP32"),
                                   ("speech_lengths", np.array([[len(feat)]], np.int32), "INT32"),
                                   ("language", np.array([[0]], np.int32), "INT32"),
                                   ("textnorm", np.array([[15]], np.int32), "INT32")]:
            tensor = grpcclient.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        out = client.infer("sensevoice", inputs)
        length = int(out.as_numpy("encoder_out_lens").reshape(-1)[0])
        return out.as_numpy("token_ids").reshape(-1)[:length].tolist()

    stats_before = _model_stats(server, "sensevoice")
    alone = [infer(f) for f in feats]
    with ThreadPoolExecutor(len(feats)) as pool:
        together = list(pool.map(infer, feats))
    stats_after = _model_stats(server, "sensevoice")
    assert together == alone
    executions = stats_after["execution_count"] - stats_before["execution_count"]
    inferences = stats_after["inference_count"] - stats_before["inference_count"]
    assert executions == inferences == 2 * len(feats)


def _model_stats(server, model: str) -> dict:
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(
        model, headers={ADMIN_HEADER: TEST_ADMIN_KEY}, as_json=True)
    entry = stats["model_stats"][0]
    return {"execution_count": int(entry.get("execution_count", 0)),
            "inference_count": int(entry.get("inference_count", 0))}


# --- bad input: a clear result or a clear error, and the server keeps serving ------------------

def _still_serving(client):
    assert client.transcribe_file(DATA / "one_phrase.wav")["segments"]


def _raw_infer(server, audio: np.ndarray, sample_rate: int = 16000, language: bytes = b"auto"):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for name, value, dtype in [("AUDIO", audio.reshape(1, -1).astype(np.float32), "FP32"),
                               ("SAMPLE_RATE", np.array([[sample_rate]], np.int32), "INT32"),
                               ("LANGUAGE", np.array([[language]], np.object_), "BYTES"),
                               ("USE_ITN", np.array([[False]]), "BOOL")]:
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return client.infer("asr_offline", inputs)


@pytest.mark.parametrize("audio, sample_rate, language, message", [
    (np.zeros(0), 16000, b"auto", "empty"),
    (np.full(16000, np.nan), 16000, b"auto", "NaN"),
    (np.full(16000, np.inf), 16000, b"auto", "NaN or infinite"),
    (np.zeros(16000), 44100, b"auto", "got 44100 Hz"),
    (np.zeros(16000), 16000, b"klingon", "unknown language"),
], ids=["empty", "nan", "inf", "wrong-rate", "unknown-language"])
def test_server_rejects_bad_audio_clearly(server, client, audio, sample_rate, language, message):
    with pytest.raises(grpcclient.InferenceServerException, match=message):
        _raw_infer(server, audio, sample_rate, language)
    _still_serving(client)


def test_client_rejects_bad_files_clearly(client, tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio")
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    for path, message in [(empty, "empty"), (text, "not a readable audio file"), (nan, "NaN")]:
        with pytest.raises(AudioError, match=message):
            client.transcribe_file(path)
    _still_serving(client)


def test_unknown_model_is_a_clear_error(server):
    from tritonasr.client.offline import OfflineClient, TranscriptionError

    with pytest.raises(TranscriptionError, match="not loaded|unknown"):
        OfflineClient(server.grpc_url, model="no_such_model").transcribe(np.zeros(16000, np.float32))


@pytest.mark.parametrize("rate, channels", [(8000, 1), (48000, 1), (16000, 2), (44100, 2)])
def test_other_rates_and_stereo_transcribe_like_16k_mono(client, tmp_path, rate, channels):
    import soxr

    samples = load_audio(DATA / "pause_1s.wav").samples
    converted = soxr.resample(samples, 16000, rate) if rate != 16000 else samples
    if channels == 2:
        converted = np.stack([converted, converted], axis=1)
    path = tmp_path / f"converted_{rate}_{channels}.flac"
    sf.write(path, converted, rate)
    expected = spans(client.transcribe(samples))
    got = spans(client.transcribe_file(path))
    assert len(got) == len(expected)
    # 8 kHz loses the upper band: boundaries move a little, not by a word.
    assert all(abs(a - b) <= 100 for g, e in zip(got, expected) for a, b in zip(g, e)), (got, expected)


@pytest.fixture()
def one_request_client(server):
    """Sends every recording in one asr_offline request, however long (the limit's own test)."""
    with OfflineClient(server.grpc_url, timeout_s=900, pieces_above_s=math.inf) as offline:
        yield offline


def test_thirty_minutes_of_silence(one_request_client):
    result = one_request_client.transcribe(np.zeros(16000 * 1800, np.float32))
    assert result == {"duration_ms": 1_800_000, "segments": []}


def test_thirty_minutes_of_continuous_speech(one_request_client, layout):
    """No pause long enough to end a segment: VAD cuts at 60 s, the pipeline at 30 s. 30 minutes
    is the most asr_offline takes in one request."""
    client = one_request_client
    samples = load_audio(DATA / "one_phrase.wav").samples
    speech = layout["one_phrase.wav"]["speech"][0]
    phrase = samples[speech["start_ms"] * 16: speech["end_ms"] * 16]
    audio = np.tile(phrase, -(-16000 * 1800 // phrase.size))[: 16000 * 1800]
    result = client.transcribe(audio)
    segments = result["segments"]
    assert result["duration_ms"] == 1_800_000
    assert len(segments) >= 60
    assert all(s["end_ms"] - s["start_ms"] <= 30_000 for s in segments)
    assert sum(s["end_ms"] - s["start_ms"] for s in segments) >= 0.9 * 1_800_000
    _still_serving(client)


@pytest.mark.parametrize("name", ["long_70s.wav", "pause_3s.wav"])
def test_recordings_sent_in_pieces_equal_one_request(server, one_request_client, name):
    """Past `pieces_above_s` the client sends a recording through asr_stream in chunks; the result
    is asr_offline's for one request: the same segments, texts and speaker labels."""
    expected = one_request_client.transcribe_file(DATA / name)
    progress = []
    with OfflineClient(server.grpc_url, timeout_s=900, pieces_above_s=1) as pieces:
        got = pieces.transcribe_file(DATA / name, on_progress=lambda done, total: progress.append((done, total)))
    assert got["segments"] and got == expected
    total = expected["duration_ms"]
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert progress[-1] == (total, total)


def test_a_recording_refused_in_pieces_is_a_clear_error(server):
    with OfflineClient(server.grpc_url, timeout_s=60, pieces_above_s=1) as pieces:
        with pytest.raises(TranscriptionError, match="unknown ASR engine 'nope'"):
            pieces.transcribe(np.zeros(16000 * 30, np.float32), engine="nope")
        # The refused stream was closed cleanly: the same client goes on.
        assert pieces.transcribe(np.zeros(16000 * 3, np.float32)) == {"duration_ms": 3000, "segments": []}
