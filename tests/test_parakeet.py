"""Parakeet TDT: a tiny random-weight NeMo model saved as a .nemo file, exported from that file,
and the served pair run in-process (our mel front end, both ONNX graphs, our batched TDT loop)
against NeMo's own preprocessor, encoder and transcribe()."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tritonasr.audio import load_audio
from tritonasr.export.parakeet import (
    FRONTEND_TOLERANCE,
    TOLERANCE,
    encode_padded,
    export_parakeet,
    load_model,
    nemo_greedy,
    random_model,
)
from tritonasr.models.mel import FILTERBANK_FILE
from tritonasr.models.parakeet import decode_padded
from tritonasr.paths import model_templates, speech_dir
from tritonasr.repository.check import check_model, parse_config
from tritonasr.runtime.in_process import LocalParakeet

DATA = speech_dir()
WAVS = sorted(DATA.glob("*.wav")) + sorted((DATA / "speakers").glob("*.wav"))
TEMPLATES = model_templates()


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def nemo_file(fresh_cache) -> Path:
    """A tiny random Parakeet saved as .nemo in a fresh cache (built, not found)."""
    return random_model("tiny", progress=quiet)


@pytest.fixture(scope="module")
def model(nemo_file):
    """NeMo's model, restored from the file: the reference (the exporter uses its own copy)."""
    return load_model(nemo_file)


@pytest.fixture(scope="module")
def repository(tmp_path_factory, nemo_file) -> tuple[Path, dict]:
    repo = tmp_path_factory.mktemp("model_repository")
    return repo, export_parakeet(str(nemo_file), None, repo, progress=quiet)


@pytest.fixture(scope="module")
def local(repository) -> LocalParakeet:
    return LocalParakeet.from_repository(repository[0])


@pytest.fixture(scope="module")
def waves() -> list[np.ndarray]:
    return [load_audio(path).samples for path in WAVS]


@pytest.fixture(scope="module")
def speech_at(layout) -> list[int]:
    """Per wav, a sample in the middle of its first spoken phrase."""
    phrases = [layout[str(path.relative_to(DATA))]["speech"][0] for path in WAVS]
    return [(p["start_ms"] + p["end_ms"]) * 8 for p in phrases]  # ms / 2 * 16 samples


@pytest.fixture(scope="module")
def reference(model, waves) -> list[dict]:
    return nemo_greedy(model, waves)


def as_dict(result) -> dict:
    return {"tokens": result.tokens.tolist(), "frames": result.frames.tolist(),
            "durations": result.durations.tolist()}


def same_tokens(results, references) -> bool:
    return all(as_dict(r) == {k: ref[k] for k in ("tokens", "frames", "durations")}
               for r, ref in zip(results, references, strict=True))


# --- export -----------------------------------------------------------------------------------


def test_export_parity_is_recorded_and_within_tolerance(repository, nemo_file):
    repo, report = repository
    parity = report["parity"]
    assert parity["tokens_identical"] and parity["batch_tokens_identical"]
    assert parity["encoder_lengths_identical"]
    for name in ("encoder_max_abs_diff", "batch_encoder_max_abs_diff", "decoder_joint_max_abs_diff",
                 "decoder_states_max_abs_diff"):
        assert parity[name] <= TOLERANCE, name
    assert parity["frontend_max_abs_diff"] <= FRONTEND_TOLERANCE
    assert sum(parity["tokens_per_segment"]) > 0
    metas = [json.loads(path.read_text()) for path in report["meta"]]
    assert metas[0] == metas[1]
    meta = metas[0]
    assert meta["source"] == str(nemo_file) and meta["random_init"] is None
    assert meta["parity"] == json.loads(json.dumps(parity))
    assert (meta["blank_id"], meta["vocab_size"], meta["durations"]) == (128, 128, [0, 1, 2, 3, 4])
    assert meta["max_symbols_per_step"] == 10
    assert meta["decoder_state"]["shape"] == [2, 64]
    assert (meta["subsampling_factor"], meta["window_stride"], meta["frame_ms"]) == (8, 0.01, 80.0)
    assert meta["preprocessor"]["n_mels"] == 128 and meta["preprocessor"]["preemph"] == 0.97
    for version, graph in (("parakeet_encoder", "model.onnx"), ("parakeet_decoder", "decoder_joint.onnx")):
        names = sorted(p.name for p in (repo / version / "1").iterdir())
        assert names == sorted(["meta.json", graph, "tokenizer.model", FILTERBANK_FILE])  # no staging leftovers
        filterbank = np.load(repo / version / "1" / FILTERBANK_FILE)
        assert filterbank.dtype == np.float32 and filterbank.shape == (128, 257) and filterbank.any()


