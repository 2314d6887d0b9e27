"""Export a FunASR SenseVoiceSmall checkpoint in sherpa-onnx's SenseVoice format: the weights
the peer server (`sherpa-onnx-offline-websocket-server`) serves in the load tests.

sherpa-onnx's SenseVoice loader (offline-sense-voice-model.cc, offline-recognizer-sense-voice-
impl.h) wants a different graph from the one we serve:

- inputs by position: x [N, T, 560] float32 LFR features *after* CMVN (sherpa applies
  `(x + neg_mean) * inv_stddev` itself, from the metadata), x_length [N] int32, language [N]
  int32, text_norm [N] int32 (the query ids); output 0: logits [N, T + 4, vocab]. It zero-pads
  a batch and decodes `T + 4` frames of each sequence with greedy CTC.
- model metadata (string key/values): vocab_size, blank_id, lfr_window_size,
  lfr_window_shift, normalize_samples, neg_mean, inv_stddev (comma-separated floats),
  lang_auto|zh|en|ja|ko|yue, with_itn, without_itn, and a `comment` that must not contain
  "Nano" (sherpa treats such a model as FunASR-Nano, a different graph).
- tokens.txt: "<piece> <id>" per line, every id of the vocabulary.

Its front end is fixed in code: 16 kHz, 80 kaldi fbank bins, 25/10 ms hamming windows with
snip_edges, samples scaled to the int16 range (normalize_samples=0), no dither; the export
refuses a checkpoint whose frontend_conf differs.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from tritonasr.models.meta import META_FILE
from tritonasr.models.transcript import ctc_greedy
from tritonasr.paths import cache_dir

from tritonasr.export.common import (
    Cmvn,
    ExportJob,
    Progress,
    Staging,
    cached_model_dir,
    export_onnx,
    lfr_features,
    load_funasr_model,
    max_abs_diff,
    run_export,
    stderr_progress,
)
from tritonasr.export.sensevoice import (
    BLANK_ID,
    LOGITS_TOLERANCE,
    QUERY_FRAMES,
    _segments,
    _sensevoice_feed,
    _torch_reference,
)

# Bump when the files written here change, so cached exports are rebuilt.
FORMAT_VERSION = 1
MODEL_TYPE = "sense_voice_ctc"
INPUT_NAMES = ["x", "x_length", "language", "text_norm"]  # sherpa feeds them by position
OUTPUT_NAMES = ["logits"]  # sherpa reads output 0 only
# What sherpa's SenseVoice front end computes; a checkpoint trained on other features would be
# served wrongly by it.
SHERPA_FRONTEND = {"fs": 16000, "window": "hamming", "n_mels": 80, "frame_length": 25,
                   "frame_shift": 10}
SHERPA_LANGUAGES = ("auto", "zh", "en", "ja", "ko", "yue")


class SherpaSenseVoiceGraph(torch.nn.Module):
    """FunASR's own export forward of SenseVoiceSmall (export_meta.py), logits only, no CMVN."""

    def __init__(self, export_model: torch.nn.Module):
        super().__init__()
        self.model = export_model

    def forward(self, x, x_length, language, text_norm):
        logits, _ = self.model(x, x_length, language, text_norm)
        return logits


