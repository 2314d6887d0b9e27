"""The streaming client's own logic, without a server: chunking and validation, the request
sequence and its real-time pacing, latency bookkeeping, result parsing, CLI output."""
import asyncio
import io
import json
import time

import numpy as np
import pytest

from tritonasr.audio import AudioError, encode
from tritonasr.client.connection import AccessDeniedError
from tritonasr.client.offline import ServerUnavailableError
from tritonasr.client.stream import (
    ChunkClock,
    LiveStream,
    StreamError,
    StreamingClient,
    StreamSegment,
    StreamSummary,
    split_chunks,
    validate_chunk,
)
from tritonasr.client.stream_cli import Printer, run_stream, segment_json, text_line
from tritonasr.contract import EXIT_FAILED, EXIT_UNREACHABLE
from tritonasr.loadtest.bench_stream import best_streams, render_markdown, start_offsets
from tritonasr.loadtest.workload import joined_speech
from tritonasr.paths import speech_dir
from tritonasr.serving.server import free_port


class FakeTime:
    """A clock that only moves when slept on: pacing is checked exactly, not timed."""

    def __init__(self, now: float = 1000.0):
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeResult:
    """Stands in for tritonclient's InferResult in `LiveStream.read` (a unit test; the
    end-to-end tests talk to the real server)."""

    def __init__(self, payload: dict | bytes):
        self._payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()

    def as_numpy(self, name: str) -> np.ndarray:
        assert name == "RESULT"
        return np.array([[self._payload]], dtype=np.object_)


def _run(coro):
    return asyncio.run(coro)


def _segment(**fields) -> dict:
    base = {"start_ms": 500, "end_ms": 3100, "text": "hello", "language": "en", "emotion": "NEUTRAL",
            "event": "Speech", "final": True, "segment_index": 0, "endpoint_ms": 3900}
    return {**base, **fields}


async def _items(*items):
    for item in items:
        yield item


def _live_stream(client, chunks=(), fake=None, **options) -> LiveStream:
    options = {"language": "auto", "use_itn": False, "partial_interval_ms": 0, "realtime": False, **options}
    fake = fake or FakeTime()
    return LiveStream(client, chunks, clock=fake, sleep=fake.sleep, **options)


# -- chunks --------------------------------------------------------------------------------------

def test_split_chunks_equal_sizes_last_shorter():
    samples = np.arange(5600, dtype=np.float32)
    chunks = split_chunks(samples, 100)
    assert [c.size for c in chunks] == [1600, 1600, 1600, 800]
    np.testing.assert_array_equal(np.concatenate(chunks), samples)


def test_split_chunks_uneven_sizes_are_cycled():
    samples = np.zeros(16000 * 5, np.float32)
    chunks = split_chunks(samples, [10, 2000, 250])
    assert [c.size for c in chunks[:6]] == [160, 32000, 4000, 160, 32000, 4000]
    assert sum(c.size for c in chunks) == samples.size


def test_split_chunks_random_sizes():
    rng = np.random.default_rng(0)
    samples = rng.uniform(-1, 1, 16000 * 20).astype(np.float32)
    sizes = rng.integers(10, 2001, size=40)
    chunks = split_chunks(samples, sizes)
    assert len({c.size for c in chunks}) > 5
    np.testing.assert_array_equal(np.concatenate(chunks), samples)
    assert all(0 < c.size <= 32000 for c in chunks)


@pytest.mark.parametrize("sizes", [0, 2001, [100, 0], []])
def test_split_chunks_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match="chunk"):
        split_chunks(np.zeros(16000, np.float32), sizes)


def test_validate_chunk():
    assert validate_chunk(np.zeros(32000, np.float64)).dtype == np.float32
    assert validate_chunk(np.zeros(0, np.float32)).size == 0  # an empty chunk is allowed
    with pytest.raises(AudioError, match="at most 2000 ms .* got 32001 samples"):
        validate_chunk(np.zeros(32001, np.float32))
    with pytest.raises(AudioError, match="1-D"):
        validate_chunk(np.zeros((1, 1600), np.float32))
    with pytest.raises(AudioError, match="floating point"):
        validate_chunk(np.zeros(1600, np.int16))
    bad = np.zeros(1600, np.float32)
    bad[[3, 7]] = [np.nan, np.inf]
    with pytest.raises(AudioError, match="2 NaN or infinite"):
        validate_chunk(bad)


