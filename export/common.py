"""Shared pieces of the export steps: progress, FunASR loading, features, ONNX files, parity,
and `run_export`, the stage-export-check-publish sequence of a one-graph export."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from tritonasr.audio import load_audio
from tritonasr.models.fbank import Frontend
from tritonasr.models.meta import META_FILE
from tritonasr.paths import sample_audio

Progress = Callable[[str], None]

OPSET = 17
# Keys of a FunASR frontend_conf that describe the features themselves (not file paths).
FEATURE_KEYS = ("fs", "window", "n_mels", "frame_length", "frame_shift", "lfr_m", "lfr_n")
# Features after CMVN are O(1); beyond this a frontend difference can move the model's output.
FRONTEND_WARN = 1e-3


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Audio and features


def check_waveform(check_audio: Path | None) -> tuple[np.ndarray, str]:
    """The speech the parity checks run on, and a description of where it came from."""
    path = Path(check_audio) if check_audio is not None else sample_audio()
    if not path.is_file():
        raise FileNotFoundError(f"check audio not found: {path}")
    return load_audio(path).samples, str(path)


def lfr_features(waveform: np.ndarray, frontend_conf: Mapping) -> np.ndarray:
    """LFR-stacked fbank features [T, n_mels * lfr_m], float32, before CMVN: the serving
    frontend's, so parity is measured on the features the server will feed."""
    return Frontend.from_config(frontend_conf).features(waveform)


@dataclass(frozen=True)
class Cmvn:
    """Global CMVN of a FunASR am.mvn: y = (x + shift) * scale."""

    shift: np.ndarray
    scale: np.ndarray

    @classmethod
    def load(cls, path: Path) -> "Cmvn":
        from funasr.frontends.wav_frontend import load_cmvn

        table = load_cmvn(str(path)).numpy()
        return cls(shift=table[0].astype(np.float32), scale=table[1].astype(np.float32))

    def apply_funasr(self, feats: np.ndarray) -> torch.Tensor:
        """CMVN exactly as FunASR's frontend applies it (its own function, in torch)."""
        from funasr.frontends.wav_frontend import apply_cmvn

        table = torch.from_numpy(np.stack([self.shift, self.scale]))
        # apply_cmvn works in place: hand it a copy.
        return apply_cmvn(torch.tensor(feats, dtype=torch.float32), table)


