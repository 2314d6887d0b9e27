"""Greedy decoding of a Token-and-Duration Transducer (Parakeet TDT), batched, in numpy; word
timings; Parakeet's spec (front end, tokenizer, decoding settings).

The decoder+joint network runs behind a callable (`DecoderJoint`), so the same loop drives a
local ONNX Runtime session and the one inside the Triton model. Every sequence of the batch
keeps its own frame pointer and prediction-network state; each step evaluates the joint once
for every sequence that is still inside its own length, so padding never reaches a result and
a sequence's tokens do not depend on what else is in the batch.

The rules are those of NeMo's label-looping greedy TDT decoder
(GreedyBatchedTDTLabelLoopingComputer.torch_impl, the `greedy_batch` strategy), step by step:
- start with the blank id as <SOS> and zero LSTM states;
- token = argmax over the token logits (blank included), duration = durations[argmax over the
  duration logits]; a blank predicted with duration 0 moves on by 1 frame instead;
- a token is emitted at the frame it was predicted on, with its predicted duration, and only
  then feeds the prediction network; a blank leaves the prediction network as it was;
- after `max_symbols_per_step` tokens on one frame with duration 0, the frame pointer is moved
  on by one (NeMo's "force blank").
NeMo evaluates the joint for all sequences and masks the results; here only the sequences that
need it are evaluated: the same evaluations per sequence, in the same order.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import sentencepiece as spm

from tritonasr.models.mel import MelFrontend, MelSpec
from tritonasr.models.meta import read_meta

# parakeet_decoder's graph: one decoder+joint step, not the served model's own interface (its
# Python model runs the whole loop), so it is not named model.onnx.
DECODER_GRAPH = "decoder_joint.onnx"

# (encoder frames [N, D], previous labels [N], LSTM states h, c [layers, N, hidden])
#   -> (joint logits [N, vocab + 1 + len(durations)], h', c')
# The states returned are those after feeding the previous labels: what the next step takes
# once a new label has been emitted.
DecoderJoint = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                        tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class TdtSpec:
    blank_id: int
    durations: tuple[int, ...]
    max_symbols_per_step: int | None
    state_layers: int
    state_hidden: int
    d_model: int  # the width of an encoder frame, what decoder_joint takes

    @staticmethod
    def meta(*, blank_id: int, durations: Sequence[int], max_symbols_per_step: int | None,
             state_layers: int, state_hidden: int, d_model: int) -> dict:
        """The meta.json keys `from_meta` reads."""
        return {
            "d_model": d_model,
            "blank_id": blank_id,
            "durations": list(durations),
            "max_symbols_per_step": max_symbols_per_step,
            # names: the decoder_joint inputs the states go to (OnnxDecoderJoint feeds them).
            "decoder_state": {"names": ["input_states_1", "input_states_2"],
                              "shape": [state_layers, state_hidden]},
        }

    @classmethod
    def from_meta(cls, meta: Mapping) -> "TdtSpec":
        layers, hidden = meta["decoder_state"]["shape"]
        return cls(int(meta["blank_id"]), tuple(int(d) for d in meta["durations"]),
                   meta["max_symbols_per_step"], layers, hidden, int(meta["d_model"]))


@dataclass
class TdtResult:
    """One sequence's emitted tokens, the encoder frame each was emitted on and its duration."""

    tokens: np.ndarray  # int32
    frames: np.ndarray  # int32
    durations: np.ndarray  # int32


