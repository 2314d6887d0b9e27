"""Export FunASR's FSMN-VAD to `<repository>/vad/1/model.onnx` with its caches as tensors.

The served graph takes LFR(5,1) fbank features before CMVN (the CMVN of am.mvn is inside)
and four FSMN caches, and returns frame scores and the next caches. The caches are explicit
inputs/outputs so the server keeps one set per stream and batches streams together.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from tritonasr.models.meta import META_FILE
from tritonasr.models.vad import VadSpec

from tritonasr.export.common import (
    OPSET,
    Cmvn,
    CmvnLayer,
    ExportJob,
    export_onnx,
    frontend_parity,
    lfr_features,
    load_funasr_model,
    max_abs_diff,
    pin_output_dims,
    Progress,
    run_export,
    Staging,
    stderr_progress,
)

TOLERANCE = 1e-4  # max abs diff of scores and caches, PyTorch vs ONNX Runtime


class VadGraph(torch.nn.Module):
    """CMVN, then FunASR's own export rebuild of the FSMN encoder (FSMNExport)."""

    def __init__(self, export_model: torch.nn.Module, cmvn: Cmvn):
        super().__init__()
        self.cmvn = CmvnLayer(cmvn)
        self.model = export_model

    def forward(self, speech, *in_caches):
        scores, out_caches = self.model(self.cmvn(speech), *in_caches)
        return (scores, *out_caches)


def export_vad(
    model_dir: Path | None,
    repository: Path,
    check_audio: Path | None = None,
    progress: Progress = stderr_progress,
) -> dict:
    """Export the VAD, check it against PyTorch, publish model.onnx and meta.json.

    model_dir: a FunASR FSMN-VAD directory (model.pt, config.yaml, am.mvn); None fetches the
    real weights (`tritonasr.export.weights.fetch_vad_weights`).
    Returns a summary: output paths, tensor specs and parity numbers.
    """
    from tritonasr.export.weights import fetch_vad_weights

    if model_dir is None:
        progress("fetching the FSMN-VAD weights…")
        model_dir = fetch_vad_weights()
    model_dir = Path(model_dir)
    progress(f"loading FSMN-VAD from {model_dir}…")
    model, kwargs = load_funasr_model(model_dir)
    frontend_conf = {k: v for k, v in kwargs["frontend_conf"].items() if k != "cmvn_file"}
    encoder_conf = dict(kwargs["encoder_conf"])
    cmvn_file = Path(kwargs["frontend_conf"]["cmvn_file"])
    cmvn = Cmvn.load(cmvn_file)
    n_caches = encoder_conf["fsmn_layers"]
    cache_frames = (encoder_conf["lorder"] - 1) * encoder_conf.get("lstride", 1)
    cache_shape = (encoder_conf["proj_dim"], cache_frames, 1)

    # FunASR's export rebuild swaps modules in place (even inside the shared FSMN stack):
    # rebuild a copy, keep the original as the PyTorch reference.
    graph = VadGraph(copy.deepcopy(model).export(encoder=kwargs["encoder"], type="onnx"), cmvn)
    input_names = ["speech"] + [f"in_cache{i}" for i in range(n_caches)]
    output_names = ["logits"] + [f"out_cache{i}" for i in range(n_caches)]
    dynamic_axes = {"speech": {0: "batch", 1: "frames"}, "logits": {0: "batch", 1: "frames"}}
    dynamic_axes.update({name: {0: "batch"} for name in input_names[1:] + output_names[1:]})
    dummy = (torch.randn(2, 30, encoder_conf["input_dim"]),) + tuple(
        torch.zeros(2, *cache_shape) for _ in range(n_caches)
    )

    def write(staging: Staging) -> None:
        export_onnx(graph, dummy, staging.path("model.onnx"), input_names, output_names,
                    dynamic_axes)
        pin_output_dims(staging.path("model.onnx"),
                        {name: {2: cache_frames} for name in output_names[1:]})

    def failures(parity: dict) -> list[str]:
        worst = max(parity["scores_max_abs_diff"], parity["caches_max_abs_diff"],
                    parity["batch_max_abs_diff"])
        return [f"max abs diff {worst:.3e} > {TOLERANCE}"] if worst > TOLERANCE else []

    done = run_export(ExportJob(
        version_dir=Path(repository) / "vad" / "1",
        exporting="exporting vad/1/model.onnx…",
        report_export_time=False,
        write=write,
        check_audio=check_audio,
        compare=lambda session, waveform: _parity(model, session,
                                                  lfr_features(waveform, frontend_conf), cmvn,
                                                  n_caches, cache_shape),
        frontend=lambda waveform: frontend_parity(waveform, frontend_conf, cmvn_file),
        summary=lambda parity: (
            f"  scores max abs diff {parity['scores_max_abs_diff']:.2e}, "
            f"caches {parity['caches_max_abs_diff']:.2e} over {parity['chunks']} chunks "
            f"({parity['frames']} frames); batch-of-2 vs batch-of-1 "
            f"{parity['batch_max_abs_diff']:.2e}"),
        failures=failures,
        failed="VAD export parity failed",
        meta={
            **VadSpec.meta(frontend=frontend_conf, vad_post=kwargs["model_conf"], fsmn_layers=n_caches,
                           proj_dim=encoder_conf["proj_dim"], lorder=encoder_conf["lorder"],
                           cache_frames=cache_frames),
            "source": str(model_dir),
        },
    ), progress)
    return {
        "model": done.paths["model.onnx"],
        "meta": done.paths[META_FILE],
        "opset": OPSET,
        "export_seconds": done.export_seconds,
        "tensors": done.tensors,
        "parity": done.parity,
    }


