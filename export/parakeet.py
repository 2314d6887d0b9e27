"""Export NVIDIA Parakeet TDT (NeMo) to `<repository>/parakeet_encoder/1/` and `parakeet_decoder/1/`.

NeMo's own `model.export()` writes two graphs for a transducer: the FastConformer encoder and
the prediction network + joint in one step graph ("decoder_joint"). They are served as:
- parakeet_encoder/1/model.onnx: NeMo's encoder with a transpose at each end, so time is axis 1
  as the ragged batching pads it: features [B, T, n_mels] + length [B] -> encoded [B, T', D] +
  encoded_lengths [B]. Graphs over 2 GB keep their weights in model.onnx.data beside them.
- parakeet_decoder/1/decoder_joint.onnx: NeMo's decoder_joint graph as exported; the Triton model runs
  the whole greedy TDT loop over it (tritonasr.models.parakeet).
Both version directories get the same meta.json (front end, decoding and graph settings,
source, parity numbers) and the model's tokenizer.model, so each served model is
self-contained: the encoder's directory describes its features, the decoder's its decoding.

Sources: a `.nemo` file, a Hugging Face id (e.g. nvidia/parakeet-tdt-0.6b-v2, when the hub can
be reached), or a random-weight `.nemo` built here with NeMo's own classes (the real
architecture at full size, or a tiny one for tests). All go through `ASRModel.restore_from` /
`from_pretrained`, NeMo's loading code.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tritonasr.audio import load_audio
from tritonasr.export.common import (
    OPSET,
    Progress,
    Staging,
    check_waveform,
    max_abs_diff,
    publish_export,
    stderr_progress,
    tensor_specs,
    warn_random_weights,
)
from tritonasr.export.sensevoice import TOKENIZER_TEXT
from tritonasr.models.mel import FILTERBANK_FILE, MelSpec
from tritonasr.models.meta import META_FILE
from tritonasr.models.parakeet import DECODER_GRAPH, ParakeetSpec, TdtSpec
from tritonasr.paths import cache_dir, sample_audio
from tritonasr.runtime.in_process import LocalParakeet
from tritonasr.runtime.onnx_session import OnnxModel

HF_MODEL_ID = "nvidia/parakeet-tdt-0.6b-v2"
ENCODER_DIR, DECODER_DIR = "parakeet_encoder", "parakeet_decoder"
# ONNX protobufs cannot exceed 2 GB: bigger graphs keep their weights in this file beside them.
EXTERNAL_DATA = "model.onnx.data"
# Encoder outputs are layer-normed, O(1); joint logits O(1-10). Measured (x86 CPU, fp32, ONNX
# Runtime 1.31 vs PyTorch 2.13): encoder 2.8e-6 full size / 1.4e-6 tiny, decoder_joint logits
# 6.3e-6 / 1.2e-7, LSTM states 1.1e-6 / 2.4e-7. 1e-3 leaves room for other CPUs' kernels and
# trained weights, and still catches a wrong graph (differences of O(0.1)).
TOLERANCE = 1e-3
# Normalised log-mel features are O(1); measured up to 9e-5 against NeMo's torch preprocessor
# on the test speech: torch's float32 STFT rounding (ours is float64), divided by each mel bin's
# std. 1e-3 is 10x that and far below what moves an encoder output (a wrong window, filterbank
# or normalisation differs by O(0.1-1)).
FRONTEND_TOLERANCE = 1e-3

# --- random-weight models (parakeet-tdt-0.6b-v2's model_config.yaml, or a tiny one) ---------

SIZES = {
    "full": {"n_layers": 24, "d_model": 1024, "n_heads": 8, "subsampling_conv_channels": 256,
             "pred_hidden": 640, "joint_hidden": 640, "vocab_size": 1024},
    "tiny": {"n_layers": 2, "d_model": 96, "n_heads": 4, "subsampling_conv_channels": 32,
             "pred_hidden": 64, "joint_hidden": 64, "vocab_size": 128},
}
TDT_DURATIONS = [0, 1, 2, 3, 4]
MAX_SYMBOLS = 10
# A random joint sees a near-constant encoder output and predicts the same token (or blank)
# with the same duration on every frame. The random models are calibrated on the bundled
# speech so their logits vary with the audio; then these biases, in units of the logits'
# spread, give speech-like output: blanks between tokens, all durations, and now and then
# runs of duration-0 tokens that reach max_symbols (checked on the speech corpus with seed 0).
BLANK_BIAS = 1.5
DURATION0_BIAS = -1.5


def model_config(size: str, tokenizer_dir: Path) -> dict:
    """NeMo's EncDecRNNTBPEModel config for parakeet-tdt-0.6b-v2 ("full") or a tiny twin."""
    dims = SIZES[size]
    return {
        "sample_rate": 16000,
        "model_defaults": {"enc_hidden": dims["d_model"], "pred_hidden": dims["pred_hidden"],
                           "joint_hidden": dims["joint_hidden"], "tdt_durations": TDT_DURATIONS,
                           "num_tdt_durations": len(TDT_DURATIONS)},
        "tokenizer": {"dir": str(tokenizer_dir), "type": "bpe"},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000, "normalize": "per_feature", "window_size": 0.025,
            "window_stride": 0.01, "window": "hann", "features": 128, "n_fft": 512, "log": True,
            "frame_splicing": 1, "dither": 1e-5, "pad_to": 0, "pad_value": 0.0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": 128, "feat_out": -1, "n_layers": dims["n_layers"], "d_model": dims["d_model"],
            "use_bias": False, "subsampling": "dw_striding", "subsampling_factor": 8,
            "subsampling_conv_channels": dims["subsampling_conv_channels"],
            "causal_downsampling": False, "ff_expansion_factor": 4, "self_attention_model": "rel_pos",
            "n_heads": dims["n_heads"], "att_context_size": [-1, -1], "att_context_style": "regular",
            "xscaling": True, "untie_biases": True, "pos_emb_max_len": 5000, "conv_kernel_size": 9,
            "conv_norm_type": "batch_norm", "conv_context_size": None, "dropout": 0.1,
            "dropout_pre_encoder": 0.1, "dropout_emb": 0.0, "dropout_att": 0.1,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder", "normalization_mode": None,
            "random_state_sampling": False, "blank_as_pad": True,
            "prednet": {"pred_hidden": dims["pred_hidden"], "pred_rnn_layers": 2, "t_max": None,
                        "dropout": 0.2},
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint", "log_softmax": None,
            "preserve_memory": False, "fuse_loss_wer": True, "fused_batch_size": 4,
            "jointnet": {"joint_hidden": dims["joint_hidden"], "activation": "relu", "dropout": 0.2},
            "num_extra_outputs": len(TDT_DURATIONS),
        },
        "decoding": {"strategy": "greedy_batch", "model_type": "tdt", "durations": TDT_DURATIONS,
                     "greedy": {"max_symbols": MAX_SYMBOLS}},
        "loss": {"loss_name": "tdt", "tdt_kwargs": {"fastemit_lambda": 0.0, "clamp": -1.0,
                                                     "durations": TDT_DURATIONS, "sigma": 0.02,
                                                     "omega": 0.1}},
    }


