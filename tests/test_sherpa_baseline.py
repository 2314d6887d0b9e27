"""The load tests' peer server: our SenseVoice weights exported in sherpa-onnx's format and served
by the real `sherpa-onnx-offline-websocket-server`, against FunASR's PyTorch model in-process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tritonasr.audio import load_audio
from tritonasr.export.common import Cmvn
from tritonasr.export.sensevoice import LOGITS_TOLERANCE, QUERY_FRAMES, export_sensevoice
from tritonasr.export.sherpa_onnx import sherpa_model_for
from tritonasr.loadtest.sherpa_server import SherpaOnnxServer
from tritonasr.loadtest.ws_offline import OfflineWebsocketError, transcribe
from tritonasr.models.transcript import ctc_greedy
from tritonasr.paths import sample_audio, speech_dir
from tritonasr.serving.server import free_port

DATA = speech_dir()
SAMPLE = sample_audio()
SHERPA_KEYS = {"vocab_size", "blank_id", "lfr_window_size", "lfr_window_shift", "normalize_samples",
               "neg_mean", "inv_stddev", "lang_auto", "lang_zh", "lang_en", "lang_ja", "lang_ko",
               "lang_yue", "with_itn", "without_itn", "model_type", "comment"}
FRAME_SHIFT_S = 0.06  # sherpa's timestamps: 10 ms x LFR shift 6 per output frame


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """A model repository with the tiny random SenseVoice exported by our own exporter (its
    checkpoint comes from the usual cache)."""
    repo = tmp_path_factory.mktemp("repository")
    export_sensevoice(None, "tiny", repo, None, progress=quiet)
    return repo


@pytest.fixture(scope="module")
def served_meta(repository) -> dict:
    return json.loads((repository / "sensevoice" / "1" / "meta.json").read_text())


@pytest.fixture(scope="module")
def sherpa_cache(repository, tmp_path_factory):
    """A fresh cache for the sherpa-onnx exports (set after the checkpoint is in place)."""
    patch = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("sherpa-cache")
    patch.setenv("TRITONASR_CACHE", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="module")
def sherpa_export(repository, sherpa_cache) -> tuple[Path, list[str]]:
    messages: list[str] = []
    return sherpa_model_for(repository, progress=messages.append), messages


def test_export_files_metadata_and_parity(sherpa_export, sherpa_cache, served_meta):
    export, messages = sherpa_export
    assert export.parent == sherpa_cache / "sherpa-onnx"
    assert any("exporting" in m for m in messages)
    assert {p.name for p in export.iterdir()} == {"model.onnx", "tokens.txt", "meta.json"}

    graph = onnx.load(str(export / "model.onnx"))
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert SHERPA_KEYS <= set(metadata)
    assert metadata["model_type"] == "sense_voice_ctc" and "Nano" not in metadata["comment"]
    vocab_size = served_meta["vocab_size"]
    assert int(metadata["vocab_size"]) == vocab_size
    assert (int(metadata["lfr_window_size"]), int(metadata["lfr_window_shift"])) == (7, 6)
    assert metadata["normalize_samples"] == "0"
    for language in ("auto", "zh", "en", "ja", "ko", "yue"):
        assert int(metadata[f"lang_{language}"]) == served_meta["lid_dict"][language]
    assert int(metadata["with_itn"]) == served_meta["textnorm_dict"]["withitn"]
    assert int(metadata["without_itn"]) == served_meta["textnorm_dict"]["woitn"]
    cmvn = Cmvn.load(Path(served_meta["model_dir"]) / "am.mvn")
    neg_mean = np.array(metadata["neg_mean"].split(","), np.float32)
    inv_stddev = np.array(metadata["inv_stddev"].split(","), np.float32)
    assert np.array_equal(neg_mean, cmvn.shift) and np.array_equal(inv_stddev, cmvn.scale)

    # sherpa feeds x, x_length, language, text_norm by position and reads output 0.
    elem = onnx.TensorProto
    inputs = [(i.name, i.type.tensor_type.elem_type) for i in graph.graph.input]
    assert inputs == [("x", elem.FLOAT), ("x_length", elem.INT32), ("language", elem.INT32),
                      ("text_norm", elem.INT32)]
    assert [o.name for o in graph.graph.output] == ["logits"]
    assert graph.graph.output[0].type.tensor_type.shape.dim[2].dim_value == vocab_size

    lines = (export / "tokens.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == vocab_size
    assert [int(line.split(" ")[1]) for line in lines] == list(range(vocab_size))
    assert lines[0] == "<unk> 0"

    meta = json.loads((export / "meta.json").read_text())
    assert meta["model_dir"] == served_meta["model_dir"]
    parity = meta["parity"]
    assert parity["logits_max_abs_diff"] < LOGITS_TOLERANCE
    assert parity["batch_logits_max_abs_diff"] < LOGITS_TOLERANCE
    assert parity["tokens_identical"] and parity["batch_tokens_identical"]
    assert min(parity["tokens_per_segment"]) > QUERY_FRAMES  # the random model does emit tokens


def test_sherpa_model_for_reuses_the_cached_export(repository, sherpa_export):
    export, _ = sherpa_export
    mtime = (export / "model.onnx").stat().st_mtime_ns
    messages: list[str] = []
    assert sherpa_model_for(repository, progress=messages.append) == export
    assert messages == [f"using the cached sherpa-onnx export {export}"]
    assert (export / "model.onnx").stat().st_mtime_ns == mtime


def test_cli_prints_the_export(repository, sherpa_export, capsys):
    from tritonasr.cli import main

    assert main(["export", "sherpa-onnx", "--model-repository", str(repository)]) == 0
    assert capsys.readouterr().out.strip() == str(sherpa_export[0])


def test_sherpa_model_for_needs_an_exported_sensevoice(tmp_path):
    with pytest.raises(FileNotFoundError, match="no exported SenseVoice"):
        sherpa_model_for(tmp_path, progress=quiet)


def test_missing_server_binary_says_how_to_install(tmp_path, monkeypatch):
    from tritonasr.loadtest.sherpa_server import SherpaServerError, find_binary

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SherpaServerError, match="pip install sherpa-onnx-bin"):
        find_binary()


# --- the real sherpa-onnx server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sherpa_server(sherpa_export, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("sherpa-log") / "server.log"
    with SherpaOnnxServer(sherpa_export[0], num_threads=1, max_batch_size=4, num_work_threads=2,
                          log_path=log_path) as server:
        yield server


@pytest.fixture(scope="module")
def reference(served_meta):
    """Our greedy CTC decode of the same weights with FunASR's PyTorch model, the whole file as one
    utterance (as sherpa decodes it); token ids -> pieces through the exported tokens.txt."""
    from tritonasr.export.sensevoice import TorchSenseVoice

    torch_model = TorchSenseVoice(served_meta["model_dir"])

    def decode(samples: np.ndarray) -> tuple[list[int], list[int]]:
        ids, length = torch_model.greedy_ids(samples, language="auto", use_itn=False)
        tokens = ctc_greedy(ids, length)
        # The frame each token is emitted at: where a non-blank id differs from the previous.
        ids = ids[:length]
        frames = [t for t in range(length) if ids[t] != 0 and (t == 0 or ids[t] != ids[t - 1])]
        assert len(frames) == len(tokens)
        return tokens, frames

    return decode


@pytest.fixture(scope="module")
def pieces(sherpa_export) -> list[str]:
    # sherpa shows SentencePiece's word marker as a space.
    lines = (sherpa_export[0] / "tokens.txt").read_text(encoding="utf-8").splitlines()
    return [line.rsplit(" ", 1)[0].replace("\u2581", " ") for line in lines]


@pytest.mark.e2e
@pytest.mark.parametrize("path", [DATA / "one_phrase.wav", SAMPLE], ids=lambda p: p.name)
def test_sherpa_tokens_equal_pytorch_greedy(sherpa_server, reference, pieces, path):
    """Exactly equal, not merely close: sherpa's front end (kaldi-native-fbank, hamming, 16-bit
    scaling, no dither, LFR padded with the edge frames) computes our features, and its greedy CTC
    is ours. sherpa takes the first four emitted tokens as language/emotion/event/ITN tags (a
    trained model emits them on the four query frames) and reports the rest."""
    samples = load_audio(path).samples
    result = transcribe(sherpa_server.url, samples)
    tokens, frames = reference(samples)
    assert len(tokens) > QUERY_FRAMES + 10, "the reference emits too few tokens to compare"
    assert result["tokens"] == [pieces[i] for i in tokens[QUERY_FRAMES:]]
    assert [result["lang"], result["emotion"], result["event"]] == [pieces[i] for i in tokens[:3]]
    assert result["text"] == "".join(result["tokens"]).lstrip()  # sherpa drops a leading space
    expected_times = [FRAME_SHIFT_S * (t - QUERY_FRAMES) for t in frames[QUERY_FRAMES:]]
    assert result["timestamps"] == pytest.approx(expected_times, abs=1e-3)


@pytest.mark.e2e
def test_too_long_is_refused_and_the_server_keeps_serving(sherpa_server, reference, pieces):
    too_long = np.zeros(int(16000 * (sherpa_server.max_utterance_length + 1)), np.float32)
    with pytest.raises(OfflineWebsocketError, match=r"code 1009: Max utterance length"):
        transcribe(sherpa_server.url, too_long)
    samples = load_audio(DATA / "one_phrase.wav").samples
    tokens, _ = reference(samples)
    assert transcribe(sherpa_server.url, samples)["tokens"] == [pieces[i] for i in tokens[QUERY_FRAMES:]]


@pytest.mark.e2e
def test_unreachable_server_is_a_clear_error():
    with pytest.raises(OfflineWebsocketError, match="cannot talk to"):
        transcribe(f"ws://127.0.0.1:{free_port()}", np.zeros(16000, np.float32), timeout_s=5)


GEVENT_CLIENTS = """
from gevent import monkey
monkey.patch_all()  # first, as Locust's workers do