def test_stream_options_are_checked_up_front():
    async def go():
        async with StreamingClient("localhost:1") as client:
            with pytest.raises(ValueError, match="language must be one of"):
                client.stream([], language="fr")
            with pytest.raises(ValueError, match="partial_interval_ms"):
                client.stream([], partial_interval_ms=-1)
    _run(go())


# -- requests and pacing -------------------------------------------------------------------------

def _inputs(request: dict) -> dict:
    return {i.name(): (i.datatype(), i.shape()) for i in request["inputs"]}


def test_requests_start_with_options_end_with_an_empty_chunk():
    chunks = [np.full(1600, 0.5, np.float32), np.zeros(800, np.float32)]

    async def go():
        async with StreamingClient("localhost:1") as client:
            stream = _live_stream(client, chunks, language="en", use_itn=True, partial_interval_ms=400)
            return stream, [r async for r in stream.requests()]

    stream, requests = _run(go())
    assert len(requests) == 3
    assert 0 < stream.sequence_id < 2 ** 63
    assert {r["sequence_id"] for r in requests} == {stream.sequence_id}
    # Every chunk carries the stream's secret, which nobody else knows.
    assert [r["parameters"] for r in requests] == [{"stream_token": stream.token}] * 3 and len(stream.token) >= 20
    assert {r["model_name"] for r in requests} == {"asr_stream"}
    assert [(r["sequence_start"], r["sequence_end"]) for r in requests] == [(True, False), (False, False),
                                                                            (False, True)]
    assert _inputs(requests[0]) == {"AUDIO": ("FP32", [1, 1600]), "SAMPLE_RATE": ("INT32", [1, 1]),
                                    "LANGUAGE": ("BYTES", [1, 1]), "USE_ITN": ("BOOL", [1, 1]),
                                    "PARTIAL_INTERVAL_MS": ("INT32", [1, 1]), "ENGINE": ("BYTES", [1, 1]), "WITH_SPEAKER": ("BOOL", [1, 1]),
                                    "RETURN_EMBEDDING": ("BOOL", [1, 1]), "END_SILENCE_MS": ("INT32", [1, 1]),
                                    "MAX_SEGMENT_MS": ("INT32", [1, 1]), "SPEECH_START_MS": ("INT32", [1, 1])}
    # Later requests carry AUDIO alone, so those of all streams batch together on the server.
    assert _inputs(requests[1]) == {"AUDIO": ("FP32", [1, 800])}
    assert _inputs(requests[2]) == {"AUDIO": ("FP32", [1, 0])}
    audio = np.frombuffer(requests[0]["inputs"][0]._raw_content, np.float32)
    np.testing.assert_array_equal(audio, chunks[0])
    assert [o.name() for o in requests[0]["outputs"]] == ["RESULT"]


def test_no_chunks_is_one_start_and_end_request():
    async def go():
        async with StreamingClient("localhost:1") as client:
            return [r async for r in _live_stream(client, []).requests()]

    (request,) = _run(go())
    assert request["sequence_start"] and request["sequence_end"]
    assert _inputs(request)["AUDIO"] == ("FP32", [1, 0])


def test_realtime_sends_each_chunk_when_its_audio_ends():
    fake = FakeTime(1000.0)
    sizes = [1600, 3200, 160, 32000]  # 100 ms, 200 ms, 10 ms, 2 s

    async def go():
        async with StreamingClient("localhost:1") as client:
            stream = _live_stream(client, [np.zeros(n, np.float32) for n in sizes], fake, realtime=True)
            sent = []
            async for _ in stream.requests():
                sent.append(round(fake.now - 1000.0, 6))
            return stream, sent

    stream, sent = _run(go())
    assert sent == [0.1, 0.3, 0.31, 2.31, 2.31]  # the END chunk follows the last one at once
    assert stream.chunk_clock.start == 1000.0
    assert stream.chunk_clock.samples == sum(sizes)


def test_realtime_does_not_wait_for_a_producer_already_late():
    fake = FakeTime(0.0)

    async def slow_chunks():
        for _ in range(3):
            await fake.sleep(0.5)  # a live source that delivers 100 ms of audio every 500 ms
            yield np.zeros(1600, np.float32)

    async def go():
        async with StreamingClient("localhost:1") as client:
            stream = _live_stream(client, slow_chunks(), fake, realtime=True)
            return [fake.now async for _ in stream.requests()]

    assert _run(go()) == [0.5, 1.0, 1.5, 1.5]
    assert fake.sleeps == [0.5, 0.5, 0.5]  # only the producer's own