def random_model(size: str, seed: int = 0, progress: Progress = stderr_progress) -> Path:
    """A `.nemo` file of Parakeet TDT with seeded random weights (built once, then reused)."""
    if size not in SIZES:
        raise ValueError(f"random_init must be one of {sorted(SIZES)}, not {size!r}")
    target = cache_dir() / f"parakeet-tdt-random-{size}-seed{seed}.nemo"
    if target.is_file():
        return target
    progress(f"building a random-weight Parakeet TDT ({size}, seed {seed}) in {target}…")
    from nemo.collections.asr.models import EncDecRNNTBPEModel
    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory(prefix=f".{target.stem}-", dir=target.parent) as tmp:
        _write_tokenizer(Path(tmp), SIZES[size]["vocab_size"])
        torch.manual_seed(seed)
        model = EncDecRNNTBPEModel(cfg=OmegaConf.create(model_config(size, Path(tmp))))
        model.eval()
        _calibrate_emissions(model)
        part = Path(tmp) / target.name
        model.save_to(str(part))
        os.replace(part, target)  # the file appears complete or not at all
    return target


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
    """An English BPE the way NeMo's create_spt_model trains one (tokenizer.model, vocab.txt),
    without sentencepiece's console log."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_TEXT.splitlines()), model_writer=buffer,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
        bos_id=-1, eos_id=-1, remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    if sp.get_piece_size() != vocab_size:
        raise RuntimeError(f"the tokenizer text yields {sp.get_piece_size()} pieces, not {vocab_size}")
    (directory / "tokenizer.model").write_bytes(buffer.getvalue())
    # NeMo's vocab.txt: pieces without special tokens, '▁x' as 'x', 'x' as '##x'.
    pieces = [sp.id_to_piece(i) for i in range(vocab_size) if not sp.is_unknown(i)]
    lines = [p[1:] or p if p.startswith("\u2581") else f"##{p}" for p in pieces]
    (directory / "vocab.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


@torch.no_grad()
def _calibrate_emissions(model) -> None:
    """Standardise the joint's view of the encoder on the bundled speech and centre its logits
    there; see BLANK_BIAS."""
    wave = torch.from_numpy(load_audio(sample_audio()).samples)[None]
    feats, n = model.preprocessor(input_signal=wave, length=torch.tensor([wave.shape[1]]))
    encoded, _ = model.encoder(audio_signal=feats, length=n)
    frames = encoded[0].T  # [T, D]
    joint = model.joint
    joint.enc.weight /= frames.std(0)
    joint.enc.bias -= joint.enc.weight @ frames.mean(0)
    blank = model.decoder.blank_idx
    state = model.decoder.initialize_state(frames[None])
    g, *_ = model.decoder.predict(torch.full((1, 1), blank), state, add_sos=False, batch_size=1)
    hidden = joint.joint_net[:-1](joint.project_encoder(frames[None]) + joint.project_prednet(g))[0]
    out = joint.joint_net[-1]
    logits = hidden @ out.weight.T
    spread = float(logits.std(0).mean())
    out.bias.copy_(-logits.mean(0))
    out.bias[blank] += BLANK_BIAS * spread
    out.bias[blank + 1 + TDT_DURATIONS.index(0)] += DURATION0_BIAS * spread


# --- loading ---------------------------------------------------------------------------------


def load_model(source: str | Path):
    """A NeMo TDT model in eval mode, on CPU, from a `.nemo` file or a Hugging Face id."""
    from nemo.collections.asr.models import ASRModel

    path = Path(source).expanduser()
    if path.exists() or str(source).endswith(".nemo"):
        if not path.exists():
            raise FileNotFoundError(f"Parakeet .nemo file not found: {source}")
        if not path.is_file():
            raise ValueError(f"{path} is not a .nemo file")
        try:
            model = ASRModel.restore_from(str(path), map_location="cpu")
        except Exception as exc:  # NeMo raises tarfile / yaml / key errors for broken files
            raise ValueError(f"{path} is not a loadable .nemo model: {type(exc).__name__}: {exc}") from exc
    elif str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        from huggingface_hub import constants

        from tritonasr.export.weights import _probe

        try:
            _probe(constants.ENDPOINT, timeout=10.0)
        except ConnectionError as exc:
            raise RuntimeError(f"cannot download {source!r}: {exc}. Without hub access, pass the "
                               f"path of a .nemo file instead.") from exc
        model = ASRModel.from_pretrained(str(source), map_location="cpu")
    else:
        raise FileNotFoundError(f"Parakeet .nemo file not found: {source}")
    if not list(getattr(model.cfg.decoding, "durations", None) or []):
        raise ValueError(f"{source} is not a TDT model (its decoding config has no durations)")
    model.eval()
    return model


def _resolve_source(source: str | None, random_init: str | None, seed: int,
                   progress: Progress) -> str | Path:
    if (source is None) == (random_init is None):
        raise ValueError("give exactly one of a model source (.nemo file or hub id) and random_init")
    return random_model(random_init, seed, progress) if random_init is not None else source


# --- export ----------------------------------------------------------------------------------


def export_parakeet(
    source: str | None,
    random_init: str | None,
    repository: Path,
    check_audio: Path | None = None,
    seed: int = 0,
    progress: Progress = stderr_progress,
) -> dict:
    """Export Parakeet TDT, check it against NeMo, publish both graphs, tokenizer and meta.

    source: a `.nemo` file or a Hugging Face id; or, instead, random_init "full" | "tiny" for
    seeded random weights (meaningless transcripts). Returns a summary: output paths, tensor
    specs, export time and parity numbers.
    """
    resolved = _resolve_source(source, random_init, seed, progress)
    warn_random_weights(progress, random_init, seed, graph="the graphs compute",
                        outputs="their transcripts", source="a .nemo file or hub id",
                        use="for real text")
    progress(f"loading Parakeet TDT from {resolved}…")
    started = time.perf_counter()
    model = load_model(resolved)
    progress(f"  {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
             f"vocabulary {model.tokenizer.vocab_size}, loaded in {time.perf_counter() - started:.1f} s")
    # The served front end computes NeMo's features with NeMo's own mel matrix.
    filterbank = model.preprocessor.featurizer.fb.squeeze(0).numpy().astype(np.float32)
    meta = {**_model_meta(model), "source": str(source if source is not None else resolved),
            "random_init": random_init, "seed": seed if random_init is not None else None}
    waveform, audio_source = check_waveform(check_audio)
    segments = _segments(waveform)
    # NeMo's reference first: exporting switches the joint's log-softmax off for good.
    reference = nemo_greedy(model, segments)

    repository = Path(repository)
    with Staging(repository / ENCODER_DIR / "1") as encoder_stage, \
            Staging(repository / DECODER_DIR / "1") as decoder_stage, \
            tempfile.TemporaryDirectory(prefix=".nemo-export-", dir=encoder_stage.dir.parent) as scratch:
        progress("exporting with NeMo's model.export() (encoder, decoder_joint)…")
        started = time.perf_counter()
        model.export(str(Path(scratch) / "model.onnx"), onnx_opset_version=OPSET)
        _time_major_encoder(Path(scratch) / "encoder-model.onnx", encoder_stage.path("model.onnx"))
        os.replace(Path(scratch) / "decoder_joint-model.onnx", decoder_stage.path(DECODER_GRAPH))
        export_seconds = time.perf_counter() - started
        progress(f"  exported in {export_seconds:.1f} s")
        for stage in (encoder_stage, decoder_stage):
            stage.path("tokenizer.model").write_bytes(model.tokenizer.tokenizer.serialized_model_proto())
            np.save(stage.path(FILTERBANK_FILE), filterbank)

        progress("checking parity (NeMo vs ONNX Runtime)…")
        encoder = OnnxModel(encoder_stage.path("model.onnx"), ragged_inputs=["features"],
                            providers=["CPUExecutionProvider"])
        decoder = OnnxModel(decoder_stage.path(DECODER_GRAPH), providers=["CPUExecutionProvider"])
        spec = ParakeetSpec.from_meta(meta, encoder_stage.dir)
        parity = _parity(model, LocalParakeet(encoder, decoder, spec), segments, reference)
        parity["audio"] = audio_source
        _report(parity, progress)
        meta["parity"] = parity
        specs = {ENCODER_DIR: tensor_specs(encoder.session), DECODER_DIR: tensor_specs(decoder.session)}
        del encoder, decoder
        # The decoder first: whoever finds the new encoder finds its decoder too.
        paths = {name: publish_export(stage, meta, progress)
                 for name, stage in ((DECODER_DIR, decoder_stage), (ENCODER_DIR, encoder_stage))}
    sizes = {name: sum(path.stat().st_size for path in paths[name].values())
             for name in (ENCODER_DIR, DECODER_DIR)}
    stale = repository / ENCODER_DIR / "1" / EXTERNAL_DATA  # a bigger model's weights, from before
    if EXTERNAL_DATA not in paths[ENCODER_DIR] and stale.exists():
        stale.unlink()
    return {
        "encoder": paths[ENCODER_DIR]["model.onnx"],
        "decoder": paths[DECODER_DIR][DECODER_GRAPH],
        "meta": [paths[ENCODER_DIR][META_FILE], paths[DECODER_DIR][META_FILE]],
        "tokenizer": paths[DECODER_DIR]["tokenizer.model"],
        "source": resolved,
        "random_init": random_init,
        "opset": OPSET,
        "export_seconds": round(export_seconds, 2),
        "bytes": sizes,
        "tensors": specs,
        "parity": parity,
    }


def _model_meta(model) -> dict:
    """What serving reads (ParakeetSpec.meta) and what describes the graphs, from the loaded
    model (so a real checkpoint's own settings are used, not this file's)."""
    featurizer = model.preprocessor.featurizer
    cfg = model.cfg.preprocessor
    expected = {"frame_splicing": 1, "exact_pad": False, "log": True}
    unsupported = {k: getattr(featurizer, k) for k, v in expected.items() if getattr(featurizer, k) != v}
    if unsupported:
        raise ValueError(f"the serving front end does not reproduce these preprocessor settings: {unsupported}")
    mel = MelSpec(
        sample_rate=featurizer.sample_rate, n_fft=featurizer.n_fft, win_length=featurizer.win_length,
        hop_length=featurizer.hop_length, n_mels=featurizer.nfilt, window=cfg.get("window", "hann"),
        preemph=featurizer.preemph, lowfreq=float(cfg.get("lowfreq", 0.0) or 0.0),
        highfreq=cfg.get("highfreq", None), mel_norm=cfg.get("mel_norm", "slaney"),
        mag_power=float(featurizer.mag_power), log_zero_guard_type=featurizer.log_zero_guard_type,
        log_zero_guard_value=float(featurizer.log_zero_guard_value_fn(torch.zeros(1))),
        normalize=featurizer.normalize,
    )
    subsampling = int(model.encoder.subsampling_factor)
    window_stride = float(cfg.window_stride)
    decoder = model.decoder
    tdt = TdtSpec.meta(
        blank_id=int(decoder.blank_idx), durations=[int(d) for d in model.cfg.decoding.durations],
        max_symbols_per_step=model.cfg.decoding.greedy.get("max_symbols", None),
        state_layers=int(decoder.pred_rnn_layers), state_hidden=int(decoder.pred_hidden),
        d_model=int(model.encoder.d_model))
    return {
        "model": "parakeet-tdt",
        **ParakeetSpec.meta(preprocessor=mel, frame_ms=window_stride * 1000 * subsampling, tdt=tdt),
        "subsampling_factor": subsampling,
        "window_stride": window_stride,
        "vocab_size": int(model.tokenizer.vocab_size),
        "encoder_graph": {"inputs": ["features", "length"], "outputs": ["encoded", "encoded_lengths"]},
        # The encoder graph's relative-position table: the longest input it takes, in encoded
        # frames (5000 x 80 ms = 400 s for Parakeet).
        "pos_emb_max_len": int(model.cfg.encoder.get("pos_emb_max_len", 5000)),
    }


def _time_major_encoder(src: Path, dst: Path) -> None:
    """NeMo's encoder graph with time as axis 1 at both ends (features [B, T, n_mels] ->
    audio_signal [B, n_mels, T]; outputs [B, D, T'] -> encoded [B, T', D]), saved with its
    weights in one external file when it is too big for one protobuf."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))  # with the weights torch may have spread over many files
    graph = model.graph
    (signal,) = [i for i in graph.input if i.name == "audio_signal"]
    n_mels = signal.type.tensor_type.shape.dim[1].dim_value
    (outputs,) = [o for o in graph.output if o.name == "outputs"]
    d_model = outputs.type.tensor_type.shape.dim[1].dim_value
    graph.node.insert(0, helper.make_node("Transpose", ["features"], ["audio_signal"], perm=[0, 2, 1],
                                          name="features_to_audio_signal"))
    graph.node.append(helper.make_node("Transpose", ["outputs"], ["encoded"], perm=[0, 2, 1],
                                       name="outputs_to_encoded"))
    graph.input.remove(signal)
    graph.input.insert(0, helper.make_tensor_value_info("features", TensorProto.FLOAT,
                                                        ["batch", "frames", n_mels]))
    graph.output.remove(outputs)
    graph.output.insert(0, helper.make_tensor_value_info("encoded", TensorProto.FLOAT,
                                                         ["batch", "encoded_frames", d_model]))
    for value, name in ((graph.input[1], "batch"), (graph.output[1], "batch")):
        value.type.tensor_type.shape.dim[0].dim_param = name
    large = sum(t.ByteSize() for t in graph.initializer) > 1_900_000_000
    onnx.save_model(model, str(dst), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA)
    onnx.checker.check_model(str(dst))  # by path: works with external data too


