"""The speaker stage end to end: the real tritonserver, ERes2NetV2 (tiny, random weights) served as
`speaker`, the `speaker_registry` model over gRPC, and segments from asr_offline and asr_stream.

Random weights do not tell voices apart, only recordings (see conftest.TEST_SPEAKER_THRESHOLD):
the tests use the same recording where a real model would hear the same voice."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import soundfile as sf

from tritonasr.audio import load_audio
from tritonasr.client.offline import TranscriptionError
from tritonasr.client.speakers import SpeakerRegistryClient, run_speakers
from tritonasr.client.stream import StreamingClient, split_chunks

from conftest import DATA, conversation, TEST_SPEAKER_THRESHOLD

SPEAKERS = sorted((DATA / "speakers").glob("utt*.wav"))


def _utterance(i: int) -> np.ndarray:
    """Speaker utterance i, trimmed to whole 10 ms frames so that copies of it placed in a longer
    recording start on the same fbank frame grid (random weights are sensitive to the grid)."""
    samples = load_audio(SPEAKERS[i]).samples
    return samples[: samples.size // 160 * 160]


def _recording(path, i: int, gap_s: float = 1.0):
    """Utterance i alone, with the silence around it that it has in the calls below: with random
    weights, even where the segment ends has to match."""
    sf.write(path, conversation([0], [_utterance(i)], gap_s), 16000)
    return path


async def _stream_finals(url: str, samples: np.ndarray, chunk_ms=100, **options):
    async with StreamingClient(url) as client:
        return [seg async for seg in client.stream(split_chunks(samples, chunk_ms), **options) if seg.final]


@pytest.fixture()
def registry(server):
    with SpeakerRegistryClient(server.grpc_url) as client:
        yield client
        for speaker in client.list():
            client.remove(speaker["name"])


def test_served_embeddings_equal_in_process_ones(server, client, model_repository):
    from tritonasr.recognition.settings import SpeakerSettings
    from tritonasr.runtime.in_process import LocalPipeline

    threshold = float(TEST_SPEAKER_THRESHOLD)
    local = LocalPipeline(model_repository, speakers=SpeakerSettings(threshold=threshold, cluster_threshold=threshold))
    audio = conversation([0, 5, 2], [_utterance(i) for i in range(8)], gap_s=1.2)  # 2.5 s, 4.9 s, 2.9 s of speech
    served = client.transcribe(audio, return_embedding=True)["segments"]
    expected = local.transcribe(audio, return_embedding=True)["segments"]
    assert len(served) == len(expected) == 3
    for got, want in zip(served, expected):
        assert (got["start_ms"], got["end_ms"], got["speaker"]["label"]) == \
               (want["start_ms"], want["end_ms"], want["speaker"]["label"])
        np.testing.assert_allclose(got["speaker"]["embedding"], want["speaker"]["embedding"], atol=1e-5)
        assert abs(np.linalg.norm(got["speaker"]["embedding"]) - 1) < 1e-4
    # Without RETURN_EMBEDDING the speaker field has no vector; WITH_SPEAKER=false drops the stage.
    assert set(client.transcribe(audio)["segments"][0]["speaker"]) == {"id", "score", "label"}
    assert all(seg["speaker"] is None for seg in client.transcribe(audio, with_speaker=False)["segments"])


def test_short_segments_get_no_speaker(client):
    samples = np.concatenate([np.zeros(16000, np.float32), _utterance(0)[4800:4800 + 7200],  # 0.45 s
                              np.zeros(16000, np.float32)])
    segments = client.transcribe(samples)["segments"]
    assert segments and all(seg["end_ms"] - seg["start_ms"] < 1000 for seg in segments)
    assert all(seg["speaker"] is None for seg in segments)


def test_the_same_recording_three_times_gets_one_label(server, client):
    utterances = [_utterance(i) for i in range(8)]
    audio = conversation([0, 1, 0, 2, 0, 3], utterances, gap_s=1.5)
    offline = client.transcribe(audio)["segments"]
    labels = [seg["speaker"]["label"] for seg in offline]
    assert len(labels) == 6
    assert labels[0] == labels[2] == labels[4] == "A"
    # The other recordings are not that one (the test can fail both ways).
    assert {labels[1], labels[3], labels[5]}.isdisjoint({"A"})
    streamed = asyncio.run(_stream_finals(server.grpc_url, audio, chunk_ms=160))
    assert [seg.speaker["label"] for seg in streamed] == labels  # a stream labels as a file does


def test_enroll_then_identify_when_streamed(server, registry, tmp_path):
    alice = _recording(tmp_path / "alice.wav", 0)
    result = registry.enroll("alice", [alice])
    assert result["enrolled"] == "alice" and result["recordings"] == 1 and result["speech_ms"] > 1000
    assert [s["name"] for s in registry.list()] == ["alice"]

    known = asyncio.run(_stream_finals(server.grpc_url, load_audio(alice).samples, chunk_ms=80))
    assert len(known) == 1 and known[0].speaker["id"] == "alice"
    assert known[0].speaker["score"] > float(TEST_SPEAKER_THRESHOLD)
    stranger = asyncio.run(_stream_finals(server.grpc_url, _utterance(4)))
    assert len(stranger) == 1 and stranger[0].speaker["id"] is None
    assert stranger[0].speaker["score"] < float(TEST_SPEAKER_THRESHOLD)  # compared, not matched

    # In a longer call, alice's turns are named and the other voice keeps an anonymous label.
    call = conversation([0, 4, 0], [_utterance(i) for i in range(8)], gap_s=1.0)
    finals = asyncio.run(_stream_finals(server.grpc_url, call))
    assert [seg.speaker["id"] for seg in finals] == ["alice", None, "alice"]


def test_enrolling_from_several_files_and_replacing(registry, tmp_path):
    files = []
    for i in (1, 2):
        files.append(_recording(tmp_path / f"bob{i}.wav", i))
    both = registry.enroll("bob", files)
    assert both["recordings"] == 2
    with pytest.raises(TranscriptionError, match="'bob' is already enrolled"):
        registry.enroll("bob", files[:1])
    assert registry.enroll("bob", files[:1], replace=True)["speech_ms"] < both["speech_ms"]
    assert [s["name"] for s in registry.list()] == ["bob"]


def test_registry_bad_input_is_a_clear_error(registry, tmp_path):
    empty, silence = tmp_path / "empty.wav", tmp_path / "silence.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    sf.write(silence, np.zeros(32000, np.float32), 16000)
    with pytest.raises(TranscriptionError, match="empty.wav: .*empty"):
        registry.enroll("carol", [empty])
    with pytest.raises(TranscriptionError, match="silence.wav: no speech segment of at least 1000 ms"):
        registry.enroll("carol", [silence])
    with pytest.raises(TranscriptionError, match="no speaker named 'nobody' is enrolled"):
        registry.remove("nobody")
    with pytest.raises(TranscriptionError, match="a speaker name must not be empty"):
        registry.enroll("  ", [SPEAKERS[0]])
    from tritonasr.client.speakers import _action

    with pytest.raises(TranscriptionError, match="unknown ACTION 'rename'"):
        registry.infer([_action("rename")])
    assert registry.list() == []  # nothing half-enrolled


def test_registry_survives_a_restart(model_repository, registry, tmp_path, capsys):
    from tritonasr.serving.server import ServerConfig, TritonServer, free_port

    registry.enroll("dave", [_recording(tmp_path / "dave.wav", 3)])
    # A second server process on the same repository (only what the registry needs) reads the
    # store from disk.
    config = ServerConfig(model_repository, free_port(), free_port(), free_port(),
                          models=["vad", "speaker", "speaker_registry"], extra_args=["--exit-timeout-secs=5"])
    with TritonServer(config) as restarted:
        assert run_speakers("list", restarted.grpc_url) == 0
        assert capsys.readouterr().out.startswith("dave\t")
        assert run_speakers("remove", restarted.grpc_url, "dave") == 0
        assert run_speakers("remove", restarted.grpc_url, "dave") == 1
    assert "no speaker named 'dave'" in capsys.readouterr().err
    assert registry.list() == []  # the first server sees the removal made through the second


def test_text_first_finals_come_before_their_speakers_which_match(server):
    """A text-first stream gets each final at once (speaker pending) and its speaker in an update
    after it, in order; merged, they are the finals of a stream that waits for its speakers."""
    from tritonasr.client.stream import SpeakerUpdate

    utterances = [_utterance(i) for i in range(8)]
    audio = conversation([0, 1, 0, 2, 0, 3], utterances, gap_s=1.5)

    async def run():
        async with StreamingClient(server.grpc_url) as client:
            stream = client.stream(split_chunks(audio, 100), text_first=True)
            return [item async for item in stream], stream.finals

    waited = asyncio.run(_stream_finals(server.grpc_url, audio))
    items, merged = asyncio.run(run())
    finals = [item for item in items if not isinstance(item, SpeakerUpdate) and item.final]
    updates = [item for item in items if isinstance(item, SpeakerUpdate)]
    assert [f.segment_index for f in finals] == [u.segment_index for u in updates] == list(range(len(waited)))
    assert all(f.speaker is None and f.speaker_pending for f in finals)
    order = [("final", item.segment_index) if not isinstance(item, SpeakerUpdate) else ("speaker", item.segment_index)
             for item in items if isinstance(item, SpeakerUpdate) or item.final]
    assert all(order.index(("final", i)) < order.index(("speaker", i)) for i in range(len(waited)))
    keys = ("start_ms", "end_ms", "text", "speaker")
    assert [{k: getattr(merged[i], k) for k in keys} for i in range(len(waited))] == \
           [{k: getattr(seg, k) for k in keys} for seg in waited]
    assert len({seg.speaker["label"] for seg in waited}) >= 2  # (the labels carry information)


def test_two_servers_sharing_a_postgresql_store_see_each_others_enrollments(model_repository, postgres, tmp_path):
    """A fleet's shared store: an enrollment made through one server's speaker_registry names the
    speaker in the next stream of another server, and a removal unnames it; the password reaches
    both servers as $PGPASSWORD only."""
    from tritonasr.serving.server import ServerConfig, TritonServer, free_port

    store = postgres.new_database()
    registry_models, stream_models = ["vad", "speaker", "speaker_registry"], ["vad", "sensevoice", "speaker", "asr_stream"]
    servers = [TritonServer(ServerConfig(model_repository, free_port(), free_port(), free_port(), models=models,
                                         speaker_settings={"store": store}, extra_args=["--exit-timeout-secs=5"]))
               for models in (registry_models, stream_models)]
    alice = _recording(tmp_path / "alice.wav", 0)
    samples = load_audio(alice).samples
    try:
        for server in servers:
            server.start()
        enrolling, streaming = servers

        def speaker_id():
            (final,) = asyncio.run(_stream_finals(streaming.grpc_url, samples, chunk_ms=80))
            return final.speaker["id"]

        assert speaker_id() is None
        with SpeakerRegistryClient(enrolling.grpc_url) as registry:
            registry.enroll("alice", [alice])
            assert speaker_id() == "alice"
            registry.remove("alice")
        assert speaker_id() is None
    finally:
        for server in servers:
            server.stop()
