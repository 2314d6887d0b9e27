"""Fuzz suite, against the real tritonserver over real gRPC: malformed requests to asr_offline,
asr_stream and speaker_registry, and malformed or unusual audio files through the client's loader
and through the `tritonasr transcribe` command (a real subprocess).

Each kind gets a clear error (the gRPC status and a message saying what is wrong, bounded in
length), or, for formats the loader promises to read (multichannel is averaged to mono; μ-law,
A-law, 8/20/24-bit, float, RF64 and whatever else libsndfile decodes), a transcript. After every
case the server is live and ready, and a good request gives the result taken at the start.

Files are written at test time with Python (struct, soundfile): no system tool is needed."""
from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
import soxr
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from tritonasr.audio import AudioError, load_audio
from tritonasr.client.offline import OfflineClient
from tritonasr.client.stream import StreamingClient, split_chunks
from tritonasr.errors import MAX_MESSAGE_CHARS, split_status
from tritonasr.runtime.access import ADMIN_HEADER

from conftest import DATA, TEST_ADMIN_KEY, raw_stream

pytestmark = pytest.mark.e2e

ADMIN = {ADMIN_HEADER: TEST_ADMIN_KEY}
GOOD = DATA / "one_phrase.wav"
SPEECH = load_audio(GOOD).samples
PCM16 = sf.read(GOOD, dtype="int16")[0]
# Triton's own refusals (data types, shapes) are fixed texts a little longer than the pipelines'
# bound; neither may echo a caller's input.
TRITON_MESSAGE_CHARS = 600
SEGMENT_KEYS = ("start_ms", "end_ms", "text", "language", "emotion", "event")


# ---------------------------------------------------------------------------------------------
# The reference results and the health check every case ends with

@dataclass
class Reference:
    offline: dict
    stream: list[dict]
    speakers: list[dict]


def _finals(segments) -> list[dict]:
    return [{k: getattr(s, k) for k in SEGMENT_KEYS} for s in segments if s.final]


def _good_stream(url: str) -> list[dict]:
    async def run():
        async with StreamingClient(url) as client:
            return _finals([s async for s in client.stream(split_chunks(SPEECH, 100))])
    return asyncio.run(asyncio.wait_for(run(), 120))


def _speakers(url: str) -> list[dict]:
    with grpcclient.InferenceServerClient(url) as raw:
        result = raw.infer("speaker_registry", [_text_tensor("ACTION", b"list", batch=False)], headers=ADMIN)
        return json.loads(result.as_numpy("RESULT").item())["speakers"]


@pytest.fixture(scope="module")
def reference(server) -> Reference:
    with OfflineClient(server.grpc_url, timeout_s=300) as offline:
        result = offline.transcribe_file(GOOD)
    assert result["segments"], "the reference file has speech"
    stream = _good_stream(server.grpc_url)
    assert stream
    return Reference(result, stream, _speakers(server.grpc_url))


def _open_streams(server) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(v) for v in re.findall(r"^tritonasr_open_streams\{[^}]*\} (\S+)$", text, flags=re.M))


def _healthy_and_unchanged(server, reference: Reference, stream: bool = False) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as raw:
        assert raw.is_server_live() and raw.is_server_ready()
        for model in ("asr_offline", "asr_stream", "speaker_registry"):
            assert raw.is_model_ready(model, headers=ADMIN), model
    with OfflineClient(server.grpc_url, timeout_s=300) as offline:
        assert offline.transcribe_file(GOOD) == reference.offline
    if stream:
        assert _good_stream(server.grpc_url) == reference.stream
        deadline = time.monotonic() + 5
        while _open_streams(server) and time.monotonic() < deadline:  # a failed stream is freed at once
            time.sleep(0.1)
        assert _open_streams(server) == 0


def _check_message(message: str, pattern: str, limit: int = MAX_MESSAGE_CHARS) -> None:
    assert re.search(pattern, message), message
    assert len(message) <= limit, f"{len(message)} characters: {message[:200]}…"


# ---------------------------------------------------------------------------------------------
# Tensors

def _tensor(name: str, value: np.ndarray, dtype: str, module=grpcclient):
    tensor = module.InferInput(name, list(value.shape), dtype)
    tensor.set_data_from_numpy(value)
    return tensor


def _text_tensor(name: str, value: bytes, batch: bool = True, module=grpcclient):
    return _tensor(name, np.array([[value]] if batch else [value], dtype=np.object_), "BYTES", module)


def _int(name: str, value: int, module=grpcclient):
    return _tensor(name, np.array([[value]], np.int32), "INT32", module)


def _audio(samples: np.ndarray, dtype: str = "FP32", module=grpcclient):
    samples = samples if samples.ndim > 1 else samples[None]
    return _tensor("AUDIO", samples, dtype, module)


def _with_nan(samples: np.ndarray, at: int = 5) -> np.ndarray:
    bad = samples.astype(np.float32, copy=True)
    bad[at] = np.nan
    return bad


def _lying_shape(samples: np.ndarray):
    tensor = _audio(samples)
    tensor.set_shape([1, 100])  # the bytes of 57521 samples, declared as 100
    return tensor


