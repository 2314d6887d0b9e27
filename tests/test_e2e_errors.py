"""Errors callers can act on, against the real tritonserver: input errors are INVALID_ARGUMENT
with short, clear messages (also for invalid UTF-8, missing AUDIO, out-of-range samples, huge
options), registry refusals say what is wrong, each failed request or stream counts once in
tritonasr_errors_total, a hang-up is no error, and a stream closed for idleness is told why.
After each bad request a good one gives the same result as before."""
from __future__ import annotations

import asyncio
import re
import time
import unicodedata
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from tritonasr.audio import load_audio
from tritonasr.client.stream import StreamError, StreamingClient, split_chunks
from tritonasr.errors import MAX_MESSAGE_CHARS
from tritonasr.runtime.access import ADMIN_HEADER
from tritonasr.serving.server import LOG_TAIL_LINES

from conftest import DATA, TEST_ADMIN_KEY

# Raw calls show the session server's admin key: registry changes need it.
ADMIN = {ADMIN_HEADER: TEST_ADMIN_KEY}

GOOD = DATA / "one_phrase.wav"


def _errors(server, model: str) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    counts: dict[str, float] = {}
    for labels, value in re.findall(r"^tritonasr_errors_total\{([^}]*)\} (\S+)$", text, flags=re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if have.get("model") == model:
            counts[have["kind"]] = counts.get(have["kind"], 0) + float(value)
    return counts


def _delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after) if after.get(k, 0) != before.get(k, 0)}


def _tensor(name: str, value: np.ndarray, dtype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(value.shape), dtype)
    tensor.set_data_from_numpy(value)
    return tensor


def _text(name: str, value: bytes) -> grpcclient.InferInput:
    return _tensor(name, np.array([[value]], dtype=np.object_), "BYTES")


def _audio(samples: np.ndarray) -> grpcclient.InferInput:
    return _tensor("AUDIO", samples.reshape(1, -1).astype(np.float32), "FP32")


def _refusal(server, model: str, inputs) -> InferenceServerException:
    with grpcclient.InferenceServerClient(server.grpc_url) as raw:
        with pytest.raises(InferenceServerException) as refused:
            raw.infer(model, inputs, headers=ADMIN)
    return refused.value


@pytest.fixture(scope="module")
def good_result(server):
    from tritonasr.client.offline import OfflineClient

    with OfflineClient(server.grpc_url, timeout_s=600) as offline:
        result = offline.transcribe_file(GOOD)
    assert result["segments"]
    return result


def _still_the_same(client, good_result):
    assert client.transcribe_file(GOOD) == good_result


SPEECH = np.zeros(16000, np.float32)
MAX = np.finfo(np.float32).max


@pytest.mark.parametrize("inputs, kind, message", [
    ([_audio(SPEECH), _text("LANGUAGE", b"\xff\xfeen")], "bad_request", "LANGUAGE is not valid UTF-8 text"),
    ([_audio(SPEECH), _text("ENGINE", b"sense\xc3")], "bad_request", "ENGINE is not valid UTF-8 text"),
    ([_audio(SPEECH), _text("LANGUAGE", b"x" * 1_000_000)], "bad_request", "LANGUAGE is 1000000 bytes long"),
    ([_audio(SPEECH), _text("LANGUAGE", b"y" * 1000)], "bad_request", "unknown language 'yyyy"),
    ([_text("LANGUAGE", b"en"), _tensor("USE_ITN", np.array([[True]]), "BOOL")], "bad_request",
     "needs the AUDIO input"),
    ([_audio(np.full(16000, MAX, np.float32))], "bad_audio", r"must be in \[-1, 1\]; got one of magnitude 3.403e\+38"),
    ([_audio(np.full(16000, -40000.0, np.float32))], "bad_audio", r"scale integer PCM by 1/32768"),
], ids=["utf8-language", "utf8-engine", "huge-language", "long-language", "no-audio", "float32-max", "int-pcm"])
def test_offline_input_errors_are_invalid_argument_short_and_counted_once(server, client, good_result, inputs,
                                                                          kind, message):
    before = _errors(server, "asr_offline")
    refused = _refusal(server, "asr_offline", inputs)
    assert refused.status() == "StatusCode.INVALID_ARGUMENT", refused
    assert re.search(message, refused.message()), refused.message()
    assert len(refused.message()) <= MAX_MESSAGE_CHARS
    assert _delta(before, _errors(server, "asr_offline")) == {kind: 1}
    _still_the_same(client, good_result)


