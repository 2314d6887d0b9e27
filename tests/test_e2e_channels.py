"""Per-channel recognition against the real tritonserver: a two-channel call whose agent and
customer talk over each other, recognised channel by channel (CHANNELS=separate), and as their mix,
in one request and as a live stream."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import soundfile as sf

from tritonasr.audio import load_audio
from tritonasr.client.stream import StreamingClient, split_chunks
from tritonasr.recognition.settings import SpeakerSettings
from tritonasr.runtime.in_process import LocalPipeline

from conftest import DATA, TEST_SPEAKER_THRESHOLD, raw_stream

pytestmark = pytest.mark.e2e
KEYS = ("start_ms", "end_ms", "text", "language")
RATE = 16000


def _utterance(i: int) -> np.ndarray:
    samples = load_audio(sorted((DATA / "speakers").glob("utt*.wav"))[i]).samples
    return samples[: samples.size // 160 * 160]  # whole 10 ms frames, as placed below


def _place(track: np.ndarray, utterance: np.ndarray, at_s: float) -> None:
    start = int(at_s * 100) * 160  # on the 10 ms frame grid
    track[start:start + utterance.size] += utterance


@pytest.fixture(scope="module")
def call() -> np.ndarray:
    """[frames, 2]: the agent (channel 0) says utterance 0, the customer (channel 1) cuts in with
    utterance 1 before the agent is done, then the customer says utterance 0 too."""
    agent, customer = _utterance(0), _utterance(1)
    frames = np.zeros((int(14 * RATE), 2), np.float32)
    _place(frames[:, 0], agent, 1.0)
    overlap_at = 1.0 + agent.size / RATE - 1.0  # a second before the agent stops
    _place(frames[:, 1], customer, overlap_at)
    _place(frames[:, 1], agent, overlap_at + customer.size / RATE + 2.0)
    assert frames.shape[0] * 1.0 > (overlap_at + customer.size / RATE + 2.5 + agent.size / RATE) * RATE
    return frames


def _segments(result: dict, keys=KEYS + ("channel",)) -> list[dict]:
    return [{key: segment.get(key) for key in keys} for segment in result["segments"]]


def test_each_channel_is_recognised_on_its_own_overlaps_included(client, model_repository, call):
    separate = client.transcribe(call, separate_channels=True)["segments"]
    assert [s["channel"] for s in separate] == [0, 1, 1]
    assert [s["start_ms"] for s in separate] == sorted(s["start_ms"] for s in separate)
    agent, customer = separate[0], separate[1]
    assert customer["start_ms"] < agent["end_ms"]  # they talk over each other: both transcribed
    for channel in (0, 1):  # each channel's segments are that channel's alone
        alone = client.transcribe(np.ascontiguousarray(call[:, channel]))["segments"]
        assert [{k: s[k] for k in KEYS} for s in separate if s["channel"] == channel] == \
               [{k: s[k] for k in KEYS} for s in alone]
    # One speaker session for the call: the same recording on the other channel is the same label.
    assert [s["speaker"]["label"] for s in separate] == ["A", "B", "A"]
    # The served result is the in-process pipeline's.
    local = LocalPipeline(model_repository, speakers=SpeakerSettings(threshold=float(TEST_SPEAKER_THRESHOLD),
                                                                     cluster_threshold=float(TEST_SPEAKER_THRESHOLD)))
    in_process = local.transcribe(call.reshape(-1), channels=2, separate_channels=True)
    assert _segments(in_process) == _segments({"segments": separate})


def test_mixed_by_default_and_from_a_file(client, call, tmp_path):
    mixed = client.transcribe(call)["segments"]
    assert all("channel" not in s for s in mixed)
    assert mixed == client.transcribe(call.mean(axis=1, dtype=np.float32))["segments"]
    path = tmp_path / "call.wav"
    sf.write(path, call, RATE, subtype="FLOAT")
    from_file = client.transcribe_file(path, separate_channels=True)["segments"]
    assert _segments({"segments": from_file}) == _segments(client.transcribe(call, separate_channels=True))


@pytest.mark.parametrize("count, mode, samples, expected", [
    (2, b"sideways", 3200, "CHANNELS must be one of mix, separate, got 'sideways'"),
    (0, b"separate", 3200, "audio must have 1 to 8 channels, got 0"),
    (9, b"separate", 9 * 1600, "audio must have 1 to 8 channels, got 9"),
    (2, b"separate", 3201, "3201 samples do not make whole frames of 2 channels"),
])
def test_bad_channel_requests_are_the_callers_error(server, count, mode, samples, expected):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    def tensor(name, value, datatype):
        t = grpcclient.InferInput(name, list(value.shape), datatype)
        t.set_data_from_numpy(value)
        return t

    inputs = [tensor("AUDIO", np.zeros((1, samples), np.float32), "FP32"),
              tensor("CHANNEL_COUNT", np.array([[count]], np.int32), "INT32"),
              tensor("CHANNELS", np.array([[mode]], np.object_), "BYTES")]
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as refused:
            client.infer("asr_offline", inputs)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and expected in refused.value.message()


def _stream_finals(url: str, chunks, **options) -> list[dict]:
    """A stream's finals as segment dicts (its `channel` included when the server sent one)."""
    async def run():
        async with StreamingClient(url) as client:
            return [segment async for segment in client.stream(chunks, **options) if segment.final]

    return [{key: getattr(s, key) for key in KEYS + ("channel", "speaker")} for s in asyncio.run(run())]


