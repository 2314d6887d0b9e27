"""`tritonasr repo build` for every target from the tiny exported graphs, and `repo check` on
what it writes: configs parse as Triton's ModelConfig, tensors match the graphs, BLS targets
exist. The GPU targets cannot load here (no GPU, no native backends); the cpu target is served."""
import json
import shutil

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from tritonasr.cli import main as cli
from tritonasr.export.frontend import export_served_frontend
from tritonasr.recognition.settings import OfflineSettings, PipelineSettings
from tritonasr.repository.build import GPU_MAX_INFLIGHT_SEGMENTS, GRAPH_MODELS, BuildOptions, build_repository
from tritonasr.repository.check import check_repository, parse_config
from tritonasr.repository.plans import PlanError, build_plans, shapes_argument, trtexec_command
from tritonasr.repository.quantize import QUANTIZATION_FILE, QUANTIZED_MODELS

from conftest import DATA


def _set_parameter(config_file, key: str, value: str) -> None:
    from google.protobuf import text_format

    config = parse_config(config_file)
    config.parameters[key].string_value = value
    config_file.write_text(text_format.MessageToString(config))

TARGETS = ["cpu", "gpu-onnxruntime", "gpu-tensorrt"]
ALL = ["asr_offline", "asr_stream", "parakeet_decoder", "parakeet_encoder", "sensevoice", "speaker",
       "speaker_registry", "vad"]
FRONTENDS = ["fbank", "parakeet_mel", "speaker_fbank"]


def build(source, output, options):
    """`tritonasr repo build` as the CLI runs it with the export extra installed."""
    return build_repository(source, output, options, export_served_frontend)


@pytest.fixture(scope="module")
def built(model_repository, tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    for target in TARGETS:
        options = BuildOptions(target, gpus=2, instances=3, max_batch=32)
        expected = ALL if target == "cpu" else sorted(ALL + FRONTENDS)
        assert build(model_repository, root / target, options) == expected
    # The front ends served on a CPU too, so that this path of the GPU targets can run here.
    assert build(model_repository, root / "cpu-frontends", BuildOptions("cpu", served_frontends=True)) == \
        sorted(ALL + FRONTENDS)
    return root


def test_the_exported_repository_is_consistent(model_repository):
    assert check_repository(model_repository) == []


@pytest.mark.parametrize("target", TARGETS + ["cpu-frontends"])
def test_every_target_builds_and_passes_check(built, target):
    assert check_repository(built / target, require_plans=False) == []
    assert cli(["repo", "check", str(built / target), "--allow-missing-plans"]) == 0


def test_cpu_target_keeps_python_leaf_models(built):
    assert not any((built / "cpu" / frontend).exists() for frontend in FRONTENDS)
    config = parse_config(built / "cpu" / "sensevoice" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 32
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 3)]
    assert config.input[0].allow_ragged_batch
    assert not config.HasField("dynamic_batching")  # each segment alone: a CPU core gains nothing from a batch
    offline = parse_config(built / "cpu" / "asr_offline" / "config.pbtxt")
    params = {key: value.string_value for key, value in offline.parameters.items()}
    assert PipelineSettings.from_parameters(params, {}).pad_segments_ms == 0
    assert OfflineSettings.from_parameters(params, {}).max_inflight_segments == OfflineSettings.max_inflight_segments