def test_samples_just_over_full_scale_are_accepted(client):
    loud = np.clip(load_audio(GOOD).samples * 4, -1.005, 1.005)
    assert client.transcribe(loud)["segments"]


@pytest.fixture(scope="module")
def embedding(server) -> np.ndarray:
    from tritonasr.client.speakers import SpeakerRegistryClient

    with SpeakerRegistryClient(server.grpc_url) as registry:
        return np.array(registry.voiceprint(load_audio(DATA / "speakers" / "utt01.wav").samples)["embedding"],
                        np.float32)


def _registry_request(action: str, name: bytes | None = None, embeddings: np.ndarray | None = None):
    inputs = [_tensor("ACTION", np.array([action.encode()], dtype=np.object_), "BYTES")]
    if name is not None:
        inputs.append(_tensor("NAME", np.array([name], dtype=np.object_), "BYTES"))
    if embeddings is not None:
        inputs += [_tensor("EMBEDDINGS", embeddings, "FP32"),
                   _tensor("SPEECH_MS", np.full(len(embeddings), 2000, np.int32), "INT32")]
    return inputs


def _registry(server, inputs) -> dict:
    import json

    with grpcclient.InferenceServerClient(server.grpc_url) as raw:
        return json.loads(raw.infer("speaker_registry", inputs, headers=ADMIN).as_numpy("RESULT").item())


def test_registry_refusals_say_what_is_wrong(server, embedding):
    dim = embedding.size
    cases = [
        (_registry_request("enroll", b"\xffbad", embedding[None]), "INVALID_ARGUMENT", "NAME is not valid UTF-8"),
        (_registry_request("embed"), "INVALID_ARGUMENT", "needs the AUDIO input"),
        (_registry_request("enroll", b"short", embedding[None, :7]), "INVALID_ARGUMENT",
         rf"N embeddings of this server's {dim} values.*got \[1, 7\]"),
        (_registry_request("enroll", b"many", np.tile(embedding, (101, 1))), "INVALID_ARGUMENT",
         "at most 100 recordings; got 101"),
        (_registry_request("remove", b"nobody"), "NOT_FOUND", "no speaker named 'nobody'"),
        (_registry_request("x" * 900), "INVALID_ARGUMENT", "unknown ACTION 'xxx"),
    ]
    before = _errors(server, "speaker_registry")
    for inputs, status, message in cases:
        refused = _refusal(server, "speaker_registry", inputs)
        assert refused.status() == f"StatusCode.{status}" and re.search(message, refused.message()), refused
        assert len(refused.message()) <= MAX_MESSAGE_CHARS
    assert _delta(before, _errors(server, "speaker_registry")) == {"bad_request": len(cases)}
    assert _registry(server, _registry_request("list"))["speakers"] == []  # nothing half-enrolled


def test_names_are_nfc_normalised_in_every_action(server, embedding):
    composed, decomposed = "Zoë", unicodedata.normalize("NFD", "Zoë")
    assert composed != decomposed
    enrolled = _registry(server, _registry_request("enroll", decomposed.encode(), embedding[None]))
    assert enrolled["enrolled"] == composed
    refused = _refusal(server, "speaker_registry", _registry_request("enroll", composed.encode(), embedding[None]))
    assert refused.status() == "StatusCode.ALREADY_EXISTS"
    assert _registry(server, _registry_request("remove", decomposed.encode())) == {"removed": composed}
    assert _registry(server, _registry_request("list"))["speakers"] == []