def test_graph_interfaces(repository):
    repo, report = repository
    f32, i32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, onnx.TensorProto.INT64

    def io(path):
        graph = onnx.load(str(path), load_external_data=False).graph
        return [{v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value
                                                          for d in v.type.tensor_type.shape.dim])
                 for v in values} for values in (graph.input, graph.output)]

    inputs, outputs = io(report["encoder"])
    assert inputs == {"features": (f32, ["batch", "frames", 128]), "length": (i64, ["batch"])}
    assert outputs["encoded"] == (f32, ["batch", "encoded_frames", 96])
    assert outputs["encoded_lengths"][0] == i64
    inputs, outputs = io(report["decoder"])
    assert {k: v[0] for k, v in inputs.items()} == {
        "encoder_outputs": f32, "targets": i32, "target_length": i32,
        "input_states_1": f32, "input_states_2": f32}
    assert outputs["outputs"][1][-1] == 128 + 1 + 5  # tokens, blank, durations
    assert {"output_states_1", "output_states_2"} <= set(outputs)


def test_served_configs_fit_the_graphs(repository):
    repo, _ = repository
    for name in ("parakeet_encoder", "parakeet_decoder"):
        for config in [TEMPLATES / name / "config.pbtxt", *(TEMPLATES / name / "configs").glob("*.pbtxt")]:
            parsed = parse_config(config)
            assert parsed.name == name
            if name == "parakeet_encoder":
                assert check_model(repo / name, config) == []
            else:  # its tensors are the loop's, not the step graph's
                assert [t.name for t in parsed.input] == ["encoded", "encoded_lengths"]
                assert [t.name for t in parsed.output] == ["tokens", "frames", "durations"]


# --- front end --------------------------------------------------------------------------------


def crops(wave: np.ndarray, speech_at: int) -> list[np.ndarray]:
    """Cuts of several lengths, each with speech in it, down to two frames and one."""
    return [wave, wave[:speech_at], wave[speech_at - 8000: speech_at + 8001], wave[speech_at:],
            wave[speech_at: speech_at + 400], wave[speech_at: speech_at + 161]]


def test_mel_matches_nemo_preprocessor(model, local, waves, speech_at):
    """Real speech of many lengths, down to one frame. (Not pure digital silence: NeMo's
    per-feature std is then 0 and its output float32 rounding noise / 1e-5, ours 0.)"""
    frontend = local.spec.frontend
    featurizer = model.preprocessor.featurizer
    assert np.array_equal(featurizer.fb[0].numpy(), frontend.filterbank.astype(np.float32))
    worst = 0.0
    for wave, at in zip(waves, speech_at):
        for cut in crops(wave, at):
            with torch.no_grad():
                theirs, n = model.preprocessor(input_signal=torch.from_numpy(cut)[None],
                                               length=torch.tensor([len(cut)]))
            ours = frontend.features(cut)
            assert ours.shape == (int(n), 128) == (frontend.num_frames(len(cut)), 128)
            worst = max(worst, float(np.abs(theirs[0, :, :int(n)].T.numpy() - ours).max()))
    assert worst <= FRONTEND_TOLERANCE


# --- decoding ---------------------------------------------------------------------------------


def test_tokens_match_nemo_transcribe_single_and_batched(local, waves, reference):
    single = [local.transcribe([wave])[0] for wave in waves]
    assert same_tokens(single, reference)
    assert same_tokens(local.transcribe(waves), reference)
    # The random model must exercise the rules, or this test could pass on empty output.
    tokens = np.concatenate([r.tokens for r in single])
    durations = np.concatenate([r.durations for r in single])
    assert tokens.size > 100 and len(set(tokens.tolist())) > 20
    assert set(durations.tolist()) == {0, 1, 2, 3, 4}
    assert max(np.bincount(r.frames).max() for r in single if r.frames.size) > 1  # tokens on one frame


