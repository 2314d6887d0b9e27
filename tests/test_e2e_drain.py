"""Graceful drain: SIGTERM to the real `tritonasr serve` (a pod's preStop) turns readiness off and
refuses new streams and offline requests with a "draining" UNAVAILABLE, while the stream that was
open receives every final it would have and the offline request taken in is answered; then serve
exits 0 without waiting out its grace period."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tritonasr.audio import load_audio
from tritonasr.client.connection import NO_RETRY
from tritonasr.client.offline import OfflineClient, ServerBusyError
from tritonasr.client.stream import StreamError, StreamingClient, split_chunks
from tritonasr.serving.server import free_port

from conftest import DATA

pytestmark = pytest.mark.e2e

GRACE_S = 120


def _health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/health/ready", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


@pytest.fixture()
def serve(model_repository, tmp_path):
    """`tritonasr serve` in a process of its own, its ports and its stderr."""
    ports = {name: free_port() for name in ("grpc", "http", "metrics", "health")}
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tritonasr.cli", "serve", "--model-repository", str(model_repository), "--quiet",
         "--grpc-port", str(ports["grpc"]), "--http-port", str(ports["http"]),
         "--metrics-port", str(ports["metrics"]), "--health-port", str(ports["health"]),
         "--drain-seconds", str(GRACE_S), "--triton-arg=--exit-timeout-secs=5"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    health = f"http://127.0.0.1:{ports['health']}"
    try:
        _wait_for(lambda: _health(health)[0] == 200 or process.poll() is not None, 300, "serve ready")
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        yield process, f"localhost:{ports['grpc']}", health, f"http://127.0.0.1:{ports['metrics']}", tmp_path / "serve.log"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def _gauge(metrics: str, name: str) -> float:
    with urllib.request.urlopen(f"{metrics}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name)


async def _paced(chunks: list[np.ndarray], seconds_per_chunk: float):
    for chunk in chunks:
        yield chunk
        await asyncio.sleep(seconds_per_chunk)


def test_sigterm_drains_open_work_and_refuses_new(serve):
    process, url, health, metrics, log = serve
    samples = np.concatenate([load_audio(DATA / name).samples for name in ("pause_3s.wav", "pause_1s.wav")])
    long_request = np.concatenate([load_audio(DATA / "long_70s.wav").samples] * 4)  # 280 s
    with OfflineClient(url, timeout_s=120) as client:
        expected = [(s["start_ms"], s["end_ms"], s["text"]) for s in client.transcribe(samples)["segments"]]
        long_expected = client.transcribe(long_request)["segments"]
    assert len(expected) >= 3

    signalled = threading.Event()
    finals: list[tuple[tuple, float]] = []  # (segment, monotonic time received)
    offline: dict = {}

    async def open_stream():
        async with StreamingClient(url, finish_timeout_s=60) as client:
            # 100 ms chunks at twice real time: the 18 s stream lasts ~9 s; SIGTERM comes once it is open.
            async for s in client.stream(_paced(split_chunks(samples, 100), 0.05)):
                if s.final:
                    finals.append(((s.start_ms, s.end_ms, s.text), time.monotonic()))

    def long_offline():
        with OfflineClient(url, timeout_s=120) as client:
            offline["segments"] = client.transcribe(long_request)["segments"]
            offline["at"] = time.monotonic()

    stream_thread = threading.Thread(target=lambda: asyncio.run(open_stream()))
    offline_thread = threading.Thread(target=long_offline)
    stream_thread.start()
    _wait_for(lambda: _gauge(metrics, "tritonasr_open_streams") >= 1, 30, "the stream open")
    offline_thread.start()
    # SIGTERM once the model holds the request (tritonasr_inflight_requests): one still in Triton's
    # queue then is refused, by design.
    _wait_for(lambda: _gauge(metrics, "tritonasr_inflight_requests") >= 1, 30, "the long request taken in")
    process.send_signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    signalled.set()

    # Readiness goes off at once; the process keeps serving what it holds.
    status, body = _wait_for(lambda: (lambda r: r if r[0] == 503 else None)(_health(health)), 5, "not ready")
    assert body["state"] == "draining" and "left" in body["reason"], body

    # New work is refused, with the reason, as UNAVAILABLE (a client retries elsewhere).
    async def new_stream():
        async with StreamingClient(url) as client:
            return [s async for s in client.stream(split_chunks(samples[:16000], 100), retry=NO_RETRY)]

    with pytest.raises(StreamError) as refused:
        asyncio.run(new_stream())
    assert refused.value.code == "UNAVAILABLE" and "draining" in str(refused.value)
    with OfflineClient(url, timeout_s=30, retry=NO_RETRY) as client, pytest.raises(ServerBusyError, match="draining"):
        client.transcribe(samples[:16000])  # (ServerBusyError: UNAVAILABLE)

    stream_thread.join(timeout=90)
    offline_thread.join(timeout=120)
    # The open stream got every final, some of them after the signal; the request taken in
    # before it was answered in full, after it.
    assert [segment for segment, _ in finals] == expected
    assert any(at > signalled_at for _, at in finals)
    assert offline["segments"] == long_expected
    assert offline["at"] > signalled_at, "the long request finished before the drain began: make it longer"

    # Nothing left: serve stops well before its grace period and exits 0.
    assert process.wait(timeout=60) == 0
    assert time.monotonic() - signalled_at < GRACE_S / 2
    text = log.read_text()
    assert "tritonasr: drained" in text, text[-3000:]