def _parity(model, session, feats: np.ndarray, cmvn: Cmvn, n_caches: int,
            cache_shape: tuple) -> dict:
    """Chunked streaming run of PyTorch (FunASR's FSMN with its dict cache) and ONNX."""
    frames = feats.shape[0]
    # Three unequal chunks; caches carried from chunk to chunk on both sides.
    bounds = [0, frames // 4, frames // 4 + frames // 3, frames]
    torch_cache: dict = {}
    onnx_caches = [np.zeros((1, *cache_shape), np.float32) for _ in range(n_caches)]
    scores_diff = caches_diff = 0.0
    for start, end in zip(bounds[:-1], bounds[1:]):
        chunk = feats[start:end]
        with torch.no_grad():
            torch_scores = model.encoder(cmvn.apply_funasr(chunk)[None], cache=torch_cache)
        outputs = session.run(None, _vad_feed(chunk[None], onnx_caches))
        onnx_caches = outputs[1:]
        scores_diff = max(scores_diff, max_abs_diff(torch_scores, outputs[0]))
        for i in range(n_caches):
            caches_diff = max(caches_diff, max_abs_diff(torch_cache[f"cache_layer_{i}"],
                                                        onnx_caches[i]))

    # Batch of two different windows with different caches vs each one alone.
    window = min(frames // 2, 200)
    items = [
        (feats[:window], [np.zeros((1, *cache_shape), np.float32)] * n_caches),
        (feats[frames - window:], onnx_caches),
    ]
    batched = session.run(None, _vad_feed(
        np.stack([f for f, _ in items]),
        [np.concatenate([c[i] for _, c in items]) for i in range(n_caches)],
    ))
    batch_diff = 0.0
    for b, (chunk, caches) in enumerate(items):
        single = session.run(None, _vad_feed(chunk[None], caches))
        for got, want in zip(batched, single):
            batch_diff = max(batch_diff, max_abs_diff(got[b:b + 1], want))
    return {
        "scores_max_abs_diff": scores_diff,
        "caches_max_abs_diff": caches_diff,
        "batch_max_abs_diff": batch_diff,
        "chunks": len(bounds) - 1,
        "frames": frames,
        "tolerance": TOLERANCE,
    }


def _vad_feed(speech: np.ndarray, caches) -> dict[str, np.ndarray]:
    feed = {"speech": np.ascontiguousarray(speech, np.float32)}
    feed.update({f"in_cache{i}": np.ascontiguousarray(c, np.float32) for i, c in enumerate(caches)})
    return feed
