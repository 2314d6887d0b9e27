"""Export 3D-Speaker's ERes2NetV2 speaker-embedding model to `<repository>/speaker/1/model.onnx`.

The served graph takes the 80-dim kaldi fbank of one window with the window's mean over time
already subtracted (`speaker_features`), [batch, frames, 80], and returns the embedding as the
model computes it, [batch, 192] (not length-normalised: cosine scoring does that). Only windows
of equal length batch together: the statistics pooling would average in any padding, so the
pipeline cuts segments into windows of a few fixed lengths and nothing is ever padded.

Sources: a ModelScope model directory (configuration.json and the checkpoint it names, e.g.
iic/speech_eres2netv2w24s4ep4_sv_zh-cn_16k-common), a ModelScope id, or a random-weight
directory in the same format built here (the real w24s4ep4 architecture at full size, or a tiny
one for tests). All three load through `load_speaker_model`, the way ModelScope loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# FunASR's copy of 3D-Speaker's ERes2NetV2: the same code and state-dict keys as ModelScope's
# (checked: one state dict gives bit-identical embeddings in both). ModelScope's own module
# (modelscope.models.audio.sv.ERes2NetV2) imports torchaudio at import time, and there is no
# torchaudio here. FunASR's wrapper around it (ERes2NetV2SV) is not used: it loads checkpoints
# non-strictly and prefixes the keys with "model.".
from funasr.models.eres2net.eres2netv2 import ERes2NetV2

from tritonasr.models.meta import META_FILE
from tritonasr.models.speaker import FRONTEND, SpeakerSpec, speaker_features
from tritonasr.paths import cache_dir

from tritonasr.export.common import (
    cached_model_dir,
    OPSET,
    ExportJob,
    export_onnx,
    max_abs_diff,
    Progress,
    resolve_source,
    run_export,
    stderr_progress,
    warn_random_weights,
    write_json,
)

HUB_MODEL = "iic/speech_eres2netv2w24s4ep4_sv_zh-cn_16k-common"
CHECKPOINT = "pretrained_eres2netv2w24s4ep4.ckpt"  # the real checkpoint's name
# configuration.json's model.model_config. ModelScope reads embed_dim, baseWidth, scale and
# expansion and leaves the rest at ERes2NetV2's defaults (MODELSCOPE_FIXED); m_channels and
# num_blocks are read here too, so that the tiny test model can shrink.
MODEL_CONFIG = {
    "full": {"sample_rate": 16000, "fbank_dim": 80, "embed_dim": 192, "baseWidth": 24,
             "scale": 4, "expansion": 4},
    "tiny": {"sample_rate": 16000, "fbank_dim": 80, "embed_dim": 192, "baseWidth": 24,
             "scale": 4, "expansion": 4, "m_channels": 8, "num_blocks": [1, 1, 1, 1]},
}
MODELSCOPE_FIXED = {"feat_dim": 80, "m_channels": 64, "num_blocks": [3, 4, 6, 3]}
# Three stride-2 stages divide time by 8; the pooling's (unbiased) std needs 2 frames there.
MIN_FRAMES = 9
# PyTorch vs ONNX Runtime: the largest difference relative to the embedding's largest element,
# and the two embeddings' cosine. Measured (x86 CPU, fp32, ONNX Runtime 1.31, random weights):
# full size 1.5e-3 relative (5.5e-3 absolute), 1 - cosine 1.1e-6; tiny 1.7e-6 relative, 1e-12.
# The full size's is float32 rounding amplified by 16 residual blocks, not export error: PyTorch's
# own fp32 embedding is as far from a float64 run. A wrong graph differs by O(1). Batch-of-N vs
# batch-of-1 measured 0 (bit-identical).
RELATIVE_TOLERANCE = 1e-2
MIN_COSINE = 0.9999
PARITY_SECONDS = (0.5, 1.7, 3.0, 10.0)  # crops of the check audio (repeated where it is shorter)
BATCH_WINDOWS, BATCH_SECONDS = 4, 1.5


def speaker_frontend_parity(waveform: np.ndarray) -> float:
    """Max abs diff of `speaker_features` and FunASR's port of 3D-Speaker's front end
    (campplus.utils.extract_feature: torchaudio's kaldi.fbank, or without torchaudio, as here,
    kaldi-native-fbank with torchaudio's default options)."""
    from funasr.models.campplus.utils import extract_feature

    theirs, _, _ = extract_feature([torch.from_numpy(np.ascontiguousarray(waveform))])
    ours = speaker_features(waveform)
    if theirs.shape[1] != ours.shape[0]:
        raise RuntimeError(f"the features have {ours.shape[0]} frames where 3D-Speaker's front "
                           f"end has {theirs.shape[1]}: the serving front end does not match")
    return max_abs_diff(theirs[0], ours)


# --- model directories -----------------------------------------------------------------------


def load_speaker_model(model_dir: Path) -> tuple[ERes2NetV2, dict]:
    """ERes2NetV2 from a ModelScope speaker-verification directory, built as ModelScope's
    SpeakerVerificationERes2NetV2 builds it: constructor arguments from configuration.json's
    model.model_config, the checkpoint that model.pretrained_model names (a plain state dict),
    loaded strictly (a parameter missing or left over is an error), eval mode.

    Returns the model and its architecture (the constructor arguments).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    config_file = model_dir / "configuration.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"not a ModelScope model directory (no configuration.json): "
                                f"{model_dir}")
    config = json.loads(config_file.read_text(encoding="utf-8")).get("model", {})
    if "pretrained_model" not in config:
        raise ValueError(f"{config_file} names no checkpoint (model.pretrained_model)")
    architecture = _architecture(config.get("model_config", {}), config_file)
    checkpoint = model_dir / config["pretrained_model"]
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint named in {config_file} not found: {checkpoint}")
    model = ERes2NetV2(**architecture)
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    # strict=False only to word the error ourselves; shape mismatches raise either way.
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{checkpoint} does not fit the ERes2NetV2 of {config_file}: it lacks "
            f"{len(missing)} parameters {missing[:5]} and has {len(unexpected)} unknown ones "
            f"{unexpected[:5]}")
    return model.eval(), architecture


def _architecture(model_config: dict, where: Path | str) -> dict:
    """ERes2NetV2's constructor arguments from a configuration.json model.model_config."""
    missing = [k for k in ("embed_dim", "baseWidth", "scale", "expansion") if k not in model_config]
    if missing:
        raise ValueError(f"{where}: model.model_config lacks {missing}: not an ERes2NetV2 "
                         f"speaker model")
    return {
        **MODELSCOPE_FIXED,
        **{k: model_config[k] for k in ("m_channels", "num_blocks") if k in model_config},
        "embedding_size": model_config["embed_dim"],  # ModelScope's class calls it embed_dim
        **{k: model_config[k] for k in ("baseWidth", "scale", "expansion")},
    }


def random_model_dir(size: str, seed: int = 0, progress: Progress = stderr_progress) -> Path:
    """A ModelScope ERes2NetV2 directory with seeded random weights (built once, then reused):
    configuration.json and a checkpoint, as the real model has them."""
    if size not in MODEL_CONFIG:
        raise ValueError(f"random_init must be one of {sorted(MODEL_CONFIG)}, not {size!r}")
    target = cache_dir() / f"eres2netv2-random-{size}-seed{seed}"

    def build(directory: Path) -> None:
        progress(f"building a random-weight ERes2NetV2 ({size}, seed {seed}) in {target}…")
        write_json(directory / "configuration.json", {
            "framework": "pytorch",
            "task": "speaker-verification",
            "model": {"type": "eres2netv2-sv", "model_config": MODEL_CONFIG[size],
                      "pretrained_model": CHECKPOINT},
            "pipeline": {"type": "speaker-verification-eres2netv2"},
        })
        architecture = _architecture(MODEL_CONFIG[size], f"random_init {size}")
        torch.save(_random_state_dict(architecture, seed), directory / CHECKPOINT)

    return cached_model_dir(target, CHECKPOINT, build)


def _random_state_dict(architecture: dict, seed: int) -> dict:
    """Seeded PyTorch initialisation, with BatchNorm made non-trivial: random affine parameters,
    and running statistics measured on real speech (the bundled sample), as training leaves
    them. With the defaults (mean 0, variance 1) every BatchNorm would be near the identity,
    activations would shrink stage by stage, and all inputs would get nearly the same embedding.
    """
    from tritonasr.audio import load_audio
    from tritonasr.paths import sample_audio

    torch.manual_seed(seed)
    model = ERes2NetV2(**architecture)
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in batchnorms:
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.2)
            bn.reset_running_stats()
            bn.momentum = None  # running statistics = plain average over what is seen
        feats = speaker_features(load_audio(sample_audio()).samples)
        model.train()(torch.from_numpy(feats)[None])
    return model.state_dict()