class CmvnLayer(torch.nn.Module):
    """CMVN baked into the graph as constants, so the server needs no am.mvn."""

    def __init__(self, cmvn: Cmvn):
        super().__init__()
        self.register_buffer("shift", torch.from_numpy(cmvn.shift.copy()))
        self.register_buffer("scale", torch.from_numpy(cmvn.scale.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.shift) * self.scale


def frontend_parity(waveform: np.ndarray, frontend_conf: Mapping, cmvn_file: Path) -> float:
    """Max abs diff of FunASR's own frontend (fbank, LFR, CMVN) and `lfr_features` + CMVN.

    Not the graph's parity: it tells whether the features the server computes are the ones
    the model was trained on.
    """
    from funasr.frontends.wav_frontend import WavFrontend

    conf = {k: frontend_conf[k] for k in FEATURE_KEYS if k in frontend_conf}
    frontend = WavFrontend(cmvn_file=str(cmvn_file), dither=0.0, **conf)
    with torch.no_grad():
        theirs, _ = frontend(torch.from_numpy(waveform)[None], torch.tensor([len(waveform)]))
    cmvn = Cmvn.load(cmvn_file)
    ours = (lfr_features(waveform, frontend_conf) + cmvn.shift) * cmvn.scale
    if theirs.shape[1] != ours.shape[0]:
        raise RuntimeError(f"the features have {ours.shape[0]} frames where FunASR's frontend "
                           f"has {theirs.shape[1]}: the serving frontend does not match")
    return max_abs_diff(theirs[0], ours)


def report_frontend(diff: float, progress: Progress) -> None:
    warning = "  <-- WARNING: the serving features are not FunASR's" if diff > FRONTEND_WARN else ""
    progress(f"  features vs FunASR's frontend: max abs diff {diff:.2e}{warning}")


# ---------------------------------------------------------------------------------------------
# Sources


def cached_model_dir(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """`target`, built once by `build(directory)` in a scratch directory beside it and renamed
    into place, so it appears complete or not at all; later calls find `target / marker`."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(scratch)
        scratch.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            os.replace(scratch, target)
        except OSError:  # someone else finished first (target exists, not empty)
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def resolve_source(source: str | None, random_init: str | None, seed: int, progress: Progress,
                   random_model_dir: Callable[[str, int, Progress], Path], hub: str | None = None) -> Path:
    """The local model directory to export from: `source` (a directory, or a hub id to download)
    or, with `random_init`, the one `random_model_dir(size, seed, progress)` builds."""
    if (source is None) == (random_init is None):
        raise ValueError("give exactly one of a model source (directory or hub id) and random_init")
    if random_init is not None:
        return random_model_dir(random_init, seed, progress)
    path = Path(source).expanduser()
    if path.exists():
        return path
    # "owner/name" that is not a local path is a hub id; anything else is a missing directory.
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"model directory not found: {source}")
    from tritonasr.export.weights import fetch_hub_model

    progress(f"downloading {source} from {hub or 'ModelScope, then Hugging Face'}…")
    return fetch_hub_model(source, hub)


def warn_random_weights(progress: Progress, random_init: str | None, seed: int, *, graph: str,
                        outputs: str, source: str, use: str) -> None:
    """The banner of a random-weight export (none for a real checkpoint)."""
    if random_init is None:
        return
    bar = "!" * 78
    progress(f"{bar}\n!! RANDOM WEIGHTS ({random_init}, seed {seed}): {graph} the real\n!! "
             f"architecture but {outputs} are MEANINGLESS. Export a real checkpoint\n!! "
             f"({source}) {use}.\n{bar}")


# ---------------------------------------------------------------------------------------------
# FunASR models


def load_funasr_model(model_dir: Path) -> tuple[torch.nn.Module, dict]:
    """Build a model from a FunASR model directory with FunASR's own loader (AutoModel.build_model).

    Returns the model in eval mode and the resolved kwargs (frontend_conf, tokenizer, ...).
    Unlike FunASR's default, a checkpoint that does not cover every parameter is an error, not
    a warning with silently random weights.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    for name in ("config.yaml", "model.pt"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"not a FunASR model directory (no {name}): {model_dir}")
    from funasr import AutoModel

    model, kwargs = AutoModel.build_model(
        model=str(model_dir),
        device="cpu",
        ncpu=torch.get_num_threads(),  # FunASR would otherwise reset torch to 4 threads
        disable_update=True,
        ignore_init_mismatch=False,  # shape mismatches raise instead of keeping random weights
    )
    _check_all_weights_loaded(model, Path(kwargs["init_param"]))
    cmvn_file = kwargs.get("frontend_conf", {}).get("cmvn_file")
    if not cmvn_file or not Path(cmvn_file).is_file():
        raise FileNotFoundError(f"no CMVN file (am.mvn) in the model directory {model_dir}")
    model.eval()
    return model, kwargs


def _check_all_weights_loaded(model: torch.nn.Module, checkpoint: Path) -> None:
    state = torch.load(str(checkpoint), map_location="cpu", mmap=True, weights_only=True)
    for wrapper in ("state_dict", "model_state_dict", "model"):  # FunASR's own unwrapping
        state = state.get(wrapper, state)
    present = {k.removeprefix("module.") for k in state}
    missing = sorted(set(model.state_dict()) - present)
    if missing:
        raise RuntimeError(
            f"{checkpoint} lacks {len(missing)} parameters of {type(model).__name__}, "
            f"e.g. {missing[:5]}: wrong model.pt for this config.yaml?"
        )


# ---------------------------------------------------------------------------------------------
# ONNX files


class Staging:
    """Files of one model version, written to a scratch directory and published together.

    Nothing in the version directory changes until `publish`, which moves each file in with
    an atomic rename; files it does not produce (e.g. a Python backend's model.py) are kept.
    """

    def __init__(self, version_dir: Path):
        self.version_dir = Path(version_dir)
        self.version_dir.mkdir(parents=True, exist_ok=True)
        # Same file system as the target, so the renames are atomic.
        self.dir = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.version_dir.parent))

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def publish(self) -> dict[str, Path]:
        published = {}
        # model.onnx goes last: whoever sees the new graph also sees its external data and meta.
        for src in sorted(self.dir.iterdir(), key=lambda p: p.name == "model.onnx"):
            dst = self.version_dir / src.name
            os.replace(src, dst)
            published[src.name] = dst
        return published


