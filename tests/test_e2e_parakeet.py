"""The parakeet engine end to end: the real tritonserver, parakeet_encoder + parakeet_decoder (a tiny
random-init Parakeet TDT built with NeMo's classes) under asr_offline and asr_stream, against NeMo's
own transcribe() of the same segments."""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tritonasr.audio import load_audio
from tritonasr.client.offline import OfflineClient, TranscriptionError
from tritonasr.client.stream import StreamingClient, split_chunks

from conftest import DATA

FILES = sorted(p.relative_to(DATA) for p in DATA.rglob("*.wav"))


@pytest.fixture(scope="module")
def parakeet(model_repository):
    """NeMo's model restored from the .nemo file the export read, and the served spec."""
    from tritonasr.export.parakeet import load_model
    from tritonasr.models.parakeet import ParakeetSpec

    meta = json.loads((model_repository / "parakeet_decoder" / "1" / "meta.json").read_text())
    return load_model(meta["source"]), ParakeetSpec.load(model_repository / "parakeet_decoder" / "1")


@pytest.fixture(scope="module")
def expected(parakeet):
    """Per file, NeMo's transcript of each segment the served pipeline found, as a segment would
    carry it: text and words with absolute times."""
    from tritonasr.export.parakeet import nemo_greedy
    from tritonasr.models.parakeet import TdtResult

    model, spec = parakeet

    def get(name, segments: list[dict]) -> list[dict]:
        samples = load_audio(DATA / name).samples
        audios = [samples[s["start_ms"] * 16: s["end_ms"] * 16] for s in segments]
        results = []
        for seg, ref in zip(segments, nemo_greedy(model, audios)):
            result = TdtResult(*(np.array(ref[k], np.int32) for k in ("tokens", "frames", "durations")))
            words = [{**w, "start_ms": w["start_ms"] + seg["start_ms"],
                      "end_ms": min(seg["end_ms"], w["end_ms"] + seg["start_ms"])} for w in spec.words(result)]
            results.append({"text": spec.text(result), "words": words, "tokens": len(ref["tokens"])})
        return results

    return get


def _transcripts(segments: list[dict]) -> list[dict]:
    return [{"text": s["text"], "words": s["words"]} for s in segments]


def test_served_transcripts_equal_nemo_single_and_batched(server, expected):
    with OfflineClient(server.grpc_url, timeout_s=600) as client:
        single = {name: client.transcribe_file(DATA / name, engine="parakeet")["segments"] for name in FILES}
    emitted = 0
    for name, segments in single.items():
        assert segments, f"{name}: no speech found"
        want = expected(name, segments)
        assert _transcripts(segments) == [{"text": w["text"], "words": w["words"]} for w in want], name
        emitted += sum(w["tokens"] for w in want)
        for seg in segments:
            assert seg["language"] == "en" and seg["emotion"] is None
            assert all(seg["start_ms"] <= w["start_ms"] <= w["end_ms"] <= seg["end_ms"] for w in seg["words"])
            starts = [w["start_ms"] for w in seg["words"]]
            assert starts == sorted(starts)
    assert emitted > 50, "the random model must emit tokens, or this test proves nothing"

    # All files at once: parakeet_encoder pads ragged batches, parakeet_decoder decodes them together.
    def one(name):
        with OfflineClient(server.grpc_url, timeout_s=600) as client:
            return client.transcribe_file(DATA / name, engine="parakeet")["segments"]

    with ThreadPoolExecutor(len(FILES)) as pool:
        batched = dict(zip(FILES, pool.map(one, FILES)))
    assert batched == single


def test_the_default_engine_and_unknown_engines(client):
    samples = load_audio(DATA / "one_phrase.wav").samples
    default = client.transcribe(samples)["segments"]
    assert default[0]["words"] is None and default[0]["event"] is not None  # sensevoice: tags, no words
    with pytest.raises(TranscriptionError, match="unknown ASR engine 'whisper'; this server runs: sensevoice, parakeet"):
        client.transcribe(samples, engine="whisper")
    with pytest.raises(TranscriptionError, match="parakeet engine transcribes English only"):
        client.transcribe(samples, engine="parakeet", language="zh")


@pytest.mark.parametrize("name", ["pause_1s.wav", "long_70s.wav"])
def test_streams_give_the_offline_transcripts(server, client, name):
    samples = load_audio(DATA / name).samples
    offline = client.transcribe(samples, engine="parakeet")["segments"]

    async def stream():
        async with StreamingClient(server.grpc_url) as streaming:
            live = streaming.stream(split_chunks(samples, 320), engine="parakeet", partial_interval_ms=1000)
            return [seg async for seg in live]

    results = asyncio.run(stream())
    finals = [seg for seg in results if seg.final]
    assert [(s.start_ms, s.end_ms, s.text, s.words) for s in finals] == \
           [(s["start_ms"], s["end_ms"], s["text"], s["words"]) for s in offline]
    partials = [seg for seg in results if not seg.final]
    assert partials and all(p.words is not None for p in partials)


def test_serve_time_default_engine_and_only_exported_models(model_repository, tmp_path):
    """A deployment that exported both engines but not `speaker`, served with
    `--asr-engine parakeet`: requests naming no engine get Parakeet, SenseVoice stays available,
    and segments carry no speaker (the stage's model is neither exported nor loaded)."""
    import shutil

    from tritonasr.repository.layout import exported_models
    from tritonasr.serving.server import ServerConfig, TritonServer, free_port

    repo = tmp_path / "repo"
    for model in ("vad", "sensevoice", "parakeet_encoder", "parakeet_decoder", "asr_offline", "asr_stream",
                  "speaker_registry"):
        shutil.copytree(model_repository / model, repo / model, ignore=shutil.ignore_patterns("*.db*"))
    models = exported_models(repo)
    assert models == ["asr_offline", "asr_stream", "parakeet_decoder", "parakeet_encoder", "sensevoice", "vad"]
    config = ServerConfig(repo, free_port(), free_port(), free_port(), models=models, asr_engine="parakeet",
                          extra_args=["--exit-timeout-secs=5"])
    samples = load_audio(DATA / "one_phrase.wav").samples
    with TritonServer(config) as server, OfflineClient(server.grpc_url, timeout_s=300) as client:
        default = client.transcribe(samples)["segments"]
        assert default and default[0]["words"] is not None and default[0]["speaker"] is None
        assert default == client.transcribe(samples, engine="parakeet")["segments"]
        assert client.transcribe(samples, engine="sensevoice")["segments"][0]["words"] is None