def test_without_realtime_chunks_go_at_once():
    fake = FakeTime(0.0)

    async def go():
        async with StreamingClient("localhost:1") as client:
            stream = _live_stream(client, [np.zeros(1600, np.float32)] * 5, fake)
            return [r async for r in stream.requests()]

    assert len(_run(go())) == 6 and fake.sleeps == []


# -- latency bookkeeping -------------------------------------------------------------------------

def test_chunk_clock_finds_the_chunk_holding_a_position():
    clock = ChunkClock(start=10.0)
    assert clock.sent_at(100) is None
    clock.record(1600, 10.1)  # [0, 100) ms
    clock.record(800, 10.2)   # [100, 150) ms
    clock.record(0, 10.25)    # the empty END chunk
    assert clock.sent_at(0) == 10.1
    assert clock.sent_at(100) == 10.1  # a chunk ending exactly there holds it
    assert clock.sent_at(100.0625) == 10.2  # one sample later
    assert clock.sent_at(150) == 10.2  # not the END chunk at the same position
    assert clock.sent_at(151) == 10.25  # past the audio (server rounding): the last chunk
    assert clock.delay_ms(120, 10.7) == pytest.approx(500.0)
    assert clock.chunks == 3 and clock.samples == 2400


def test_results_are_timed_against_the_chunks_they_answer():
    fake = FakeTime(50.0)

    async def go():
        async with StreamingClient("localhost:1") as client:
            stream = _live_stream(client, fake=fake)
            stream.chunk_clock = clock = ChunkClock(start=50.0)
            for i in range(40):  # 100 ms chunks sent in real time: chunk i at 50.1 + i/10
                clock.record(1600, 50.1 + i / 10)

            async def responses():
                fake.now = 53.9  # a partial, answering audio up to 2000 ms
                yield FakeResult(_segment(final=False, end_ms=2000, endpoint_ms=2000, text="hel")), None
                fake.now = 54.5  # the final: speech ended at 3100 ms (sent at 53.1), endpoint at 3900 (53.9)
                yield FakeResult(_segment()), None
                fake.now = 54.6
                yield FakeResult({"complete": True, "duration_ms": 4000, "segment_count": 1}), None
                raise AssertionError("read past the end-of-stream response")

            return stream, [s async for s in stream.read(responses())]

    stream, (partial, final) = _run(go())
    assert not partial.final and partial.text == "hel"
    assert partial.latency_ms == pytest.approx(1900.0)  # 2000 ms went with the chunk sent at 52.0
    assert final == StreamSegment(500, 3100, "hello", "en", "NEUTRAL", "Speech", True, 0, 3900,
                                  latency_ms=pytest.approx(1400.0), after_endpoint_ms=pytest.approx(600.0),
                                  received_ms=pytest.approx(4500.0))
    assert stream.summary == StreamSummary(4000, 1, pytest.approx(4600.0))
    assert stream.complete


def _read_all(*items):
    async def go():
        async with StreamingClient("localhost:1") as client:
            stream = _live_stream(client)
            stream.chunk_clock = ChunkClock(0.0)
            return [s async for s in stream.read(_items(*items))]
    return _run(go())


def test_server_error_is_a_stream_error():
    from tritonclient.utils import InferenceServerException

    with pytest.raises(StreamError, match="^chunk of 3000 ms is over the 2000 ms limit$"):
        _read_all((FakeResult(_segment()), None),
                  (None, InferenceServerException("chunk of 3000 ms is over the 2000 ms limit")))


def test_stream_closed_without_summary_is_an_error():
    with pytest.raises(StreamError, match="closed the stream before its end-of-stream response"):
        _read_all((FakeResult(_segment()), None))


@pytest.mark.parametrize("payload", [{"text": "no times"}, b"not json", b"[1, 2]"])
def test_malformed_result_is_an_error(payload):
    with pytest.raises(StreamError, match="unexpected result from the server"):
        _read_all((FakeResult(payload), None))


def test_silent_server_after_the_end_times_out():
    class SilentCall:
        async def __anext__(self):
            await asyncio.sleep(3600)

    async def go():
        async with StreamingClient("localhost:1", finish_timeout_s=0.2) as client:
            stream = client.stream([])
            stream._last_activity = time.monotonic()  # as if the END chunk had just been sent
            async for _ in stream._responses(SilentCall()):
                pass

    began = time.monotonic()
    with pytest.raises(StreamError, match="no response from the server 0.2 s after the end of the audio"):
        _run(go())
    assert time.monotonic() - began < 5