def test_a_stream_recognises_each_channel_as_the_request_does(server, client, call, tmp_path):
    """Chunks of interleaved frames, each channel recognised on its own: the finals, in order of
    start, are the offline request's segments, channels and speaker labels included."""
    offline = _segments(client.transcribe(call, separate_channels=True), KEYS + ("channel", "speaker"))
    finals = _stream_finals(server.grpc_url, split_chunks(call, 100), channels=2, separate_channels=True)
    assert sorted(finals, key=lambda s: (s["start_ms"], s["channel"])) == offline
    assert [s["speaker"]["label"] for s in finals] == ["A", "B", "A"]  # in the order their speech ended
    path = tmp_path / "call.wav"
    sf.write(path, call, RATE, subtype="FLOAT")

    async def from_file():
        async with StreamingClient(server.grpc_url) as client:
            return [s async for s in client.stream_file(path, 250, separate_channels=True) if s.final]

    assert [(s.start_ms, s.channel, s.text) for s in asyncio.run(from_file())] == \
           [(s["start_ms"], s["channel"], s["text"]) for s in finals]


def test_a_stream_of_several_channels_is_their_mix_by_default(server, call):
    mixed = _stream_finals(server.grpc_url, split_chunks(call, 100), channels=2)
    assert mixed and all(s["channel"] is None for s in mixed)
    assert mixed == _stream_finals(server.grpc_url, split_chunks(call.mean(axis=1, dtype=np.float32), 100))


@pytest.mark.parametrize("count, mode, samples, expected", [
    (2, b"sideways", 3200, "CHANNELS must be one of mix, separate, got 'sideways'"),
    (9, b"separate", 9 * 1600, "audio must have 1 to 8 channels, got 9"),
    (2, b"separate", 3201, "a chunk of 3201 samples does not hold whole frames of 2 channels"),
])
def test_bad_channel_streams_are_the_callers_error(server, count, mode, samples, expected):
    from tritonasr.client.offline import tensor_input

    start = {"model_name": "asr_stream", "sequence_id": 4242, "sequence_start": True, "sequence_end": True,
             "inputs": [tensor_input("AUDIO", np.zeros((1, samples), np.float32), "FP32"),
                        tensor_input("CHANNEL_COUNT", np.array([[count]], np.int32), "INT32"),
                        tensor_input("CHANNELS", np.array([[mode]], np.object_), "BYTES")]}
    results, errors = asyncio.run(raw_stream(server.grpc_url, [start]))
    assert not results and len(errors) == 1 and expected in errors[0], errors


def test_a_long_recording_in_pieces_is_recognised_per_channel_as_in_one_request(server, client, call):
    """Past pieces_above_s a recording goes through asr_stream in chunks, its channels too."""
    from tritonasr.client.offline import OfflineClient

    progress = []
    with OfflineClient(server.grpc_url, timeout_s=300, pieces_above_s=5) as in_pieces:
        pieces = in_pieces.transcribe(call, separate_channels=True, on_progress=lambda done, total: progress.append(total))
    assert progress and set(progress) == {14000}  # ms of the call, not of its interleaved samples
    assert _segments(pieces, KEYS + ("channel", "speaker")) == \
           _segments(client.transcribe(call, separate_channels=True), KEYS + ("channel", "speaker"))