# --- parity ----------------------------------------------------------------------------------


def _segments(waveform: np.ndarray) -> list[np.ndarray]:
    """The whole recording and three cuts of different lengths from it."""
    n = len(waveform)
    cuts = [(0.0, 1.0), (0.0, 0.4), (0.25, 0.9), (0.5, 0.65)]
    return [waveform[int(a * n):int(b * n)] for a, b in cuts]


def nemo_greedy(model, waveforms: list[np.ndarray], batch_size: int = 1) -> list[dict]:
    """NeMo's own transcribe() (greedy_batch TDT) on each waveform: tokens, the frame of each,
    its duration, and NeMo's word timestamps (start/end in encoder frames).

    batch_size 1 is the reference: in NeMo 3.0's batched label-looping TDT loop, a sequence
    whose token was found while others still search records the duration predicted at a later
    step (the inner loop overwrites `durations` for the whole batch, unmasked); its frames and
    tokens are right. Our loop records the duration it advanced by, as NeMo does at batch 1.
    """
    hypotheses = model.transcribe([np.asarray(w, np.float32) for w in waveforms], batch_size=batch_size,
                                  return_hypotheses=True, timestamps=True, verbose=False)
    # transcribe() ends with unfreeze(), which puts encoder, decoder and joint in training mode
    # (dropout on) even when the model was in eval mode: put them back.
    model.eval()
    if isinstance(hypotheses, tuple):  # older NeMo: (best, all)
        hypotheses = hypotheses[0]
    return [{
        "tokens": np.asarray(h.y_sequence, np.int64).reshape(-1).tolist(),
        "frames": [int(t) for t in h.timestamp["timestep"]],
        "durations": [int(d) for d in h.token_duration],
        "words": [(w["word"], int(w["start_offset"]), int(w["end_offset"])) for w in h.timestamp["word"]],
    } for h in hypotheses]


