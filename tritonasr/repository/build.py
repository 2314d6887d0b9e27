"""`tritonasr repo build`: a complete model repository for one deployment target, from the
exported graphs.

- `cpu`: the embedded default; leaf models are Python-backend models running their ONNX graphs
  with ONNX Runtime, which pad the segments a batch holds itself (allow_ragged_batch). `--int8`
  quantizes the ASR encoders' weights (tritonasr.repository.quantize).
- `gpu-onnxruntime`: leaf graphs on Triton's native ONNX Runtime backend with the TensorRT
  execution accelerator (FP16; engine and timing caches on a volume), KIND_GPU instances.
- `gpu-tensorrt`: leaf graphs as TensorRT plans, built on the serving GPU at deploy time by
  `tritonasr repo plans` (trtexec) from the ONNX graph kept beside them, with one optimization
  profile covering batch 1..max and every segment length the pipeline sends.

Native backends batch only requests of equal shape, so on the GPU targets the pipelines pad each
segment's features up to a whole number of `pad_segments_ms` (they pass the true length, which
the graphs mask by). Parakeet's decoder loop stays a Python-backend model on every target (a
native backend cannot loop over its own outputs); on GPU targets its instances are KIND_GPU and
run ONNX Runtime's CUDA provider. The BLS models stay KIND_CPU: they coordinate, the leaf models
compute.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tritonasr.models.meta import read_meta
from tritonasr.models.parakeet import ParakeetSpec
from tritonasr.models.sensevoice import SenseVoiceSpec
from tritonasr.models.speaker import SpeakerSpec
from tritonasr.models.vad import VAD_CHUNK_FRAMES
from tritonasr.recognition.engines import pad_step, padded_length
from tritonasr.recognition.offline import MAX_ASR_SEGMENT_MS
from tritonasr.recognition.settings import SpeakerSettings
from tritonasr.repository.check import BLS_TARGET_PARAMETERS, parse_config
from tritonasr.repository.layout import PIPELINES, SERVED_FRONTENDS, exported_models, install_model_files
from tritonasr.repository.quantize import QUANTIZATION_FILE, QUANTIZED_MODELS, graph_files, quantize_repository

TARGETS = ("cpu", "gpu-onnxruntime", "gpu-tensorrt")
# Leaf models whose whole computation is one ONNX graph (1/model.onnx): the native backends serve them.
GRAPH_MODELS = ("vad", "sensevoice", "parakeet_encoder", "speaker")
PLANS_FILE = "plans.json"
DEFAULT_TRT_CACHE = "/cache/trt"
# GPU targets: segments padded to whole seconds, so the batcher sees at most 30 shapes per model.
GPU_PAD_SEGMENTS_MS = 1000
# GPU targets: how long a leaf model's batcher waits to fill a batch, where the CPU config has none.
GPU_MAX_QUEUE_DELAY_US = 2000
# GPU targets: asr_offline's segments in the leaf models at once, per instance (the CPU default is
# smaller: see OfflineSettings), so that the GPU's batches fill.
GPU_MAX_INFLIGHT_SEGMENTS = 32


FRONTEND_CONFIG = """\
# A served front end ({what}): waveforms of many requests in, their features out, batched on the
# instance's device. Float32 throughout (kaldi's int16-scale power spectrum overflows FP16).
name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [
  {{ name: "waveform" data_type: TYPE_FP32  dims: [ -1 ] allow_ragged_batch: true }},
  {{ name: "lengths"  data_type: TYPE_INT64 dims: [ 1 ] reshape: {{ shape: [ ] }} }}
]
output [
  {{ name: "features" data_type: TYPE_FP32  dims: [ -1, {bins} ] }},
  {{ name: "frames"   data_type: TYPE_INT64 dims: [ 1 ] reshape: {{ shape: [ ] }} }}
]
dynamic_batching {{ max_queue_delay_microseconds: 1000 }}
instance_group [ {{ count: {count} kind: {kind}{gpus} }} ]
parameters {{ key: "ragged_inputs" value: {{ string_value: "waveform" }} }}
parameters {{ key: "intra_op_threads" value: {{ string_value: "1" }} }}
"""
FRONTEND_MODEL_PY = '''"""A served front end: its ONNX graph (from tritonasr.export.frontend) through ONNX Runtime,
the waveforms of the batch zero-padded into one call (their lengths say what is valid)."""
from tritonasr.runtime.triton_backend import OnnxLeafModel


class TritonPythonModel(OnnxLeafModel):
    pass
'''


@dataclass(frozen=True)
class BuildOptions:
    target: str = "cpu"
    gpus: int = 1  # GPU targets: instances go on GPUs 0..gpus-1
    instances: int | None = None  # leaf-model instances per device; None: the shipped count
    max_batch: int | None = None  # leaf models' max_batch_size; None: the shipped value
    trt_cache: str = DEFAULT_TRT_CACHE  # gpu-onnxruntime: TensorRT engine and timing caches
    pad_segments_ms: int = GPU_PAD_SEGMENTS_MS
    # Front ends as served models, batched on the device; None: on the GPU targets only (on a
    # CPU, computing them in the pipelines' own processes costs less than a round trip).
    served_frontends: bool | None = None
    int8: bool = False  # cpu: the ASR encoders' weights in int8 (tritonasr.repository.quantize)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}: use one of {', '.join(TARGETS)}")
        if self.int8 and self.on_gpu:
            raise ValueError("--int8 is for the cpu target: the GPU targets run the float32 graphs in FP16 "
                             "under TensorRT")
        for name in ("gpus", "instances", "max_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    @property
    def on_gpu(self) -> bool:
        return self.target != "cpu"

    @property
    def frontends(self) -> bool:
        return self.on_gpu if self.served_frontends is None else self.served_frontends


# export_frontend(source repository, front end, graph file to write) -> its feature bins: the
# export role's tritonasr.export.frontend.export_served_frontend, passed in by the CLI.
ExportFrontend = Callable[[Path, str, Path], int]


def build_repository(source: Path, output: Path, options: BuildOptions,
                     export_frontend: ExportFrontend | None = None) -> list[str]:
    """Writes `output` from the exports in `source`; returns the models written. Served front ends
    (options.frontends) are graphs exported from torch modules: they need `export_frontend`."""
    source, output = Path(source).resolve(), Path(output).resolve()
    models = [model for model in exported_models(source) if model not in SERVED_FRONTENDS]  # rebuilt below
    if not models:
        raise ValueError(f"{source} holds no exported models: run `tritonasr export vad` and an ASR engine first")
    if output == source:
        raise ValueError("--output must differ from the source repository")
    install_model_files(source, models)  # a repository exported before its configs changed
    frontends = served_frontends(source, models) if options.frontends else []
    if frontends and export_frontend is None:
        raise ValueError("served front ends are exported from torch modules: install the export extra, "
                         "or build with --no-served-frontends")
    output.mkdir(parents=True, exist_ok=True)
    # A model left from an earlier build would still load (model control mode none): remove it.
    for stale in sorted(p for p in output.iterdir()
                        if (p / "config.pbtxt").exists() and p.name not in models and p.name not in frontends):
        shutil.rmtree(stale)
    for report in (PLANS_FILE, QUANTIZATION_FILE):
        (output / report).unlink(missing_ok=True)
    plans = []
    for model in models:
        template = parse_config(source / model / "config.pbtxt")
        config = model_config(template, options, models, frontends)
        # A graph to be quantized is written by quantize_repository: copying it first (when
        # the output is on another file system) would copy gigabytes for nothing.
        graphs = graph_files(source / model / "1" / "model.onnx") if options.int8 and model in QUANTIZED_MODELS else []
        _copy_model(source / model, output / model, skip=graphs)
        shutil.rmtree(output / model / "configs", ignore_errors=True)  # the build's config is the one
        (output / model / "config.pbtxt").unlink(missing_ok=True)
        (output / model / "config.pbtxt").write_text(
            f"# Written by `tritonasr repo build --target {options.target}` from {source / model}.\n"
            f"# The shipped, commented template is tritonasr/model_templates/{model}/config.pbtxt.\n"
            + text_format.MessageToString(config))
        if options.target == "gpu-tensorrt" and model in GRAPH_MODELS:
            plans.append(plan_spec(output, model, config, options.pad_segments_ms))
    if options.target == "gpu-tensorrt":
        (output / PLANS_FILE).write_text(json.dumps({"plans": plans}, indent=2) + "\n")
    for name in frontends:
        shutil.rmtree(output / name, ignore_errors=True)
        write_frontend(output, name, export_frontend(source, name, output / name / "1" / "model.onnx"), options)
    if options.int8:
        quantize_repository(source, output, models)
    return sorted(models + frontends)


def model_config(template: mc.ModelConfig, options: BuildOptions, models: list[str],
                 frontends: list[str] = ()) -> mc.ModelConfig:
    config = mc.ModelConfig()
    config.CopyFrom(template)
    name = config.name
    for key in BLS_TARGET_PARAMETERS:  # a stage whose model was not exported is off ("")
        if key in config.parameters and config.parameters[key].string_value not in models:
            config.parameters[key].string_value = ""
    if "vad_model" in config.parameters:  # a BLS model: it calls the served front ends
        for frontend in frontends:
            config.parameters[SERVED_FRONTENDS[frontend][1]].string_value = frontend
    if name in PIPELINES:
        if options.on_gpu:
            config.parameters["pad_segments_ms"].string_value = str(options.pad_segments_ms)
            if name == "asr_offline":
                config.parameters["max_inflight_segments"].string_value = str(GPU_MAX_INFLIGHT_SEGMENTS)
        return config
    if config.max_batch_size and options.max_batch:
        config.max_batch_size = options.max_batch
    if options.instances:
        for group in config.instance_group:
            group.count = options.instances
    if options.int8 and name in QUANTIZED_MODELS:
        # Dynamic quantization scales a call's activations by their range over the whole batch:
        # batched, one caller's segment would change another's result. Each segment runs alone.
        config.ClearField("dynamic_batching")
    if not options.on_gpu or name not in GRAPH_MODELS and name != "parakeet_decoder":
        return config
    _on_gpus(config, options.gpus)
    if name == "parakeet_decoder":
        return config  # Python backend: model.py picks the CUDA provider on a KIND_GPU instance
    config.ClearField("backend")
    config.ClearField("parameters")  # the Python leaf model's own (threads, ragged inputs)
    for tensor in config.input:
        tensor.allow_ragged_batch = False  # the pipelines pad instead (pad_segments_ms)
    if options.target == "gpu-onnxruntime":
        config.platform = "onnxruntime_onnx"
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add()
        accelerator.name = "tensorrt"
        accelerator.parameters.update({
            "precision_mode": "FP16",
            "max_workspace_size_bytes": str(4 << 30),
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": options.trt_cache,
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": options.trt_cache,
        })
    else:
        config.platform = "tensorrt_plan"
        config.default_model_filename = "model.plan"
    return config


def _on_gpus(config: mc.ModelConfig, gpus: int) -> None:
    if not config.HasField("dynamic_batching"):  # a CPU template may run each request alone (sensevoice)
        config.dynamic_batching.max_queue_delay_microseconds = GPU_MAX_QUEUE_DELAY_US
    count = max((group.count for group in config.instance_group), default=1) or 1
    config.ClearField("instance_group")
    group = config.instance_group.add()
    group.kind = mc.ModelInstanceGroup.KIND_GPU
    group.count = count  # on each of the GPUs
    group.gpus.extend(range(gpus))


# Files at least this big are hard-linked where the file system allows (Parakeet's graph is
# 2.4 GB); smaller ones are copied, so editing the output never edits the source.
LINK_BYTES = 64 << 20


def _copy_model(source: Path, target: Path, skip: list[Path] = ()) -> None:
    """The model's files but its configs (written by the build) and those in `skip`."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if (path.is_dir() or path.name.startswith(".") or "__pycache__" in path.parts
                or relative == Path("config.pbtxt") or relative.parts[0] == "configs" or path in skip):
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.exists():
            destination.unlink()
        if path.stat().st_size >= LINK_BYTES:
            try:
                os.link(path, destination)
                continue
            except OSError:
                pass
        shutil.copy2(path, destination)


