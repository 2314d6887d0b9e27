"""The per-session baseline of the load tests (loadtest/per_session.py): a real server process
running FunASR AutoModel (the real FSMN-VAD, a tiny random-init SenseVoice) behind its WebSocket
front, driven by the load tests' own clients (ws_offline, ws_stream). Results are compared with
FunASR's AutoModel in this process, same weights and kwargs."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tritonasr.audio import load_audio
from tritonasr.client.stream import split_chunks
from tritonasr.loadtest.per_session import (
    GENERATE_OPTIONS,
    AudioBuffer,
    PerSessionServer,
    automodel_kwargs,
    baseline_model_dirs,
)
from tritonasr.paths import sample_audio

from conftest import DATA

FILES = {"pause_1s": DATA / "pause_1s.wav", "sample": sample_audio(), "pause_3s": DATA / "pause_3s.wav"}
BOUNDARY_TOLERANCE_MS = 50


@pytest.fixture(scope="module")
def model_dirs():
    from tritonasr.export.sensevoice import random_model_dir
    from tritonasr.export.weights import fetch_vad_weights

    return random_model_dir("tiny"), fetch_vad_weights()


@pytest.fixture(scope="module")
def audio() -> dict[str, np.ndarray]:
    return {name: load_audio(path).samples for name, path in FILES.items()}


@pytest.fixture(scope="module")
def expected(model_dirs, audio) -> dict[str, dict]:
    """What FunASR's AutoModel gives in this process, per file: {"text", "segments"}."""
    import torch
    from funasr import AutoModel

    threads = torch.get_num_threads()  # AutoModel sets torch's global thread count: put it back after
    try:
        model = AutoModel(**automodel_kwargs(*model_dirs, torch_threads=1))
        results = {}
        for name, samples in audio.items():
            result = model.generate(input=samples, **GENERATE_OPTIONS)
            segments = [{"start_ms": s["start"], "end_ms": s["end"], "text": s["text"]}
                        for s in result[0]["sentence_info"]]
            results[name] = {"text": " ".join(s["text"] for s in segments), "segments": segments}
    finally:
        torch.set_num_threads(threads)
    return results


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    with PerSessionServer(*model_dirs, log_path=tmp_path_factory.mktemp("per-session") / "server.log") as running:
        yield running


def _raw(url: str):
    from websockets.sync.client import connect

    return connect(url, open_timeout=10, close_timeout=5, compression=None)


def _refusal(conn) -> tuple[dict, int]:
    """The server's error message and then its close code."""
    from websockets.exceptions import ConnectionClosed

    message = json.loads(conn.recv(timeout=30))
    with pytest.raises(ConnectionClosed) as closed:
        conn.recv(timeout=30)
    return message, closed.value.rcvd.code


def _wait_for_log(server: PerSessionServer, text: str, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while text not in (log := server.log_text()):
        assert time.monotonic() < deadline, f"{text!r} not in the server log:\n{server.log_tail()}"
        time.sleep(0.1)
    return log


def test_baseline_model_dirs(tmp_path, model_dirs):
    sensevoice, vad = model_dirs
    for model, meta in (("sensevoice", {"model_dir": str(sensevoice), "source": "iic/SenseVoiceSmall"}),
                        ("vad", {"source": str(vad)})):
        (tmp_path / model / "1").mkdir(parents=True)
        (tmp_path / model / "1" / "meta.json").write_text(json.dumps(meta))
    assert baseline_model_dirs(tmp_path) == (sensevoice, vad)

    (tmp_path / "vad" / "1" / "meta.json").write_text(json.dumps({"exported": "x"}))
    with pytest.raises(ValueError, match="has no 'source'"):
        baseline_model_dirs(tmp_path)
    (tmp_path / "vad" / "1" / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="export the model first"):
        baseline_model_dirs(tmp_path)


def test_audio_buffer_slices_across_chunks_and_drops_old_audio():
    buffer = AudioBuffer()
    for start in range(0, 100, 10):
        buffer.append(np.arange(start, start + 10, dtype=np.float32))
    np.testing.assert_array_equal(buffer.slice(15, 42), np.arange(15, 42))
    buffer.drop_before(25)  # whole chunks only: 20..29 stays
    assert buffer.start == 20
    np.testing.assert_array_equal(buffer.slice(20, 35), np.arange(20, 35))


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["pause_1s", "sample"])
def test_offline_matches_automodel_in_process(server, audio, expected, name):
    from tritonasr.loadtest.ws_offline import transcribe

    result = transcribe(server.url, audio[name], timeout_s=60)
    assert result == expected[name]
    assert len(result["segments"]) == 2  # two phrases, 1 s apart
    assert all(segment["text"] for segment in result["segments"])  # the random model emits tokens