# ---------------------------------------------------------------------------------------------
# asr_offline

# (id, inputs, gRPC status, message pattern, refused by Triton itself before the model)
OFFLINE_CASES = [
    ("audio-int16", lambda: [_audio((SPEECH * 32767).astype(np.int16), "INT16")], "INVALID_ARGUMENT",
     r"input 'AUDIO' data-type is 'INT16', but model 'asr_offline' expects 'FP32'", True),
    ("audio-float64", lambda: [_audio(SPEECH.astype(np.float64), "FP64")], "INVALID_ARGUMENT",
     r"input 'AUDIO' data-type is 'FP64', but .* expects 'FP32'", True),
    ("audio-bytes", lambda: [_audio(np.array([[b"RIFF....WAVE"]], np.object_), "BYTES")], "INVALID_ARGUMENT",
     r"input 'AUDIO' data-type is 'BYTES'", True),
    ("audio-3d", lambda: [_audio(SPEECH[None, None])], "INVALID_ARGUMENT",
     r"unexpected shape for input 'AUDIO' .* got \[1,1,57521\]", True),
    # One recording per request (max_batch_size 1): Triton refuses more rows itself.
    ("audio-two-rows", lambda: [_audio(np.stack([SPEECH, SPEECH]))], "INVALID_ARGUMENT",
     r"batch-size must be <= 1 for 'asr_offline'", True),
    ("audio-shape-lies", lambda: [_lying_shape(SPEECH)], "INVALID_ARGUMENT",
     r"input byte size mismatch for input 'AUDIO'.*Expected 400, got 230084", True),
    ("audio-empty", lambda: [_audio(SPEECH[:0])], "INVALID_ARGUMENT", r"^audio is empty \(0 samples\)$", False),
    ("audio-nan", lambda: [_audio(_with_nan(SPEECH))], "INVALID_ARGUMENT",
     r"^audio contains 1 NaN or infinite samples$", False),
    ("audio-inf", lambda: [_audio(np.full(800, -np.inf, np.float32))], "INVALID_ARGUMENT",
     r"^audio contains 800 NaN or infinite samples$", False),
    ("audio-beyond-full-scale", lambda: [_audio(SPEECH * 100)], "INVALID_ARGUMENT",
     r"audio samples must be in \[-1, 1\]; got one of magnitude \d+", False),
    ("rate-zero", lambda: [_audio(SPEECH), _int("SAMPLE_RATE", 0)], "INVALID_ARGUMENT",
     r"^audio must be at 8000 Hz or 16000 Hz; got 0 Hz", False),
    ("rate-negative", lambda: [_audio(SPEECH), _int("SAMPLE_RATE", -16000)], "INVALID_ARGUMENT",
     r"^audio must be at 8000 Hz or 16000 Hz; got -16000 Hz", False),
    ("rate-1e9", lambda: [_audio(SPEECH), _int("SAMPLE_RATE", 10 ** 9)], "INVALID_ARGUMENT",
     r"^audio must be at 8000 Hz or 16000 Hz; got 1000000000 Hz \(resample it on the client\)$", False),
    ("rate-44100", lambda: [_audio(SPEECH), _int("SAMPLE_RATE", 44100)], "INVALID_ARGUMENT",
     r"^audio must be at 8000 Hz or 16000 Hz; got 44100 Hz", False),
    ("rate-float", lambda: [_audio(SPEECH), _tensor("SAMPLE_RATE", np.array([[16000.0]], np.float32), "FP32")],
     "INVALID_ARGUMENT", r"input 'SAMPLE_RATE' data-type is 'FP32', but .* expects 'INT32'", True),
    ("rate-two-values", lambda: [_audio(SPEECH), _tensor("SAMPLE_RATE", np.array([[16000, 8000]], np.int32), "INT32")],
     "INVALID_ARGUMENT", r"unexpected shape for input 'SAMPLE_RATE'", True),
    ("language-empty-tensor", lambda: [_audio(SPEECH), _tensor("LANGUAGE", np.zeros((1, 0), np.object_), "BYTES")],
     "INVALID_ARGUMENT", r"unexpected shape for input 'LANGUAGE'.*got \[1,0\]", True),
    ("language-invalid-utf8", lambda: [_audio(SPEECH), _text_tensor("LANGUAGE", b"\xc3\x28")], "INVALID_ARGUMENT",
     r"^LANGUAGE is not valid UTF-8 text$", False),
    ("engine-invalid-utf8", lambda: [_audio(SPEECH), _text_tensor("ENGINE", b"\xed\xa0\x80")], "INVALID_ARGUMENT",
     r"^ENGINE is not valid UTF-8 text$", False),
    ("language-1MB", lambda: [_audio(SPEECH), _text_tensor("LANGUAGE", b"e" * 1_000_000)], "INVALID_ARGUMENT",
     r"^LANGUAGE is 1000000 bytes long; at most 1024$", False),
    ("engine-100KB", lambda: [_audio(SPEECH), _text_tensor("ENGINE", b"w" * 100_000)], "INVALID_ARGUMENT",
     r"^ENGINE is 100000 bytes long; at most 1024$", False),
    ("language-nul-byte", lambda: [_audio(SPEECH), _text_tensor("LANGUAGE", b"en\x00")], "INVALID_ARGUMENT",
     r"^unknown language 'en\\x00'; use one of: auto, en", False),
    ("engine-unknown", lambda: [_audio(SPEECH), _text_tensor("ENGINE", b"whisper")], "INVALID_ARGUMENT",
     r"^unknown ASR engine 'whisper'; this server runs: sensevoice, parakeet$", False),
    ("engine-language-mismatch", lambda: [_audio(SPEECH), _text_tensor("ENGINE", b"parakeet"),
                                          _text_tensor("LANGUAGE", b"zh")], "INVALID_ARGUMENT",
     r"parakeet engine transcribes English only; language must be auto or en, got 'zh'", False),
    ("use-itn-int32", lambda: [_audio(SPEECH), _int("USE_ITN", 1)], "INVALID_ARGUMENT",
     r"input 'USE_ITN' data-type is 'INT32', but .* expects 'BOOL'", True),
    ("no-inputs-at-all", lambda: [], "INVALID_ARGUMENT", r"missing required input\(s\) \['AUDIO'\]", True),
    ("options-without-audio", lambda: [_int("SAMPLE_RATE", 16000), _text_tensor("LANGUAGE", b"en")],
     "INVALID_ARGUMENT", r"^this request needs the AUDIO input$", False),
    ("unknown-extra-input", lambda: [_audio(SPEECH), _int("PRIORITY", 1)], "INVALID_ARGUMENT",
     r"unexpected inference input 'PRIORITY' for model 'asr_offline'", True),
]


