"""Live streaming end to end: the real tritonserver, `asr_stream` over gRPC bidirectional streams,
real FSMN-VAD weights and a tiny random-init SenseVoice. Streams are compared with `asr_offline`
on the same audio, which the offline tests compare with FunASR in-process."""
from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio

from tritonasr.audio import load_audio
from tritonasr.client.stream import StreamError, StreamingClient, split_chunks

from conftest import DATA, conversation

FILES = ["one_phrase.wav", "pause_0.3s.wav", "pause_1s.wav", "pause_3s.wav", "lead_trail_silence.wav",
         "long_70s.wav"]
SEGMENT_KEYS = ("start_ms", "end_ms", "text", "language", "emotion", "event")


def _run(coro):
    return asyncio.run(coro)


async def _collect(url: str, chunks, **options):
    async with StreamingClient(url) as client:
        stream = client.stream(chunks, **options)
        results = [segment async for segment in stream]
        return results, stream.summary


def _finals(results) -> list[dict]:
    return [{key: getattr(seg, key) for key in SEGMENT_KEYS} for seg in results if seg.final]


def _assert_same_segments(streamed: list[dict], offline: list[dict]):
    assert len(streamed) == len(offline), (streamed, offline)
    for got, want in zip(streamed, offline):
        assert abs(got["start_ms"] - want["start_ms"]) <= 50 and abs(got["end_ms"] - want["end_ms"]) <= 50
        assert (got["text"], got["language"], got["emotion"], got["event"]) == \
               (want["text"], want["language"], want["emotion"], want["event"])


def _open_streams(server) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values = re.findall(r"^tritonasr_open_streams\{[^}]*\} (\S+)$", text, flags=re.M)
    assert values, "the open-streams metric is missing from /metrics"
    return sum(float(v) for v in values)


