"""Streams are isolated by construction, against the real tritonserver: string sequence ids are
refused, a second START on a live id is refused without disturbing the stream, chunks from
another caller (another stream_token) neither add audio to a stream nor receive its segments,
and an error closes only the stream it belongs to. Every case runs beside good streams whose
finals must equal an undisturbed run's."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio

from tritonasr.audio import load_audio
from tritonasr.client.stream import StreamError, StreamingClient, split_chunks

from conftest import DATA, raw_stream

GOOD = ["pause_1s.wav", "pause_0.3s.wav"]
VICTIM = "pause_3s.wav"
SEGMENT_KEYS = ("start_ms", "end_ms", "text", "language", "emotion", "event")


def _samples(name: str) -> np.ndarray:
    return load_audio(DATA / name).samples


def _finals(results) -> list[dict]:
    """Final segments, from library StreamSegments or raw JSON payloads."""
    as_dict = [r if isinstance(r, dict) else {k: getattr(r, k) for k in SEGMENT_KEYS + ("final",)} for r in results]
    return [{k: r[k] for k in SEGMENT_KEYS} for r in as_dict if r.get("final")]


async def _library_stream(client: StreamingClient, chunks, sequence_id: int | None = None) -> list:
    stream = client.stream(chunks)
    if sequence_id is not None:
        stream.sequence_id = sequence_id  # as if another caller knew or guessed it
    return [segment async for segment in stream]


async def _paced(name: str):
    """Chunks with a pause between them, so that streams interleave on the server."""
    for chunk in split_chunks(_samples(name), 100):
        yield chunk
        await asyncio.sleep(0.005)


async def _good_streams(url: str) -> list[list]:
    async with StreamingClient(url) as client:
        return await asyncio.gather(*(_library_stream(client, _paced(name)) for name in GOOD))


@pytest.fixture(scope="module")
def undisturbed(server) -> dict[str, list[dict]]:
    async def alone(name):
        async with StreamingClient(server.grpc_url) as client:
            return _finals(await _library_stream(client, split_chunks(_samples(name), 100)))

    finals = {name: asyncio.run(alone(name)) for name in GOOD + [VICTIM]}
    assert all(finals.values()), "every file has speech"
    return finals


def _assert_good(results: list[list], undisturbed):
    for name, got in zip(GOOD, results):
        assert _finals(got) == undisturbed[name], name


def _request(sequence_id, audio: np.ndarray, token: str = "", start=False, end=False) -> dict:
    tensor = grpcaio.InferInput("AUDIO", [1, audio.size], "FP32")
    tensor.set_data_from_numpy(audio[None].astype(np.float32))
    return {"model_name": "asr_stream", "inputs": [tensor], "sequence_id": sequence_id, "sequence_start": start,
            "sequence_end": end, "outputs": [grpcaio.InferRequestedOutput("RESULT")],
            "parameters": {"stream_token": token} if token else None}


async def _victim_chunks(speech: np.ndarray, live: asyncio.Event, intruder_done: asyncio.Event):
    """The victim's chunks, pausing mid-stream while the intruder acts."""
    for i, chunk in enumerate(split_chunks(speech, 100)):
        if i == 10:
            await asyncio.sleep(1.0)  # the chunks sent so far are in: the stream is live
            live.set()
            await intruder_done.wait()
        yield chunk


def test_string_sequence_ids_are_refused(server, undisturbed):
    chunk = _samples(VICTIM)[:16000]

    async def run():
        callers = [raw_stream(server.grpc_url, [_request(f"caller-{i}", chunk, start=True),
                                                _request(f"caller-{i}", chunk),
                                                _request(f"caller-{i}", chunk[:0], end=True)]) for i in range(4)]
        return await asyncio.gather(asyncio.gather(*callers), _good_streams(server.grpc_url))

    callers, good = asyncio.run(asyncio.wait_for(run(), 120))
    for results, errors in callers:
        assert results == [] and len(errors) == 3
        assert all(e.startswith("INVALID_ARGUMENT: ") and "string ids are refused" in e for e in errors), errors
    _assert_good(good, undisturbed)