def segment_frames(model: str, model_dir: Path, pad_ms: int = GPU_PAD_SEGMENTS_MS) -> tuple[int, int, int]:
    """(min, typical, max) length along the variable time axis of what the pipelines send `model`."""
    meta = read_meta(model_dir / "1")
    if model == "vad":  # stream steps (100 ms = 10 frames) .. whole-file chunks
        return 1, 10, VAD_CHUNK_FRAMES
    if model == "speaker":  # windows of whole 500 ms steps up to the shipped speaker_window_ms
        spec = SpeakerSpec.from_meta(meta)
        window = SpeakerSettings().window_ms // spec.frontend.frame_shift
        return max(spec.min_frames, 1), window, window
    frame_ms = _frame_ms(model, meta)
    # The longest segment (MAX_ASR_SEGMENT_MS, one frame to spare), padded as the pipelines pad it.
    longest = padded_length(math.ceil(MAX_ASR_SEGMENT_MS / frame_ms) + 1, pad_step(frame_ms, pad_ms))
    return 1, math.ceil(8000 / frame_ms), longest


def _frame_ms(model: str, meta: dict) -> float:
    if model == "sensevoice":  # LFR frames of kaldi fbank
        return SenseVoiceSpec.frontend_of(meta).frame_ms
    return ParakeetSpec.mel_of(meta).hop_ms  # parakeet_encoder: NeMo mel frames