@pytest.mark.parametrize("message, error", [("unknown ASR engine 'nope'", StreamError),
                                            ("unauthenticated: no API key", AccessDeniedError)])
def test_refused_stream_stops_sending_and_is_not_cancelled(message, error):
    """After the server's error the client half-closes and lets the server end the call: a
    cancel while the server finishes the stream can crash Triton 2.51 (server#7368)."""
    from tritonclient.utils import InferenceServerException

    class RefusingCall:
        def __init__(self, requests):
            self.requests = requests.__aiter__()
            self.sent = 0
            self.cancelled = False

        async def __anext__(self):
            if self.sent == 0:
                await self.requests.__anext__()
                self.sent += 1
                return None, InferenceServerException(message)
            async for _ in self.requests:  # the server answers what was sent, then ends the call
                self.sent += 1
            raise StopAsyncIteration

        def cancel(self):
            self.cancelled = True

    calls = []

    async def go():
        async with StreamingClient("localhost:1") as client:
            client._grpc.stream_infer = lambda requests, headers: calls.append(RefusingCall(requests)) or calls[-1]
            async for _ in client.stream(split_chunks(np.zeros(16000 * 5, np.float32), 100)):
                pass

    with pytest.raises(error, match=message.split(":")[0]):
        _run(go())
    assert calls[0].sent == 1 and not calls[0].cancelled


# -- no server -----------------------------------------------------------------------------------

def test_unreachable_server_is_reported_not_hung():
    url = f"localhost:{free_port()}"

    async def go():
        async with StreamingClient(url) as client:
            with pytest.raises(ServerUnavailableError, match=f"cannot reach the Triton server at {url}"):
                await client.check_ready()
            with pytest.raises(ServerUnavailableError, match=f"cannot reach the Triton server at {url}"):
                async for _ in client.stream(split_chunks(np.zeros(16000, np.float32), 100)):
                    pass

    _run(asyncio.wait_for(go(), 30))


def test_cli_exit_codes_without_server(tmp_path, capsys):
    assert run_stream(str(tmp_path / "missing.wav"), f"localhost:{free_port()}") == EXIT_FAILED
    assert "missing.wav: No such file or directory" in capsys.readouterr().err
    sample = str(speech_dir() / "one_phrase.wav")
    assert run_stream(sample, f"localhost:{free_port()}") == EXIT_UNREACHABLE
    assert "cannot reach the Triton server" in capsys.readouterr().err


# -- output --------------------------------------------------------------------------------------

SEGMENT = StreamSegment(1230, 3400, "Hello there.", "en", "NEUTRAL", "Speech", True, 0, 4200,
                        latency_ms=812.4, after_endpoint_ms=95.04, received_ms=4312.45,
                        speaker={"id": None, "score": 0.31, "label": "B"})


def test_text_lines():
    assert text_line(SEGMENT) == ("[00:01.230 --> 00:03.400] <en|NEUTRAL|Speech> speaker B: Hello there.  "
                                  "(latency 812 ms)")
    partial = StreamSegment(1230, 2000, "Hello", None, None, None, False, 0, 2000, None, None, 2100.0)
    assert text_line(partial) == "[00:01.230 --> 00:02.000] Hello  (partial)"


def test_printer_text_not_a_tty_prints_partials_on_lines():
    out = io.StringIO()
    printer = Printer("text", out)
    printer.segment(StreamSegment(1230, 2000, "Hello", "en", None, None, False, 0, 2000, 300.0, 300.0, 2300.0))
    printer.segment(SEGMENT)
    assert out.getvalue() == ("[00:01.230 --> 00:02.000] <en> Hello  (partial, latency 300 ms)\n"
                              "[00:01.230 --> 00:03.400] <en|NEUTRAL|Speech> speaker B: Hello there.  (latency 812 ms)\n")


def test_printer_tty_rewrites_the_partial_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    printer = Printer("text", out)
    printer.segment(StreamSegment(1230, 2000, "Hello", None, None, None, False, 0, 2000, None, None, 0.0))
    printer.segment(SEGMENT)
    assert out.getvalue().startswith("\r\x1b[K[00:01.230 --> 00:02.000] Hello")
    assert out.getvalue().endswith("\r\x1b[K[00:01.230 --> 00:03.400] <en|NEUTRAL|Speech> speaker B: Hello there.  "
                                   "(latency 812 ms)\n")