@pytest.mark.e2e
def test_concurrent_sessions_get_their_own_results(server, audio, expected):
    from tritonasr.loadtest.ws_offline import transcribe

    names = ["pause_1s", "pause_3s"] * 2
    results: dict[int, dict] = {}
    barrier = threading.Barrier(len(names))

    def one(i: int) -> None:
        barrier.wait()
        results[i] = transcribe(server.url, audio[names[i]], timeout_s=60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(names))]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert expected["pause_1s"] != expected["pause_3s"]
    for i, name in enumerate(names):
        assert results[i] == expected[name], name


@pytest.mark.e2e
def test_one_connection_takes_several_files_in_small_messages(server, audio, expected):
    """sherpa-onnx's protocol in full: header and samples split over 10 KiB messages, a second
    file on the same connection, then "Done" and a normal close."""
    from websockets.exceptions import ConnectionClosedOK

    with _raw(server.url + "/any/path") as conn:
        for name in ("pause_1s", "pause_3s"):
            samples = audio[name]
            data = np.int32(16000).tobytes() + np.int32(samples.size * 4).tobytes() + samples.astype("<f4").tobytes()
            for start in range(0, len(data), 10240):
                conn.send(data[start:start + 10240])
            assert json.loads(conn.recv(timeout=60)) == expected[name]
        conn.send("Done")
        with pytest.raises(ConnectionClosedOK) as closed:
            conn.recv(timeout=10)
        assert closed.value.rcvd.code == 1000


@pytest.mark.e2e
@pytest.mark.parametrize("chunk_ms", [100, [5, 3, 1000, 10, 7, 250]], ids=["100ms", "uneven"])
def test_stream_finals_match_the_offline_segments(server, audio, expected, chunk_ms):
    """Chunks of 100 ms, and of uneven sizes down to 3 ms (under one fbank frame shift: FunASR's
    streaming VAD makes no feature frame of them)."""
    from tritonasr.loadtest.ws_stream import stream

    seen = []
    summary = stream(server.url + "/stream", audio["pause_1s"], chunk_ms=chunk_ms, realtime=False,
                     on_segment=seen.append, timeout_s=60)
    offline = expected["pause_1s"]["segments"]
    assert [s.segment_index for s in seen] == list(range(len(offline)))
    for got, want in zip(seen, offline, strict=True):
        assert got.final
        assert abs(got.start_ms - want["start_ms"]) <= BOUNDARY_TOLERANCE_MS, (got, want)
        assert abs(got.end_ms - want["end_ms"]) <= BOUNDARY_TOLERANCE_MS, (got, want)
        assert got.text  # SenseVoice ran on the segment's audio
        # The VAD closed the first segment on its end silence; the last one at the end of the audio.
        assert got.end_ms <= got.endpoint_ms <= summary["duration_ms"]
        assert got.latency_ms is not None and got.latency_ms >= 0
        assert got.after_endpoint_ms is not None and 0 <= got.after_endpoint_ms <= got.latency_ms
    assert seen[0].endpoint_ms < summary["duration_ms"]  # ended while audio was still coming
    assert summary["duration_ms"] == len(audio["pause_1s"]) * 1000 // 16000
    assert summary["segment_count"] == len(seen)
    assert summary["finals"] == seen
    assert summary["chunks"] == (80 if chunk_ms == 100 else len(split_chunks(audio["pause_1s"], chunk_ms)))
    assert 0 <= summary["first_response_ms"] <= summary["received_ms"]


@pytest.mark.e2e
def test_a_stream_without_audio_completes_empty(server):
    from tritonasr.loadtest.ws_stream import stream

    summary = stream(server.url + "/stream", np.zeros(0, np.float32), realtime=False, timeout_s=30)
    assert (summary["duration_ms"], summary["segment_count"], summary["finals"]) == (0, 0, [])
    assert summary["first_response_ms"] is None  # no chunk was sent


