"""The streaming core in-process (ONNX Runtime, no server): online features, the audio buffer,
stream bookkeeping, and live streams equal to the offline pipeline whatever the chunking."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tritonasr.audio import AudioError, decode, encode, load_audio
from tritonasr.errors import InputError, OverloadError, StreamError
from tritonasr.models.fbank import Frontend, in_process
from tritonasr.recognition.admission import Admission
from tritonasr.recognition.streaming import (
    ChunkReader,
    OnlineFeatures,
    SampleBuffer,
    StreamKey,
    StreamOptions,
    StreamRegistry,
    check_sequence_id,
)

from conftest import DATA

VAD_FRONTEND = Frontend(window="hamming", n_mels=80, lfr_m=5, lfr_n=1)
SENSEVOICE_FRONTEND = Frontend(window="hamming", n_mels=80, lfr_m=7, lfr_n=6)


def _random_sizes(total: int, rng: np.random.Generator, low: int = 1, high: int = 9000) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(rng.integers(low, high)))
    return sizes


@pytest.mark.parametrize("frontend", [VAD_FRONTEND, SENSEVOICE_FRONTEND], ids=["vad", "sensevoice"])
@pytest.mark.parametrize("step", [1, 10])
@pytest.mark.parametrize("served", [False, True], ids=["online-fbank", "served-fbank"])
def test_online_features_equal_whole_file_features(frontend, step, served):
    """Served: each step's fbank comes from a front end that sees only the step's samples (here
    the whole-file fbank function, as a served front-end model would compute it)."""
    samples = load_audio(DATA / "pause_0.3s.wav").samples
    expected = frontend.features(samples)
    rng = np.random.default_rng(step)
    calls = []

    async def fbank(waveform):
        calls.append(waveform.size)
        return frontend.fbank(waveform)

    online = OnlineFeatures(frontend, fbank if served else None)
    parts, pos = [], 0
    for size in _random_sizes(samples.size, rng):
        online.accept(samples[pos:pos + size])
        pos += size
        got = asyncio.run(online.take(step))
        assert got.shape[0] % step == 0
        parts.append(got)
    online.finish()
    parts.append(asyncio.run(online.take(step)))
    np.testing.assert_array_equal(np.concatenate(parts), expected)
    if served:  # every sample was sent once, plus the 240-sample overlap of each call
        assert sum(calls) - 240 * (len(calls) - 1) <= samples.size and max(calls) < samples.size


def test_online_features_of_audio_shorter_than_a_window():
    online = OnlineFeatures(VAD_FRONTEND)
    online.accept(np.zeros(100, dtype=np.float32))
    online.finish()
    assert asyncio.run(online.take(10)).shape == (0, 400)


@pytest.mark.parametrize("served", [False, True], ids=["online-fbank", "served-fbank"])
def test_a_segments_fbank_is_the_streams_frames_from_its_start(served):
    """What the ASR engine takes instead of computing a segment's fbank again: exactly the fbank
    of the segment's samples alone, for a start on a frame boundary; None where the frames
    cannot give it."""
    samples = load_audio(DATA / "pause_0.3s.wav").samples
    online = OnlineFeatures(VAD_FRONTEND, in_process(VAD_FRONTEND.fbank) if served else None)
    rng = np.random.default_rng(3)
    pos = 0
    for size in _random_sizes(samples.size, rng, 800, 4000):
        online.accept(samples[pos:pos + size])
        pos = min(pos + size, samples.size)
        asyncio.run(online.take(10))
        for start_ms, end_ms in ((0, 250), (120, 1370), (300, pos // 16)):
            start, stop = start_ms * 16, min(end_ms * 16, pos)
            if stop - start < 400:
                continue
            got = online.fbank_of(start, stop - start)
            assert got is not None and np.array_equal(got, VAD_FRONTEND.fbank(samples[start:stop])), (start, stop)
    assert online.fbank_of(16 * 120 + 80, 16000) is None  # between two frames
    assert online.fbank_of(0, pos + 1600) is None  # past the frames made
    online.discard_before(16000 * 2)
    assert online.fbank_of(16000, 8000) is None  # dropped
    assert np.array_equal(online.fbank_of(32000, 8000), VAD_FRONTEND.fbank(samples[32000:40000]))


def test_sample_buffer_keeps_absolute_addresses_while_dropping_and_shrinking():
    buffer = SampleBuffer(capacity=16000)
    audio = np.arange(200_000, dtype=np.float32)
    for pos in range(0, 120_000, 7000):
        buffer.append(audio[pos:pos + 7000])
    np.testing.assert_array_equal(buffer.get(50_000, 50_010), audio[50_000:50_010])
    buffer.discard_before(110_000)  # grew to hold 126k samples; keeps 16k: shrinks back
    assert buffer.start == 110_000 and buffer._data.size < 60_000
    assert buffer.end == 126_000
    buffer.append(audio[126_000:140_000])
    np.testing.assert_array_equal(buffer.get(110_000, 140_000), audio[110_000:140_000])
    buffer.discard_before(110_500)  # under a second: not worth a copy yet
    assert buffer.start == 110_000
    with pytest.raises(ValueError, match="already dropped"):
        buffer.get(100, 200)


def test_chunks_are_read_as_their_stream_declared_them():
    ok = np.zeros(1600, dtype=np.float32)
    reader = ChunkReader(StreamOptions(), 2000)
    assert reader.read(ok[None], None, None).shape == (1600,)
    assert reader.read(np.zeros((1, 0), np.float32), None, 16000).size == 0
    with pytest.raises(AudioError, match="longer than this server's limit of 2000 ms"):
        reader.read(np.zeros(48000, np.float32), None, None)
    with pytest.raises(AudioError, match="NaN"):
        reader.read(np.array([0.0, np.nan], np.float32), None, None)
    with pytest.raises(AudioError, match="opened at 16000 Hz; a chunk says 8000 Hz"):
        reader.read(ok, None, 8000)
    with pytest.raises(AudioError, match="float32 stream's chunks carry AUDIO"):
        reader.read(None, np.zeros(10, np.uint8), None)
    mulaw = ChunkReader(StreamOptions(sample_rate=8000, encoding="mulaw"), 2000)
    speech = np.sin(np.arange(800) / 7).astype(np.float32) * 0.5
    assert np.array_equal(mulaw.read(None, np.frombuffer(encode(speech, "mulaw"), np.uint8)[None], 8000),
                          decode(encode(speech, "mulaw"), "mulaw"))
    with pytest.raises(AudioError, match="longer than this server's limit of 2000 ms"):
        mulaw.read(None, np.zeros(16001, np.uint8), None)  # 2000 ms at 8 kHz is 16000 bytes
    with pytest.raises(AudioError, match="does not hold whole samples"):
        ChunkReader(StreamOptions(encoding="pcm16"), 2000).read(None, np.zeros(3, np.uint8), None)
    with pytest.raises(AudioError, match="unknown audio encoding 'opus'"):
        ChunkReader(StreamOptions(encoding="opus"), 2000)
    with pytest.raises(AudioError, match="8000 Hz or 16000 Hz; got 44100 Hz"):
        ChunkReader(StreamOptions(sample_rate=44100), 2000)


class _Stub:
    """A stand-in LiveStream for registry bookkeeping (the registry reads these fields and calls
    close and hung_up)."""

    def __init__(self, key):
        self.key, self.id, self.token = key, key.id, ""
        self.busy, self.last_active, self.closed, self.notice, self.gone = 0, 0.0, None, None, False

    def close(self, reason, failed=False, notice=None):
        self.closed = self.closed or reason
        self.notice = self.notice or notice

    def hung_up(self):
        return self.gone


def _registry(slots, max_streams: int = 4, **kwargs) -> StreamRegistry:
    """A registry over a stand-in stream factory; `slots`: the admission control's directory."""
    return StreamRegistry(lambda key, opts: _Stub(key),
                          **{"idle_timeout_s": 5, "admission": Admission(slots, max_streams), **kwargs})