@pytest.mark.parametrize("make_inputs, status, pattern, by_triton",
                         [pytest.param(*case[1:], id=case[0]) for case in OFFLINE_CASES])
def test_offline_malformed_requests(server, reference, make_inputs, status, pattern, by_triton):
    _check_refused(server, "asr_offline", make_inputs(), status, pattern, by_triton)
    _healthy_and_unchanged(server, reference)


def _check_refused(server, model: str, inputs: list, status: str, pattern: str, by_triton: bool) -> None:
    """One request to `model` is refused with `status` and a message matching `pattern`."""
    with grpcclient.InferenceServerClient(server.grpc_url) as raw:
        with pytest.raises(InferenceServerException) as refused:
            raw.infer(model, inputs, headers=ADMIN, client_timeout=60)
    assert refused.value.status() == f"StatusCode.{status}", refused.value
    _check_message(refused.value.message(), pattern, TRITON_MESSAGE_CHARS if by_triton else MAX_MESSAGE_CHARS)


@pytest.mark.parametrize("samples", [1, 10, 400], ids=lambda n: f"{n}-samples")
def test_offline_tiny_audio_is_transcribed_to_nothing(server, reference, samples):
    """Too short to hold speech, but audio: no segments, not an error."""
    with OfflineClient(server.grpc_url, timeout_s=60) as offline:
        result = offline.transcribe(SPEECH[:samples] * 0.5)
    assert result["segments"] == []
    _healthy_and_unchanged(server, reference)


# ---------------------------------------------------------------------------------------------
# asr_stream

def _chunk(sequence_id, samples: np.ndarray, start=False, end=False, token="fuzz", extra=(), dtype="FP32",
           parameters=None) -> dict:
    params = {"stream_token": token} if token else {}
    params.update(parameters or {})
    return {"model_name": "asr_stream", "inputs": [_audio(samples, dtype, grpcaio), *extra],
            "sequence_id": sequence_id, "sequence_start": start, "sequence_end": end,
            "outputs": [grpcaio.InferRequestedOutput("RESULT")], "parameters": params or None}


def _without_audio(chunk: dict) -> dict:
    return {**chunk, "inputs": chunk["inputs"][1:]}


def _whole_stream(sequence_id: int, samples: np.ndarray = SPEECH) -> list[dict]:
    chunks = split_chunks(samples, 100)
    return ([_chunk(sequence_id, chunks[0], start=True)] + [_chunk(sequence_id, c) for c in chunks[1:]]
            + [_chunk(sequence_id, samples[:0], end=True)])


C = SPEECH[:1600]  # 100 ms (of leading silence)
A = grpcaio  # the module of a stream's tensors


def _mid_stream(sequence_id: int, bad: dict) -> list[dict]:
    """A good stream whose fourth request is replaced by `bad`."""
    requests = _whole_stream(sequence_id)
    requests[3] = bad
    return requests