def greedy_decode(encoded: np.ndarray, lengths: np.ndarray, decoder_joint: DecoderJoint,
                  spec: TdtSpec) -> list[TdtResult]:
    """encoded: [B, T, D] (time-major, as the served encoder emits it), lengths: [B] valid frames."""
    batch = encoded.shape[0]
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    durations = np.asarray(spec.durations, dtype=np.int64)
    n_durations = durations.size
    time = np.zeros(batch, np.int64)
    labels = np.full(batch, spec.blank_id, np.int32)  # last emitted label; blank is NeMo's <SOS>
    h = np.zeros((spec.state_layers, batch, spec.state_hidden), np.float32)
    c = np.zeros_like(h)
    # NeMo's last_nb_timestamp / last_nb_timestamp_lasts: the frame of the last token, and how
    # many tokens in a row were emitted on it.
    last_frame = np.full(batch, -1, np.int64)
    run = np.zeros(batch, np.int64)
    emitted: list[tuple[np.ndarray, ...]] = []

    active = np.flatnonzero(time < lengths)
    while active.size:
        logits, h_next, c_next = decoder_joint(encoded[active, time[active]], labels[active],
                                               h[:, active], c[:, active])
        token = logits[:, :-n_durations].argmax(axis=-1)
        duration = durations[logits[:, -n_durations:].argmax(axis=-1)]
        blank = token == spec.blank_id
        duration[blank & (duration == 0)] = 1
        frame = time[active]
        time[active] += duration

        found = ~blank
        rows = active[found]
        emitted.append((rows, token[found], frame[found], duration[found]))
        labels[rows] = token[found]
        h[:, rows] = h_next[:, found]
        c[:, rows] = c_next[:, found]
        run[rows] = np.where(last_frame[rows] == frame[found], run[rows] + 1, 1)
        last_frame[rows] = frame[found]
        if spec.max_symbols_per_step is not None:
            stuck = rows[(run[rows] >= spec.max_symbols_per_step) & (last_frame[rows] == time[rows])
                         & (time[rows] < lengths[rows])]
            time[stuck] += 1
        active = np.flatnonzero(time < lengths)
    return _split(emitted, batch)


def _split(emitted: list[tuple[np.ndarray, ...]], batch: int) -> list[TdtResult]:
    """Per-step emissions -> per-sequence results (a stable sort keeps each one's order)."""
    if not emitted:
        empty = np.zeros(0, np.int32)
        return [TdtResult(empty, empty, empty) for _ in range(batch)]
    rows, tokens, frames, durations = (np.concatenate(parts) for parts in zip(*emitted))
    order = np.argsort(rows, kind="stable")
    bounds = np.cumsum(np.bincount(rows, minlength=batch))[:-1]
    split = [np.split(values[order].astype(np.int32), bounds) for values in (tokens, frames, durations)]
    return [TdtResult(*parts) for parts in zip(*split)]


class _Runner(Protocol):
    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]: ...


class OnnxDecoderJoint:
    """NeMo's exported decoder_joint graph (RNNTDecoderJoint) as a `DecoderJoint`: one label and
    one encoder frame per sequence. `runner`: an OnnxModel (or anything with its `run`)."""

    OUTPUTS = ["outputs", "output_states_1", "output_states_2"]

    def __init__(self, runner: _Runner):
        self.runner = runner

    def __call__(self, frames, labels, h, c):
        n = frames.shape[0]
        out = self.runner.run({
            "encoder_outputs": np.ascontiguousarray(frames, dtype=np.float32)[:, :, None],  # [N, D, 1]
            "targets": labels.astype(np.int32).reshape(n, 1),
            "target_length": np.ones(n, np.int32),
            "input_states_1": h,
            "input_states_2": c,
        }, self.OUTPUTS)
        return out["outputs"].reshape(n, -1), out["output_states_1"], out["output_states_2"]