def write_json(path: Path, data: Mapping) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def publish_export(staging: Staging, meta: Mapping, progress: Progress) -> dict[str, Path]:
    """Writes meta.json and publishes the staged version directory; returns the published files."""
    write_json(staging.path(META_FILE), meta)
    paths = staging.publish()
    for path in paths.values():
        progress(f"wrote {path}")
    return paths


@dataclass(frozen=True)
class ExportJob:
    """The model-specific parts of a one-graph export (model.onnx); `run_export` runs them."""

    version_dir: Path
    write: Callable[[Staging], None]  # model.onnx and any files beside it, into the stage
    compare: Callable[[object, np.ndarray], dict]  # parity numbers (ORT session, check speech)
    summary: Callable[[dict], str]  # the progress line that reports them
    failures: Callable[[dict], list[str]]  # the checks that fail
    failed: str  # opening of the parity error, e.g. "VAD export parity failed"
    meta: Mapping  # meta.json, less "parity"
    check_audio: Path | None = None
    frontend: Callable[[np.ndarray], float] | None = None  # served features vs the model's own
    exporting: str | None = None  # progress line before the export
    report_export_time: bool = True
    checking: str = "checking parity (PyTorch vs ONNX Runtime)…"
    meta_tensors: bool = False  # meta.json also records the tensor specs and opset


@dataclass(frozen=True)
class Exported:
    paths: dict[str, Path]  # published files by name
    tensors: dict
    export_seconds: float
    parity: dict


def run_export(job: ExportJob, progress: Progress) -> Exported:
    """Export into a staging directory, check parity on the check speech, write meta.json and
    publish. A failed parity check raises RuntimeError and publishes nothing."""
    with Staging(job.version_dir) as staging:
        if job.exporting:
            progress(job.exporting)
        started = time.perf_counter()
        job.write(staging)
        export_seconds = time.perf_counter() - started
        if job.report_export_time:
            progress(f"  exported in {export_seconds:.1f} s")

        progress(job.checking)
        waveform, audio_source = check_waveform(job.check_audio)
        session = ort_session(staging.path("model.onnx"))
        parity = job.compare(session, waveform)
        parity["audio"] = audio_source
        if job.frontend is not None:
            parity["frontend_max_abs_diff"] = job.frontend(waveform)
        progress(job.summary(parity))
        if job.frontend is not None:
            report_frontend(parity["frontend_max_abs_diff"], progress)
        failures = job.failures(parity)
        if failures:
            raise RuntimeError(f"{job.failed}: {', '.join(failures)}")

        specs = tensor_specs(session)
        tensors = {"tensors": specs, "opset": OPSET} if job.meta_tensors else {}
        paths = publish_export(staging, {**job.meta, **tensors, "parity": parity}, progress)
    return Exported(paths, specs, round(export_seconds, 2), parity)


def export_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> None:
    """torch -> ONNX with the TorchScript exporter, then onnx's checker on the file.

    The TorchScript exporter (dynamo=False) is used because it keeps the FunASR modules' shape
    arithmetic symbolic with `dynamic_axes`; weights over 2 GB go to external data files next
    to the graph, which `Staging.publish` moves along with it.
    """
    import onnx

    module.eval()
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))  # by path: works for graphs with external data too


def pin_output_dims(path: Path, dims: Mapping[str, Mapping[int, int]]) -> None:
    """Declare output dims the exporter left symbolic but that are fixed by construction.

    (A slice like `cache[:, :, -19:]` comes out as a named symbolic dim; Triton configs and
    clients want the number.) Small graphs only: it rewrites the file in one piece.
    """
    import onnx

    model = onnx.load(str(path))
    for output in model.graph.output:
        for axis, value in dims.get(output.name, {}).items():
            output.type.tensor_type.shape.dim[axis].dim_value = value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def ort_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def tensor_specs(session) -> dict[str, dict[str, list]]:
    """Names and shapes (symbolic dims as strings) of a session's inputs and outputs."""
    return {
        "inputs": {i.name: list(i.shape) for i in session.get_inputs()},
        "outputs": {o.name: list(o.shape) for o in session.get_outputs()},
    }


def max_abs_diff(a, b) -> float:
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
