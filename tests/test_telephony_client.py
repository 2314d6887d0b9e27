"""Telephony audio on the client side, without a server: 8 kHz audio and its byte encodings in
the requests the library builds (asr_stream's START, chunks and END; asr_offline's request; a
long recording's pieces), chunked and timed in ms of audio, and files sent as they are."""
import asyncio

import numpy as np
import pytest
import soundfile as sf
import soxr
from test_endpointing_client import _FakeStreamClient

from tritonasr.audio import ENCODING_SUBTYPES, AudioError, decode, load_audio
from tritonasr.client.offline import OfflineClient
from tritonasr.client.stream import (
    ChunkClock,
    LiveStream,
    StreamingClient,
    load_stream_audio,
    split_chunks,
    stream_request,
    validate_chunk,
)
from tritonasr.paths import speech_dir

SPEECH = speech_dir() / "pause_1s.wav"


@pytest.fixture(scope="module")
def speech_8k() -> np.ndarray:
    return soxr.resample(load_audio(SPEECH).samples, 16000, 8000).astype(np.float32)


def _inputs(request: dict) -> dict:
    return {i.name(): (i.datatype(), i.shape()) for i in request["inputs"]}


def _value(request: dict, name: str):
    (tensor,) = [i for i in request["inputs"] if i.name() == name]
    if tensor.datatype() == "BYTES":
        return tensor._raw_content[4:].decode()  # after the 4-byte length
    return np.frombuffer(tensor._raw_content, {"INT32": np.int32, "UINT8": np.uint8, "FP32": np.float32}[
        tensor.datatype()])


def _requests(chunks, **options) -> tuple[LiveStream, list[dict]]:
    async def go():
        async with StreamingClient("localhost:1") as client:
            stream = client.stream(chunks, **options)
            return stream, [r async for r in stream.requests()]
    return asyncio.run(go())


# -- requests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["mulaw", "alaw", "pcm16"])
def test_a_byte_stream_declares_itself_on_start_and_sends_bytes(encoding):
    data = bytes(range(160))
    start = stream_request("asr_stream", 7, data, True, False, sample_rate=8000, encoding=encoding)
    later = stream_request("asr_stream", 7, np.frombuffer(data, np.uint8), False, True, sample_rate=8000,
                           encoding=encoding)
    assert _inputs(start)["AUDIO_BYTES"] == ("UINT8", [1, 160]) and "AUDIO" not in _inputs(start)
    assert _value(start, "SAMPLE_RATE") == [8000] and _value(start, "ENCODING") == encoding
    assert _value(start, "AUDIO_BYTES").tobytes() == data
    # Later chunks carry the bytes alone, so that they batch with every other stream's.
    assert _inputs(later) == {"AUDIO_BYTES": ("UINT8", [1, 160])}


def test_a_float_stream_at_8khz_sends_samples_and_says_float32():
    samples = np.linspace(-1, 1, 800, dtype=np.float32)
    start = stream_request("asr_stream", 7, samples, True, False, sample_rate=8000)
    assert _inputs(start)["AUDIO"] == ("FP32", [1, 800]) and "AUDIO_BYTES" not in _inputs(start)
    assert _value(start, "SAMPLE_RATE") == [8000] and "ENCODING" not in _inputs(start)  # float32: the default
    assert _inputs(stream_request("asr_stream", 7, samples, False, False, sample_rate=8000)) == {
        "AUDIO": ("FP32", [1, 800])}


def test_a_live_mulaw_stream_ends_on_empty_bytes_and_counts_samples():
    stream, requests = _requests([bytes(800), bytearray(400)], sample_rate=8000, encoding="mulaw")
    assert [_inputs(r)["AUDIO_BYTES"] for r in requests] == [("UINT8", [1, 800]), ("UINT8", [1, 400]),
                                                             ("UINT8", [1, 0])]
    assert _value(requests[0], "ENCODING") == "mulaw"
    assert stream.chunk_clock.samples == 1200 and stream.chunk_clock.sample_rate == 8000


@pytest.mark.parametrize("encoding, chunk", [("float32", np.zeros(800, np.float32)), ("mulaw", bytes(800)),
                                             ("pcm16", bytes(1600))])
def test_realtime_paces_8khz_chunks_by_their_ms(encoding, chunk):
    now = [0.0]

    async def sleep(seconds):
        now[0] += seconds

    async def go():
        async with StreamingClient("localhost:1") as client:
            stream = LiveStream(client, [chunk] * 3, language="auto", use_itn=False, partial_interval_ms=0,
                                realtime=True, sample_rate=8000, encoding=encoding, clock=lambda: now[0],
                                sleep=sleep)
            return [round(now[0], 6) async for _ in stream.requests()]

    assert asyncio.run(go()) == [0.1, 0.2, 0.3, 0.3]  # 100 ms each, then END