def test_printer_json_lines_end_with_the_summary():
    out = io.StringIO()
    printer = Printer("json", out)
    printer.segment(SEGMENT)
    printer.summary(StreamSummary(7966, 1, 8000.0))
    first, last = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first == {"start_ms": 1230, "end_ms": 3400, "text": "Hello there.", "language": "en",
                     "emotion": "NEUTRAL", "event": "Speech", "final": True, "segment_index": 0,
                     "endpoint_ms": 4200, "latency_ms": 812.4, "after_endpoint_ms": 95.0, "received_ms": 4312.4,
                     "speaker": {"id": None, "score": 0.31, "label": "B"}, "words": None, "speaker_pending": False}
    assert first == segment_json(SEGMENT)
    assert last == {"complete": True, "duration_ms": 7966, "segment_count": 1}


# -- benchmark helpers ---------------------------------------------------------------------------

def test_bench_streams_differ_and_last_long_enough():
    audios = [np.full(16000 * n, n, np.float32) for n in (3, 4, 5)]
    a, b = joined_speech(audios, 0, 20, 1000), joined_speech(audios, 1, 20, 1000)
    assert a.size >= 20 * 16000 and b.size >= 20 * 16000
    assert a[0] == 3 and b[0] == 4
    assert np.all(a[3 * 16000: 4 * 16000] == 0)  # 1 s of silence between files
    assert start_offsets(4, 3000) == [0.0, 0.75, 1.5, 2.25]


def test_bench_best_streams_and_table():
    def level(n, p95, errors=0, refused=0, slowest=None):
        return {"streams": n, "segments": 10 * n, "partials": 0, "errors": errors, "refused": refused, "wall_s": 30.0,
                "latency_ms": {"p50": p95 / 2, "p95": p95, "p99": p95 * 1.1},
                "after_endpoint_ms": {"p50": 50.0, "p95": 80.0, "p99": None},
                "refusal_ms": {"p50": slowest, "p95": slowest, "p99": slowest, "max": slowest}}

    levels = [level(1, 400), level(4, 700), level(8, 900, errors=1), level(12, 800, refused=2, slowest=20.0),
              level(16, 2500)]
    assert best_streams(levels, 1000) == 4  # a level with errors or refusals is past the capacity
    default = {"preset": "default", "end_silence_ms": None, "max_segment_ms": None, "speech_start_ms": None}
    table = render_markdown({"levels": levels, "best_streams": 4, "target_ms": 1000, "admission": [],
                             "endpointing": default})
    assert table.startswith("Endpointing preset `default`: the server's VAD values. Speaker stage: on, each "
                            "final with its speaker\n")
    assert "| 4 | 40 | 0 | 350 ms | 700 ms | 770 ms | 50 ms | 80 ms | – |" in table
    assert table.endswith("under 1000 ms and no errors: **4**")
    admitted = render_markdown({"levels": [], "admission": [level(4, 700), level(12, 910, refused=8, slowest=31.0)],
                                "capacity": 4, "overload": 3,
                                "endpointing": {**default, "preset": "assistant", "end_silence_ms": 300,
                                                "max_segment_ms": 15000}})
    assert admitted.startswith("Endpointing preset `assistant`: end silence 300 ms, max segment 15000 ms. Speaker")
    assert "| 12 | 4 | 8 | 0 | 455 ms | 910 ms | 1001 ms | 31 ms | 31 ms | 31 ms |" in admitted
    assert admitted.endswith("3x capacity: 1.30x its value at capacity (target: at most 2x); "
                             "slowest refusal 31 ms (target: 100 ms)")


# -- several channels ------------------------------------------------------------------------------

def test_a_stream_of_frames_sends_them_interleaved_and_declares_its_channels_on_start():
    from test_telephony_client import _inputs, _requests, _value

    frames = np.arange(3200, dtype=np.float32).reshape(1600, 2) / 4000  # 100 ms of 2 channels
    stream, requests = _requests([frames, frames], channels=2, separate_channels=True)
    assert [_inputs(r)["AUDIO"] for r in requests] == [("FP32", [1, 3200]), ("FP32", [1, 3200]), ("FP32", [1, 0])]
    assert np.array_equal(_value(requests[0], "AUDIO"), frames.reshape(-1))
    assert _value(requests[0], "CHANNEL_COUNT") == [2] and _value(requests[0], "CHANNELS") == "separate"
    assert _inputs(requests[1]) == {"AUDIO": ("FP32", [1, 3200])}  # options on the START only
    assert stream.chunk_clock.samples == 3200  # frames: 200 ms


