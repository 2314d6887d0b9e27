"""`repo build --target cpu --int8`: the ASR encoders' weights in int8 for CPU serving.

ONNX Runtime's dynamic quantization (a maintained tool; we only choose its settings) rewrites each
MatMul against a weight as a MatMulInteger on int8 weights, one scale per output channel, with its
activations quantized to uint8 per call: one scale for the call's whole tensor, so the build takes
these models' batchers away (segments batched together would change each other's results). On the
project's VNNI x86 VM that ran about twice the audio per core (BENCHMARKS.md). The outputs differ
from the float32 graph, so the text can: the build transcribes the sample with both and writes what
it got into QUANTIZATION_FILE, and README says to compare on your own audio. The VAD (small, and
its scores decide where segments fall) and the speaker model (convolutions) keep float32.
"""
from __future__ import annotations

import json
import logging
from difflib import SequenceMatcher
from pathlib import Path

import onnx

from tritonasr.contract import ENGINES
from tritonasr.paths import sample_audio
from tritonasr.repository.layout import LEAF_MODELS

QUANTIZED_MODELS = ("sensevoice", "parakeet_encoder")
QUANTIZATION_FILE = "quantization.json"
METHOD = {"tool": "onnxruntime.quantization.quantize_dynamic", "ops": ["MatMul"],
          "weights": "int8, per output channel", "activations": "uint8, per call"}


def graph_files(graph: Path) -> list[Path]:
    """The graph file and the external data files it names."""
    model = onnx.load(str(graph), load_external_data=False)
    external = {entry.value for tensor in model.graph.initializer
                if tensor.data_location == onnx.TensorProto.EXTERNAL
                for entry in tensor.external_data if entry.key == "location"}
    return [graph] + [graph.parent / name for name in sorted(external)]


def quantize_graph(source: Path, destination: Path) -> None:
    """Writes the int8 graph of `source` (float32, weights inline or external) to `destination`,
    replacing what is there (a copy or hard link of the source: unlinked, never written through)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for path in graph_files(destination) if destination.exists() else []:
        path.unlink(missing_ok=True)
    # Int8 weights are a quarter of float32: even Parakeet's (2.4 GB) then fit one protobuf.
    # The tool warns about every tensor it cannot infer a type for (shape slices): not ours to fix.
    logging.disable(logging.WARNING)
    try:
        # A loaded graph, not its path: given a path, the tool writes a shape-inferred copy next
        # to the source (a repository that may be read-only, or served).
        quantize_dynamic(onnx.load(str(source)), destination, op_types_to_quantize=METHOD["ops"],
                         per_channel=True, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)


def compare_on_sample(source: Path, output: Path, models: list[str]) -> dict:
    """The sample's text from the float32 repository and from the int8 one, for each engine
    whose encoder was quantized."""
    from tritonasr.audio import load_audio
    from tritonasr.runtime.in_process import LocalPipeline

    samples = load_audio(sample_audio()).samples
    texts = {}
    for label, repository in (("float32", source), ("int8", output)):
        pipeline = LocalPipeline(repository)
        for model in models:
            engine = next(engine for engine in ENGINES if model in LEAF_MODELS[engine])
            result = pipeline.transcribe(samples, engine=engine)
            texts.setdefault(model, {})[label] = " ".join(s["text"] for s in result["segments"])
    return {model: {**pair, "identical": pair["float32"] == pair["int8"],
                    # difflib's ratio over characters (no word boundaries in Chinese): 1.0 is identical
                    "similarity": round(SequenceMatcher(None, pair["float32"], pair["int8"],
                                                        autojunk=False).ratio(), 4)}
            for model, pair in texts.items()}


def quantize_repository(source: Path, output: Path, models: list[str]) -> None:
    """Writes the int8 graphs of the ASR encoders among `models` from `source` into the built
    `output`, and QUANTIZATION_FILE: the method, the models, and the sample's text with each."""
    quantized = [model for model in QUANTIZED_MODELS if model in models]
    for model in quantized:
        quantize_graph(source / model / "1" / "model.onnx", output / model / "1" / "model.onnx")
    report = {"method": METHOD, "models": quantized, "sample": sample_audio().name,
              "sample_text": compare_on_sample(source, output, quantized)}
    (output / QUANTIZATION_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