import json, sys, time
import gevent
import numpy as np
from tritonasr.loadtest.ws_offline import transcribe

url, path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
samples = np.load(path)
started = time.monotonic()

def one():
    begin = time.monotonic() - started
    tokens = transcribe(url, samples)["tokens"]
    return {"begin": begin, "end": time.monotonic() - started, "tokens": tokens}

jobs = [gevent.spawn(one) for _ in range(count)]
gevent.joinall(jobs, raise_error=True)
print(json.dumps([job.value for job in jobs]))
"""


@pytest.mark.e2e
def test_concurrent_greenlets_under_gevent(sherpa_server, reference, pieces, tmp_path):
    """Several 60 s transcriptions in greenlets after gevent's monkey-patching (Locust's setting):
    all in flight at once, and each the same tokens as our decode of the file alone (sherpa
    batches them, zero-padded)."""
    samples = load_audio(DATA / "long_70s.wav").samples[:16000 * 60]
    np.save(tmp_path / "clip.npy", samples)
    count = 6
    run = subprocess.run([sys.executable, "-c", GEVENT_CLIENTS, sherpa_server.url,
                          str(tmp_path / "clip.npy"), str(count)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    tokens, _ = reference(samples)
    expected = [pieces[i] for i in tokens[QUERY_FRAMES:]]
    assert all(r["tokens"] == expected for r in results)
    # Concurrent, not one after another: every request had started before the first one ended.
    assert max(r["begin"] for r in results) < min(r["end"] for r in results), results