def test_stream_options_are_checked():
    async def go():
        async with StreamingClient("localhost:1") as client:
            with pytest.raises(ValueError, match="sample_rate must be one of 8000, 16000, got 44100"):
                client.stream([], sample_rate=44100)
            with pytest.raises(ValueError, match="unknown audio encoding 'opus'"):
                client.stream([], encoding="opus")
    asyncio.run(go())


# -- chunks and their timing ---------------------------------------------------------------------

@pytest.mark.parametrize("encoding, audio, size", [
    ("float32", np.zeros(8000, np.float32), 800),
    ("mulaw", bytes(8000), 800),
    ("alaw", np.zeros(8000, np.uint8), 800),
    ("pcm16", bytes(16000), 1600),
])
def test_split_chunks_at_8khz_gives_100_ms_chunks(encoding, audio, size):
    chunks = split_chunks(audio, 100, sample_rate=8000, encoding=encoding)
    assert [len(c) for c in chunks] == [size] * 10
    assert np.array_equal(np.concatenate([np.frombuffer(c, np.uint8) if isinstance(c, bytes) else c for c in chunks]),
                          np.frombuffer(audio, np.uint8) if isinstance(audio, bytes) else audio)


def test_split_chunks_keeps_pcm16_samples_whole():
    chunks = split_chunks(bytes(2 * 8000), [10, 0.05], sample_rate=8000, encoding="pcm16")
    assert [len(c) for c in chunks[:2]] == [160, 2]  # 80 samples; at least one sample
    assert all(len(c) % 2 == 0 for c in chunks)


def test_validate_chunk_counts_2_s_at_the_streams_rate():
    assert validate_chunk(np.zeros(16000, np.float32), 8000).size == 16000
    with pytest.raises(AudioError, match=r"at most 2000 ms \(16000 samples at 8 kHz\), got 16001 samples"):
        validate_chunk(np.zeros(16001, np.float32), 8000)
    assert validate_chunk(bytes(16000), 8000, "mulaw").dtype == np.uint8
    with pytest.raises(AudioError, match=r"\(32000 bytes of pcm16 at 8 kHz\), got 32002 bytes"):
        validate_chunk(bytes(32002), 8000, "pcm16")
    with pytest.raises(AudioError, match="3 bytes of pcm16 does not hold whole samples"):
        validate_chunk(bytes(3), 8000, "pcm16")
    with pytest.raises(AudioError, match="must be bytes or 1-D uint8 arrays, got float32"):
        validate_chunk(np.zeros(800, np.float32), 8000, "alaw")


def test_chunk_clock_at_8khz_finds_chunks_by_ms():
    clock = ChunkClock(start=0.0, sample_rate=8000)
    clock.record(800, 1.0)  # [0, 100) ms
    clock.record(400, 2.0)  # [100, 150) ms
    assert clock.sent_at(100) == 1.0 and clock.sent_at(100.125) == 2.0 and clock.sent_at(150) == 2.0


# -- files ---------------------------------------------------------------------------------------

def _sent_audio(stream: LiveStream, requests: list[dict]) -> np.ndarray:
    """The float samples a stream's requests carry, decoded as the server would."""
    if stream.encoding == "float32":
        return np.concatenate([_value(r, "AUDIO") for r in requests])
    return decode(np.concatenate([_value(r, "AUDIO_BYTES") for r in requests]).tobytes(), stream.encoding)


def _stream_file(path, **options) -> tuple[LiveStream, list[dict]]:
    async def go():
        async with StreamingClient("localhost:1") as client:
            stream = client.stream_file(path, chunk_ms=100, **options)
            return stream, [r async for r in stream.requests()]
    return asyncio.run(go())


@pytest.mark.parametrize("encoding", ["mulaw", "alaw", "pcm16"])
def test_an_8khz_wav_is_streamed_in_its_own_encoding(tmp_path, speech_8k, encoding):
    path = tmp_path / f"call_{encoding}.wav"
    sf.write(path, speech_8k, 8000, subtype=ENCODING_SUBTYPES[encoding])
    stream, requests = _stream_file(path, language="en")
    assert (stream.sample_rate, stream.encoding) == (8000, encoding)
    assert _value(requests[0], "SAMPLE_RATE") == [8000] and _value(requests[0], "ENCODING") == encoding
    assert _inputs(requests[1]) == {"AUDIO_BYTES": ("UINT8", [1, 800 * (2 if encoding == "pcm16" else 1)])}
    np.testing.assert_array_equal(_sent_audio(stream, requests), sf.read(path, dtype="float32")[0])