# --- export ----------------------------------------------------------------------------------


def export_speaker(
    source: str | None,
    random_init: str | None,
    repository: Path,
    check_audio: Path | None = None,
    seed: int = 0,
    progress: Progress = stderr_progress,
) -> dict:
    """Export ERes2NetV2, check it against PyTorch, publish model.onnx and meta.json.

    source: a ModelScope model directory or hub id (e.g. HUB_MODEL); or, instead, random_init
    "full" | "tiny" for seeded random weights (meaningless embeddings).
    Returns a summary: output paths, tensor specs and parity numbers.
    """
    model_dir = resolve_source(source, random_init, seed, progress, random_model_dir)
    warn_random_weights(progress, random_init, seed, graph="the graph computes",
                        outputs="its embeddings", source="a model directory or hub id",
                        use="to tell speakers apart")
    progress(f"loading ERes2NetV2 from {model_dir}…")
    model, architecture = load_speaker_model(model_dir)
    embedding_dim = architecture["embedding_size"]
    parameters = sum(p.numel() for p in model.parameters())
    progress(f"  {parameters / 1e6:.1f} M parameters, embedding {embedding_dim}")

    def failures(parity: dict) -> list[str]:
        # `not <=` / `not >=`: NaN fails too.
        failed = [f"{name} {parity[name]:.3e}" for name in ("max_rel_diff", "batch_max_rel_diff")
                  if not parity[name] <= RELATIVE_TOLERANCE]
        if not parity["min_cosine"] >= MIN_COSINE:
            failed.append(f"cosine {parity['min_cosine']:.9f}")
        return failed

    done = run_export(ExportJob(
        version_dir=Path(repository) / "speaker" / "1",
        exporting="exporting speaker/1/model.onnx…",
        write=lambda staging: export_onnx(
            model, (torch.randn(2, 200, FRONTEND.n_mels),), staging.path("model.onnx"),
            ["feats"], ["embedding"],
            {"feats": {0: "batch", 1: "frames"}, "embedding": {0: "batch"}}),
        check_audio=check_audio,
        compare=lambda session, waveform: _parity(model, session, waveform),
        frontend=speaker_frontend_parity,
        summary=lambda parity: (
            f"  {len(PARITY_SECONDS)} crops ({', '.join(f'{s:g}' for s in PARITY_SECONDS)} s): "
            f"max abs diff {parity['max_abs_diff']:.2e}, relative {parity['max_rel_diff']:.2e} "
            f"(tolerance {RELATIVE_TOLERANCE:g}), cosine >= {parity['min_cosine']:.9f} "
            f"(tolerance {MIN_COSINE}); batch-of-{BATCH_WINDOWS} == batch-of-1: relative diff "
            f"{parity['batch_max_rel_diff']:.2e}"),
        failures=failures,
        failed="ERes2NetV2 export parity failed",
        meta={
            "model": "ERes2NetV2",
            "source": str(source) if source is not None else str(model_dir),
            "random_init": random_init,
            **SpeakerSpec.meta(frontend=FRONTEND, embedding_dim=embedding_dim, min_frames=MIN_FRAMES),
            "architecture": architecture,
        },
    ), progress)
    return {
        "model": done.paths["model.onnx"],
        "meta": done.paths[META_FILE],
        "model_dir": model_dir,
        "random_init": random_init,
        "opset": OPSET,
        "parameters": parameters,
        "export_seconds": done.export_seconds,
        "tensors": done.tensors,
        "parity": done.parity,
    }