def plan_spec(repository: Path, model: str, config: mc.ModelConfig, pad_ms: int = GPU_PAD_SEGMENTS_MS) -> dict:
    """What trtexec needs for `model`: the ONNX graph, the plan to write, and one optimization
    profile covering batch 1..max_batch_size and every length `segment_frames` allows."""
    graph = onnx.load(str(repository / model / "1" / "model.onnx"), load_external_data=False)
    shortest, typical, longest = segment_frames(model, repository / model, pad_ms)
    batch = config.max_batch_size
    shapes = {"min": {}, "opt": {}, "max": {}}
    for tensor in graph.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.type.tensor_type.shape.dim]
        for profile, n, length in (("min", 1, shortest), ("opt", max(1, batch // 2), typical), ("max", batch, longest)):
            shape = [n] + [length if d is None else d for d in dims[1:]]
            shapes[profile][tensor.name] = shape
    return {"model": model, "onnx": f"{model}/1/model.onnx", "plan": f"{model}/1/model.plan", "fp16": True,
            **shapes}


def served_frontends(source: Path, models: list[str]) -> list[str]:
    """The front ends to serve for the exports in `models` (see SERVED_FRONTENDS)."""
    from tritonasr.models.sensevoice import SenseVoiceSpec
    from tritonasr.models.vad import VadSpec

    names = []
    if "vad" in models:
        if "sensevoice" in models:
            vad = VadSpec.load(source / "vad" / "1").frontend
            sensevoice = SenseVoiceSpec.load(source / "sensevoice" / "1").frontend
            if not vad.fbank_options_equal(sensevoice):  # one served fbank feeds both
                raise ValueError(f"the VAD's fbank ({vad}) differs from SenseVoice's ({sensevoice}): "
                                 "one served front end cannot feed both")
        names.append("fbank")
    if "speaker" in models:
        names.append("speaker_fbank")
    if "parakeet_decoder" in models:
        names.append("parakeet_mel")
    return names


def write_frontend(output: Path, name: str, bins: int, options: BuildOptions) -> None:
    """The served front end's config and model.py, beside its graph (output/name/1/model.onnx)."""
    model_dir = output / name
    (model_dir / "1" / "model.py").write_text(FRONTEND_MODEL_PY)
    gpus = f" gpus: {list(range(options.gpus))}" if options.on_gpu else ""
    (model_dir / "config.pbtxt").write_text(FRONTEND_CONFIG.format(
        what=SERVED_FRONTENDS[name][0], name=name, bins=bins, max_batch=options.max_batch or 64,
        count=options.instances or 1, kind="KIND_GPU" if options.on_gpu else "KIND_CPU", gpus=gpus))