# (id, requests for a fresh sequence id, gRPC status (None: Triton's own refusal, which a
# stream carries without one), pattern of the first error, number of errors)
STREAM_CASES = [
    ("chunk-without-start", lambda i: [_chunk(i, C)], None,
     rf"^inference request for sequence {{i}} to model 'asr_stream' must specify the START flag", 1),
    ("end-without-start", lambda i: [_chunk(i, C[:0], end=True)], None,
     r"must specify the START flag on the first request of the sequence", 1),
    ("chunk-after-end", lambda i: [_chunk(i, C, start=True), _chunk(i, C, end=True), _chunk(i, C)], None,
     r"must specify the START flag on the first request of the sequence", 1),
    ("sequence-id-zero", lambda i: [_chunk(0, C, start=True)], None,
     r"must specify a non-zero or non-empty correlation ID", 1),
    ("sequence-id-string", lambda i: [_chunk(f"caller-{i}", C, start=True), _chunk(f"caller-{i}", C, end=True)],
     "INVALID_ARGUMENT", r"^sequence ids must be integers \(1 \.\. 2\*\*64-1\); string ids are refused$", 2),
    ("chunk-two-rows", lambda i: [_chunk(i, np.stack([C, C]), start=True)], None,
     r"must specify batch-size 1 due to requirements of sequence batcher", 1),
    ("chunk-int16", lambda i: [_chunk(i, (C * 32767).astype(np.int16), start=True, dtype="INT16")], None,
     r"input 'AUDIO' data-type is 'INT16', but model 'asr_stream' expects 'FP32'", 1),
    ("chunk-over-size-limit", lambda i: [_chunk(i, C, start=True), _chunk(i, SPEECH[:48000])], "INVALID_ARGUMENT",
     r"^chunk of 3000 ms is longer than this server's limit of 2000 ms: send smaller chunks$", 1),
    ("start-without-audio", lambda i: [_without_audio(_chunk(i, C, start=True, extra=[_int("SAMPLE_RATE", 16000, A)]))],
     "INVALID_ARGUMENT", r"^a float32 stream's chunks carry AUDIO \(an END request may carry it empty\)$", 1),
    ("chunk-without-audio", lambda i: [_chunk(i, C, start=True), _without_audio(_chunk(i, C, extra=[_int("SAMPLE_RATE", 16000, A)]))],
     "INVALID_ARGUMENT", r"^a float32 stream's chunks carry AUDIO \(an END request may carry it empty\)$", 1),
    ("chunk-nan", lambda i: [_chunk(i, C, start=True), _chunk(i, _with_nan(C))], "INVALID_ARGUMENT",
     r"^audio contains 1 NaN or infinite samples$", 1),
    ("chunk-beyond-full-scale", lambda i: [_chunk(i, C, start=True), _chunk(i, np.full(1600, 5.0, np.float32))],
     "INVALID_ARGUMENT",
     r"^audio samples must be in \[-1, 1\]", 1),
    ("rate-change-mid-stream", lambda i: _mid_stream(i, _chunk(i, C, extra=[_int("SAMPLE_RATE", 8000, A)])),
     "INVALID_ARGUMENT", r"^this stream was opened at 16000 Hz; a chunk says 8000 Hz", None),
    ("options-mid-stream", lambda i: _mid_stream(i, _chunk(i, C, extra=[_text_tensor("LANGUAGE", b"en", module=A)])),
     "INVALID_ARGUMENT", r"^LANGUAGE can only be set on a stream's START request", None),
    ("negative-partial-interval", lambda i: [_chunk(i, C, start=True, extra=[_int("PARTIAL_INTERVAL_MS", -100, A)])],
     "INVALID_ARGUMENT", r"^PARTIAL_INTERVAL_MS must be >= 0 \(0: no partials\), got -100$", 1),
    ("start-language-invalid-utf8", lambda i: [_chunk(i, C, start=True, extra=[_text_tensor("LANGUAGE", b"\xff", module=A)])],
     "INVALID_ARGUMENT", r"^LANGUAGE is not valid UTF-8 text$", 1),
    ("start-engine-unknown", lambda i: [_chunk(i, C, start=True, extra=[_text_tensor("ENGINE", b"kaldi", module=A)])],
     "INVALID_ARGUMENT", r"^unknown ASR engine 'kaldi'", 1),
    ("start-twice", lambda i: [_chunk(i, C, start=True), _chunk(i, C, start=True), _chunk(i, C, end=True)],
     "ALREADY_EXISTS", rf"^stream {{i}} is already open: a START on a live sequence id is refused", 1),
    ("token-100KB", lambda i: [_chunk(i, C, start=True, token="t" * 100_000)], "INVALID_ARGUMENT",
     r"^stream_token must be a string of at most 256 characters$", 1),
    ("token-not-a-string", lambda i: [_chunk(i, C, start=True, token="", parameters={"stream_token": 12345})],
     "INVALID_ARGUMENT", r"^stream_token must be a string", 1),
]


@pytest.mark.parametrize("make_requests, status, pattern, count",
                         [pytest.param(*case[1:], id=case[0]) for case in STREAM_CASES])
