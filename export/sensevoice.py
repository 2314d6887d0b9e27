"""Export FunASR's SenseVoiceSmall to `<repository>/sensevoice/1/model.onnx`.

The served graph takes LFR(7,6) fbank features before CMVN (am.mvn's CMVN is inside), their
lengths and the language / text-normalisation query ids, and returns the CTC logits, their
argmax (so the server need not move full-vocabulary logits around) and the output lengths.
Output frame t covers input frame t - 4: SenseVoice prepends four query frames (language,
event, emotion, text normalisation) whose outputs are its rich tags.

Sources: a FunASR model directory, a ModelScope / Hugging Face model id, or a random-weight
model directory built here (the real architecture at full size, or a tiny one for tests)
for machines without hub access. All three load through the same FunASR code path.
"""

from __future__ import annotations

import copy
import io
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from tritonasr.audio import load_audio
from tritonasr.models.meta import META_FILE
from tritonasr.models.sensevoice import SenseVoiceSpec
from tritonasr.models.transcript import ctc_greedy
from tritonasr.paths import cache_dir, sample_audio

from tritonasr.export.common import (
    cached_model_dir,
    OPSET,
    Cmvn,
    CmvnLayer,
    ExportJob,
    export_onnx,
    frontend_parity,
    lfr_features,
    load_funasr_model,
    max_abs_diff,
    Progress,
    resolve_source,
    run_export,
    Staging,
    stderr_progress,
    warn_random_weights,
    write_json,
)

QUERY_FRAMES = 4  # language, event, emotion, textnorm
EVENT_EMO_IDS = (1, 2)  # fixed event / emotion query ids, as in SenseVoiceSmall.inference
BLANK_ID = 0
# Logits are compared in absolute terms. Measured (x86 CPU, fp32, ONNX Runtime 1.31): up to 8e-6
# for the full-size random model, 5e-6 for the tiny one. 1e-3 leaves room for other CPUs' kernels
# and for trained weights' larger logits, and still catches a wrong graph (differences of O(0.1)).
LOGITS_TOLERANCE = 1e-3

# --- random-weight model directories ---------------------------------------------------------

FRONTEND_CONF = {"fs": 16000, "window": "hamming", "n_mels": 80, "frame_length": 25,
                 "frame_shift": 10, "lfr_m": 7, "lfr_n": 6}
ENCODER_CONF = {  # SenseVoiceSmall's config.yaml (iic/SenseVoiceSmall)
    "full": {"output_size": 512, "attention_heads": 4, "linear_units": 2048, "num_blocks": 50,
             "tp_blocks": 20, "kernel_size": 11},
    "tiny": {"output_size": 64, "attention_heads": 2, "linear_units": 128, "num_blocks": 3,
             "tp_blocks": 2, "kernel_size": 11},
}
COMMON_ENCODER_CONF = {"dropout_rate": 0.1, "positional_dropout_rate": 0.1,
                       "attention_dropout_rate": 0.1, "input_layer": "pe",
                       "pos_enc_class": "SinusoidalPositionEncoder", "normalize_before": True,
                       "sanm_shfit": 0, "selfattention_layer_type": "sanm"}
VOCAB_SIZE = {"full": 25055, "tiny": 500}
BPE_PIECES = 400  # learnt pieces; the rest of the vocabulary is filler
TOKENIZER_FILE = "chn_jpn_yue_eng_ko_spectok.bpe.model"  # the real checkpoint's name
RICH_TAGS = (
    "<|zh|> <|en|> <|yue|> <|ja|> <|ko|> <|nospeech|> <|HAPPY|> <|SAD|> <|ANGRY|> <|NEUTRAL|> "
    "<|FEARFUL|> <|DISGUSTED|> <|SURPRISED|> <|EMO_UNKNOWN|> <|Speech|> <|BGM|> <|Applause|> "
    "<|Laughter|> <|Cry|> <|Sneeze|> <|Breath|> <|Cough|> <|Event_UNK|> <|withitn|> <|woitn|>"
).split()
# Harvard sentences (IEEE 1969, public domain): English text to learn a small BPE from.
TOKENIZER_TEXT = """\
The birch canoe slid on the smooth planks.
Glue the sheet to the dark blue background.
It's easy to tell the depth of a well.
These days a chicken leg is a rare dish.
Rice is often served in round bowls.
The juice of lemons makes fine punch.
The box was thrown beside the parked truck.
The hogs were fed chopped corn and garbage.
Four hours of steady work faced us.
A large size in stockings is hard to sell.
The boy was there when the sun rose.
A rod is used to catch pink salmon.
The source of the huge river is the clear spring.
Kick the ball straight and follow through.
Help the woman get back to her feet.
A pot of tea helps to pass the evening.
Smoky fires lack flame and heat.
The soft cushion broke the man's fall.
The salt breeze came across from the sea.
The girl at the booth sold fifty bonds.
The small pup gnawed a hole in the sock.
The fish twisted and turned on the bent hook.
Press the pants and sew a button on the vest.
The swan dive was far short of perfect.
The beauty of the view stunned the young boy.
Two blue fish swam in the tank.
Her purse was full of useless trash.
The colt reared and threw the tall rider.
It snowed, rained, and hailed the same morning.
Read verse out loud for pleasure.
Hoist the load to your left shoulder.
Take the winding path to reach the lake.
Note closely the size of the gas tank.
Wipe the grease off his dirty face.
Mend the coat before you go out.
The wrist was badly strained and hung limp.
The stray cat gave birth to kittens.
The young girl gave no clear response.
The meal was cooked before the bell rang.
What joy there is in living.
"""


