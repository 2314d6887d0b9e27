"""The pipelines' own metrics on Triton's /metrics (the Python backend's custom metrics API), and
every metric the Grafana dashboard queries, after a short run against the real tritonserver."""
from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import numpy as np
import pytest

from tritonasr.audio import load_audio
from tritonasr.client.offline import TranscriptionError, tensor_input
from tritonasr.client.stream import StreamingClient, split_chunks

from conftest import DATA


def _scrape(server) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        return response.read().decode()


def _sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, flags=re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _names(text: str) -> set[str]:
    return set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", text, flags=re.M))


async def _stream(url: str, samples: np.ndarray):
    async with StreamingClient(url) as client:
        stream = client.stream(split_chunks(samples, 200))
        return [segment async for segment in stream]


def _wait_for(condition, timeout_s: float = 10.0):
    """Triton refreshes the custom metrics on scrape, but a stream's last final may still be on its
    way, and asr_stream adds the audio it took in to its counter once a second."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return result


def _quiet(server) -> str:
    """/metrics once what earlier tests streamed is all counted: asr_stream adds the audio it took
    in once a second."""
    text = _scrape(server)
    for _ in range(20):
        time.sleep(1.5)
        again = _scrape(server)
        if _sum(again, "tritonasr_audio_seconds_total") == _sum(text, "tritonasr_audio_seconds_total"):
            return again
        text = again
    raise AssertionError("the audio counters did not settle")


def _offline_run(client) -> tuple[dict, str]:
    """A file through asr_offline, and a request at 44.1 kHz (sent raw: the client would resample)."""
    offline = client.transcribe_file(DATA / "pause_1s.wav")
    try:
        client.infer([tensor_input("AUDIO", np.zeros((1, 8000), np.float32), "FP32"),
                      tensor_input("SAMPLE_RATE", np.array([[44100]], np.int32), "INT32")])
    except TranscriptionError as exc:
        return offline, str(exc)
    return offline, "(accepted)"


@pytest.fixture(scope="module")
def short_run(server):
    """A whole file, a stream of another, and one bad request; /metrics before and after."""
    from tritonasr.client.offline import OfflineClient

    before = _quiet(server)
    with OfflineClient(server.grpc_url, timeout_s=600) as client:
        offline, bad = _offline_run(client)
    assert "16000 Hz" in bad
    streamed = load_audio(DATA / "pause_3s.wav").samples
    results = asyncio.run(_stream(server.grpc_url, streamed))
    finals = [segment for segment in results if segment.final]

    stream_s = streamed.size / 16000

    def settled():
        text = _scrape(server)
        done = _sum(text, "tritonasr_final_latency_seconds_count", model="asr_stream") - \
            _sum(before, "tritonasr_final_latency_seconds_count", model="asr_stream")
        counted = _sum(text, "tritonasr_audio_seconds_total", model="asr_stream") - \
            _sum(before, "tritonasr_audio_seconds_total", model="asr_stream")
        return text if done >= len(finals) and counted >= stream_s - 1e-3 else None

    after = _wait_for(settled) or _scrape(server)
    return {"before": before, "after": after, "offline": offline, "finals": finals,
            "offline_s": load_audio(DATA / "pause_1s.wav").samples.size / 16000, "stream_s": stream_s}


def _delta(run, name: str, **labels: str) -> float:
    return _sum(run["after"], name, **labels) - _sum(run["before"], name, **labels)


def test_pipeline_metrics_count_what_was_served(short_run):
    run = short_run
    assert run["offline"]["segments"] and run["finals"], "both files have speech"
    assert _delta(run, "tritonasr_segments_total", model="asr_offline", engine="sensevoice") == \
        len(run["offline"]["segments"])
    assert _delta(run, "tritonasr_segments_total", model="asr_stream", engine="sensevoice") == len(run["finals"])
    assert _delta(run, "tritonasr_audio_seconds_total", model="asr_offline") == pytest.approx(run["offline_s"], abs=1e-3)
    assert _delta(run, "tritonasr_audio_seconds_total", model="asr_stream") == pytest.approx(run["stream_s"], abs=1e-3)
    # One latency observation per final, each no longer than the whole stream took.
    assert _delta(run, "tritonasr_final_latency_seconds_count", model="asr_stream") == len(run["finals"])
    latency_sum = _delta(run, "tritonasr_final_latency_seconds_sum", model="asr_stream")
    assert 0 < latency_sum < 60 * len(run["finals"])
    assert _delta(run, "tritonasr_final_latency_seconds_bucket", model="asr_stream", le="+Inf") == len(run["finals"])
    # The stream's first segment ends in 3 s of silence: decoded ahead of it, and used.
    assert 1 <= _delta(run, "tritonasr_decodes_ahead_total", model="asr_stream", result="used") <= len(run["finals"])
    assert _delta(run, "tritonasr_errors_total", model="asr_offline", kind="bad_audio") == 1
    assert _sum(run["after"], "tritonasr_open_streams", model="asr_stream") == 0
    assert re.search(r'^tritonasr_inflight_requests\{[^}]*model="asr_offline"[^}]*\} 0$', run["after"], re.M)
    # Refusals by limit are on /metrics, at 0, before the first one.
    for reason in ("max_streams", "max_streams_per_client", "draining"):
        assert re.search(rf'^tritonasr_rejected_total\{{[^}}]*reason="{reason}"[^}}]*\}} 0$', run["after"], re.M)
    # Each instance is its own process with its own series; the label is not Prometheus's `instance`.
    assert re.search(r'^tritonasr_open_streams\{[^}]*model_instance="asr_stream_0_0"', run["after"], re.M)


def test_every_metric_the_dashboard_queries_is_served(short_run):
    from tritonasr.serving.dashboard import DASHBOARD, metric_names

    queried = metric_names(DASHBOARD)
    assert {"tritonasr_open_streams", "tritonasr_segments_total", "tritonasr_audio_seconds_total",
            "tritonasr_final_latency_seconds_bucket", "tritonasr_errors_total", "tritonasr_rejected_total"} <= queried
    # The GPU's own metrics exist only where Triton sees a GPU (DCGM); this server has none.
    gpu_only = {name for name in queried if name.startswith("nv_gpu_")}
    assert gpu_only <= {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes",
                        "nv_gpu_power_usage"}
    missing = queried - gpu_only - _names(short_run["after"])
    assert not missing, f"the dashboard queries metrics /metrics does not have: {sorted(missing)}"


def test_every_metric_the_alert_rules_watch_is_served(short_run):
    import yaml

    from tritonasr.paths import deploy_files
    from tritonasr.serving.dashboard import expression_metrics

    rules = yaml.safe_load((deploy_files() / "prometheus" / "alerts.yml").read_text())
    watched = set().union(*(expression_metrics(rule["expr"]) for group in rules["groups"] for rule in group["rules"]
                            if group["name"] != "tritonasr-gateway"))  # (the gateway's: tests/test_e2e_gateway.py)
    watched -= {"up"}  # Prometheus's own, per scrape
    assert {"tritonasr_requests_total", "tritonasr_max_streams"} <= watched
    missing = watched - _names(short_run["after"])
    assert not missing, f"the alert rules watch metrics /metrics does not have: {sorted(missing)}"
