"""The gRPC balancer: Debian's nginx, running the shipped deploy/nginx/tritonasr-grpc.conf, in front
of three real tritonservers. Calls are spread, not connections: through one client channel, 60
offline requests and 24 live streams land within ±20% of even on the three, each with its lone
result; and a server that is draining sends its share to the others through the client's retries."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tritonasr.audio import load_audio
from tritonasr.client.connection import Credentials
from tritonasr.client.offline import OfflineClient
from tritonasr.client.stream import StreamingClient, split_chunks
from tritonasr.paths import deploy_files
from tritonasr.recognition.admission import DRAINING, slot_directory, start_draining
from tritonasr.serving.server import ServerConfig, TritonServer, free_port

from conftest import DATA

pytestmark = pytest.mark.e2e

SHIPPED = deploy_files() / "nginx" / "tritonasr-grpc.conf"
MODELS = ["vad", "sensevoice", "asr_offline", "asr_stream"]
EVEN_WITHIN = 0.2


class Nginx:
    """nginx with the shipped server config, its upstream block listing `ports`, on a port of its own."""

    def __init__(self, binary: str, directory: Path, ports: list[int]):
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        shipped = SHIPPED.read_text()
        upstream = re.search(r"^(\s*)server 127\.0\.0\.1:8001 (.*);$", shipped, re.M)
        assert upstream and shipped.count("listen 8080 http2;") == 1
        servers = "\n".join(f"{upstream.group(1)}server 127.0.0.1:{port} {upstream.group(2)};" for port in ports)
        config = shipped.replace(upstream.group(0), servers).replace(
            "listen 8080 http2;", f"listen 127.0.0.1:{self.port} http2;")
        self.process: subprocess.Popen | None = None
        self.credentials: Credentials | None = None  # what its readiness check is made with
        self.write_config(config)

    def write_config(self, config: str) -> None:
        """`config` (an http-context file) inside an nginx.conf of this directory."""
        directory = self.directory
        (directory / "tritonasr-grpc.conf").write_text(config)
        (directory / "nginx.conf").write_text(f"""
            {"user root;" if os.geteuid() == 0 else ""}
            daemon off;
            worker_processes 1;
            pid {directory}/nginx.pid;
            error_log {directory}/error.log info;
            events {{ worker_connections 1024; }}
            http {{
                access_log {directory}/access.log;
                client_body_temp_path {directory}/body;
                proxy_temp_path {directory}/proxy;
                fastcgi_temp_path {directory}/fastcgi;
                uwsgi_temp_path {directory}/uwsgi;
                scgi_temp_path {directory}/scgi;
                include {directory}/tritonasr-grpc.conf;
            }}
        """)

    @property
    def url(self) -> str:
        return f"localhost:{self.port}"

    def start(self) -> "Nginx":
        check = subprocess.run([self.binary, "-t", "-p", str(self.directory), "-c", str(self.directory / "nginx.conf")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.process = subprocess.Popen([self.binary, "-p", str(self.directory), "-c", str(self.directory / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with OfflineClient(self.url, timeout_s=5, credentials=self.credentials) as client:
                    client.check_ready()
                return self
            except Exception:  # noqa: BLE001 - not listening yet
                assert self.process.poll() is None, (self.directory / "error.log").read_text()
                time.sleep(0.2)
        raise AssertionError("nginx did not come up: " + (self.directory / "error.log").read_text())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def fleet(model_repository, tmp_path_factory, nginx):
    servers = [TritonServer(ServerConfig(model_repository, free_port(), free_port(), free_port(), models=MODELS,
                                         extra_args=["--exit-timeout-secs=5"])) for _ in range(3)]
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda server: server.start(), servers))
        balancer = Nginx(nginx, tmp_path_factory.mktemp("nginx"), [server.config.grpc_port for server in servers]).start()
        try:
            yield servers, balancer
        finally:
            balancer.stop()
    finally:
        for server in servers:
            server.stop()


def _metric(server: TritonServer, name: str, **labels) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name in (name, f"{name}_total")  # (the parser names counters' samples *_total)
               and all(sample.labels.get(k) == v for k, v in labels.items()))


def _successes(servers, seconds: float) -> list[float]:
    """Offline requests of `seconds` each that each server transcribed. (Not Triton's
    nv_inference_request_success: a request answered through its response sender counts there
    whether the answer was a result or an error.)"""
    return [round(_metric(server, "tritonasr_audio_seconds", model="asr_offline") / seconds, 3) for server in servers]


def _even(counts: list[float], total: int) -> bool:
    share = total / len(counts)
    return all(abs(count - share) <= EVEN_WITHIN * share for count in counts)


def test_offline_requests_through_one_channel_are_spread_evenly(fleet):
    servers, balancer = fleet
    samples = load_audio(DATA / "one_phrase.wav").samples
    with OfflineClient(servers[0].grpc_url, timeout_s=60) as direct:
        alone = direct.transcribe(samples)
    before = _successes(servers, samples.size / 16000)
    with OfflineClient(balancer.url, timeout_s=60) as client:  # one gRPC channel for all 60
        results = [client.transcribe(samples) for _ in range(60)]
    counts = [round(after - was) for after, was in zip(_successes(servers, samples.size / 16000), before)]
    assert sum(counts) == 60 and _even(counts, 60), counts
    assert all(result == alone for result in results)


def test_live_streams_through_one_channel_are_spread_evenly_and_stay_whole(fleet):
    servers, balancer = fleet
    samples = load_audio(DATA / "pause_1s.wav").samples
    with OfflineClient(servers[0].grpc_url, timeout_s=60) as direct:
        expected = [(s["start_ms"], s["end_ms"], s["text"]) for s in direct.transcribe(samples)["segments"]]
    open_counts: list[list[float]] = []

    async def paced(chunks):
        for chunk in chunks:
            yield chunk
            await asyncio.sleep(0.1)  # real time: all 24 are open together for seconds

    async def run():
        async with StreamingClient(balancer.url, finish_timeout_s=60) as client:  # one channel
            async def one():
                return [(s.start_ms, s.end_ms, s.text)
                        async for s in client.stream(paced(split_chunks(samples, 100))) if s.final]

            async def watch():
                deadline = time.monotonic() + 6
                while time.monotonic() < deadline:
                    counts = await asyncio.to_thread(
                        lambda: [_metric(server, "tritonasr_open_streams") for server in servers])
                    open_counts.append(counts)
                    await asyncio.sleep(0.2)

            return await asyncio.gather(*(one() for _ in range(24)), watch())

    *finals, _ = asyncio.run(run())
    assert all(stream == expected for stream in finals)
    busiest = max(open_counts, key=sum)
    assert sum(busiest) == 24 and _even(busiest, 24), open_counts


def test_a_draining_server_sends_its_share_elsewhere_through_client_retries(fleet):
    servers, balancer = fleet
    samples = load_audio(DATA / "one_phrase.wav").samples
    draining = servers[0]
    speech = load_audio(DATA / "pause_1s.wav").samples
    with OfflineClient(servers[1].grpc_url, timeout_s=60) as direct:
        expected = [(s["start_ms"], s["end_ms"], s["text"]) for s in direct.transcribe(speech)["segments"]]
    refused_before = _metric(draining, "tritonasr_rejected", model="asr_offline", reason="draining")
    streams_refused_before = _metric(draining, "tritonasr_rejected", model="asr_stream", reason="draining")
    before = _successes(servers, samples.size / 16000)
    start_draining(draining.process.pid)

    async def streams():
        async with StreamingClient(balancer.url) as client:  # failover on by default
            runs = []
            for _ in range(3):  # in turn: one of them is sent to the draining server first
                stream = client.stream(split_chunks(speech, 100))
                runs.append(([(s.start_ms, s.end_ms, s.text) async for s in stream if s.final], stream.failovers))
            return runs

    try:
        with OfflineClient(balancer.url, timeout_s=60) as client:  # retries on by default
            results = [client.transcribe(samples) for _ in range(12)]
        streamed = asyncio.run(streams())
    finally:
        (slot_directory(draining.process.pid) / DRAINING).unlink()  # serving again, for what follows
    counts = [round(after - was) for after, was in zip(_successes(servers, samples.size / 16000), before)]
    assert len(results) == 12 and all(result["segments"] for result in results)
    assert counts[0] == 0 and counts[1] + counts[2] == 12, counts
    # Its share came to it first and was refused, then retried through the balancer.
    assert _metric(draining, "tritonasr_rejected", model="asr_offline", reason="draining") > refused_before
    # Streams too: refused at their start there, opened again elsewhere, nothing lost.
    assert [finals for finals, _ in streamed] == [expected] * 3
    assert sum(failovers for _, failovers in streamed) >= 1
    assert _metric(draining, "tritonasr_rejected", model="asr_stream", reason="draining") > streams_refused_before


def test_a_stream_whose_server_is_killed_goes_on_elsewhere_losing_nothing(fleet):
    """kill -9 of the server holding a live real-time stream: the client opens the stream again
    through the balancer and sends the audio after its last final; the caller gets every final
    once, equal to the offline transcript, in the stream's own timeline. (Kills a server: last.)"""
    servers, balancer = fleet
    speech = np.concatenate([load_audio(DATA / name).samples for name in ("pause_3s.wav", "pause_1s.wav")])
    with OfflineClient(servers[0].grpc_url, timeout_s=60) as direct:
        expected = [(s["start_ms"], s["end_ms"], s["text"]) for s in direct.transcribe(speech)["segments"]]
    assert len(expected) >= 4
    killed = {}

    async def run():
        async with StreamingClient(balancer.url, finish_timeout_s=60) as client:
            stream = client.stream(split_chunks(speech, 100), realtime=True)
            finals = []
            async for segment in stream:
                if segment.final:
                    finals.append(segment)
                    if len(finals) == 1:  # one final delivered: kill the server holding the stream
                        holder = await asyncio.to_thread(
                            lambda: [s for s in servers if _metric(s, "tritonasr_open_streams") > 0])
                        assert len(holder) == 1, holder
                        killed["server"] = holder[0]
                        holder[0].process.kill()
            return stream, finals

    stream, finals = asyncio.run(run())
    assert killed and killed["server"].process.wait(timeout=10) is not None
    assert stream.failovers == 1
    assert [(s.start_ms, s.end_ms, s.text) for s in finals] == expected
    assert [s.segment_index for s in finals] == list(range(len(expected)))
    assert stream.summary.segment_count == len(expected)
    assert abs(stream.summary.duration_ms - speech.size / 16) <= 100