# --- parity ----------------------------------------------------------------------------------


def _crop(waveform: np.ndarray, start_s: float, seconds: float) -> np.ndarray:
    """`seconds` of the waveform from `start_s`, the waveform repeated where it is too short."""
    start, n = int(start_s * FRONTEND.fs), int(seconds * FRONTEND.fs)
    repeats = -(-(start + n) // len(waveform))
    return np.tile(waveform, repeats)[start:start + n]


def _parity(model: ERes2NetV2, session, waveform: np.ndarray) -> dict:
    diffs, rel_diffs, cosines, frames = [], [], [], []
    for seconds in PARITY_SECONDS:
        feats = speaker_features(_crop(waveform, 0.0, seconds))[None]
        with torch.no_grad():
            ref = model(torch.from_numpy(feats)).numpy()
        (got,) = session.run(None, {"feats": feats})
        diffs.append(max_abs_diff(ref, got))
        rel_diffs.append(_rel_diff(ref, got))
        ref64, got64 = ref[0].astype(np.float64), got[0].astype(np.float64)
        cosines.append(float(ref64 @ got64 / np.linalg.norm(ref64) / np.linalg.norm(got64)))
        frames.append(feats.shape[1])

    # Equal-length windows from different places, as one batch and each alone.
    windows = np.stack([speaker_features(_crop(waveform, 0.7 * i, BATCH_SECONDS))
                        for i in range(BATCH_WINDOWS)])
    (batched,) = session.run(None, {"feats": windows})
    batch_diff = max(_rel_diff(session.run(None, {"feats": windows[i:i + 1]})[0], batched[i:i + 1])
                     for i in range(BATCH_WINDOWS))
    return {
        "seconds": list(PARITY_SECONDS),
        "frames": frames,
        "max_abs_diffs": diffs,
        "max_rel_diffs": rel_diffs,
        "cosines": cosines,
        "max_abs_diff": max(diffs),
        "max_rel_diff": max(rel_diffs),
        "min_cosine": min(cosines),
        "batch_windows": BATCH_WINDOWS,
        "batch_seconds": BATCH_SECONDS,
        "batch_max_rel_diff": batch_diff,
        "relative_tolerance": RELATIVE_TOLERANCE,
        "min_cosine_tolerance": MIN_COSINE,
    }


def _rel_diff(ref: np.ndarray, got: np.ndarray) -> float:
    """Max abs difference relative to the reference's largest element."""
    return max_abs_diff(ref, got) / float(np.abs(ref).max())