def test_a_mono_stream_declares_no_channels():
    from test_telephony_client import _inputs, _requests

    _, requests = _requests([np.zeros(1600, np.float32)])
    assert "CHANNEL_COUNT" not in _inputs(requests[0]) and "CHANNELS" not in _inputs(requests[0])


def test_chunks_of_several_channels_hold_whole_frames_and_at_most_2_s():
    assert validate_chunk(np.zeros((32000, 2), np.float32), channels=2).shape == (64000,)
    with pytest.raises(AudioError, match="does not hold whole frames of 2 channels"):
        validate_chunk(np.zeros(3201, np.float32), channels=2)
    with pytest.raises(AudioError, match="at most 2000 ms"):
        validate_chunk(np.zeros((32001, 2), np.float32), channels=2)

    async def nine():
        async with StreamingClient("localhost:1") as client:
            client.stream([], channels=9)

    with pytest.raises(ValueError, match="channels must be 1 to 8"):
        asyncio.run(nine())


def test_bench_stream_reports_the_servers_cpu_per_second_of_audio():
    import os

    from tritonasr.loadtest.rss import cpu_seconds

    used = cpu_seconds(os.getpid())  # a process without model processes: itself, as "tritonserver"
    assert list(used) == ["tritonserver"] and used["tritonserver"] > 0
    level = {"streams": 8, "segments": 40, "errors": 0, "refused": 0,
             "latency_ms": {"p50": 350.0, "p95": 700.0, "p99": 770.0},
             "after_endpoint_ms": {"p50": 50.0, "p95": 80.0, "p99": None},
             "cpu_per_audio_s": {"tritonserver": 0.01, "sensevoice": 0.06, "asr_stream": 0.02},
             "client_cpu_per_audio_s": 0.015}
    table = render_markdown({"levels": [level], "best_streams": 8, "target_ms": 1000, "admission": [],
                             "endpointing": {"preset": "default", "end_silence_ms": None, "max_segment_ms": None,
                                             "speech_start_ms": None}})
    assert "| streams | sensevoice | asr_stream | tritonserver | all | client |" in table
    assert "| 8 | 0.060 | 0.020 | 0.010 | 0.090 | 0.015 |" in table


def test_a_stream_keeps_what_a_next_server_needs_from_the_last_final_on():
    """Failover's bookkeeping: after a final ending at E the chunks from E on (cut on the 10 ms
    frame grid) are what a next server is sent; older ones are let go, and a stream of silence
    keeps at most MAX_KEPT_MS."""
    from tritonasr.client.stream import MAX_KEPT_MS

    audio = np.arange(16000, dtype=np.float32) / 16000  # 1 s, sample i = i / 16000

    async def sent(stream):
        return [r async for r in stream.requests()]

    async def go():
        async with StreamingClient("localhost:1") as client:
            stream = _live_stream(client, split_chunks(audio, 100))
            await sent(stream)
            stream._confirmed(357)  # a final up to 357 ms: a next server starts at 350 ms
            replay = np.concatenate(list(stream._replay()))
            kept_from = stream._kept_from
            # 8 kHz pcm16 bytes: frames are 2 bytes
            pcm = encode(audio[:8000], "pcm16")
            bytes_stream = _live_stream(client, split_chunks(pcm, 100, sample_rate=8000, encoding="pcm16"),
                                        sample_rate=8000, encoding="pcm16")
            await sent(bytes_stream)
            bytes_stream._confirmed(357)
            bytes_replay = b"".join(np.asarray(chunk).tobytes() for chunk in bytes_stream._replay())
            # silence for longer than MAX_KEPT_MS, no final at all
            long_stream = _live_stream(client, split_chunks(np.zeros(16 * (MAX_KEPT_MS + 5000), np.float32), 100))
            await sent(long_stream)
            return replay, kept_from, bytes_replay, pcm, long_stream

    replay, kept_from, bytes_replay, pcm, long_stream = _run(go())
    np.testing.assert_array_equal(replay, audio[5600:])
    assert kept_from == 4800  # chunks 0-2 (0-300 ms) let go
    assert bytes_replay == bytes(pcm)[2 * 2800:]
    assert long_stream._kept_frames <= 16 * MAX_KEPT_MS
    assert long_stream._resume_frame == 16 * 5000 and long_stream._resume_frame % 160 == 0