def random_model_dir(size: str, seed: int = 0, progress: Progress = stderr_progress) -> Path:
    """A FunASR SenseVoiceSmall model directory with seeded random weights (built once).

    It has what a real checkpoint has: config.yaml, configuration.json, model.pt (a state
    dict of FunASR's SenseVoiceSmall), am.mvn and a SentencePiece BPE tokenizer whose id 0 is
    <unk>, the CTC blank, and which holds the SenseVoice rich tags.
    """
    if size not in ENCODER_CONF:
        raise ValueError(f"random_init must be one of {sorted(ENCODER_CONF)}, not {size!r}")
    target = cache_dir() / f"sensevoice-random-{size}-seed{seed}-v2"  # v2: plain-word fillers

    def build(directory: Path) -> None:
        progress(f"building a random-weight SenseVoiceSmall ({size}, seed {seed}) in {target}…")
        vocab_size = _write_tokenizer(directory / TOKENIZER_FILE, VOCAB_SIZE[size])
        _write_am_mvn(directory / "am.mvn")
        config = {
            "encoder": "SenseVoiceEncoderSmall",
            "encoder_conf": {**ENCODER_CONF[size], **COMMON_ENCODER_CONF},
            "model": "SenseVoiceSmall",
            "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1},
            "tokenizer": "SentencepiecesTokenizer",
            "tokenizer_conf": {"bpemodel": None, "unk_symbol": "<unk>", "split_with_space": True},
            "frontend": "WavFrontend",
            "frontend_conf": {**FRONTEND_CONF, "cmvn_file": None},
        }
        (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        write_json(directory / "configuration.json", {
            "framework": "pytorch",
            "task": "auto-speech-recognition",
            "model": {"type": "funasr"},
            "file_path_metas": {"init_param": "model.pt", "config": "config.yaml",
                                "tokenizer_conf": {"bpemodel": TOKENIZER_FILE},
                                "frontend_conf": {"cmvn_file": "am.mvn"}},
        })
        torch.save(_random_state_dict(config, vocab_size, seed), directory / "model.pt")

    return cached_model_dir(target, "model.pt", build)


def _random_state_dict(config: dict, vocab_size: int, seed: int) -> dict:
    from funasr.register import tables

    import funasr.models.sense_voice.model  # noqa: F401  (registers SenseVoiceSmall)

    torch.manual_seed(seed)
    model_class = tables.model_classes.get(config["model"])
    model = model_class(
        encoder=config["encoder"],
        encoder_conf=config["encoder_conf"],
        input_size=FRONTEND_CONF["n_mels"] * FRONTEND_CONF["lfr_m"],
        vocab_size=vocab_size,
        **config["model_conf"],
    )
    return model.state_dict()


def _write_tokenizer(path: Path, vocab_size: int) -> int:
    """Train a small English BPE with the rich tags, pad it with fillers to `vocab_size`."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_TEXT.splitlines()),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=BPE_PIECES,
        hard_vocab_limit=False,  # the text is small: take what it yields, fillers do the rest
        user_defined_symbols=RICH_TAGS,
        unk_id=BLANK_ID, bos_id=1, eos_id=2, pad_id=-1,  # as SenseVoice's: <unk> is id 0
        character_coverage=1.0,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    learnt = spm.SentencePieceProcessor(model_proto=buffer.getvalue()).get_piece_size()
    if learnt > vocab_size:
        raise ValueError(f"tokenizer has {learnt} pieces, more than {vocab_size}")
    # Fillers keep every id decodable (random weights emit any id); as user-defined symbols
    # they never come out of encoding ordinary text.
    # Plain words, not <|tags|>: the served text strips tags, and random weights pick fillers
    # most of the time; visible (meaningless) words show the pipeline works end to end.
    fillers = [f"\u2581w{i}" for i in range(vocab_size - learnt)]
    path.write_bytes(buffer.getvalue() + _user_defined_pieces(fillers))
    return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()


def _user_defined_pieces(pieces: list[str]) -> bytes:
    """ModelProto.pieces entries (field 1) of type USER_DEFINED, in protobuf wire format.

    Appended to a serialized ModelProto they extend its pieces: parsers concatenate a
    repeated field's entries wherever they appear. Written by hand because sentencepiece's
    sentencepiece_model_pb2 needs protobuf >= 7 and this environment has protobuf 6.
    """

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    user_defined = 4  # ModelProto.SentencePiece.Type.USER_DEFINED
    out = bytearray()
    for piece in pieces:
        text = piece.encode("utf-8")
        entry = b"\x0a" + varint(len(text)) + text + b"\x18" + varint(user_defined)
        out += b"\x0a" + varint(len(entry)) + entry
    return bytes(out)


def _write_am_mvn(path: Path) -> None:
    """Global CMVN of LFR features of the bundled speech sample."""
    feats = lfr_features(load_audio(sample_audio()).samples, FRONTEND_CONF)
    mean = feats.mean(axis=0)
    std = np.maximum(feats.std(axis=0), 1e-2)
    dim = feats.shape[1]

    def row(values: np.ndarray) -> str:
        return "<LearnRateCoef> 0 [ " + " ".join(f"{v:.6g}" for v in values) + " ]"

    # Kaldi nnet1 text, the layout FunASR's and funasr-onnx's load_cmvn parse.
    path.write_text("\n".join([
        "<Nnet>", f"<Splice> {dim} {dim}", "[ 0 ]",
        f"<AddShift> {dim} {dim}", row(-mean),
        f"<Rescale> {dim} {dim}", row(1.0 / std),
        "</Nnet>", "",
    ]))


# --- export ----------------------------------------------------------------------------------


class SenseVoiceGraph(torch.nn.Module):
    """CMVN, FunASR's own export forward of SenseVoiceSmall (export_meta.py), argmax."""

    def __init__(self, export_model: torch.nn.Module, cmvn: Cmvn):
        super().__init__()
        self.cmvn = CmvnLayer(cmvn)
        self.model = export_model

    def forward(self, speech, speech_lengths, language, textnorm):
        ctc_logits, encoder_out_lens = self.model(self.cmvn(speech), speech_lengths, language,
                                                  textnorm)
        token_ids = ctc_logits.argmax(dim=-1).to(torch.int32)
        return ctc_logits, token_ids, encoder_out_lens.to(torch.int32)


def export_sensevoice(
    source: str | None,
    random_init: str | None,
    repository: Path,
    check_audio: Path | None = None,
    seed: int = 0,
    progress: Progress = stderr_progress,
    hub: str | None = None,
) -> dict:
    """Export SenseVoiceSmall, check it against PyTorch, publish model.onnx, tokenizer, meta.

    source: a FunASR model directory or a ModelScope / Hugging Face id; or, instead,
    random_init "full" | "tiny" for seeded random weights (meaningless transcripts).
    Returns a summary: output paths, tensor specs and parity numbers.
    """
    model_dir = resolve_source(source, random_init, seed, progress, random_model_dir, hub)
    warn_random_weights(progress, random_init, seed, graph="the graph computes",
                        outputs="its transcripts", source="a model directory or hub id",
                        use="for real text")
    progress(f"loading SenseVoiceSmall from {model_dir}…")
    started = time.perf_counter()
    model, kwargs = load_funasr_model(model_dir)
    progress(f"  {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
             f"vocabulary {model.vocab_size}, loaded in {time.perf_counter() - started:.1f} s")
    tokenizer = kwargs["tokenizer"]
    frontend_conf = {k: v for k, v in kwargs["frontend_conf"].items() if k != "cmvn_file"}
    cmvn_file = Path(kwargs["frontend_conf"]["cmvn_file"])
    cmvn = Cmvn.load(cmvn_file)

    # FunASR's export rebuild replaces forward() on the instance it is given: use a copy.
    graph = SenseVoiceGraph(copy.deepcopy(model).export(device="cpu"), cmvn)
    input_names = ["speech", "speech_lengths", "language", "textnorm"]
    output_names = ["ctc_logits", "token_ids", "encoder_out_lens"]
    dynamic_axes = {
        "speech": {0: "batch", 1: "frames"},
        "speech_lengths": {0: "batch"},
        "language": {0: "batch"},
        "textnorm": {0: "batch"},
        "ctc_logits": {0: "batch", 1: "out_frames"},
        "token_ids": {0: "batch", 1: "out_frames"},
        "encoder_out_lens": {0: "batch"},
    }
    feat_dim = model.embed.embedding_dim
    dummy = (
        torch.randn(2, 30, feat_dim),
        torch.tensor([30, 17], dtype=torch.int32),
        torch.tensor([0, 4], dtype=torch.int32),
        torch.tensor([15, 14], dtype=torch.int32),
    )

    def write(staging: Staging) -> None:
        export_onnx(graph, dummy, staging.path("model.onnx"), input_names, output_names,
                    dynamic_axes)
        shutil.copyfile(tokenizer.bpemodel, staging.path("tokenizer.model"))

    def failures(parity: dict) -> list[str]:
        failed = [name for name in ("tokens_identical", "funasr_text_identical",
                                    "batch_tokens_identical") if not parity[name]]
        if parity["logits_max_abs_diff"] > LOGITS_TOLERANCE:
            failed.append(f"logits diff {parity['logits_max_abs_diff']:.3e}")
        if parity["batch_logits_max_abs_diff"] > LOGITS_TOLERANCE:
            failed.append(f"batch logits diff {parity['batch_logits_max_abs_diff']:.3e}")
        return failed

    done = run_export(ExportJob(
        version_dir=Path(repository) / "sensevoice" / "1",
        exporting="exporting sensevoice/1/model.onnx…",
        write=write,
        check_audio=check_audio,
        compare=lambda session, waveform: _parity(model, session, tokenizer, waveform,
                                                  frontend_conf, cmvn),
        frontend=lambda waveform: frontend_parity(waveform, frontend_conf, cmvn_file),
        summary=lambda parity: (
            f"  {parity['segments']} segments: ctc_logits max abs diff "
            f"{parity['logits_max_abs_diff']:.2e} (tolerance {LOGITS_TOLERANCE:g}); greedy "
            f"tokens identical: {parity['tokens_identical']}; FunASR inference() text "
            f"identical: {parity['funasr_text_identical']}; batch-of-{parity['segments']} == "
            f"batch-of-1 tokens: {parity['batch_tokens_identical']} (logits max abs diff "
            f"{parity['batch_logits_max_abs_diff']:.2e})"),
        failures=failures,
        failed="SenseVoice export parity failed",
        meta={
            **SenseVoiceSpec.meta(frontend=frontend_conf, blank_id=BLANK_ID, lid_dict=model.lid_dict,
                                  textnorm_dict=model.textnorm_dict),
            "vocab_size": int(model.vocab_size),
            "query_frames": QUERY_FRAMES,
            "source": str(source) if source is not None else str(model_dir),
            "model_dir": str(model_dir),
            "random_init": random_init,
        },
    ), progress)
    return {
        "model": done.paths["model.onnx"],
        "meta": done.paths[META_FILE],
        "tokenizer": done.paths["tokenizer.model"],
        "model_dir": model_dir,
        "random_init": random_init,
        "opset": OPSET,
        "export_seconds": done.export_seconds,
        "tensors": done.tensors,
        "parity": done.parity,
    }


# --- parity ----------------------------------------------------------------------------------


def _segments(waveform: np.ndarray) -> list[np.ndarray]:
    """The whole recording and three cuts of different lengths from it."""
    n = len(waveform)
    cuts = [(0.0, 1.0), (0.0, 0.4), (0.25, 0.9), (0.5, 0.65)]
    return [waveform[int(a * n):int(b * n)] for a, b in cuts]


def _torch_reference(model, feats: torch.Tensor, language: str, textnorm: str):
    """The forward of SenseVoiceSmall.inference, step by step, keeping the logits."""
    batch = feats.size(0)
    lengths = torch.tensor([feats.size(1)] * batch)

    def query(*ids: int) -> torch.Tensor:
        return model.embed(torch.LongTensor([ids])).repeat(batch, 1, 1)

    language_query = query(model.lid_dict[language])
    textnorm_query = query(model.textnorm_dict[textnorm])
    speech = torch.cat((textnorm_query, feats), dim=1)
    event_emo_query = query(*EVENT_EMO_IDS)
    speech = torch.cat((torch.cat((language_query, event_emo_query), dim=1), speech), dim=1)
    encoder_out, encoder_out_lens = model.encoder(speech, lengths + QUERY_FRAMES)
    if isinstance(encoder_out, tuple):
        encoder_out = encoder_out[0]
    return model.ctc.ctc_lo(encoder_out), encoder_out_lens


def _parity(model, session, tokenizer, waveform, frontend_conf, cmvn: Cmvn) -> dict:
    languages = ["auto", "en", "zh", "ja"]
    textnorms = ["woitn", "withitn"]
    items = []
    for i, segment in enumerate(_segments(waveform)):
        language, textnorm = languages[i % len(languages)], textnorms[i % len(textnorms)]
        items.append({
            "feats": lfr_features(segment, frontend_conf),
            "language": language,
            "textnorm": textnorm,
            "language_id": model.lid_dict[language],
            "textnorm_id": model.textnorm_dict[textnorm],
            "seconds": len(segment) / frontend_conf["fs"],
        })

    logits_diff = 0.0
    tokens_identical = text_identical = True
    for item in items:
        feats = item["feats"]
        with torch.no_grad():
            normed = cmvn.apply_funasr(feats)[None]
            ref_logits, ref_lens = _torch_reference(model, normed, item["language"],
                                                    item["textnorm"])
            # FunASR's own inference() on the same features: guards _torch_reference.
            results, _ = model.inference(
                normed, data_lengths=torch.tensor([feats.shape[0]]), data_type="fbank",
                key=["parity"], tokenizer=tokenizer, device="cpu", language=item["language"],
                text_norm=item["textnorm"])
        logits, token_ids, lens = session.run(None, _sensevoice_feed([item]))
        length = int(lens[0])
        if length != int(ref_lens[0]) or length != feats.shape[0] + QUERY_FRAMES:
            raise RuntimeError(f"encoder_out_lens {length} vs PyTorch {int(ref_lens[0])}")
        logits_diff = max(logits_diff, max_abs_diff(ref_logits[0, :length], logits[0, :length]))
        item["tokens"] = ctc_greedy(token_ids[0], length)
        ref_tokens = ctc_greedy(ref_logits[0].argmax(-1).numpy(), int(ref_lens[0]))
        tokens_identical &= item["tokens"] == ref_tokens
        text_identical &= tokenizer.decode(item["tokens"]) == results[0]["text"]
        item["logits"] = logits[0, :length]

    # All segments in one zero-padded batch vs each alone.
    logits, token_ids, lens = session.run(None, _sensevoice_feed(items))
    batch_tokens_identical = True
    batch_diff = 0.0
    for b, item in enumerate(items):
        length = int(lens[b])
        batch_tokens_identical &= ctc_greedy(token_ids[b], length) == item["tokens"]
        batch_diff = max(batch_diff, max_abs_diff(logits[b, :length], item["logits"]))

    return {
        "segments": len(items),
        "segment_seconds": [round(item["seconds"], 2) for item in items],
        "logits_max_abs_diff": logits_diff,
        "tokens_identical": bool(tokens_identical),
        "funasr_text_identical": bool(text_identical),
        "batch_tokens_identical": bool(batch_tokens_identical),
        "batch_logits_max_abs_diff": batch_diff,
        "tokens_per_segment": [len(item["tokens"]) for item in items],
        "logits_tolerance": LOGITS_TOLERANCE,
    }


def _sensevoice_feed(items: list[dict]) -> dict[str, np.ndarray]:
    """Zero-padded batch of features with per-item lengths and query ids."""
    frames = max(item["feats"].shape[0] for item in items)
    dim = items[0]["feats"].shape[1]
    speech = np.zeros((len(items), frames, dim), np.float32)
    for b, item in enumerate(items):
        speech[b, :item["feats"].shape[0]] = item["feats"]
    return {
        "speech": speech,
        "speech_lengths": np.array([item["feats"].shape[0] for item in items], np.int32),
        "language": np.array([item["language_id"] for item in items], np.int32),
        "textnorm": np.array([item["textnorm_id"] for item in items], np.int32),
    }


class TorchSenseVoice:
    """FunASR's PyTorch SenseVoiceSmall behind FunASR's own frontend (dither off): the in-process
    reference the served pipeline is compared with."""

    def __init__(self, model_dir: str | Path):
        self.model, kwargs = load_funasr_model(Path(model_dir))
        self.frontend = kwargs["frontend"]
        self.frontend.dither = 0.0  # FunASR's default of 1.0 would make the reference random

    @torch.no_grad()
    def greedy_ids(self, audio: np.ndarray, language: str = "auto", use_itn: bool = False) -> tuple[np.ndarray, int]:
        """Per-frame argmax token ids of one segment and how many frames are valid."""
        wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
        feats, _ = self.frontend(wave, torch.tensor([wave.shape[1]]))
        logits, lengths = _torch_reference(self.model, feats, language, "withitn" if use_itn else "woitn")
        return logits[0].argmax(-1).numpy(), int(lengths[0])
