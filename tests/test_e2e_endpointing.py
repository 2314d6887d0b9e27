"""Per-request endpointing against the real tritonserver: a stream's endpointing (END_SILENCE_MS,
MAX_SEGMENT_MS, SPEECH_START_MS on its START) cuts it exactly as the same options cut the offline
request, which equals the in-process pipeline; bad values are the caller's error."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from tritonasr.audio import load_audio
from tritonasr.client.offline import OfflineClient
from tritonasr.client.stream import StreamingClient, split_chunks
from tritonasr.contract import ENDPOINTING_PRESETS, Endpointing
from tritonasr.runtime.in_process import LocalPipeline

from conftest import DATA, raw_stream

pytestmark = pytest.mark.e2e
KEYS = ("start_ms", "end_ms", "text", "language")
ASSISTANT, DICTATION = ENDPOINTING_PRESETS["assistant"], ENDPOINTING_PRESETS["dictation"]


def _offline(server, name: str, endpointing: Endpointing | None) -> list[dict]:
    with OfflineClient(server.grpc_url, timeout_s=600) as client:
        segments = client.transcribe(load_audio(DATA / name).samples, endpointing=endpointing)["segments"]
    return [{key: s[key] for key in KEYS} for s in segments]


def _streamed(server, name: str, endpointing: Endpointing | None, chunk_ms: int = 100) -> list:
    async def run():
        async with StreamingClient(server.grpc_url) as client:
            chunks = split_chunks(load_audio(DATA / name).samples, chunk_ms)
            return [s async for s in client.stream(chunks, endpointing=endpointing) if s.final]

    return asyncio.run(run())


@pytest.mark.parametrize("name, endpointing, default_count, count", [
    ("pause_0.3s.wav", ASSISTANT, 1, 2),  # a 0.3 s pause ends an assistant's turn, not FunASR's 800 ms
    ("pause_1s.wav", DICTATION, 2, 1),  # a 1 s thinking pause stays inside dictation's sentence
    ("long_70s.wav", Endpointing(max_segment_ms=5000), 8, 15),  # cut at 5 s (and one frame)
])
def test_a_streams_endpointing_cuts_it_as_the_offline_request_is_cut(server, model_repository, name,
                                                                     endpointing, default_count, count):
    offline = _offline(server, name, endpointing)
    assert len(_offline(server, name, None)) == default_count and len(offline) == count
    local = LocalPipeline(model_repository).transcribe(load_audio(DATA / name).samples, endpointing=endpointing)
    assert [{key: s[key] for key in KEYS} for s in local["segments"]] == offline
    for chunk_ms in (100, 600):
        streamed = [{key: getattr(s, key) for key in KEYS} for s in _streamed(server, name, endpointing, chunk_ms)]
        assert len(streamed) == len(offline)
        for got, want in zip(streamed, offline):  # the online decisions land on the offline frames
            assert abs(got["start_ms"] - want["start_ms"]) <= 50 and abs(got["end_ms"] - want["end_ms"]) <= 50
            assert got["text"] == want["text"]


def test_a_shorter_end_silence_sends_the_final_sooner(server):
    default, assistant = _streamed(server, "pause_3s.wav", None), _streamed(server, "pause_3s.wav", ASSISTANT)
    assert len(default) == len(assistant) == 2 and default[0].end_ms == assistant[0].end_ms
    # The first sentence's end is decided after its end silence: 300 ms instead of 800 ms.
    assert assistant[0].endpoint_ms <= default[0].endpoint_ms - 400


def _int_input(name: str, value: int, aio: bool = False):
    tensor = (grpcaio if aio else grpcclient).InferInput(name, [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], np.int32))
    return tensor


@pytest.mark.parametrize("name, value, expected", [
    ("END_SILENCE_MS", 5, "END_SILENCE_MS: end_silence_ms must be a whole number of ms from 100 to 10000"),
    ("MAX_SEGMENT_MS", 100_000, "MAX_SEGMENT_MS: max_segment_ms must be a whole number of ms from 1000 to 60000"),
    ("SPEECH_START_MS", -5, "SPEECH_START_MS: speech_start_ms must be a whole number of ms from 20 to 200"),
])
def test_bad_endpointing_is_the_callers_error(server, name, value, expected):
    samples = load_audio(DATA / "one_phrase.wav").samples
    audio = grpcclient.InferInput("AUDIO", [1, samples.size], "FP32")
    audio.set_data_from_numpy(samples[None])
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as refused:
            client.infer("asr_offline", [audio, _int_input(name, value)])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and expected in refused.value.message()

    chunk = grpcaio.InferInput("AUDIO", [1, 1600], "FP32")
    chunk.set_data_from_numpy(samples[None, :1600])
    start = {"model_name": "asr_stream", "inputs": [chunk, _int_input(name, value, aio=True)], "sequence_id": 7301,
             "sequence_start": True, "sequence_end": False}
    _, errors = asyncio.run(raw_stream(server.grpc_url, [start]))
    assert len(errors) == 1 and errors[0].startswith("INVALID_ARGUMENT") and expected in errors[0]


def test_endpointing_on_a_later_chunk_is_refused(server):
    samples = load_audio(DATA / "one_phrase.wav").samples[:1600]

    def chunk(start: bool, extra=()):
        audio = grpcaio.InferInput("AUDIO", [1, samples.size], "FP32")
        audio.set_data_from_numpy(samples[None])
        return {"model_name": "asr_stream", "inputs": [audio, *extra], "sequence_id": 7302,
                "sequence_start": start, "sequence_end": False}

    _, errors = asyncio.run(raw_stream(server.grpc_url, [chunk(True), chunk(False, [_int_input("END_SILENCE_MS", 300,
                                                                                                aio=True)])]))
    assert len(errors) == 1 and "END_SILENCE_MS can only be set on a stream's START" in errors[0]