def _parity(model, local: LocalParakeet, segments: list[np.ndarray], reference: list[dict]) -> dict:
    """The served pair (our front end, both graphs, our TDT loop) against NeMo."""
    frontend = local.spec.frontend
    frontend_diff = encoder_diff = 0.0
    lengths_identical = True
    nemo_encoded = []
    for segment in segments:
        with torch.no_grad():
            feats, n = model.preprocessor(input_signal=torch.from_numpy(segment)[None],
                                          length=torch.tensor([len(segment)]))
            encoded, encoded_len = model.encoder(audio_signal=feats, length=n)
        nemo_feats = feats[0, :, :int(n)].T.numpy()
        frontend_diff = max(frontend_diff, max_abs_diff(nemo_feats, frontend.features(segment)))
        # The encoder graph on NeMo's own features: the graph's diff, not the front end's.
        (out,) = local.encode([nemo_feats])
        lengths_identical &= out.shape[0] == int(encoded_len[0])
        valid = min(out.shape[0], int(encoded_len[0]))
        nemo_encoded.append(encoded[0].T[:valid].numpy())
        encoder_diff = max(encoder_diff, max_abs_diff(nemo_encoded[-1], out[:valid]))

    # Our features, all segments in one zero-padded batch vs each alone.
    feats = [frontend.features(s) for s in segments]
    alone = [local.encode([f])[0] for f in feats]
    batch_diff = max(max_abs_diff(a, b) for a, b in zip(alone, encode_padded(local.encoder, feats)))

    # decoder_joint on a batch of steps: NeMo's encoder frames, labels and random LSTM states.
    frames = np.concatenate(nemo_encoded)[:8]
    generator = np.random.default_rng(0)
    labels = generator.integers(0, model.decoder.blank_idx + 1, len(frames)).astype(np.int32)
    states = [generator.standard_normal((local.spec.tdt.state_layers, len(frames),
                                         local.spec.tdt.state_hidden)).astype(np.float32) * 0.5
              for _ in range(2)]
    theirs = _torch_decoder_joint(model, frames, labels, *states)
    ours = local.decoder_joint(frames, labels, *states)
    joint_diff = max_abs_diff(theirs[0], ours[0])
    states_diff = max(max_abs_diff(a, b) for a, b in zip(theirs[1:], ours[1:]))

    single = [local.transcribe([s])[0] for s in segments]
    batched = local.transcribe(segments)
    tokens_identical = all(_as_lists(r) == {k: ref[k] for k in ("tokens", "frames", "durations")}
                           for r, ref in zip(single, reference))
    batch_identical = all(_as_lists(a) == _as_lists(b) for a, b in zip(single, batched))
    return {
        "segments": len(segments),
        "segment_seconds": [round(len(s) / frontend.spec.sample_rate, 2) for s in segments],
        "frontend_max_abs_diff": frontend_diff,
        "encoder_max_abs_diff": encoder_diff,
        "encoder_lengths_identical": bool(lengths_identical),
        "batch_encoder_max_abs_diff": batch_diff,
        "decoder_joint_max_abs_diff": joint_diff,
        "decoder_states_max_abs_diff": states_diff,
        "tokens_identical": bool(tokens_identical),
        "batch_tokens_identical": bool(batch_identical),
        "tokens_per_segment": [len(r.tokens) for r in single],
        "tolerance": TOLERANCE,
        "frontend_tolerance": FRONTEND_TOLERANCE,
    }