def test_stream_malformed_requests(server, reference, make_requests, status, pattern, count):
    sequence_id = secrets.randbits(40) + 1
    results, errors = asyncio.run(asyncio.wait_for(raw_stream(server.grpc_url, make_requests(sequence_id)), 60))
    assert errors, results
    message, got_status = split_status(errors[0])
    assert got_status == status, errors[0]
    _check_message(message, pattern.format(i=sequence_id), MAX_MESSAGE_CHARS if status else TRITON_MESSAGE_CHARS)
    if count is not None:
        assert len(errors) == count, errors
    else:  # the stream is closed by the error: each later request is told so, none is taken in (an
        # earlier chunk still queued behind the stream's previous one may be told so too)
        assert all(f"stream {sequence_id} is closed (closed after an error" in e for e in errors[1:]), errors
        assert len(errors) >= len(make_requests(sequence_id)) - 3, "\n".join(errors)
    _healthy_and_unchanged(server, reference, stream=True)


# ---------------------------------------------------------------------------------------------
# speaker_registry

EMBEDDING = np.random.default_rng(7).standard_normal((1, 192)).astype(np.float32)


def _registry(action: bytes | None, name: bytes | None = None, embeddings: np.ndarray | None = None,
              speech_ms: np.ndarray | None = None, audio: np.ndarray | None = None, rate: int | None = None):
    inputs = [] if action is None else [_text_tensor("ACTION", action, batch=False)]
    if name is not None:
        inputs.append(_text_tensor("NAME", name, batch=False))
    if embeddings is not None:
        inputs.append(_tensor("EMBEDDINGS", embeddings, "FP64" if embeddings.dtype == np.float64 else "FP32"))
        if speech_ms is None:
            speech_ms = np.full(len(embeddings), 2000, np.int32)
    if speech_ms is not None:
        inputs.append(_tensor("SPEECH_MS", speech_ms.astype(np.int32), "INT32"))
    if audio is not None:
        inputs.append(_tensor("AUDIO", audio, "FP32"))
    if rate is not None:
        inputs.append(_tensor("SAMPLE_RATE", np.array([rate], np.int32), "INT32"))
    return inputs


def _embedding(value: float | None = None, dims: int = 192, at: slice = slice(None)) -> np.ndarray:
    """The test embedding cut to `dims` values, with `value` written at `at`."""
    e = EMBEDDING[:, :dims].copy()
    if value is not None:
        e[0, at] = value
    return e


REGISTRY_CASES = [
    ("action-unknown", lambda: _registry(b"drop table speakers"), "INVALID_ARGUMENT",
     r"^unknown ACTION 'drop table speakers': use embed, enroll, remove or list$", False),
    ("action-invalid-utf8", lambda: _registry(b"enr\xffoll"), "INVALID_ARGUMENT", r"^ACTION is not valid UTF-8 text$",
     False),
    ("action-missing", lambda: _registry(None, b"x"), "INVALID_ARGUMENT", r"^this request needs the ACTION input$", False),
    ("action-two-values", lambda: [_tensor("ACTION", np.array([b"list", b"enroll"], np.object_), "BYTES")],
     "INVALID_ARGUMENT", r"unexpected shape for input 'ACTION'", True),
    ("enroll-without-embeddings", lambda: _registry(b"enroll", b"ann"), "INVALID_ARGUMENT",
     r"^this request needs the EMBEDDINGS input$", False),
    ("enroll-wrong-dims", lambda: _registry(b"enroll", b"ann", _embedding(dims=7)), "INVALID_ARGUMENT",
     r"enroll needs N embeddings of this server's 192 values .*got \[1, 7\]", False),
    ("enroll-no-rows", lambda: _registry(b"enroll", b"ann", EMBEDDING[:0]), "INVALID_ARGUMENT",
     r"enroll needs N embeddings .*got \[0, 192\] and 0", False),
    ("enroll-3d-embeddings", lambda: _registry(b"enroll", b"ann", EMBEDDING[None]), "INVALID_ARGUMENT",
     r"unexpected shape for input 'EMBEDDINGS'", True),
    ("enroll-float64-embeddings", lambda: _registry(b"enroll", b"ann", EMBEDDING.astype(np.float64)),
     "INVALID_ARGUMENT", r"input 'EMBEDDINGS' data-type is 'FP64'", True),
    ("enroll-nan-embedding", lambda: _registry(b"enroll", b"ann", _embedding(np.nan, at=slice(3, 4))), "INVALID_ARGUMENT",
     r"^the embedding must be a non-zero vector of finite numbers$", False),
    ("enroll-inf-embedding", lambda: _registry(b"enroll", b"ann", _embedding(float("inf"))), "INVALID_ARGUMENT",
     r"^the embedding must be a non-zero vector of finite numbers$", False),
    ("enroll-zero-embedding", lambda: _registry(b"enroll", b"ann", _embedding(0.0)), "INVALID_ARGUMENT",
     r"^the embedding must be a non-zero vector of finite numbers$", False),
    ("enroll-overflowing-embedding", lambda: _registry(b"enroll", b"ann", _embedding(3e38)), "INVALID_ARGUMENT",
     r"^the embedding must be a non-zero vector of finite numbers$", False),
    ("enroll-speech-ms-negative", lambda: _registry(b"enroll", b"ann", EMBEDDING, np.array([-5])), "INVALID_ARGUMENT",
     r"^speech durations must be positive$", False),
    ("enroll-speech-ms-count", lambda: _registry(b"enroll", b"ann", EMBEDDING, np.array([5, 5])), "INVALID_ARGUMENT",
     r"enroll needs N embeddings .* and N speech durations; got \[1, 192\] and 2", False),
    ("enroll-empty-name", lambda: _registry(b"enroll", b"", EMBEDDING), "INVALID_ARGUMENT", r"^enroll needs a NAME$",
     False),
    ("enroll-blank-name", lambda: _registry(b"enroll", b" \t ", EMBEDDING), "INVALID_ARGUMENT",
     r"^a speaker name must not be empty$", False),
    ("enroll-control-char-name", lambda: _registry(b"enroll", b"ann\x1b[2J", EMBEDDING), "INVALID_ARGUMENT",
     r"^a speaker name must not contain control characters$", False),
    ("enroll-name-100KB", lambda: _registry(b"enroll", b"n" * 100_000, EMBEDDING), "INVALID_ARGUMENT",
     r"^NAME is 100000 bytes long; at most 1024$", False),
    ("enroll-name-500-chars", lambda: _registry(b"enroll", "é".encode() * 500, EMBEDDING), "INVALID_ARGUMENT",
     r"^a speaker name has at most 100 characters$", False),
    ("enroll-name-invalid-utf8", lambda: _registry(b"enroll", b"ann\xc0", EMBEDDING), "INVALID_ARGUMENT",
     r"^NAME is not valid UTF-8 text$", False),
    ("remove-nonexistent", lambda: _registry(b"remove", b"nobody-at-all"), "NOT_FOUND",
     r"^no speaker named 'nobody-at-all' is enrolled$", False),
    ("remove-without-name", lambda: _registry(b"remove"), "INVALID_ARGUMENT", r"^remove needs a NAME$", False),
    ("embed-without-audio", lambda: _registry(b"embed"), "INVALID_ARGUMENT", r"^this request needs the AUDIO input$",
     False),
    ("embed-silence", lambda: _registry(b"embed", audio=np.zeros(48000, np.float32)), "INVALID_ARGUMENT",
     r"^no speech segment of at least 1000 ms found in this audio", False),
    ("embed-nan-audio", lambda: _registry(b"embed", audio=_with_nan(SPEECH)), "INVALID_ARGUMENT",
     r"^audio contains 1 NaN or infinite samples$", False),
    ("embed-wrong-rate", lambda: _registry(b"embed", audio=SPEECH, rate=44100), "INVALID_ARGUMENT",
     r"^audio must be at 8000 Hz or 16000 Hz; got 44100 Hz", False),
]