def export_sherpa_sensevoice(model_dir: Path, output_dir: Path,
                             progress: Progress = stderr_progress) -> dict:
    """Export the SenseVoiceSmall checkpoint `model_dir` (a FunASR directory, the one our own
    exporter reads) into `output_dir` as sherpa-onnx's model.onnx + tokens.txt, plus meta.json
    (source and parity numbers). Raises if the graph's logits differ from PyTorch's.

    Files are written to a staging directory and renamed into `output_dir`, model.onnx last.
    """
    import sentencepiece as spm

    model_dir = Path(model_dir)
    progress(f"loading SenseVoiceSmall from {model_dir} for sherpa-onnx…")
    model, kwargs = load_funasr_model(model_dir)
    frontend_conf = {k: v for k, v in kwargs["frontend_conf"].items() if k != "cmvn_file"}
    _check_frontend(frontend_conf)
    cmvn = Cmvn.load(Path(kwargs["frontend_conf"]["cmvn_file"]))
    sp = spm.SentencePieceProcessor(model_file=str(kwargs["tokenizer"].bpemodel))
    vocab_size = int(model.vocab_size)
    if sp.get_piece_size() != vocab_size:
        raise ValueError(f"the tokenizer has {sp.get_piece_size()} pieces but the model "
                         f"{vocab_size} outputs: sherpa-onnx needs a symbol for every id")
    metadata = sherpa_metadata(model, frontend_conf, cmvn, vocab_size)

    graph = SherpaSenseVoiceGraph(copy.deepcopy(model).export(device="cpu"))
    dummy = (
        torch.randn(2, 30, model.embed.embedding_dim),
        torch.tensor([30, 17], dtype=torch.int32),
        torch.tensor([model.lid_dict["auto"], model.lid_dict["en"]], dtype=torch.int32),
        torch.tensor([model.textnorm_dict["woitn"], model.textnorm_dict["withitn"]],
                     dtype=torch.int32),
    )
    dynamic_axes = {"x": {0: "N", 1: "T"}, "x_length": {0: "N"}, "language": {0: "N"},
                    "text_norm": {0: "N"}, "logits": {0: "N", 1: "T_plus_4"}}

    def write(staging: Staging) -> None:
        export_onnx(graph, dummy, staging.path("model.onnx"), INPUT_NAMES, OUTPUT_NAMES,
                    dynamic_axes)
        _add_metadata(staging.path("model.onnx"), metadata)
        _write_tokens(sp, staging.path("tokens.txt"))

    def failures(parity: dict) -> list[str]:
        failed = [name for name in ("tokens_identical", "batch_tokens_identical")
                  if not parity[name]]
        for name in ("logits_max_abs_diff", "batch_logits_max_abs_diff"):
            if parity[name] > LOGITS_TOLERANCE:
                failed.append(f"{name} {parity[name]:.3e} > {LOGITS_TOLERANCE:g}")
        return failed

    pt = model_dir / "model.pt"
    done = run_export(ExportJob(
        version_dir=Path(output_dir),
        write=write,
        checking="checking parity (PyTorch vs the sherpa-onnx graph in ONNX Runtime)…",
        compare=lambda session, waveform: _parity(model, session, waveform, frontend_conf, cmvn),
        summary=lambda parity: (
            f"  {parity['segments']} segments: logits max abs diff "
            f"{parity['logits_max_abs_diff']:.2e} (tolerance {LOGITS_TOLERANCE:g}); greedy "
            f"tokens identical: {parity['tokens_identical']}; zero-padded batch vs alone: "
            f"{parity['batch_logits_max_abs_diff']:.2e}, tokens identical: "
            f"{parity['batch_tokens_identical']}"),
        failures=failures,
        failed="sherpa-onnx SenseVoice export parity failed",
        meta={
            "format": f"sherpa-onnx {MODEL_TYPE}",
            "format_version": FORMAT_VERSION,
            "model_dir": str(model_dir),
            "model_pt": {"size": pt.stat().st_size, "mtime_ns": pt.stat().st_mtime_ns},
            "frontend": frontend_conf,
            "metadata": {k: v for k, v in metadata.items() if k not in ("neg_mean", "inv_stddev")},
        },
        meta_tensors=True,
    ), progress)
    return {
        "model": done.paths["model.onnx"],
        "tokens": done.paths["tokens.txt"],
        "meta": done.paths[META_FILE],
        "model_dir": model_dir,
        "metadata": metadata,
        "tensors": done.tensors,
        "export_seconds": done.export_seconds,
        "parity": done.parity,
    }


def sherpa_metadata(model, frontend_conf: dict, cmvn: Cmvn, vocab_size: int) -> dict[str, str]:
    """The key/values sherpa-onnx's SenseVoice loader reads (all of them required but blank_id)."""

    def floats(values: np.ndarray) -> str:
        return ",".join(f"{float(v):.9g}" for v in values)  # 9 digits: float32 round-trips

    meta = {
        "model_type": MODEL_TYPE,
        # Must not contain "Nano": sherpa would load the graph as FunASR-Nano.
        "comment": "SenseVoiceSmall exported by tritonasr",
        "version": str(FORMAT_VERSION),
        "vocab_size": str(vocab_size),
        "blank_id": str(BLANK_ID),
        "lfr_window_size": str(int(frontend_conf["lfr_m"])),
        "lfr_window_shift": str(int(frontend_conf["lfr_n"])),
        # 0: sherpa scales [-1, 1] samples to the int16 range before fbank, as FunASR does.
        "normalize_samples": "0",
        # am.mvn's <AddShift> and <Rescale> rows: sherpa computes (x + neg_mean) * inv_stddev,
        # FunASR's apply_cmvn the same.
        "neg_mean": floats(cmvn.shift),
        "inv_stddev": floats(cmvn.scale),
        "with_itn": str(int(model.textnorm_dict["withitn"])),
        "without_itn": str(int(model.textnorm_dict["woitn"])),
    }
    for language in SHERPA_LANGUAGES:
        meta[f"lang_{language}"] = str(int(model.lid_dict[language]))
    if "nospeech" in model.lid_dict:  # not read by sherpa; its own export writes it
        meta["lang_nospeech"] = str(int(model.lid_dict["nospeech"]))
    return meta


def _check_frontend(frontend_conf: dict) -> None:
    wrong = {k: (frontend_conf.get(k), v) for k, v in SHERPA_FRONTEND.items()
             if frontend_conf.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}={got!r} (sherpa-onnx: {want!r})" for k, (got, want) in wrong.items())
        raise ValueError(f"sherpa-onnx's SenseVoice front end cannot compute this checkpoint's "
                         f"features: {detail}")
    for key in ("lfr_m", "lfr_n"):
        if int(frontend_conf.get(key, 0)) <= 0:
            raise ValueError(f"frontend_conf has no valid {key}: {frontend_conf.get(key)!r}")


def _add_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(graph, str(path))