def encode_padded(encoder: OnnxModel, features: list[np.ndarray]) -> list[np.ndarray]:
    """The encoder graph on one zero-padded batch (whatever the padding waste), valid frames."""
    padded = np.zeros((len(features), max(f.shape[0] for f in features), features[0].shape[1]), np.float32)
    for row, f in zip(padded, features):
        row[:len(f)] = f
    out = encoder.run({"features": padded, "length": np.array([len(f) for f in features], np.int64)},
                      ["encoded", "encoded_lengths"])
    return [e[:n] for e, n in zip(out["encoded"], out["encoded_lengths"])]


def _torch_decoder_joint(model, frames, labels, h, c) -> tuple[np.ndarray, ...]:
    """The module NeMo exported (RNNTDecoderJoint, in its export mode) on the same inputs."""
    from nemo.core.classes.common import typecheck

    with torch.no_grad(), typecheck.disable_checks():
        logits, _, h, c = model.decoder_joint(
            torch.from_numpy(frames)[:, :, None], torch.from_numpy(labels)[:, None],
            torch.ones(len(labels), dtype=torch.int32), torch.from_numpy(h), torch.from_numpy(c))
    return logits.reshape(len(labels), -1).numpy(), h.numpy(), c.numpy()


def _as_lists(result) -> dict:
    return {"tokens": result.tokens.tolist(), "frames": result.frames.tolist(),
            "durations": result.durations.tolist()}