def _chunk(sequence_id: int, audio: np.ndarray, start=False, end=False) -> dict:
    tensor = grpcaio.InferInput("AUDIO", [1, audio.size], "FP32")
    tensor.set_data_from_numpy(audio[None].astype(np.float32))
    return {"model_name": "asr_stream", "inputs": [tensor], "sequence_id": sequence_id, "sequence_start": start,
            "sequence_end": end, "outputs": [grpcaio.InferRequestedOutput("RESULT")]}


async def _raw(url: str, requests: list[dict]) -> list[str]:
    """Error messages of a gRPC stream of `requests`, once the server has closed it."""
    client = grpcaio.InferenceServerClient(url)

    async def send():
        for request in requests:
            yield request

    try:
        return [error.message() async for _, error in client.stream_infer(send()) if error is not None]
    finally:
        await client.close()


def test_a_failed_stream_counts_once_however_many_chunks_follow(server):
    speech = load_audio(GOOD).samples
    nan = speech[:1600].copy()
    nan[3] = np.nan
    requests = [_chunk(7001, speech[:1600], start=True), _chunk(7001, nan)] + \
               [_chunk(7001, speech[1600 * i:1600 * (i + 1)]) for i in range(2, 8)] + [_chunk(7001, speech[:0], end=True)]
    before = _errors(server, "asr_stream")
    errors = asyncio.run(_raw(server.grpc_url, requests))
    assert errors[0] == "INVALID_ARGUMENT: audio contains 1 NaN or infinite samples"
    assert len(errors) == 8 and all("stream 7001 is closed (closed after an error: audio contains 1 NaN" in e
                                    for e in errors[1:]), errors
    assert _delta(before, _errors(server, "asr_stream")) == {"bad_audio": 1}


def _open_streams(server) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(v) for v in re.findall(r"^tritonasr_open_streams\{[^}]*\} (\S+)$", text, flags=re.M))


def test_a_hang_up_is_freed_at_once_and_is_no_error(server):
    """The test server's idle timeout is 4 s: the hung-up stream is gone well before."""
    speech = load_audio(DATA / "pause_1s.wav").samples

    async def hang_up():
        async with StreamingClient(server.grpc_url) as client:
            async for _ in client.stream(split_chunks(speech, 100), realtime=True):
                return time.monotonic()  # the first segment, then hang up

    before = _errors(server, "asr_stream")
    hung_up_at = asyncio.run(hang_up())
    while _open_streams(server) and time.monotonic() - hung_up_at < 10:
        time.sleep(0.1)
    assert _open_streams(server) == 0 and time.monotonic() - hung_up_at < 3.5
    time.sleep(5)  # past the idle timeout: still nothing counted
    assert _delta(before, _errors(server, "asr_stream")) == {}


def test_a_stream_closed_for_idleness_is_told_why(server):
    speech = load_audio(GOOD).samples

    async def stall():
        for chunk in split_chunks(speech, 100)[:5]:
            yield chunk
        await asyncio.sleep(30)  # longer than the test server's 4 s idle timeout

    async def run():
        async with StreamingClient(server.grpc_url) as client:
            return [seg async for seg in client.stream(stall())]

    before = _errors(server, "asr_stream")
    started = time.monotonic()
    with pytest.raises(StreamError, match=r"^stream \d+ was closed: no audio for 4 s$") as closed:
        asyncio.run(run())
    assert closed.value.code == "CANCELLED" and time.monotonic() - started < 10
    assert _delta(before, _errors(server, "asr_stream")) == {"idle_timeout": 1}
    # The model's own log line went through Triton's logger (its I<date> format; --log-file applies).
    stream_id = re.search(r"stream (\d+)", str(closed.value))[1]
    line = re.compile(rf'^I\d{{4}} .*\] "asr_stream: stream {stream_id} was closed: no audio for 4 s"$', re.MULTILINE)
    deadline = time.monotonic() + 10  # (the models log from a thread of their own)
    while not line.search(server.log_tail(LOG_TAIL_LINES)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert line.search(server.log_tail(LOG_TAIL_LINES)), server.log_tail(20)