def test_registry_limits_expires_and_explains_closed_streams(tmp_path):
    counts = []
    registry = _registry(tmp_path, max_streams=2, on_change=counts.append)
    first = registry.open(StreamKey(1), StreamOptions())
    registry.open(StreamKey(2), StreamOptions())
    with pytest.raises(OverloadError, match="limit of 2 open streams") as refused:
        registry.open(StreamKey(3), StreamOptions())
    assert refused.value.code == "UNAVAILABLE"
    with pytest.raises(StreamError, match="must carry sequence_start"):
        registry.get(StreamKey(3))
    second = registry.streams[StreamKey(2)]
    second.last_active = 100.0
    first.last_active, first.busy = 0.0, 1  # a stream with a chunk in hand is never idle
    [(expired, error)] = registry.expire(now=106.0)
    assert expired is second and error.kind == "idle_timeout" and second.notice is error
    assert str(error) == "stream 2 was closed: no audio for 5 s"
    with pytest.raises(StreamError, match=r"stream 2 is closed \(no audio for 5 s\)") as late:
        registry.get(StreamKey(2))
    assert late.value.kind is None  # the stream's failure was counted when it closed
    registry.close(first, "ended")
    assert first.closed == "ended" and len(registry) == 0 and counts == [1, 2, 1, 0]
    with pytest.raises(StreamError, match=r"closed \(ended\)") as after_end:
        registry.get(StreamKey(1))
    assert after_end.value.kind == "bad_stream"  # a chunk after END is a new mistake