def _report(parity: dict, progress: Progress) -> None:
    progress(
        f"  {parity['segments']} segments: features max abs diff {parity['frontend_max_abs_diff']:.2e}; "
        f"encoder {parity['encoder_max_abs_diff']:.2e} (batched {parity['batch_encoder_max_abs_diff']:.2e}); "
        f"decoder_joint logits {parity['decoder_joint_max_abs_diff']:.2e}, states "
        f"{parity['decoder_states_max_abs_diff']:.2e} (tolerance {TOLERANCE:g}); greedy tokens, frames "
        f"and durations identical to NeMo transcribe(): {parity['tokens_identical']}; batch-of-"
        f"{parity['segments']} == batch-of-1: {parity['batch_tokens_identical']}; tokens per "
        f"segment {parity['tokens_per_segment']}"
    )
    failures = [name for name in ("encoder_lengths_identical", "tokens_identical",
                                  "batch_tokens_identical") if not parity[name]]
    failures += [f"{name} {parity[name]:.3e}" for name in (
        "encoder_max_abs_diff", "batch_encoder_max_abs_diff", "decoder_joint_max_abs_diff",
        "decoder_states_max_abs_diff") if parity[name] > TOLERANCE]
    if parity["frontend_max_abs_diff"] > FRONTEND_TOLERANCE:
        failures.append(f"frontend_max_abs_diff {parity['frontend_max_abs_diff']:.3e}")
    if failures:
        raise RuntimeError(f"Parakeet export parity failed: {', '.join(failures)}")
