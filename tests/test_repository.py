"""Every config in the repository, the GPU variants included (which cannot load here), parses as
Triton's ModelConfig and matches the exported ONNX graphs."""
import shutil

from tritonasr.repo_check import check_repository, parse_config


def test_exported_repository_is_consistent(model_repository):
    assert check_repository(model_repository) == []
    gpu = parse_config(model_repository / "sensevoice" / "configs" / "gpu.pbtxt")
    assert gpu.platform == "onnxruntime_onnx"
    accelerator = gpu.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"


def test_mismatches_are_reported(model_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(model_repository, repo, ignore=shutil.ignore_patterns("*.onnx"))
    for model in ("vad", "sensevoice"):
        (repo / model / "1" / "model.onnx").symlink_to(model_repository / model / "1" / "model.onnx")
    config = repo / "sensevoice" / "configs" / "gpu.pbtxt"
    config.write_text(config.read_text().replace('"token_ids"', '"token_idz"').replace("dims: [ -1, 560 ]", "dims: [ -1, 80 ]"))
    bls = repo / "asr_offline" / "config.pbtxt"
    bls.write_text(bls.read_text().replace('string_value: "vad"', 'string_value: "vad2"'))
    problems = "\n".join(check_repository(repo))
    assert "output 'token_idz' is not in the ONNX graph" in problems
    assert "input 'speech': config dims [-1, 80] do not fit graph dims [None, 560]" in problems
    assert "names model 'vad2'" in problems