def _write_tokens(sp, path: Path) -> None:
    lines = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        # sherpa splits each line on whitespace: "<piece> <id>".
        if not piece or any(c.isspace() for c in piece):
            raise ValueError(f"token {i} ({piece!r}) cannot be written to tokens.txt")
        lines.append(f"{piece} {i}\n")
    path.write_text("".join(lines), encoding="utf-8")


# --- parity ----------------------------------------------------------------------------------


def _parity(model, session, waveform: np.ndarray, frontend_conf: dict, cmvn: Cmvn) -> dict:
    """Logits and greedy tokens of the graph (fed CMVN'd features, as sherpa feeds it) against
    FunASR's PyTorch forward, on cuts of the waveform with different queries; then all cuts in
    one zero-padded batch (as sherpa pads) against each alone."""
    queries = [("auto", "woitn"), ("en", "withitn"), ("zh", "woitn"), ("auto", "withitn")]
    items = []
    diff = 0.0
    tokens_identical = True
    for i, segment in enumerate(_segments(waveform)):
        language, textnorm = queries[i % len(queries)]
        feats = cmvn.apply_funasr(lfr_features(segment, frontend_conf))  # [T, D] torch
        with torch.no_grad():
            ref_logits, ref_lens = _torch_reference(model, feats[None], language, textnorm)
        item = {"x": feats.numpy(), "language": int(model.lid_dict[language]),
                "text_norm": int(model.textnorm_dict[textnorm]),
                "seconds": len(segment) / frontend_conf["fs"]}
        (logits,) = session.run(None, _feed([item]))
        frames = item["x"].shape[0] + QUERY_FRAMES  # what sherpa decodes
        if logits.shape[1] != frames or int(ref_lens[0]) != frames:
            raise RuntimeError(f"logits have {logits.shape[1]} frames (PyTorch {int(ref_lens[0])}), "
                               f"sherpa-onnx decodes {frames}")
        diff = max(diff, max_abs_diff(ref_logits[0], logits[0]))
        item["tokens"] = ctc_greedy(logits[0].argmax(-1), frames, BLANK_ID)
        tokens_identical &= item["tokens"] == ctc_greedy(ref_logits[0].argmax(-1).numpy(),
                                                         frames, BLANK_ID)
        item["logits"] = logits[0]
        items.append(item)

    (logits,) = session.run(None, _feed(items))
    batch_diff = 0.0
    batch_tokens_identical = True
    for b, item in enumerate(items):
        frames = item["x"].shape[0] + QUERY_FRAMES
        batch_diff = max(batch_diff, max_abs_diff(logits[b, :frames], item["logits"]))
        batch_tokens_identical &= ctc_greedy(logits[b].argmax(-1), frames, BLANK_ID) == item["tokens"]
    return {
        "segments": len(items),
        "segment_seconds": [round(item["seconds"], 2) for item in items],
        "logits_max_abs_diff": diff,
        "tokens_identical": bool(tokens_identical),
        "batch_logits_max_abs_diff": batch_diff,
        "batch_tokens_identical": bool(batch_tokens_identical),
        "tokens_per_segment": [len(item["tokens"]) for item in items],
        "logits_tolerance": LOGITS_TOLERANCE,
    }


def _feed(items: list[dict]) -> dict[str, np.ndarray]:
    """The zero-padded batch of the served graph, under sherpa-onnx's input names."""
    served = _sensevoice_feed([{"feats": item["x"], "language_id": item["language"], "textnorm_id": item["text_norm"]}
                               for item in items])
    return dict(zip(("x", "x_length", "language", "text_norm"), served.values()))


# --- the cached export of a model repository's SenseVoice -------------------------------------


def sherpa_model_for(repository: Path, progress: Progress = stderr_progress) -> Path:
    """The sherpa-onnx export of the checkpoint `<repository>/sensevoice` was exported from,
    exported on first use into `cache_dir()/sherpa-onnx/<checkpoint>-<hash>`; the hash covers the
    checkpoint's path and its model.pt's size and mtime, so a changed checkpoint is re-exported."""
    meta_path = Path(repository) / "sensevoice" / "1" / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found: the repository {repository} has no exported SenseVoice; run "
            f"`tritonasr export sensevoice` first")
    model_dir = json.loads(meta_path.read_text()).get("model_dir")
    if not model_dir:
        raise ValueError(f"{meta_path} names no model_dir: export SenseVoice again")
    model_dir = Path(model_dir)
    pt = model_dir / "model.pt"
    if not pt.is_file():
        raise FileNotFoundError(f"{pt} not found: the checkpoint the repository's SenseVoice was "
                                f"exported from ({meta_path}) is gone; export SenseVoice again")
    stat = pt.stat()
    key = f"{model_dir.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v{FORMAT_VERSION}"
    name = f"{model_dir.resolve().name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    target = cache_dir() / "sherpa-onnx" / name
    if (target / "model.onnx").is_file():
        progress(f"using the cached sherpa-onnx export {target}")
        return target
    progress(f"exporting {model_dir} for sherpa-onnx into {target}…")
    return cached_model_dir(target, "model.onnx",
                            lambda directory: export_sherpa_sensevoice(model_dir, directory, progress))
