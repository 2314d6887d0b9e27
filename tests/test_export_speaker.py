"""Export of a tiny random-weight ERes2NetV2 from a ModelScope-format directory: the ONNX graph's
interface and dynamic time axis, its parity with PyTorch, batching, the front end, the loader's
errors, meta.json and the served configs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tritonasr.audio import load_audio
from tritonasr.export.speaker import (
    CHECKPOINT,
    MIN_COSINE,
    MIN_FRAMES,
    PARITY_SECONDS,
    RELATIVE_TOLERANCE,
    export_speaker,
    load_speaker_model,
    random_model_dir,
    speaker_frontend_parity,
)
from tritonasr.models.fbank import Frontend
from tritonasr.models.speaker import FRONTEND, speaker_features
from tritonasr.paths import model_templates, sample_audio
from tritonasr.repository.check import check_model, parse_config

SAMPLE = sample_audio()
TEMPLATE = model_templates() / "speaker"


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def model_dir(fresh_cache) -> Path:
    """A tiny model directory built in a fresh cache (so it is built, not found)."""
    return random_model_dir("tiny", progress=quiet)


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model_repository")


@pytest.fixture(scope="module")
def exported(model_dir, repository) -> dict:
    return export_speaker(str(model_dir), None, repository, progress=quiet)


@pytest.fixture(scope="module")
def session(exported) -> ort.InferenceSession:
    return ort.InferenceSession(str(exported["model"]), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def torch_model(model_dir):
    return load_speaker_model(model_dir)[0]


@pytest.fixture(scope="module")
def wave() -> np.ndarray:
    return load_audio(SAMPLE).samples


def torch_embedding(model, feats: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(feats)).numpy()


def test_export_parity_report(exported):
    parity = exported["parity"]
    assert parity["seconds"] == list(PARITY_SECONDS)
    assert parity["frames"] == sorted(set(parity["frames"]))  # four different lengths
    # The tiny model is far better conditioned than the export's gate allows for (measured:
    # 3e-6 abs, 2e-6 relative, batch bit-identical): test it tightly.
    assert parity["max_abs_diff"] <= 1e-4 and parity["max_rel_diff"] <= 1e-5
    assert parity["min_cosine"] >= 0.999999
    assert parity["batch_windows"] >= 2 and parity["batch_max_rel_diff"] <= 1e-6
    assert parity["frontend_max_abs_diff"] <= 1e-4  # measured ~8e-6 (float32 means)
    assert parity["audio"] == str(SAMPLE)


def test_graph_interface(exported):
    graph = onnx.load(str(exported["model"]))

    def spec(values):
        return {v.name: (v.type.tensor_type.elem_type,
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in values}

    f32 = onnx.TensorProto.FLOAT
    assert spec(graph.graph.input) == {"feats": (f32, ["batch", "frames", 80])}
    assert spec(graph.graph.output) == {"embedding": (f32, ["batch", 192])}
    assert {o.domain: o.version for o in graph.opset_import}[""] >= 17


@pytest.mark.parametrize("frames", [MIN_FRAMES, 57, 170, 301, 1003])
def test_any_length_matches_pytorch(session, torch_model, frames):
    """The time axis is dynamic all the way through (odd lengths hit every stride's rounding)."""
    feats = np.random.default_rng(frames).standard_normal((2, frames, 80), dtype=np.float32)
    (got,) = session.run(None, {"feats": feats})
    want = torch_embedding(torch_model, feats)
    assert got.shape == (2, 192) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_shorter_than_min_frames_is_not_finite(session):
    feats = np.ones((1, MIN_FRAMES - 1, 80), np.float32)
    assert not np.isfinite(session.run(None, {"feats": feats})[0]).all()


def test_batch_of_n_equals_batch_of_1(session, wave):
    n = 16000 * 2
    windows = np.stack([speaker_features(wave[i * 20000:i * 20000 + n]) for i in range(5)])
    (batched,) = session.run(None, {"feats": windows})
    for i in range(len(windows)):
        (single,) = session.run(None, {"feats": windows[i:i + 1]})
        np.testing.assert_allclose(batched[i:i + 1], single, atol=1e-6)
    # Different speech gives different embeddings (the random model is not degenerate).
    unit = batched / np.linalg.norm(batched, axis=1, keepdims=True)
    assert (unit @ unit.T)[np.triu_indices(len(unit), 1)].max() < 0.999


def test_frontend_matches_3dspeaker(wave):
    """The serving features vs FunASR's port of 3D-Speaker's FBank(80, mean_nor=True)."""
    from funasr.models.campplus.utils import extract_feature

    theirs = extract_feature([torch.from_numpy(wave[:40000])])[0][0].numpy()
    ours = speaker_features(wave[:40000])
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (248, 80)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert abs(ours.mean(axis=0)).max() < 1e-5
    assert speaker_frontend_parity(wave) <= 1e-4
    assert (FRONTEND.window, FRONTEND.scale, FRONTEND.dither) == ("povey", 1.0, 0.0)


def test_meta(exported, model_dir):
    meta = json.loads(exported["meta"].read_text())
    assert list(meta) == ["model", "source", "random_init", "frontend", "embedding_dim",
                          "min_frames", "architecture", "parity"]
    assert meta["model"] == "ERes2NetV2"
    assert meta["source"] == str(model_dir) and meta["random_init"] is None
    assert meta["frontend"] == {"fs": 16000, "window": "povey", "n_mels": 80, "frame_length": 25,
                                "frame_shift": 10, "dither": 0.0, "scale": 1.0}
    assert Frontend.from_config(meta["frontend"]) == FRONTEND
    assert meta["embedding_dim"] == 192 and meta["min_frames"] == MIN_FRAMES
    assert meta["architecture"] == {"feat_dim": 80, "m_channels": 8, "num_blocks": [1, 1, 1, 1],
                                    "embedding_size": 192, "baseWidth": 24, "scale": 4,
                                    "expansion": 4}
    assert meta["parity"] == json.loads(json.dumps(exported["parity"]))
    assert meta["parity"]["relative_tolerance"] == RELATIVE_TOLERANCE
    assert meta["parity"]["min_cosine_tolerance"] == MIN_COSINE
    assert sorted(p.name for p in exported["meta"].parent.iterdir()) == ["meta.json", "model.onnx"]


def test_model_dir_is_modelscope_format(model_dir):
    config = json.loads((model_dir / "configuration.json").read_text())
    assert config["task"] == "speaker-verification"
    assert config["model"]["type"] == "eres2netv2-sv"
    assert config["model"]["pretrained_model"] == CHECKPOINT
    assert {"embed_dim", "baseWidth", "scale", "expansion"} <= set(config["model"]["model_config"])
    state = torch.load(model_dir / CHECKPOINT, weights_only=True)  # a plain state dict
    assert "seg_1.weight" in state and "layer1.0.bn1.running_var" in state
    assert not torch.equal(state["bn1.running_var"], torch.ones_like(state["bn1.running_var"]))


def test_modelscope_config_means_the_full_architecture(tmp_path):
    """A real checkpoint's configuration.json names only embed_dim, baseWidth, scale and
    expansion: the rest is ERes2NetV2's default (m_channels 64, blocks 3-4-6-3), as in ModelScope."""
    from funasr.models.eres2net.eres2netv2 import ERes2NetV2

    model_config = {"sample_rate": 16000, "fbank_dim": 80, "embed_dim": 192, "baseWidth": 24,
                    "scale": 4, "expansion": 4}
    (tmp_path / "configuration.json").write_text(json.dumps(
        {"model": {"type": "eres2netv2-sv", "model_config": model_config,
                   "pretrained_model": "weights.ckpt"}}))
    reference = ERes2NetV2(baseWidth=24, scale=4, expansion=4)  # as 3D-Speaker's infer_sv builds it
    torch.save(reference.state_dict(), tmp_path / "weights.ckpt")
    model, architecture = load_speaker_model(tmp_path)
    assert architecture["m_channels"] == 64 and architecture["num_blocks"] == [3, 4, 6, 3]
    assert sum(p.numel() for p in model.parameters()) == 53_513_632
    assert not model.training


def test_checkpoint_missing_a_parameter_is_an_error(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    state = torch.load(broken / CHECKPOINT, weights_only=True)
    del state["layer2.0.bn1.running_var"]
    torch.save(state, broken / CHECKPOINT)
    with pytest.raises(RuntimeError, match=r"lacks 1 parameters \['layer2.0.bn1.running_var'\]"):
        load_speaker_model(broken)
    with pytest.raises(RuntimeError, match="lacks 1 parameters"):
        export_speaker(str(broken), None, tmp_path / "repo", progress=quiet)
    assert not (tmp_path / "repo" / "speaker" / "1" / "model.onnx").exists()


def test_bad_sources_are_clear_errors(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        export_speaker(str(tmp_path / "nowhere"), None, tmp_path, progress=quiet)
    with pytest.raises(FileNotFoundError, match="no configuration.json"):
        load_speaker_model(tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        export_speaker(str(model_dir), "tiny", tmp_path, progress=quiet)
    with pytest.raises(ValueError, match="exactly one"):
        export_speaker(None, None, tmp_path, progress=quiet)
    with pytest.raises(ValueError, match="random_init must be one of"):
        random_model_dir("huge", progress=quiet)
    (tmp_path / "configuration.json").write_text(json.dumps(
        {"model": {"model_config": {"embed_dim": 192}, "pretrained_model": CHECKPOINT}}))
    with pytest.raises(ValueError, match=r"lacks \['baseWidth', 'scale', 'expansion'\]"):
        load_speaker_model(tmp_path)


@pytest.mark.parametrize("target", ["cpu", "gpu-onnxruntime"])
def test_served_configs_match_the_graph(exported, repository, target, tmp_path):
    from google.protobuf import text_format

    from tritonasr.repository.build import BuildOptions, model_config

    config = model_config(parse_config(TEMPLATE / "config.pbtxt"), BuildOptions(target), ["speaker"])
    config_file = tmp_path / "config.pbtxt"
    config_file.write_text(text_format.MessageToString(config))
    assert check_model(repository / "speaker", config_file) == []
    assert config.name == "speaker" and config.max_batch_size == 32
    assert [(t.name, list(t.dims), t.allow_ragged_batch) for t in config.input] == \
        [("feats", [-1, 80], False)]
    assert [(t.name, list(t.dims)) for t in config.output] == [("embedding", [192])]
    assert config.HasField("dynamic_batching")
    if target == "cpu":
        assert config.backend == "python"
        assert config.parameters["intra_op_threads"].string_value == "2"
        assert [(g.count, g.kind) for g in config.instance_group] == [(1, config.instance_group[0].KIND_CPU)]
    else:
        assert config.platform == "onnxruntime_onnx"
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"