@pytest.mark.e2e
def test_bad_offline_input_is_refused_and_the_server_goes_on(server, audio, expected):
    from tritonasr.loadtest.ws_offline import transcribe

    samples = audio["pause_1s"]
    assert "sample rate 8000 Hz" in transcribe(server.url, samples, sample_rate=8000)["error"]
    nan = samples.copy()
    nan[100] = np.nan
    assert "NaN" in transcribe(server.url, nan)["error"]

    with _raw(server.url) as conn:
        conn.send("hello")
        message, code = _refusal(conn)
    assert "unexpected text message 'hello'" in message["error"] and code == 1003
    with _raw(server.url) as conn:  # the header announces more audio than the server takes
        conn.send(np.int32(16000).tobytes() + np.int32(601 * 16000 * 4).tobytes())
        message, code = _refusal(conn)
    assert "over the 600 s limit" in message["error"] and code == 1009
    with _raw(server.url) as conn:  # more bytes than announced
        conn.send(np.int32(16000).tobytes() + np.int32(8).tobytes() + np.zeros(4, "<f4").tobytes())
        message, code = _refusal(conn)
    assert "announced 8" in message["error"] and code == 1007

    assert transcribe(server.url, samples) == expected["pause_1s"]


@pytest.mark.e2e
def test_bad_stream_input_is_refused(server, audio):
    from tritonasr.audio import AudioError
    from tritonasr.loadtest.ws_stream import WebsocketStreamError, stream

    nan = audio["pause_1s"][:16000].copy()
    nan[8000] = np.inf
    with pytest.raises(AudioError, match="1 NaN or infinite"):  # the client checks before it sends
        stream(server.url + "/stream", nan, realtime=False)
    # The offline endpoint reads the first chunk as a header: refused while the client sends.
    with pytest.raises(WebsocketStreamError, match="refused the stream: sample rate .* is not supported"):
        stream(server.url + "/offline", audio["pause_1s"] + 0.01, realtime=False)
    with _raw(server.url + "/stream") as conn:
        conn.send(np.zeros(1600, "<f4").tobytes())
        conn.send(nan.astype("<f4").tobytes())
        message, code = _refusal(conn)
    assert "audio contains 1 NaN or infinite samples" in message["error"] and code == 1007
    with _raw(server.url + "/stream") as conn:
        conn.send(np.zeros(3 * 16000, "<f4").tobytes())
        message, code = _refusal(conn)
    assert "at most 2000 ms" in message["error"] and code == 1009
    with _raw(server.url + "/stream") as conn:
        conn.send(np.zeros(1600, "<f4").tobytes())
        conn.send("stop")
        message, code = _refusal(conn)
    assert "unexpected text message 'stop'" in message["error"] and code == 1003


@pytest.mark.e2e
def test_a_client_that_vanishes_mid_stream_frees_its_session(server, audio):
    from tritonasr.loadtest.ws_stream import stream

    samples = audio["pause_1s"]
    with _raw(server.url + "/stream") as conn:
        for start in range(0, 5 * 16000, 1600):  # 5 s: one segment closed, the next one open
            conn.send(samples[start:start + 1600].astype("<f4").tobytes())
        assert json.loads(conn.recv(timeout=30))["final"]
        conn.socket.shutdown(socket.SHUT_RDWR)  # gone without a close frame, as a dropped caller
    log = _wait_for_log(server, "client went away (no close frame)")
    line = [line for line in log.splitlines() if "client went away" in line][-1]
    assert "0 session(s) open" in line, line

    summary = stream(server.url + "/stream", samples, realtime=False, timeout_s=60)
    assert summary["segment_count"] == 2


@pytest.mark.e2e
def test_streams_run_concurrently_in_gevent_greenlets(server, audio):
    """Locust's setting: gevent's monkey.patch_all(), one greenlet per user, real-time pacing.
    Four 5.5 s streams at once take about 5.5 s, not 22 s."""
    script = f"""
from gevent import monkey
monkey.patch_all()
import json, time
import gevent
import numpy as np
from tritonasr.audio import load_audio
from tritonasr.client.stream import split_chunks
from tritonasr.loadtest.ws_stream import stream
samples = load_audio({str(FILES["pause_1s"])!r}).samples[:88000]  # 5.5 s: one segment closed, one open
began = time.monotonic()
jobs = [gevent.spawn(stream, {server.url + "/stream"!r}, samples, realtime=True, timeout_s=30) for _ in range(4)]
gevent.joinall(jobs, raise_error=True)
print(json.dumps({{"wall_s": time.monotonic() - began,
                  "summaries": [{{k: v for k, v in job.value.items() if k != "finals"}} for job in jobs],
                  "latencies": [[s.latency_ms for s in job.value["finals"]] for job in jobs]}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["wall_s"] < 9.0, report  # concurrent: 5.5 s of audio plus processing, not 4 x 5.5 s
    for summary, latencies in zip(report["summaries"], report["latencies"]):
        assert summary["duration_ms"] == 5500 and summary["segment_count"] == 2
        assert summary["first_response_ms"] is not None
        assert all(latency is not None and latency >= 0 for latency in latencies)