def test_a_mulaw_file_is_sent_byte_for_byte(tmp_path, speech_8k):
    path = tmp_path / "call.wav"
    sf.write(path, speech_8k, 8000, subtype="ULAW")
    with sf.SoundFile(path) as sound:
        raw = path.read_bytes()[-sound.frames:]  # the data chunk ends the file
    # Mu-law's two zeros decode alike; the encoder writes +0.
    assert load_stream_audio(path).data == raw.replace(b"\x7f", b"\xff")


def test_an_8khz_file_of_other_samples_goes_as_float32_at_8khz(tmp_path, speech_8k):
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([speech_8k, speech_8k / 2], axis=1), 8000, subtype="PCM_16")
    stream, requests = _stream_file(stereo)
    assert (stream.sample_rate, stream.encoding) == (8000, "float32")
    np.testing.assert_allclose(_sent_audio(stream, requests), sf.read(stereo, dtype="float32")[0].mean(axis=1))
    floats = tmp_path / "float.wav"
    sf.write(floats, speech_8k, 8000, subtype="FLOAT")
    audio = load_stream_audio(floats)
    assert (audio.sample_rate, audio.encoding) == (8000, "float32")
    np.testing.assert_array_equal(audio.data, speech_8k)


@pytest.mark.parametrize("rate", [16000, 44100])
def test_a_file_at_another_rate_is_streamed_at_16khz_as_before(tmp_path, rate):
    path = tmp_path / "speech.wav"
    sf.write(path, soxr.resample(load_audio(SPEECH).samples, 16000, rate), rate, subtype="PCM_16")
    stream, requests = _stream_file(path)
    assert (stream.sample_rate, stream.encoding) == (16000, "float32")
    assert _value(requests[0], "SAMPLE_RATE") == [16000] and _inputs(requests[1]) == {"AUDIO": ("FP32", [1, 1600])}
    np.testing.assert_array_equal(_sent_audio(stream, requests), load_audio(path).samples)


# -- asr_offline ---------------------------------------------------------------------------------

def _offline_requests(monkeypatch, call) -> list[dict]:
    sent = []
    with OfflineClient("localhost:1") as client:
        monkeypatch.setattr(client, "infer", lambda inputs: sent.append(
            {"inputs": inputs}) or {"duration_ms": 0, "segments": []})
        call(client)
    return sent


def test_offline_sends_8khz_samples_as_they_are(monkeypatch, speech_8k):
    (request,) = _offline_requests(monkeypatch, lambda client: client.transcribe(speech_8k, 8000))
    assert _value(request, "SAMPLE_RATE") == [8000]
    np.testing.assert_array_equal(_value(request, "AUDIO"), speech_8k)


def test_offline_resamples_other_rates_here(monkeypatch, speech_8k):
    (request,) = _offline_requests(monkeypatch, lambda client: client.transcribe(speech_8k, 11025))
    assert _value(request, "SAMPLE_RATE") == [16000]
    assert _value(request, "AUDIO").size == pytest.approx(speech_8k.size * 16000 / 11025, abs=1)


def test_offline_sends_an_8khz_file_at_8khz(monkeypatch, tmp_path, speech_8k):
    path = tmp_path / "call.wav"
    sf.write(path, speech_8k, 8000, subtype="ULAW")
    (request,) = _offline_requests(monkeypatch, lambda client: client.transcribe_file(path))
    assert _value(request, "SAMPLE_RATE") == [8000]
    np.testing.assert_array_equal(_value(request, "AUDIO"), sf.read(path, dtype="float32")[0])


def test_a_long_8khz_recording_goes_in_pieces_at_8khz():
    with OfflineClient("localhost:1", pieces_above_s=1.0) as client:
        client._client.close()
        client._client = fake = _FakeStreamClient()
        assert client.transcribe(np.zeros(3 * 8000, np.float32), 8000) == {"duration_ms": 3000, "segments": []}
    start = fake.requests[0]
    assert _value(start, "SAMPLE_RATE") == [8000] and "ENCODING" not in _inputs(start)  # float32: the default
    assert [_inputs(r)["AUDIO"] for r in fake.requests] == [("FP32", [1, 16000]), ("FP32", [1, 8000]),
                                                            ("FP32", [1, 0])]  # 2 s chunks at 8 kHz, END