def test_a_second_caller_on_a_live_id_gets_nothing_and_changes_nothing(server, undisturbed):
    """The intruder knows the victim's sequence id: its START is refused, its chunks (another
    token) are refused, and the victim's transcript is exactly its own."""
    sequence_id = 4242
    speech = _samples(VICTIM)
    live, intruder_done = asyncio.Event(), asyncio.Event()


    async def intruder_steps():
        await live.wait()
        yield _request(sequence_id, speech[:8000], token="intruder", start=True)
        for pos in range(8000, 40000, 8000):
            yield _request(sequence_id, speech[pos:pos + 8000], token="intruder")

    async def intruder():
        try:
            return await raw_stream(server.grpc_url, intruder_steps())
        finally:
            intruder_done.set()

    async def run():
        async with StreamingClient(server.grpc_url) as client:
            victim = _library_stream(client, _victim_chunks(speech, live, intruder_done), sequence_id)
            return await asyncio.gather(victim, intruder(), _good_streams(server.grpc_url))

    victim, (results, errors), good = asyncio.run(asyncio.wait_for(run(), 120))
    assert _finals(victim) == undisturbed[VICTIM]
    assert results == [], "the intruder must receive none of the victim's segments"
    assert "stream 4242 is already open" in errors[0] and errors[0].startswith("ALREADY_EXISTS: ")
    assert len(errors) == 5 and all("belongs to another caller" in e for e in errors[1:]), errors
    _assert_good(good, undisturbed)


def test_an_end_from_another_caller_is_reported_to_the_stream_it_ended(server, undisturbed):
    """Triton's sequence batcher ends a sequence on any END for its id, before the model sees
    it: the model cannot keep the stream alive, but tells its caller at once and why."""
    sequence_id = 4343
    speech = _samples(VICTIM)
    live, intruder_done = asyncio.Event(), asyncio.Event()


    async def intruder():
        async def steps():
            await live.wait()
            yield _request(sequence_id, speech[:0], token="intruder", end=True)
        try:
            return await raw_stream(server.grpc_url, steps())
        finally:
            intruder_done.set()

    async def victim():
        async with StreamingClient(server.grpc_url) as client:
            with pytest.raises(StreamError) as ended:
                await _library_stream(client, _victim_chunks(speech, live, intruder_done), sequence_id)
            return ended.value

    async def run():
        return await asyncio.gather(victim(), intruder(), _good_streams(server.grpc_url))

    ended, (results, errors), good = asyncio.run(asyncio.wait_for(run(), 120))
    assert "stream 4343 was ended by an END request without its stream_token" in str(ended)
    assert results == [] and len(errors) == 1 and "belongs to another caller" in errors[0]
    _assert_good(good, undisturbed)


def test_a_second_start_and_an_error_close_only_the_stream_they_belong_to(server, undisturbed):
    """One gRPC stream: a START sent twice is refused and the first stream goes on to the
    undisturbed result; then a bad chunk closes that stream only, and the id starts afresh."""
    sequence_id, token = 4444, "t0k3n"
    chunks = split_chunks(_samples(VICTIM), 100)
    nan = np.full(1600, np.nan, np.float32)

    def whole_stream(chunks):
        return ([_request(sequence_id, chunks[0], token, start=True)]
                + [_request(sequence_id, c, token) for c in chunks[1:]]
                + [_request(sequence_id, chunks[0][:0], token, end=True)])

    first = whole_stream(chunks)
    first.insert(5, _request(sequence_id, chunks[0][:0], token, start=True))  # a START again, no audio
    failing = [_request(sequence_id, chunks[0], token, start=True), _request(sequence_id, nan, token)]
    results: list[dict] = []

    async def steps():
        for request in first:
            yield request
        while not any(r.get("complete") for r in results):  # one stream's results at a time
            await asyncio.sleep(0.05)
        for request in failing + whole_stream(chunks):
            yield request

    async def run():
        return await asyncio.gather(raw_stream(server.grpc_url, steps(), results), _good_streams(server.grpc_url))

    (_, errors), good = asyncio.run(asyncio.wait_for(run(), 180))
    summaries = [i for i, r in enumerate(results) if r.get("complete")]
    assert len(summaries) == 2, results
    assert _finals(results[:summaries[0]]) == undisturbed[VICTIM]
    assert _finals(results[summaries[0]:]) == undisturbed[VICTIM]
    assert len(errors) == 2 and "is already open" in errors[0] and "NaN" in errors[1], errors
    _assert_good(good, undisturbed)