def test_a_second_start_on_a_live_id_is_refused_and_the_first_stream_goes_on(tmp_path):
    registry = _registry(tmp_path)
    first = registry.open(StreamKey(7), StreamOptions(), token="a")
    with pytest.raises(StreamError, match="stream 7 is already open") as refused:
        registry.open(StreamKey(7), StreamOptions(), token="b")
    assert refused.value.code == "ALREADY_EXISTS"
    registry.refused(StreamKey(7), "b", "refused at its start")  # what the model does: no effect
    assert registry.get(StreamKey(7), "a") is first and first.closed is None


def test_chunks_with_another_token_are_refused_without_touching_the_stream(tmp_path):
    registry = _registry(tmp_path)
    stream = registry.open(StreamKey(7), StreamOptions(), token="secret")
    for token in ("", "guess"):
        with pytest.raises(StreamError, match="belongs to another caller"):
            registry.get(StreamKey(7), token)
    assert registry.get(StreamKey(7), "secret") is stream and stream.closed is None
    registry.close(stream, "closed after an error: NaN", failed=True)
    # Why it closed is told to its own caller only.
    with pytest.raises(StreamError, match="is not open"):
        registry.get(StreamKey(7), "guess")
    with pytest.raises(StreamError, match="closed after an error: NaN"):
        registry.get(StreamKey(7), "secret")


def test_principals_key_streams_apart(tmp_path):
    registry = _registry(tmp_path)
    alice, bob = registry.open(StreamKey(1, "alice"), StreamOptions()), registry.open(StreamKey(1, "bob"), StreamOptions())
    assert alice is not bob and registry.get(StreamKey(1, "bob")) is bob
    with pytest.raises(StreamError, match="is not open"):
        registry.get(StreamKey(1))


def test_closing_an_old_stream_object_never_closes_a_newer_one_on_the_same_id(tmp_path):
    registry = _registry(tmp_path)
    old = registry.open(StreamKey(5), StreamOptions())
    registry.close(old, "ended")
    new = registry.open(StreamKey(5), StreamOptions())
    registry.close(old, "closed after an error: late chunk of the old stream", failed=True)
    assert registry.get(StreamKey(5)) is new and new.closed is None and len(registry) == 1