@pytest.mark.parametrize("make_inputs, status, pattern, by_triton",
                         [pytest.param(*case[1:], id=case[0]) for case in REGISTRY_CASES])
def test_registry_malformed_requests(server, reference, make_inputs, status, pattern, by_triton):
    _check_refused(server, "speaker_registry", make_inputs(), status, pattern, by_triton)
    assert _speakers(server.grpc_url) == reference.speakers, "nothing enrolled or removed"
    _healthy_and_unchanged(server, reference)


# ---------------------------------------------------------------------------------------------
# Audio files: through the client's loader (OfflineClient.transcribe_file) and the CLI

def _riff(chunks: list[bytes], riff_size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


def _chunk_bytes(cid: bytes, data: bytes, size: int | None = None) -> bytes:
    return cid + struct.pack("<I", len(data) if size is None else size) + data + (b"\0" if len(data) % 2 else b"")


def _fmt(tag=1, channels=1, rate=16000, bits=16, block=None, extension: bytes | None = None) -> bytes:
    block = (channels * ((bits + 7) // 8)) if block is None else block
    data = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    return _chunk_bytes(b"fmt ", data + (extension or b""))


PCM = PCM16.tobytes()
# KSDATAFORMAT_SUBTYPE_PCM, the subformat GUID of WAVE_FORMAT_EXTENSIBLE integer PCM.
PCM_GUID = bytes.fromhex("0100000000001000800000aa00389b71")


def _pcm24(shift: int = 8) -> bytes:
    """The reference's samples as 24-bit little-endian words (16 significant bits, exact)."""
    words = (PCM16.astype("<i4") << shift).view(np.uint8).reshape(-1, 4)[:, :3]
    return words.tobytes()


def _wav(data: bytes, **fmt) -> bytes:
    return _riff([_fmt(**fmt), _chunk_bytes(b"data", data)])


def _soundfile(path: Path, subtype: str, channels: int = 1, fmt: str = "WAV", rate: int = 16000) -> None:
    """The reference's samples written by libsndfile: `channels` identical channels, at `rate`."""
    samples = SPEECH if rate == 16000 else soxr.resample(SPEECH, 16000, rate)
    sf.write(path, np.stack([samples] * channels, axis=1) if channels > 1 else samples, rate,
             subtype=subtype, format=fmt)


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _truncated_flac(path: Path) -> None:
    full = path.with_suffix(".full.flac")
    sf.write(full, SPEECH, 16000, format="FLAC")
    path.write_bytes(full.read_bytes()[:3000])
    full.unlink()


def _float_nan(path: Path) -> None:
    samples = SPEECH.copy()
    samples[100], samples[200] = np.nan, np.inf
    sf.write(path, samples, 16000, subtype="FLOAT")


# Expectations: ("error", pattern after the path), ("same",): the reference's exact result (the
# samples decode to the reference's), ("transcribes",): a lossy or resampled version, which
# must give speech over the same duration.
FILE_CASES = [
    # unreadable or not audio
    ("zero-length", "zero.wav", _bytes(b""), ("error", r" is an empty file \(0 bytes\)$")),
    # (these bytes look like an MPEG frame to libsndfile, which then said the file did not exist)
    ("random-bytes", "noise.wav", _bytes(np.random.default_rng(1).bytes(5000)),
     ("error", r" is not a readable audio file \(Format not recognised; supported formats: ")),
    ("text-named-wav", "notes.wav", _bytes(b"meeting notes, not audio\n" * 40),
     ("error", r" is not a readable audio file \(Format not recognised; supported formats: ")),
    ("truncated-header", "cut.wav", _bytes(GOOD.read_bytes()[:30]),
     ("error", r" is not a readable audio file \(Error in WAV file\. No 'data' chunk marker\)$")),
    ("header-without-samples", "header.wav", _bytes(GOOD.read_bytes()[:44]),
     ("error", r": audio is empty \(0 samples\)$")),
    ("no-fmt-chunk", "nofmt.wav", _bytes(_riff([_chunk_bytes(b"data", PCM)])),
     ("error", r" is not a readable audio file \(")),
    ("no-data-chunk", "nodata.wav", _bytes(_riff([_fmt()])),
     ("error", r" is not a readable audio file \(Error in WAV file\. No 'data' chunk marker\)$")),
    ("zero-channels", "ch0.wav", _bytes(_wav(PCM, channels=0, block=2)),
     ("error", r" is not a readable audio file \(Channel count is zero\)$")),
    ("65535-channels", "ch65535.wav", _bytes(_wav(PCM, channels=65535, block=2)),
     ("error", r" is not a readable audio file \(Too many channels specified\)$")),
    ("sample-rate-zero", "rate0.wav", _bytes(_wav(PCM, rate=0)), ("error", r" is not a readable audio file \(")),
    ("sample-rate-1hz", "rate1.wav", _bytes(_wav(PCM, rate=1)),
     ("error", r": a sample rate of 1 Hz is outside 4000 \.\. 768000 Hz \(a damaged header\?\)$")),
    ("sample-rate-2^31", "rate2g.wav", _bytes(_wav(PCM, rate=2 ** 31 - 1)),
     ("error", r": a sample rate of 2147483647 Hz is outside 4000 \.\. 768000 Hz")),
    ("unknown-format-tag", "tag.wav", _bytes(_wav(PCM, tag=0x1234)),
     ("error", r" is not a readable audio file \(Error in WAV/W64/RF64 file\. Malformed 'fmt ' chunk\)$")),
    ("extensible-unknown-guid", "guid.wav",
     _bytes(_wav(PCM, tag=0xFFFE, extension=struct.pack("<HHI", 22, 16, 4) + b"\x42" * 16)),
     ("error", r" is not a readable audio file \(File contains data in an unimplemented format\)$")),
    ("zero-bits-per-sample", "bits0.wav", _bytes(_wav(PCM, bits=0, block=2)),
     ("error", r" is not a readable audio file \(File contains data in an unimplemented format\)$")),
    ("truncated-flac", "cut.flac", _truncated_flac, ("error", r" is not a readable audio file \(")),
    ("float-nan-and-inf", "nan.wav", _float_nan, ("error", r": audio contains 2 NaN or infinite samples$")),
    # odd but readable: the same samples as the reference
    ("data-size-lies", "bigdata.wav", _bytes(_riff([_fmt(), _chunk_bytes(b"data", PCM, size=len(PCM) * 50)])),
     ("same",)),
    ("riff-size-lies", "bigriff.wav", _bytes(_riff([_fmt(), _chunk_bytes(b"data", PCM)], riff_size=123)), ("same",)),
    ("block-align-zero", "block0.wav", _bytes(_wav(PCM, block=0)), ("same",)),
    ("3-channel", "ch3.wav", lambda p: _soundfile(p, "PCM_16", channels=3), ("same",)),
    ("5-channel", "ch5.wav", lambda p: _soundfile(p, "PCM_16", channels=5), ("same",)),
    ("24-bit", "pcm24.wav", lambda p: _soundfile(p, "PCM_24"), ("same",)),
    ("20-bit-plain", "pcm20.wav", _bytes(_wav(_pcm24(), bits=20, block=3)), ("same",)),
    ("20-bit-extensible", "pcm20x.wav",
     _bytes(_wav(_pcm24(), tag=0xFFFE, bits=24, block=3, extension=struct.pack("<HHI", 22, 20, 4) + PCM_GUID)),
     ("same",)),
    ("32-bit-float", "f32.wav", lambda p: _soundfile(p, "FLOAT"), ("same",)),
    ("64-bit-float", "f64.wav", lambda p: _soundfile(p, "DOUBLE"), ("same",)),
    ("rf64", "big.rf64", lambda p: _soundfile(p, "PCM_16", fmt="RF64"), ("same",)),
    ("rf64-named-wav", "rf64.wav", lambda p: _soundfile(p, "PCM_16", fmt="RF64"), ("same",)),
    # lossy or resampled: transcribed
    ("mu-law", "ulaw.wav", lambda p: _soundfile(p, "ULAW"), ("transcribes",)),
    ("a-law", "alaw.wav", lambda p: _soundfile(p, "ALAW"), ("transcribes",)),
    ("8-bit-unsigned", "u8.wav", lambda p: _soundfile(p, "PCM_U8"), ("transcribes",)),
    ("ima-adpcm", "adpcm.wav", lambda p: _soundfile(p, "IMA_ADPCM"), ("transcribes",)),
    ("odd-trailing-byte", "odd.wav", _bytes(GOOD.read_bytes()[:-1]), ("transcribes",)),
    ("22050-hz", "r22k.wav", lambda p: _soundfile(p, "PCM_16", rate=22050), ("transcribes",)),
]
FILE_IDS = [case[0] for case in FILE_CASES]


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fuzz_files")
    files = {}
    for kind, name, make, _ in FILE_CASES:
        path = folder / kind / name  # one folder each: names repeat across kinds
        path.parent.mkdir()
        make(path)
        files[kind] = path
    return files


def _check_file_result(result: dict, expect: tuple, reference: Reference) -> None:
    if expect[0] == "same":
        assert {k: v for k, v in result.items() if k != "file"} == \
               {k: v for k, v in reference.offline.items() if k != "file"}
    else:
        assert result["segments"], result
        assert abs(result["duration_ms"] - reference.offline["duration_ms"]) <= 30, result["duration_ms"]


@pytest.mark.parametrize("kind, expect", [pytest.param(c[0], c[3], id=c[0]) for c in FILE_CASES])
def test_audio_files_through_the_client(server, reference, fuzz_files, kind, expect):
    path = fuzz_files[kind]
    with OfflineClient(server.grpc_url, timeout_s=120) as offline:
        if expect[0] == "error":
            with pytest.raises(AudioError) as refused:
                offline.transcribe_file(path)
            message = str(refused.value)
            assert message.startswith(str(path)), message
            _check_message(message[len(str(path)):], expect[1])
        else:
            _check_file_result(offline.transcribe_file(path), expect, reference)
    _healthy_and_unchanged(server, reference)


def _cli(server, *args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("tritonasr")), "transcribe", "--url", server.grpc_url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITONASR_ADMIN_KEY": TEST_ADMIN_KEY})


@pytest.fixture(scope="module")
def cli_run(server, fuzz_files, reference) -> subprocess.CompletedProcess:
    """One `tritonasr transcribe --format json` over every file, and the good one last."""
    return _cli(server, "--format", "json", *(str(fuzz_files[k]) for k in FILE_IDS), str(GOOD))


@pytest.mark.parametrize("kind, expect", [pytest.param(c[0], c[3], id=c[0]) for c in FILE_CASES])
def test_audio_files_through_the_cli(server, reference, fuzz_files, cli_run, kind, expect):
    path = str(fuzz_files[kind])
    assert cli_run.returncode == 1, cli_run.stderr[-2000:]  # some files failed, each reported
    results = {r["file"]: r for r in map(json.loads, cli_run.stdout.splitlines())}
    errors = {m.group(1): m.group(0) for m in re.finditer(r"^error: (\S+?)(?=[: ]).*$", cli_run.stderr, flags=re.M)}
    if expect[0] == "error":
        assert path not in results
        line = errors.get(path)
        assert line is not None, cli_run.stderr[-3000:]
        _check_message(line[len(f"error: {path}"):], expect[1])
        assert "Traceback" not in cli_run.stderr
    else:
        assert path not in errors, errors.get(path)
        _check_file_result(results[path], expect, reference)
    assert {k: v for k, v in results[str(GOOD)].items() if k != "file"} == \
           {k: v for k, v in reference.offline.items() if k != "file"}
    _healthy_and_unchanged(server, reference)


def test_cli_exit_codes_for_one_bad_and_one_odd_file(server, reference, fuzz_files):
    """A single unreadable file: exit 1, one line naming it; a single odd but readable one: 0."""
    bad = _cli(server, str(fuzz_files["truncated-header"]))
    assert bad.returncode == 1 and bad.stdout == ""
    assert re.fullmatch(rf"error: {re.escape(str(fuzz_files['truncated-header']))} is not a readable audio file "
                        r"\(Error in WAV file\. No 'data' chunk marker\)\n", bad.stderr), bad.stderr
    odd = _cli(server, "--format", "json", str(fuzz_files["5-channel"]))
    assert odd.returncode == 0, odd.stderr
    assert json.loads(odd.stdout)["segments"] == reference.offline["segments"]
    _healthy_and_unchanged(server, reference)
