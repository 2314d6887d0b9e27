"""Telephony audio against the real tritonserver: 8 kHz requests and streams, streams of 16-bit
PCM, mu-law and A-law bytes. The server decodes and resamples once; what it recognises equals
what the client would have sent after decoding and resampling the whole recording itself."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import soundfile as sf
import soxr
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio

from tritonasr.audio import decode, encode, load_audio, resample

from conftest import DATA, raw_stream

pytestmark = pytest.mark.e2e
KEYS = ("start_ms", "end_ms", "text", "language")
CHUNK_MS = 100


@pytest.fixture(scope="module")
def phone_call() -> np.ndarray:
    """Two sentences 1 s apart, as a phone line carries them: 8 kHz."""
    speech = load_audio(DATA / "pause_1s.wav").samples
    return np.clip(soxr.resample(speech, 16000, 8000, quality="HQ"), -1, 1).astype(np.float32)


def _tensor(module, name: str, value: np.ndarray, datatype: str):
    tensor = module.InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return tensor


def _offline(server, samples: np.ndarray, rate: int) -> list[dict]:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer("asr_offline", [_tensor(grpcclient, "AUDIO", samples[None], "FP32"),
                                              _tensor(grpcclient, "SAMPLE_RATE", np.array([[rate]], np.int32),
                                                      "INT32")])
    return [{key: s[key] for key in KEYS} for s in json.loads(result.as_numpy("RESULT")[0, 0])["segments"]]


def _stream(server, sequence_id: int, chunks: list, rate: int, encoding: str) -> list[dict]:
    """Sends `chunks` (float32 arrays, or bytes for the byte encodings) as one stream."""
    requests = []
    for i, chunk in enumerate(chunks + [np.zeros(0, np.float32) if encoding == "float32" else b""]):
        if encoding == "float32":
            inputs = [_tensor(grpcaio, "AUDIO", chunk[None], "FP32")]
        else:
            inputs = [_tensor(grpcaio, "AUDIO_BYTES", np.frombuffer(chunk, np.uint8)[None], "UINT8")]
        if i == 0:
            inputs += [_tensor(grpcaio, "SAMPLE_RATE", np.array([[rate]], np.int32), "INT32"),
                       _tensor(grpcaio, "ENCODING", np.array([[encoding.encode()]], np.object_), "BYTES")]
        requests.append({"model_name": "asr_stream", "inputs": inputs, "sequence_id": sequence_id,
                         "sequence_start": i == 0, "sequence_end": i == len(chunks)})
    results, errors = asyncio.run(raw_stream(server.grpc_url, requests))
    assert not errors
    assert results[-1].get("complete")
    return [{key: r[key] for key in KEYS} for r in results if r.get("final")]


def test_an_8khz_request_equals_the_client_resampling_it(server, phone_call):
    resampled = _offline(server, resample(phone_call, 8000), 16000)
    assert len(resampled) == 2
    assert _offline(server, phone_call, 8000) == resampled


@pytest.mark.parametrize("encoding", ["float32", "pcm16", "mulaw", "alaw"])
def test_an_8khz_stream_equals_the_client_decoding_and_resampling_it(server, phone_call, encoding):
    step = 8000 * CHUNK_MS // 1000
    if encoding == "float32":
        sent = phone_call
        chunks = [phone_call[i:i + step] for i in range(0, phone_call.size, step)]
    else:
        data = encode(phone_call, encoding)
        sent = decode(data, encoding)
        width = len(data) // phone_call.size
        chunks = [data[i:i + step * width] for i in range(0, len(data), step * width)]
    # What a client would send after doing the work itself: 16 kHz float32, the whole call resampled.
    wideband = resample(sent, 8000)
    expected = _stream(server, 8100, [wideband[i:i + 1600] for i in range(0, wideband.size, 1600)], 16000, "float32")
    assert len(expected) == 2
    assert _stream(server, 8101, chunks, 8000, encoding) == expected
    # Uneven chunk sizes: the server's resampler carries its state across them.
    if encoding == "mulaw":
        cuts = np.cumsum(np.random.default_rng(3).integers(1, 3000, size=200))
        uneven = [data[a:b] for a, b in zip(np.r_[0, cuts], cuts) if a < len(data)]
        assert _stream(server, 8102, uneven, 8000, encoding) == expected


def test_the_client_library_sends_an_8khz_mulaw_file_as_it_is(server, phone_call, tmp_path):
    from tritonasr.client.offline import OfflineClient
    from tritonasr.client.stream import StreamingClient

    path = tmp_path / "call.wav"
    sf.write(path, phone_call, 8000, subtype="ULAW")
    wideband = resample(sf.read(path, dtype="float32")[0], 8000)
    expected = _offline(server, wideband, 16000)

    async def streamed():
        async with StreamingClient(server.grpc_url) as client:
            return [s async for s in client.stream_file(path) if s.final]

    assert [{key: getattr(s, key) for key in KEYS} for s in asyncio.run(streamed())] == expected
    with OfflineClient(server.grpc_url) as client:
        assert [{key: s[key] for key in KEYS} for s in client.transcribe_file(path)["segments"]] == expected