def test_a_refused_start_tells_its_later_chunks_why_without_counting_them_again(tmp_path):
    registry = _registry(tmp_path)
    registry.refused(StreamKey(9), "t", "refused at its start: unknown language 'xx'")
    with pytest.raises(StreamError, match="unknown language 'xx'") as late:
        registry.get(StreamKey(9), "t")
    assert late.value.kind is None


def test_a_hang_up_is_closed_at_once_and_is_not_an_error(tmp_path):
    registry = _registry(tmp_path, idle_timeout_s=60)
    stream = registry.open(StreamKey(3), StreamOptions())
    stream.gone = True
    stream.last_active = 100.0
    assert registry.expire(now=100.5) == []  # not silent long enough to ask
    [(closed, error)] = registry.expire(now=101.5)
    assert closed is stream and error.kind is None and not error.notify and stream.notice is None
    assert len(registry) == 0


@pytest.mark.parametrize("value, message", [("caller-0", "string ids are refused"), (0, "needs a sequence id"),
                                            (2 ** 64, "needs a sequence id")])
def test_sequence_ids_must_be_integers(value, message):
    with pytest.raises(StreamError, match=message):
        check_sequence_id(value)
    assert check_sequence_id(2 ** 64 - 1) == 2 ** 64 - 1


class _Collect:
    def __init__(self, out: list):
        self.out = out
        self.finished = False

    def send(self, payload):
        self.out.append(payload)

    def fail(self, error):
        self.out.append({"error": str(error)})

    def finish(self):
        assert not self.finished, "finished twice"
        self.finished = True

    def cancelled(self):
        return False


async def _stream_in_process(local, samples, sizes, options=StreamOptions()):
    return await _stream_in_process_on(local.open_stream(options), samples, sizes)


async def _stream_in_process_on(stream, samples, sizes):
    out, pos = [], 0
    for size in sizes:
        if pos >= samples.size:
            break
        await stream.push(samples[pos:pos + size], False, _Collect(out))
        pos += size
    await stream.push(np.zeros(0, np.float32), True, _Collect(out))
    await stream._delivered
    return out


@pytest.fixture(scope="module")
def local(model_repository):
    from tritonasr.runtime.in_process import LocalPipeline

    return LocalPipeline(model_repository, intra_op_threads=1)


@pytest.mark.parametrize("name", ["pause_1s.wav", "lead_trail_silence.wav", "long_70s.wav"])
def test_live_stream_equals_offline_pipeline_in_process(local, name):
    samples = load_audio(DATA / name).samples
    offline = local.transcribe(samples)["segments"]
    rng = np.random.default_rng(7)
    for sizes in ([320] * 10**5, [9600] * 10**4, _random_sizes(samples.size, rng)):
        out = asyncio.run(_stream_in_process(local, samples, sizes))
        finals = [{k: v for k, v in seg.items() if k not in ("final", "segment_index", "endpoint_ms")}
                  for seg in out[:-1]]
        assert finals == offline
        assert [seg["segment_index"] for seg in out[:-1]] == list(range(len(offline)))
        # A segment is decided after its end, and no later than the audio received.
        assert all(seg["end_ms"] <= seg["endpoint_ms"] <= out[-1]["duration_ms"] for seg in out[:-1])
        assert out[-1] == {"complete": True, "duration_ms": len(samples) * 1000 // 16000,
                           "segment_count": len(offline)}


