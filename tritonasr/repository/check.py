"""Validate a model repository without loading it: every config (config.pbtxt and the
configs/*.pbtxt variants a server can select) parses as Triton's ModelConfig, and the tensors
of models that have an ONNX graph match the graph's inputs and outputs."""
from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tritonasr.paths import model_templates

_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
    onnx.TensorProto.INT32: mc.TYPE_INT32, onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.BOOL: mc.TYPE_BOOL,
}


# Parameters through which a BLS model names the models it calls.
BLS_TARGET_PARAMETERS = ("vad_model", "sensevoice_model", "parakeet_encoder_model", "parakeet_decoder_model",
                         "speaker_model", "fbank_model", "speaker_fbank_model", "mel_model")


def parse_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())


def _graph_tensors(graph_file: Path) -> dict[str, tuple[int, list[int | None]]]:
    model = onnx.load(str(graph_file), load_external_data=False)
    tensors = {}
    for value in list(model.graph.input) + list(model.graph.output):
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        tensors[value.name] = (t.elem_type, dims)
    return tensors


def _check_tensor(kind: str, tensor, graph: dict, batched: bool) -> list[str]:
    if tensor.name not in graph:
        return [f"{kind} {tensor.name!r} is not in the ONNX graph (it has {sorted(graph)})"]
    elem, graph_dims = graph[tensor.name]
    problems = []
    if _ONNX_TO_TRITON.get(elem) != tensor.data_type:
        problems.append(f"{kind} {tensor.name!r}: config type {mc.DataType.Name(tensor.data_type)}, "
                        f"graph type {onnx.TensorProto.DataType.Name(elem)}")
    dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
    if batched:
        graph_dims = graph_dims[1:]
    if len(dims) != len(graph_dims) or any(
            g is not None and d != -1 and d != g for d, g in zip(dims, graph_dims)):
        problems.append(f"{kind} {tensor.name!r}: config dims {dims} do not fit graph dims {graph_dims}")
    return problems


def check_model(model_dir: Path, config_file: Path, require_plans: bool = True) -> list[str]:
    where = f"{config_file}"
    try:
        config = parse_config(config_file)
    except text_format.ParseError as exc:
        return [f"{where}: not a valid ModelConfig: {exc}"]
    problems = []
    if config.name and config.name != model_dir.name:
        problems.append(f"{where}: name {config.name!r} differs from its directory {model_dir.name!r}")
    graph_file = model_dir / "1" / "model.onnx"
    if config.platform == "tensorrt_plan":
        # The plan is built from model.onnx on the serving GPU (`tritonasr repo plans`): its
        # tensors are the graph's.
        plan = model_dir / "1" / (config.default_model_filename or "model.plan")
        if require_plans and not plan.exists():
            problems.append(f"{where}: {plan} is not built yet: run `tritonasr repo plans {model_dir.parent}` "
                            f"on the serving GPU")
        if not graph_file.exists():
            problems.append(f"{where}: platform tensorrt_plan but {graph_file}, which its plan is built from, "
                            f"does not exist")
    if graph_file.exists() and (config.platform in ("onnxruntime_onnx", "tensorrt_plan")
                                or config.backend in ("python", "onnxruntime")):
        graph = _graph_tensors(graph_file)
        batched = config.max_batch_size > 0
        for tensor in config.input:
            problems += [f"{where}: {p}" for p in _check_tensor("input", tensor, graph, batched)]
        for tensor in config.output:
            problems += [f"{where}: {p}" for p in _check_tensor("output", tensor, graph, batched)]
    elif config.platform == "onnxruntime_onnx":
        problems.append(f"{where}: platform onnxruntime_onnx but {graph_file} does not exist")
    for key in BLS_TARGET_PARAMETERS:
        if key in config.parameters:
            target = config.parameters[key].string_value
            if target and not (model_dir.parent / target / "config.pbtxt").exists():  # "": stage off
                problems.append(f"{where}: parameter {key} names model {target!r}, which is not in the repository")
    missing = missing_inputs(config, model_dir.name)
    if missing:
        problems.append(f"{where}: lacks the inputs {', '.join(missing)} that this version's clients may send "
                        f"(a config from an earlier version): copy them from {model_templates() / model_dir.name}"
                        "/config.pbtxt")
    return problems


def missing_inputs(config: mc.ModelConfig, model: str) -> list[str]:
    """The inputs the shipped template of `model` declares and `config` does not: a config kept
    from an earlier version (configs are never overwritten) refuses every request carrying one."""
    template = model_templates() / model / "config.pbtxt"
    if not template.is_file():
        return []
    have = {tensor.name for tensor in config.input}
    return [tensor.name for tensor in parse_config(template).input if tensor.name not in have]


def stale_configs(repository: Path, models: list[str]) -> list[str]:
    """For `serve`: a line for each config.pbtxt among `models` that lacks inputs of its template."""
    lines = []
    for model in models:
        config_file = Path(repository) / model / "config.pbtxt"
        if config_file.is_file():
            missing = missing_inputs(parse_config(config_file), model)
            if missing:
                lines.append(f"{config_file} lacks the inputs {', '.join(missing)}: requests carrying them are "
                             f"refused; copy them from {model_templates() / model}/config.pbtxt "
                             "(`tritonasr repo check` lists every such config)")
    return lines


def check_repository(repository: Path, require_plans: bool = True) -> list[str]:
    """Problems found (empty when the repository is sound). `require_plans=False` accepts a
    gpu-tensorrt repository whose plans are still to be built on the serving GPU."""
    repository = Path(repository)
    if not repository.is_dir():
        return [f"{repository} is not a directory"]
    model_dirs = sorted(p for p in repository.iterdir() if (p / "config.pbtxt").exists())
    if not model_dirs:
        return [f"{repository} holds no models (no */config.pbtxt)"]
    problems = []
    for model_dir in model_dirs:
        for config_file in [model_dir / "config.pbtxt", *sorted((model_dir / "configs").glob("*.pbtxt"))]:
            problems += check_model(model_dir, config_file, require_plans)
    return problems


def main(args) -> int:
    problems = check_repository(args.repository, require_plans=not args.allow_missing_plans)
    for problem in problems:
        print(problem)
    models = sum(1 for p in Path(args.repository).glob("*/config.pbtxt"))
    print(f"{args.repository}: {models} models, {len(problems)} problems" + ("" if problems else ": OK"))
    return 1 if problems else 0