@pytest.mark.parametrize("target", ["gpu-onnxruntime", "gpu-tensorrt"])
def test_gpu_targets_put_leaf_graphs_on_native_backends(built, target):
    for model in GRAPH_MODELS:
        config = parse_config(built / target / model / "config.pbtxt")
        assert config.backend == "" and not config.parameters
        assert config.platform == ("onnxruntime_onnx" if target == "gpu-onnxruntime" else "tensorrt_plan")
        assert [(g.kind, g.count, list(g.gpus)) for g in config.instance_group] == \
            [(mc.ModelInstanceGroup.KIND_GPU, 3, [0, 1])]
        assert not any(t.allow_ragged_batch for t in config.input)  # the pipelines pad instead
        assert config.max_batch_size == 32
        assert config.dynamic_batching.max_queue_delay_microseconds > 0
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        if target == "gpu-onnxruntime":
            assert accelerators[0].name == "tensorrt"
            assert accelerators[0].parameters["precision_mode"] == "FP16"
            assert accelerators[0].parameters["trt_engine_cache_path"] == "/cache/trt"
        else:
            assert not accelerators and config.default_model_filename == "model.plan"
    decoder = parse_config(built / target / "parakeet_decoder" / "config.pbtxt")
    assert decoder.backend == "python" and decoder.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    for bls in ("asr_offline", "asr_stream"):
        config = parse_config(built / target / bls / "config.pbtxt")
        assert config.parameters["pad_segments_ms"].string_value == "1000"
        if bls == "asr_offline":  # the GPU's batches need more segments in flight than the CPU default
            params = {key: value.string_value for key, value in config.parameters.items()}
            assert OfflineSettings.from_parameters(params, {}).max_inflight_segments == GPU_MAX_INFLIGHT_SEGMENTS
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        # Feature extraction runs in the served front ends, on the GPUs, batched across requests.
        assert {key: config.parameters[key].string_value for key in ("fbank_model", "speaker_fbank_model", "mel_model")} \
            == {"fbank_model": "fbank", "speaker_fbank_model": "speaker_fbank", "mel_model": "parakeet_mel"}
    for frontend in FRONTENDS:
        config = parse_config(built / target / frontend / "config.pbtxt")
        assert config.backend == "python" and config.input[0].allow_ragged_batch
        assert [(g.kind, g.count, list(g.gpus)) for g in config.instance_group] == \
            [(mc.ModelInstanceGroup.KIND_GPU, 3, [0, 1])]
        meta = json.loads((built / target / frontend / "1" / "meta.json").read_text())
        assert meta["parity"]["speech_vs_reference"]["max_abs_diff"] < 1e-2


def test_tensorrt_profiles_cover_every_batch_and_segment_length(built):
    plans = {plan["model"]: plan for plan in json.loads((built / "gpu-tensorrt" / "plans.json").read_text())["plans"]}
    assert sorted(plans) == sorted(GRAPH_MODELS)
    for model, plan in plans.items():
        for name, shape in plan["max"].items():
            assert shape[0] == 32 and plan["min"][name][0] == 1
    # 30 s segments padded to whole seconds: SenseVoice's 60 ms LFR frames, Parakeet's 10 ms mel frames.
    assert plans["sensevoice"]["max"]["speech"] == [32, 510, 560]
    assert plans["parakeet_encoder"]["max"]["features"][1] >= 3000
    assert plans["vad"]["max"]["speech"][1] == 6000 and plans["vad"]["min"]["in_cache0"] == [1, 128, 19, 1]
    assert plans["speaker"]["max"]["feats"] == [32, 300, 80]
    command = trtexec_command("trtexec", built / "gpu-tensorrt", plans["sensevoice"])
    assert f"--maxShapes={shapes_argument(plans['sensevoice']['max'])}" in command
    assert "--maxShapes=speech:32x510x560,speech_lengths:32,language:32,textnorm:32" in command
    assert "--fp16" in command


def test_plans_are_required_by_a_strict_check_and_need_trtexec(built, tmp_path):
    problems = check_repository(built / "gpu-tensorrt")
    assert len(problems) == len(GRAPH_MODELS) and all("repo plans" in p for p in problems)
    with pytest.raises(PlanError, match="trtexec not found"):
        build_plans(built / "gpu-tensorrt", trtexec=str(tmp_path / "none"))
    with pytest.raises(PlanError, match="repo build --target gpu-tensorrt"):
        build_plans(built / "cpu")


def test_models_not_exported_are_left_out_and_their_stages_off(model_repository, tmp_path):
    source = tmp_path / "source"
    for model in ("vad", "sensevoice", "asr_offline", "asr_stream"):
        shutil.copytree(model_repository / model, source / model)
    build(model_repository, tmp_path / "out", BuildOptions("gpu-tensorrt"))
    models = build(source, tmp_path / "out", BuildOptions("gpu-tensorrt"))
    assert models == ["asr_offline", "asr_stream", "fbank", "sensevoice", "vad"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*models, "plans.json"])  # the others pruned
    assert check_repository(tmp_path / "out", require_plans=False) == []
    params = parse_config(tmp_path / "out" / "asr_offline" / "config.pbtxt").parameters
    assert params["speaker_model"].string_value == "" and params["parakeet_encoder_model"].string_value == ""
    assert params["sensevoice_model"].string_value == "sensevoice"
    assert params["fbank_model"].string_value == "fbank" and params["mel_model"].string_value == ""