@pytest.mark.parametrize("ahead_ms", [0, 400, 10_000])
def test_segments_decoded_ahead_are_the_finals_and_start_before_their_endpoint(local, ahead_ms):
    """Each segment's decode starts once its trailing silence would close it within `ahead_ms`
    (0: when it closes). A 600 ms pause between two phrases starts one that the second phrase
    makes void (with FunASR's 800 ms of end silence, the phrases are one segment); decoding
    further ahead starts more, at shorter pauses. The finals are the offline pipeline's either way."""
    from tritonasr.recognition.streaming import stream_factory

    two = load_audio(DATA / "pause_1s.wav").samples  # phrases at 0.5-3.9 s and 4.9-7.5 s
    samples = np.concatenate([two, two[:64_000], two[70_400:], np.zeros(16_000, np.float32)])
    offline = local.transcribe(samples)["segments"]
    assert len(offline) == 3
    decodes = []  # (start ms, end ms, audio received then, in ms)
    analyse = local.recognizer.analyse

    async def counted(request, audio, start_ms, end_ms, **kwargs):
        decodes.append((start_ms, end_ms, stream.received_ms))
        return await analyse(request, audio, start_ms, end_ms, **kwargs)

    counted_ahead = {"used": 0, "void": 0}
    stream = stream_factory(local.vad, local.recognizer, local.calls.vad, decode_ahead_ms=ahead_ms,
                            on_decode_ahead=lambda result, count: counted_ahead.update({result: counted_ahead[result] + count})
                            )(StreamKey(0), StreamOptions())
    local.recognizer.analyse = counted
    try:
        finals = asyncio.run(_stream_in_process_on(stream, samples, [1600] * 10**4))[:-1]
    finally:
        local.recognizer.analyse = analyse
    assert [{k: v for k, v in seg.items() if k not in ("final", "segment_index", "endpoint_ms")}
            for seg in finals] == offline
    decoded_at = {(start, end): received for start, end, received in decodes}
    for seg in finals:
        started = decoded_at.pop((seg["start_ms"], seg["end_ms"]))
        if ahead_ms:
            assert seg["endpoint_ms"] - min(ahead_ms, 800) <= started < seg["endpoint_ms"], seg
        else:
            assert started == seg["endpoint_ms"], seg
    void = len(decodes) - len(finals)  # (each start-end decoded once)
    assert len(decoded_at) == void and void == {0: 0, 400: 1}.get(ahead_ms, void) and void >= (ahead_ms > 0), decodes
    assert counted_ahead == {"used": len(finals) if ahead_ms else 0, "void": void}  # (tritonasr_decodes_ahead_total)


def test_unknown_language_is_refused_when_the_stream_opens(local):
    with pytest.raises(InputError, match="unknown language 'xx'"):
        local.open_stream(StreamOptions(language="xx"))


def test_a_long_stream_keeps_only_recent_state(local):
    """Hours-long calls must not grow: audio is kept from the open segment (or the last second)
    on, and the state machine's per-frame energies only for the frames being decided."""
    samples = load_audio(DATA / "long_70s.wav").samples
    stream = local.open_stream()
    out = []

    async def feed():
        for pos in range(0, samples.size, 16000):
            await stream.push(samples[pos:pos + 16000], False, _Collect(out))
            (track,) = stream.tracks
            held_ms = (track.audio.end - track.audio.start) * 1000 // 16000
            open_ms = 0 if track.open_start_ms is None else track.endpointer.position_ms - track.open_start_ms
            assert held_ms <= max(open_ms, 1000) + 2000
            assert track.endpointer.detector.pending_frames == 0
        await stream._delivered

    asyncio.run(feed())
    assert len(out) == 7  # every segment but the last, which only END closes


def test_the_last_chunk_keeps_its_sender_open_to_tell_why_the_stream_closed(local):
    """Each chunk's sink is finished once the next chunk's responses are out; the last one is
    held, so a stream closed for idleness can still tell its caller."""
    from tritonasr.errors import IdleTimeout

    samples = load_audio(DATA / "pause_1s.wav").samples
    stream = local.open_stream()
    sinks = [_Collect([]) for _ in range(3)]

    async def feed():
        for i, sink in enumerate(sinks):
            await stream.push(samples[i * 1600:(i + 1) * 1600], False, sink)
        await stream._delivered

    asyncio.run(feed())
    assert [sink.finished for sink in sinks] == [True, True, False]
    stream.close("no audio for 5 s", failed=True, notice=IdleTimeout("stream 0 was closed: no audio for 5 s"))
    assert sinks[-1].finished and sinks[-1].out == [{"error": "stream 0 was closed: no audio for 5 s"}]