def test_nemo_batched_tokens_and_frames_equal_nemo_single(model, waves, reference):
    """NeMo's own batch-of-N: same tokens and frames; its recorded durations are not always the
    ones it advanced by (see nemo_greedy), which is why batch 1 is the reference."""
    batched = nemo_greedy(model, waves, batch_size=5)
    assert [(b["tokens"], b["frames"]) for b in batched] == [(r["tokens"], r["frames"]) for r in reference]


def test_tokens_match_nemo_on_crops_single_and_batched(model, local, waves, speech_at):
    cuts = [cut for wave, at in zip(waves, speech_at) for cut in crops(wave, at)[1:4]]
    expected = nemo_greedy(model, cuts)
    assert same_tokens([local.transcribe([c])[0] for c in cuts], expected)
    assert same_tokens(local.transcribe(cuts), expected)


@pytest.mark.parametrize("max_symbols", [1, 2])
def test_max_symbols_rule_matches_nemo(nemo_file, local, waves, max_symbols):
    """A low limit forces NeMo's "blank after max_symbols tokens on one frame" all the time."""
    from omegaconf import open_dict

    model = load_model(nemo_file)
    decoding = model.cfg.decoding
    with open_dict(decoding):
        decoding.greedy.max_symbols = max_symbols
    model.change_decoding_strategy(decoding, verbose=False)
    expected = nemo_greedy(model, waves)
    spec = dataclasses.replace(local.spec.tdt, max_symbols_per_step=max_symbols)
    encoded = local.encode([local.spec.frontend.features(w) for w in waves])
    results = decode_padded(encoded, local.decoder_joint, spec)
    assert same_tokens(results, expected)
    assert max(np.bincount(r.frames).max() for r in results if r.frames.size) == max_symbols


def test_encoder_padding_does_not_change_valid_outputs(local, waves):
    feats = [local.spec.frontend.features(w) for w in waves]
    singles = [local.encode([f])[0] for f in feats]
    for alone, batched in zip(singles, encode_padded(local.encoder, feats), strict=True):
        assert alone.shape == batched.shape
        np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_empty_and_tiny_inputs(local):
    results = local.transcribe([np.zeros(1600, np.float32), np.zeros(161, np.float32)])
    assert all(r.tokens.dtype == np.int32 for r in results)
    assert decode_padded([], local.decoder_joint, local.spec.tdt) == []
    empty = decode_padded([np.zeros((0, 96), np.float32)], local.decoder_joint, local.spec.tdt)
    assert empty[0].tokens.size == 0
    with pytest.raises(ValueError, match="no feature frames"):
        local.transcribe([np.zeros(159, np.float32)])


# --- word timings -----------------------------------------------------------------------------


def test_word_timings_match_nemo_timestamps(local, waves, reference):
    frame_ms = local.spec.frame_ms
    checked = 0
    for wave, ref in zip(waves, reference):
        result = local.transcribe([wave])[0]
        words = local.spec.words(result)
        expected = [{"text": w, "start_ms": round(s * frame_ms), "end_ms": round(e * frame_ms)}
                    for w, s, e in ref["words"]]
        assert words == expected
        duration_ms = len(wave) * 1000 / 16000
        starts = [w["start_ms"] for w in words]
        assert starts == sorted(starts)
        assert all(0 <= w["start_ms"] <= w["end_ms"] <= duration_ms + frame_ms * 4 for w in words)
        checked += len(words)
    assert checked > 50


# --- errors -----------------------------------------------------------------------------------


def test_missing_and_invalid_nemo_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing.nemo")
    broken = tmp_path / "broken.nemo"
    broken.write_bytes(b"not a tar archive")
    with pytest.raises(ValueError, match="not a loadable .nemo"):
        load_model(broken)
    with pytest.raises(ValueError, match="not a .nemo file"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        export_parakeet(None, None, tmp_path)
    with pytest.raises(ValueError, match="random_init"):
        export_parakeet(None, "huge", tmp_path)


def test_unreachable_hub_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):  # the probe skips behind one
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(RuntimeError, match="pass the path of a .nemo file"):
        load_model("nvidia/parakeet-tdt-0.6b-v2")