def test_bad_build_requests_are_refused(model_repository, tmp_path):
    with pytest.raises(ValueError, match="unknown target"):
        BuildOptions("tpu")
    with pytest.raises(ValueError, match="--instances must be at least 1"):
        BuildOptions("cpu", instances=0)
    with pytest.raises(ValueError, match="no exported models"):
        build_repository(tmp_path, tmp_path / "out", BuildOptions())
    assert cli(["repo", "build", "--target", "cpu", "--source", str(model_repository),
                "--output", str(model_repository)]) == 2


def test_mismatches_are_reported(built, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(built / "gpu-onnxruntime", repo)
    config = repo / "sensevoice" / "config.pbtxt"
    config.write_text(config.read_text().replace('"token_ids"', '"token_idz"').replace("dims: 560", "dims: 80"))
    _set_parameter(repo / "asr_offline" / "config.pbtxt", "vad_model", "vad2")
    (repo / "speaker" / "config.pbtxt").write_text("name: speaker\nplatform: [")
    problems = "\n".join(check_repository(repo))
    assert "output 'token_idz' is not in the ONNX graph" in problems
    assert "input 'speech': config dims [-1, 80] do not fit graph dims [None, 560]" in problems
    assert "names model 'vad2'" in problems
    assert "speaker/config.pbtxt: not a valid ModelConfig" in problems
    assert cli(["repo", "check", str(repo)]) == 1


@pytest.mark.e2e
def test_cpu_target_serves_and_padding_changes_nothing(built, client):
    """The built cpu repository, with the GPU targets' segment padding turned on in its pipelines,
    serves the same segments as the exported repository (which pads nothing)."""
    from tritonasr.client.offline import OfflineClient
    from tritonasr.serving.server import ServerConfig, TritonServer, free_port

    repo = built / "cpu"
    for bls in ("asr_offline", "asr_stream"):
        _set_parameter(repo / bls / "config.pbtxt", "pad_segments_ms", "1000")
    files = ["pause_1s.wav", "long_70s.wav"]
    config = ServerConfig(repo, free_port(), free_port(), free_port(), models=["vad", "sensevoice", "parakeet_encoder",
                                                                             "parakeet_decoder", "asr_offline"])
    with TritonServer(config) as server, OfflineClient(server.grpc_url, timeout_s=600) as padded:
        for name in files:
            for engine in ("sensevoice", "parakeet"):
                want = client.transcribe_file(DATA / name, engine=engine, with_speaker=False)["segments"]
                got = padded.transcribe_file(DATA / name, engine=engine, with_speaker=False)["segments"]
                assert want and got == want, (name, engine)


@pytest.mark.e2e
def test_served_front_ends_give_the_in_process_results(built, client):
    """The pipelines with every front end served (fbank, speaker fbank, Parakeet mel as batched
    models, as on the GPU targets) against the exported repository's, which computes them in
    process with kaldi-native-fbank and numpy: the same segments, text and speaker labels, and
    embeddings equal to float32 rounding; a stream, whose VAD fbank is served step by step, too."""
    import asyncio

    import numpy as np

    from tritonasr.audio import load_audio
    from tritonasr.client.offline import OfflineClient
    from tritonasr.client.stream import StreamingClient, split_chunks
    from tritonasr.serving.server import ServerConfig, TritonServer, free_port

    async def finals(url, samples):
        async with StreamingClient(url) as streaming:
            stream = streaming.stream(split_chunks(samples, 100))
            return [(s.start_ms, s.end_ms, s.text) for s in [segment async for segment in stream] if s.final]

    from tritonasr.repository.layout import exported_models

    repo = built / "cpu-frontends"
    assert exported_models(repo) == sorted(ALL + FRONTENDS)  # what `tritonasr serve` loads
    config = ServerConfig(repo, free_port(), free_port(), free_port(), models=exported_models(repo))
    with TritonServer(config) as server, OfflineClient(server.grpc_url, timeout_s=600) as served:
        for name in ("pause_1s.wav", "lead_trail_silence.wav", "long_70s.wav"):
            for engine in ("sensevoice", "parakeet"):
                want = client.transcribe_file(DATA / name, engine=engine, return_embedding=True)["segments"]
                got = served.transcribe_file(DATA / name, engine=engine, return_embedding=True)["segments"]
                assert want and len(got) == len(want), (name, engine)
                for a, b in zip(got, want):
                    assert abs(a["start_ms"] - b["start_ms"]) <= 20 and abs(a["end_ms"] - b["end_ms"]) <= 20
                    assert a["text"] == b["text"] and a["words"] == b["words"]
                    assert (a["speaker"] is None) == (b["speaker"] is None)
                    if a["speaker"]:
                        u, v = np.array(a["speaker"]["embedding"]), np.array(b["speaker"]["embedding"])
                        assert u @ v / np.linalg.norm(u) / np.linalg.norm(v) > 0.9999
                        assert a["speaker"]["label"] == b["speaker"]["label"]
        samples = load_audio(DATA / "pause_3s.wav").samples
        streamed = asyncio.run(finals(server.grpc_url, samples))
        assert streamed and streamed == asyncio.run(finals(client.url, samples))


def _ops(graph) -> dict[str, int]:
    import collections

    import onnx

    model = onnx.load(str(graph))
    weights = {t.name for t in model.graph.initializer}
    ops = collections.Counter(n.op_type for n in model.graph.node)
    ops["MatMul of a weight"] = sum(n.op_type == "MatMul" and n.input[1] in weights for n in model.graph.node)
    return ops


def test_int8_quantizes_the_asr_encoders_weights_and_nothing_else(model_repository, tmp_path, capsys):
    """`repo build --target cpu --int8`: every MatMul against a weight of SenseVoice and Parakeet's
    encoder becomes a MatMulInteger on int8 weights; the other models' files are the exported
    ones; the source repository is not written; the report holds the sample's text both ways;
    a build without --int8 into the same directory puts the float32 graphs back."""
    output = tmp_path / "int8"

    def mtimes():
        return {p: p.stat().st_mtime_ns for p in model_repository.rglob("*") if "__pycache__" not in p.parts}

    before = mtimes()
    assert cli(["repo", "build", "--target", "cpu", "--int8", "--source", str(model_repository),
                "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "int8 weights: sensevoice, parakeet_encoder" in printed and "float32: " in printed
    assert mtimes() == before
    assert check_repository(output) == []
    for model in QUANTIZED_MODELS:
        source = _ops(model_repository / model / "1" / "model.onnx")
        quantized = _ops(output / model / "1" / "model.onnx")
        assert source["MatMul of a weight"] > 0 and quantized["MatMul of a weight"] == 0
        assert quantized["MatMulInteger"] == source["MatMul of a weight"]
        # A batch's activations share one quantization scale: each segment must run alone.
        assert not parse_config(output / model / "config.pbtxt").HasField("dynamic_batching")
    assert parse_config(model_repository / "parakeet_encoder" / "config.pbtxt").HasField("dynamic_batching")
    for model in ("vad", "speaker", "parakeet_decoder"):
        for graph in (model_repository / model / "1").glob("*.onnx"):
            assert (output / model / "1" / graph.name).read_bytes() == graph.read_bytes()
    report = json.loads((output / QUANTIZATION_FILE).read_text())
    assert report["models"] == list(QUANTIZED_MODELS) and report["method"]["ops"] == ["MatMul"]
    for texts in report["sample_text"].values():
        assert texts["float32"] and texts["int8"] and texts["identical"] == (texts["float32"] == texts["int8"])
        assert 0 < texts["similarity"] <= 1 and (texts["similarity"] == 1 or not texts["identical"])
    build(model_repository, output, BuildOptions("cpu"))
    assert not (output / QUANTIZATION_FILE).exists()
    for model in QUANTIZED_MODELS:
        assert (output / model / "1" / "model.onnx").read_bytes() == \
            (model_repository / model / "1" / "model.onnx").read_bytes()
    with pytest.raises(ValueError, match="--int8 is for the cpu target"):
        BuildOptions("gpu-onnxruntime", int8=True)


def test_int8_reads_weights_from_an_external_file_and_never_writes_through_a_link(model_repository, tmp_path):
    """Parakeet's float32 encoder keeps its weights in an external file, which the build hard-links
    into the output: the quantized graph replaces the links and leaves the source's files as
    they were."""
    import os

    import onnx
    import onnxruntime as ort

    from tritonasr.repository.quantize import graph_files, quantize_graph

    source, output = tmp_path / "source" / "model.onnx", tmp_path / "output" / "model.onnx"
    source.parent.mkdir()
    output.parent.mkdir()
    onnx.save_model(onnx.load(str(model_repository / "parakeet_encoder" / "1" / "model.onnx")), str(source),
                    save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    assert graph_files(source) == [source, source.parent / "model.onnx.data"]
    before = [path.read_bytes() for path in graph_files(source)]
    for path in graph_files(source):
        os.link(path, output.parent / path.name)
    quantize_graph(source, output)
    assert [path.read_bytes() for path in graph_files(source)] == before
    assert graph_files(output) == [output] and not (output.parent / "model.onnx.data").exists()
    assert _ops(output)["MatMulInteger"] == _ops(source)["MatMul of a weight"] > 0
    assert [i.name for i in ort.InferenceSession(str(output)).get_inputs()] == ["features", "length"]


@pytest.mark.e2e
def test_an_int8_repository_serves_what_it_gives_in_process(model_repository, tmp_path):
    """The int8 graphs, served, give the segments and text the same graphs give in process (each
    segment alone), with both engines, though a request's segments reach the leaf models at once;
    the segments' bounds are the float32 repository's (the VAD is not quantized)."""
    from tritonasr.audio import load_audio
    from tritonasr.client.offline import OfflineClient
    from tritonasr.runtime.in_process import LocalPipeline
    from tritonasr.serving.server import ServerConfig, TritonServer, free_port

    repo = tmp_path / "int8"
    build(model_repository, repo, BuildOptions("cpu", int8=True))
    models = ["vad", "sensevoice", "parakeet_encoder", "parakeet_decoder", "asr_offline"]
    local, exported = LocalPipeline(repo), LocalPipeline(model_repository)
    keys = ("start_ms", "end_ms", "text")
    with TritonServer(ServerConfig(repo, free_port(), free_port(), free_port(), models=models)) as server, \
            OfflineClient(server.grpc_url, timeout_s=600) as client:
        for name in ("pause_1s.wav", "long_70s.wav"):
            samples = load_audio(DATA / name).samples
            for engine in ("sensevoice", "parakeet"):
                served = client.transcribe_file(DATA / name, engine=engine, with_speaker=False)["segments"]
                want = local.transcribe(samples, engine=engine)["segments"]
                assert served and [{k: s[k] for k in keys} for s in served] == [{k: s[k] for k in keys} for s in want]
                bounds = [(s["start_ms"], s["end_ms"]) for s in exported.transcribe(samples, engine=engine)["segments"]]
                assert [(s["start_ms"], s["end_ms"]) for s in served] == bounds, (name, engine)


def test_model_files_come_from_the_package_and_never_overwrite_a_config(tmp_path):
    from tritonasr.paths import model_templates
    from tritonasr.repository.layout import install_model_files

    tuned = tmp_path / "asr_offline" / "config.pbtxt"
    tuned.parent.mkdir()
    tuned.write_text("# tuned here\n")
    install_model_files(tmp_path, ["asr_offline", "vad", "fbank"])  # fbank: written whole by `repo build`
    assert tuned.read_text() == "# tuned here\n"
    assert (tmp_path / "vad" / "config.pbtxt").read_bytes() == (model_templates() / "vad" / "config.pbtxt").read_bytes()
    assert (tmp_path / "asr_offline" / "1" / "model.py").is_file() and not (tmp_path / "fbank").exists()
    # A model.py of another package version (its imports may be gone) follows the installed one.
    old = tmp_path / "vad" / "1" / "model.py"
    old.write_text("from tritonasr.triton_models import OnnxLeafModel\n")
    install_model_files(tmp_path, ["vad"])
    assert old.read_bytes() == (model_templates() / "vad" / "1" / "model.py").read_bytes()


def test_a_config_kept_from_an_earlier_version_is_reported(tmp_path):
    """Configs are never overwritten: one that predates an input the clients now send is named,
    by `repo check` and in `serve`'s warnings, with where to copy the inputs from."""
    from tritonasr.paths import model_templates
    from tritonasr.repository.check import stale_configs

    (tmp_path / "asr_stream").mkdir()
    template = (model_templates() / "asr_stream" / "config.pbtxt").read_text()
    old = "\n".join(line for line in template.splitlines() if '"TEXT_FIRST"' not in line and '"ENCODING"' not in line)
    (tmp_path / "asr_stream" / "config.pbtxt").write_text(old)
    stale = [p for p in check_repository(tmp_path) if "lacks the inputs" in p]  # (the others: models it calls)
    assert len(stale) == 1 and "lacks the inputs ENCODING, TEXT_FIRST" in stale[0]
    assert len(stale_configs(tmp_path, ["asr_stream"])) == 1
    (tmp_path / "asr_stream" / "config.pbtxt").write_text(template)
    assert not [p for p in check_repository(tmp_path) if "lacks the inputs" in p]
    assert stale_configs(tmp_path, ["asr_stream"]) == []