def _wait_for_no_open_streams(server, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while (count := _open_streams(server)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return count


@pytest.fixture(scope="module")
def offline_segments(server):
    from tritonasr.client.offline import OfflineClient

    cache = {}

    def get(name: str) -> list[dict]:
        if name not in cache:
            with OfflineClient(server.grpc_url, timeout_s=600) as offline:
                cache[name] = offline.transcribe_file(DATA / name)["segments"]
        return cache[name]

    return get


@pytest.mark.parametrize("name", FILES)
def test_any_chunking_gives_the_offline_segments(server, offline_segments, name):
    samples = load_audio(DATA / name).samples
    offline = offline_segments(name)
    assert offline, "every test file has speech"
    uneven = np.random.default_rng(len(name)).integers(10, 2001, size=200)
    for chunk_ms in (20, 100, 600, uneven):
        results, summary = _run(_collect(server.grpc_url, split_chunks(samples, chunk_ms)))
        _assert_same_segments(_finals(results), offline)
        assert [seg.segment_index for seg in results] == list(range(len(offline)))
        assert summary.segment_count == len(offline)
        assert summary.duration_ms == len(samples) * 1000 // 16000
        assert all(seg.endpoint_ms >= seg.end_ms and seg.latency_ms >= 0 for seg in results)


def test_32_interleaved_streams_each_get_exactly_their_own_segments(server, client):
    utterances = [load_audio(path).samples for path in sorted((DATA / "speakers").glob("utt*.wav"))]
    rng = np.random.default_rng(32)
    streams = [conversation(list(rng.permutation(len(utterances))[:3]), utterances, gap_s=1.0 + 0.1 * (i % 5))
               for i in range(32)]
    expected = [client.transcribe(audio)["segments"] for audio in streams]

    async def one(stream_client, audio, chunk_ms):
        async def paced():
            # Yield to the other streams between chunks, so all 32 interleave on the wire.
            for chunk in split_chunks(audio, chunk_ms):
                yield chunk
                await asyncio.sleep(0.005)

        stream = stream_client.stream(paced())
        return [seg async for seg in stream], stream.summary

    async def all_streams():
        async with StreamingClient(server.grpc_url) as stream_client:
            return await asyncio.gather(*(one(stream_client, audio, (40, 100, 250, 480)[i % 4])
                                          for i, audio in enumerate(streams)))

    outcomes = _run(all_streams())
    for (results, summary), want in zip(outcomes, expected):
        assert len(want) == 3
        _assert_same_segments(_finals(results), want)
        assert [seg.segment_index for seg in results] == [0, 1, 2]
        assert summary.segment_count == 3
    assert _wait_for_no_open_streams(server, 5) == 0


def _chunk_request(sequence_id: int, audio: np.ndarray, start=False, end=False, dtype="FP32", extra=()):
    tensor = grpcaio.InferInput("AUDIO", [1, audio.size], dtype)
    tensor.set_data_from_numpy(audio[None])
    return {"model_name": "asr_stream", "inputs": [tensor, *extra], "sequence_id": sequence_id,
            "sequence_start": start, "sequence_end": end, "outputs": [grpcaio.InferRequestedOutput("RESULT")]}


async def _raw_stream(url: str, requests: list[dict], stop_after: int = 1, hold_open_s: float = 0.0):
    """Sends `requests` on one bidirectional stream; returns the first `stop_after` (result,
    error message) pairs."""
    client = grpcaio.InferenceServerClient(url)

    async def send():
        for request in requests:
            yield request
        await asyncio.sleep(hold_open_s)

    got = []
    try:
        call = client.stream_infer(send())
        async for result, error in call:
            got.append((result, error.message() if error else None))
            if len(got) >= stop_after:
                break
        call.cancel()
    finally:
        await client.close()
    return got


def _language(value: str):
    tensor = grpcaio.InferInput("LANGUAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[value.encode()]], dtype=np.object_))
    return tensor


def _sample_rate(value: int):
    tensor = grpcaio.InferInput("SAMPLE_RATE", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return tensor


def test_bad_input_fails_only_its_own_stream(server, offline_segments):
    speech = load_audio(DATA / "pause_0.3s.wav").samples
    chunk = speech[:1600]
    nan_chunk = chunk.copy()
    nan_chunk[5] = np.nan
    bad_streams = {
        "chunk before START": ([_chunk_request(901, chunk)], "START"),
        "wrong dtype": ([_chunk_request(902, chunk, start=True),
                         _chunk_request(902, (chunk * 32767).astype(np.int16), dtype="INT16")], "INT16"),
        "oversized chunk": ([_chunk_request(903, np.zeros(48000, np.float32), start=True)],
                            "longer than this server's limit of 2000 ms"),
        "NaN samples": ([_chunk_request(904, chunk, start=True), _chunk_request(904, nan_chunk)], "NaN"),
        "chunk after END": ([_chunk_request(905, chunk, start=True, end=True), _chunk_request(905, chunk)],
                            "START"),
        "unknown language": ([_chunk_request(906, chunk, start=True, extra=[_language("xx")])],
                             "unknown language 'xx'"),
        "wrong sample rate": ([_chunk_request(907, chunk, start=True, extra=[_sample_rate(44100)])],
                              "got 44100 Hz"),
    }
    healthy = ["pause_0.3s.wav", "pause_1s.wav", "one_phrase.wav", "pause_3s.wav"] * 2

    async def everything():
        async def bad(requests):
            # A chunk after END first gets the stream's end summary, then the error.
            got = await _raw_stream(server.grpc_url, requests, stop_after=2 if requests[0]["sequence_end"] else 1,
                                    hold_open_s=30)
            return [message for _, message in got if message]

        async with StreamingClient(server.grpc_url) as stream_client:
            async def good(name):
                stream = stream_client.stream(split_chunks(load_audio(DATA / name).samples, 100))
                return [seg async for seg in stream]

            return await asyncio.gather(asyncio.gather(*(bad(reqs) for reqs, _ in bad_streams.values())),
                                        asyncio.gather(*(good(name) for name in healthy)))

    errors, good_results = _run(everything())
    for (label, (_, expected)), messages in zip(bad_streams.items(), errors):
        assert len(messages) == 1 and expected in messages[0], (label, messages)
    for name, results in zip(healthy, good_results):
        _assert_same_segments(_finals(results), offline_segments(name))
    assert _wait_for_no_open_streams(server, 5) == 0


def test_a_chunk_on_a_stream_closed_by_an_error_is_told_why(server):
    chunk = np.zeros(1600, np.float32)
    got = _run(_raw_stream(server.grpc_url, [
        _chunk_request(911, np.full(1600, np.inf, np.float32), start=True),
        _chunk_request(911, chunk),
    ], stop_after=2, hold_open_s=30))
    assert "infinite" in got[0][1]
    assert "stream 911 is closed (closed after an error" in got[1][1]


def test_vanished_and_idle_clients_leave_no_state(server):
    """The test repository closes streams after 4 s without audio (conftest)."""
    speech = load_audio(DATA / "pause_1s.wav").samples

    async def vanish():
        async with StreamingClient(server.grpc_url) as stream_client:
            stream = stream_client.stream(split_chunks(speech, 100), realtime=True)
            async for _ in stream:  # the first segment, then hang up mid-stream
                break

    async def go_idle():
        # START and some speech, then nothing more on a gRPC stream the client keeps open.
        return await _raw_stream(server.grpc_url, [_chunk_request(921, speech[:16000], start=True),
                                                   _chunk_request(921, speech[16000:32000])],
                                 stop_after=1, hold_open_s=60)

    async def both():
        idle = asyncio.ensure_future(go_idle())
        await vanish()
        await asyncio.sleep(0.5)
        assert _open_streams(server) >= 1
        # Both streams are freed while the idle client is still connected, and it is told why.
        count = await asyncio.to_thread(_wait_for_no_open_streams, server, 4 + 5)
        [(_, message)] = await asyncio.wait_for(idle, 5)
        assert message == "CANCELLED: stream 921 was closed: no audio for 4 s"
        return count

    assert _run(both()) == 0
    later = _run(_raw_stream(server.grpc_url, [_chunk_request(921, speech[:1600])], hold_open_s=30))
    assert "START" in later[0][1] or "no audio for 4 s" in later[0][1]


def test_partials_come_before_their_final_and_the_final_matches_offline(server, offline_segments):
    name = "pause_1s.wav"
    samples = load_audio(DATA / name).samples
    results, _ = _run(_collect(server.grpc_url, split_chunks(samples, 100), partial_interval_ms=300,
                               realtime=True))
    partials = [seg for seg in results if not seg.final]
    assert partials, "partials were asked for"
    final_position = {seg.segment_index: i for i, seg in enumerate(results) if seg.final}
    for i, seg in enumerate(results):
        if not seg.final:
            assert i < final_position[seg.segment_index]
            assert seg.start_ms == results[final_position[seg.segment_index]].start_ms
    _assert_same_segments(_finals(results), offline_segments(name))
    assert {seg.segment_index for seg in partials} == set(final_position)


def test_stream_errors_reach_the_client_library_as_stream_errors(server):
    async def run():
        async with StreamingClient(server.grpc_url) as stream_client:
            stream = stream_client.stream([np.zeros(1600, np.float32)], language="auto")
            stream.language = "xx"  # what an out-of-date client might send
            return [seg async for seg in stream]

    with pytest.raises(StreamError, match="unknown language 'xx'"):
        _run(run())