def word_timings(tokens, frames, durations, sp, frame_ms: float) -> list[dict]:
    """Words and their times, as NeMo's TDT word timestamps (`transcribe(timestamps=True)`).

    NeMo gives each token the span [frame, frame + duration) in encoder frames, and a frame is
    frame_ms = window_stride * subsampling_factor (80 ms for Parakeet). A word starts at a token
    whose piece differs from its text (a '▁' piece, or <unk>) and spans its first token's start
    to its last token's end. Punctuation (a token whose text is one of the vocabulary's
    punctuation marks) never starts a word: it joins the word before it, and for TDT NeMo pins
    its time to the preceding token's end, so it does not stretch the word.
    `sp`: the model's sentencepiece.SentencePieceProcessor. Times are integer milliseconds from
    the start of the audio the encoder saw.
    """
    punctuation = _punctuation(sp)
    words: list[dict] = []
    ids: list[int] = []
    spans = zip(np.asarray(tokens).tolist(), np.asarray(frames).tolist(), np.asarray(durations).tolist())
    for i, (token, frame, duration) in enumerate(spans):
        piece, text = sp.id_to_piece(token), sp.decode([token])
        is_punctuation = text in punctuation
        if not ids or (piece != text and not is_punctuation):
            if ids:
                words[-1]["text"] = sp.decode(ids)
            ids = []
            words.append({"text": "", "start_ms": round(frame * frame_ms), "end_ms": 0})
        elif is_punctuation and sp.id_to_piece(ids[-1]) == "\u2581":
            ids.pop()  # NeMo drops a lone '▁' before punctuation
        ids.append(token)
        if not is_punctuation or i == 0:
            words[-1]["end_ms"] = round((frame + duration) * frame_ms)
    if ids:
        words[-1]["text"] = sp.decode(ids)
    return words


def _punctuation(sp) -> set[str]:
    """NeMo's extract_punctuation_from_vocab: punctuation characters of the ordinary pieces."""
    special = re.compile(r"\[.*\]|<.*>|##.*|\u2581.*|\s*")
    pieces = (sp.id_to_piece(i) for i in range(sp.get_piece_size()))
    return {char for piece in pieces if not special.fullmatch(piece) for char in piece
            if unicodedata.category(char).startswith("P")}


# --- the served pair, in-process -------------------------------------------------------------


def decode_padded(encoded: list[np.ndarray], decoder_joint: DecoderJoint, spec: TdtSpec) -> list[TdtResult]:
    """Decode sequences of different lengths ([T_i, D] each) together, as one padded batch."""
    if not encoded:
        return []
    lengths = np.array([e.shape[0] for e in encoded])
    batch = np.zeros((len(encoded), max(lengths.max(), 1), encoded[0].shape[1]), np.float32)
    for row, sequence in zip(batch, encoded):
        row[:len(sequence)] = sequence
    return greedy_decode(batch, lengths, decoder_joint, spec)


@dataclass
class ParakeetSpec:
    """What a caller needs beside the two graphs: the front end, the tokenizer, the decoding
    settings and the length of an encoder frame (all from the exported meta.json)."""

    frontend: MelFrontend
    tokenizer: spm.SentencePieceProcessor
    tdt: TdtSpec
    frame_ms: float

    @staticmethod
    def meta(*, preprocessor: MelSpec, frame_ms: float, tdt: Mapping) -> dict:
        """The meta.json keys `from_meta` reads; tdt: `TdtSpec.meta(...)`."""
        return {"preprocessor": preprocessor.to_config(), "frame_ms": frame_ms, **tdt}

    @staticmethod
    def mel_of(meta: Mapping) -> MelSpec:
        return MelSpec.from_config(meta["preprocessor"])

    @classmethod
    def load(cls, model_dir: Path) -> "ParakeetSpec":
        """From a version directory: meta.json, tokenizer.model and the mel filterbank."""
        return cls.from_meta(read_meta(model_dir), model_dir)

    @classmethod
    def from_meta(cls, meta: Mapping, model_dir: Path) -> "ParakeetSpec":
        """With `meta` given (an export checks its graphs before it writes meta.json)."""
        return cls(MelFrontend.load(cls.mel_of(meta), model_dir),
                   spm.SentencePieceProcessor(model_file=str(Path(model_dir) / "tokenizer.model")),
                   TdtSpec.from_meta(meta), float(meta["frame_ms"]))

    def text(self, result: TdtResult) -> str:
        return self.tokenizer.decode(result.tokens.tolist())

    def words(self, result: TdtResult) -> list[dict]:
        return word_timings(result.tokens, result.frames, result.durations, self.tokenizer, self.frame_ms)
