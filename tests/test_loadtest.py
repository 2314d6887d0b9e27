"""Load tests: the sweep's timetable, the report's arithmetic, Triton's metrics, and a short
sweep of every system end to end (real Triton, real baselines, Locust as a subprocess) whose
report is parsed back and checked against what was sent."""
from __future__ import annotations

import csv
import http.server
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tritonasr.loadtest import workload
from tritonasr.loadtest.report import (ALL, WINDOW_RULE, Window, build, level_figures, render, requests, windows,
                                      write_report)
from tritonasr.loadtest.sweep_plan import SweepPlan, number_list
from tritonasr.loadtest.triton_metrics import counter_deltas, parse

METRICS = """\
# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="sensevoice",version="1"} 40
nv_inference_request_success{model="vad",version="1"} 10
# TYPE nv_inference_count counter
nv_inference_count{model="sensevoice",version="1"} 40
nv_inference_count{model="vad",version="1"} 10
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="sensevoice",version="1"} 16
nv_inference_exec_count{model="vad",version="1"} 10
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="sensevoice",version="1"} 80000
nv_inference_queue_duration_us{model="vad",version="1"} 500
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="x"} 0.5
"""


def test_plan_levels_and_windows():
    plan = SweepPlan(levels=(1, 4), settle_s=2.0, hold_s=8.0)
    assert [plan.level_at(t) for t in (0, 9.9, 10, 19.9, 20)] == [1, 1, 4, 4, None]
    assert plan.hold_window(1) == (10.0, 12.0, 20.0)
    assert plan.duration_s == 20.0
    assert number_list(int)("1,2, 4") == (1, 2, 4)
    for bad in ("", "1,x", "0,2"):
        with pytest.raises(ValueError):
            number_list(int)(bad)


def test_metrics_parse_and_deltas():
    before = parse(METRICS)
    assert before["sensevoice"] == {"requests": 40, "inferences": 40, "executions": 16, "queue_us": 80000,
                                    "compute_us": 0}
    after = parse(METRICS.replace("} 40", "} 70").replace("} 16", "} 22"))
    deltas = counter_deltas(before, after)
    assert set(deltas) == {"sensevoice"}  # vad did nothing in between
    assert deltas["sensevoice"]["inferences"] / deltas["sensevoice"]["executions"] == 5.0


def _row(kind, started, ended, latency_ms, audio_s=10.0, ok=True):
    return {"kind": kind, "name": "10 s clip", "started_s": started, "ended_s": ended, "latency_ms": latency_ms,
            "audio_s": audio_s, "ok": ok}


def test_level_figures_count_the_hold_window():
    window = Window(index=1, users=2, start_s=10.0, hold_start_s=12.0, end_s=22.0, client_cpu_s=1.0)
    rows = [
        _row("offline", 5.0, 11.0, 6000),  # ended before the hold: not counted
        _row("offline", 8.0, 13.0, 5000),  # started at the previous level: counted all the same
        _row("offline", 12.0, 14.0, 2000),
        _row("offline", 14.0, 16.0, 2000),
        _row("offline", 16.0, 19.0, 3000, ok=False),
        _row("offline", 19.0, 23.0, 4000),  # ended after the hold
        _row("final", 12.0, 14.0, 100),  # another kind
    ]
    f = level_figures(rows, window, "offline")
    assert (f["completed"], f["failed"]) == (4, 1)
    assert f["error_rate"] == 0.25
    assert f["qps"] == pytest.approx(3 / 10)
    assert f["rtfx"] == pytest.approx(30 / 10)
    assert (f["p50_ms"], f["mean_ms"], f["max_ms"]) == (2000, 3000, 5000)
    assert f["client_cpu"] == pytest.approx(0.1)


def _write_csv(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def test_report_names_levels_not_measured_or_without_completions(tmp_path):
    """A level without a window says so with the sweep's reason; one in which nothing completed
    says that too."""
    run = {"date": "2026-01-01", "machine": "m", "gpu": "", "cpus": 2, "command": "c", "workload": "offline",
           "plan": {"levels": [1, 2, 4], "settle_s": 1.0, "hold_s": 2.0}, "clip_seconds": [60], "raw": None,
           "systems": [{"name": "tritonasr", "description": "d",
                        "not_measured": "Locust ended before their hold windows did (exit code 2)"}]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    _write_csv(tmp_path / "tritonasr_levels.csv",
               [["level", "users", "start_s", "hold_start_s", "end_s", "client_cpu_s"],
                [0, 1, 0, 1, 3, 0.1], [1, 2, 3, 4, 6, 0.1]])
    _write_csv(tmp_path / "tritonasr_requests.csv",
               [["kind", "name", "started_s", "ended_s", "latency_ms", "audio_s", "ok", "error"],
                ["offline", "60 s clip", 0.5, 2.5, 2000, 60, 1, ""]])
    report = build(tmp_path)
    assert report["results"]["tritonasr"]["not_measured"] == [4]
    text = render(report)
    assert WINDOW_RULE in text
    assert "- **tritonasr, 4 callers: not measured**: Locust ended before their hold windows did (exit code 2)" in text
    assert ("- tritonasr, 2 callers: no request completed in the 2 s hold: latency exceeds the hold; raise --hold"
            in text)
    assert "tritonasr, 1 caller:" not in text
    # With nothing completed anywhere, the plots are drawn all the same.
    _write_csv(tmp_path / "tritonasr_requests.csv",
               [["kind", "name", "started_s", "ended_s", "latency_ms", "audio_s", "ok", "error"]])
    write_report(tmp_path)
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_levels_are_unmeasured_when_the_requests_file_was_lost(tmp_path):
    """A Locust killed before its requests reached the disk leaves an empty file: every level is
    then unmeasured (not "no request completed")."""
    from tritonasr.loadtest.report import unmeasured

    _write_csv(tmp_path / "tritonasr_levels.csv",
               [["level", "users", "start_s", "hold_start_s", "end_s", "client_cpu_s"], [0, 1, 0, 1, 3, 0.1]])
    (tmp_path / "tritonasr_requests.csv").write_text("")
    assert unmeasured(tmp_path / "tritonasr", [1, 2]) == [1, 2]
    _write_csv(tmp_path / "tritonasr_requests.csv",
               [["kind", "name", "started_s", "ended_s", "latency_ms", "audio_s", "ok", "error"]])
    assert unmeasured(tmp_path / "tritonasr", [1, 2]) == [2]


def test_clips_are_exact_lengths_of_speech_and_differ():
    a, b = workload.clip(15, 0), workload.clip(15, 1)
    assert a.size == b.size == 15 * 16000
    assert not np.array_equal(a, b)
    assert np.abs(a).max() > 0.1  # speech, not silence
    assert np.array_equal(workload.clip(15, workload.CLIP_VARIANTS), a)
    assert len(workload.all_clips([15, 30])) == 2 * workload.CLIP_VARIANTS


# -- a short sweep end to end --------------------------------------------------------------------

def _markdown_rows(text: str, header_start: str) -> list[dict]:
    """The rows of the Markdown table whose header line starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


@pytest.fixture(scope="module")
def offline_sweep(model_repository, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    command = [sys.executable, "-m", "tritonasr.cli", "loadtest", "sweep", "--model-repository", str(model_repository),
               "--out", str(out), "--levels", "1,3", "--settle", "2", "--hold", "5", "--clip-seconds", "5,10",
               "--raw-min-seconds", "1", "--raw-batch-sizes", "1,4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.e2e
def test_short_sweep_report_matches_what_was_sent(offline_sweep):
    report = (offline_sweep / "report.md").read_text()
    data = json.loads((offline_sweep / "report.json").read_text())
    for png in ("latency.png", "throughput.png"):
        assert (offline_sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _markdown_rows(report, "| system | clip | callers |")
    systems = {r["system"] for r in rows}
    assert systems == {"tritonasr", "per-session", "sherpa-onnx"}
    for system in systems:
        for users in ("1", "3"):
            level = {r["clip"]: r for r in rows if r["system"] == system and r["callers"] == users}
            assert set(level) == {"5 s clip", "10 s clip", ALL}
            clips = [level["5 s clip"], level["10 s clip"]]
            # Every request got its answer, and the counts add up.
            assert all(r["errors"] == "0.0%" for r in level.values()), level
            assert int(level[ALL]["requests"]) == sum(int(r["requests"]) for r in clips) > 0
            # Throughput is the audio the requests carried: QPS x clip length, per length and in all.
            for r, seconds in zip(clips, (5, 10)):
                assert float(r["RTFx"]) == pytest.approx(float(r["QPS"]) * seconds, rel=0.02, abs=0.2)
            assert float(level[ALL]["RTFx"]) == pytest.approx(sum(float(r["RTFx"]) for r in clips), rel=0.02, abs=0.2)
            for r in level.values():
                if r["p50"] != "–":
                    assert float(r["p50"]) <= float(r["p95"]) <= float(r["p99"])
                    assert float(r["mean"]) > 0
    # Locust's own statistics agree: no failures, at least the requests the report counted.
    for system in systems:
        with open(offline_sweep / f"{system}_stats.csv", newline="") as handle:
            aggregated = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
        assert int(aggregated["Failure Count"]) == 0
        counted = sum(int(r["requests"]) for r in rows if r["system"] == system and r["clip"] == ALL)
        assert int(aggregated["Request Count"]) >= counted
    # Triton's own counters agree with the client's: requests completed in the same window, give
    # or take those in flight at its two edges.
    server = {int(r["callers"]): r for r in _markdown_rows(report, "| callers | model |") if r["model"] == "asr_offline"}
    for level in data["results"]["tritonasr"]["levels"][ALL]:
        assert abs(int(server[level["users"]]["requests"]) - level["completed"]) <= level["users"]
        assert float(server[level["users"]]["mean batch"]) >= 1
    assert data["run"]["raw"]["best"] > 0


@pytest.mark.e2e
def test_short_stream_sweep_times_every_final(model_repository, tmp_path):
    """Real-time streams through tritonasr (gRPC) and the per-session baseline (WebSocket):
    every stream completes, its finals are timed, and sherpa-onnx is reported as skipped."""
    command = [sys.executable, "-m", "tritonasr.cli", "loadtest", "sweep", "--workload", "stream",
               "--model-repository", str(model_repository), "--out", str(tmp_path), "--levels", "2",
               "--settle", "1", "--hold", "14", "--stream-seconds", "8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads((tmp_path / "report.json").read_text())
    assert [s.get("skipped") is not None for s in data["run"]["systems"]] == [False, False, True]
    rows = _markdown_rows((tmp_path / "report.md").read_text(), "| system | streams |")
    assert {r["system"] for r in rows} == {"tritonasr", "per-session"}
    for system in ("tritonasr", "per-session"):
        levels = data["results"][system]["levels"]
        final, stream = levels["final"][0], levels["stream"][0]
        assert stream["failed"] == 0 and stream["completed"] >= 2  # both callers finished a call
        assert final["completed"] >= stream["completed"]  # each 8 s call holds several sentences
        assert 0 < final["p50_ms"] <= final["p95_ms"] <= final["p99_ms"] < 10_000
        assert levels["first_response"][0]["completed"] == stream["completed"]


# Offline callers whose every request takes 2.2 s, longer than the 2 s hold; with the sweep's shape,
# options and events.
SLOW_CALLERS = """
import gevent

from tritonasr.loadtest.locustfile import OfflineCaller, SweepShape  # noqa: F401


class SlowCaller(OfflineCaller):
    def transcribe(self, samples):
        gevent.sleep(2.2)
"""


def test_sweep_records_every_level_when_requests_outlast_the_hold_and_metrics_are_slow(tmp_path):
    """Locust with the sweep shape, callers slower than the hold and a metrics endpoint that
    takes 4 s to answer the last level's scrape (as Triton's can under load): both levels are
    recorded on the plan's timetable with their server counters, and each counts the requests
    that completed in its hold, including those started before it."""
    scrapes = []

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            scrapes.append(self.path)
            if len(scrapes) == 4:  # the end of the last level
                threading.Event().wait(4)
            n = 10 * len(scrapes)
            body = f'nv_inference_request_success{{model="asr_offline",version="1"}} {n}\n' \
                   f'nv_inference_exec_count{{model="asr_offline",version="1"}} {n}\n'
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    metrics = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=metrics.serve_forever, daemon=True).start()
    locustfile = tmp_path / "slow_callers.py"
    locustfile.write_text(SLOW_CALLERS)
    prefix = tmp_path / "slow"
    try:
        done = subprocess.run([sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--only-summary",
                               "--loglevel", "WARNING", "--csv", str(prefix), "--levels", "1,2", "--settle", "1",
                               "--hold", "2", "--clip-seconds", "5",
                               "--metrics-url", f"http://127.0.0.1:{metrics.server_port}/metrics", "SlowCaller"],
                              capture_output=True, text=True, timeout=120)
    finally:
        metrics.shutdown()
    assert done.returncode == 0, done.stderr[-4000:]
    levels = windows(prefix)
    assert [(w.users, w.start_s) for w in levels] == [(1, 0.0), (2, 3.0)]
    for w, planned in zip(levels, (1.0, 4.0)):
        assert w.hold_start_s == pytest.approx(planned, abs=0.3) and w.hold_s == pytest.approx(2.0, abs=0.3)
    with open(f"{prefix}_server.csv", newline="") as handle:
        assert [(r["users"], r["model"]) for r in csv.DictReader(handle)] == [("1", "asr_offline"),
                                                                                ("2", "asr_offline")]
    rows = requests(prefix)
    first, second = (level_figures(rows, w, "offline") for w in levels)
    # Level 1: the first request (started before the hold); level 2: the first caller's second
    # request, started at level 1, and the second caller's first.
    assert (first["completed"], second["completed"]) == (1, 2)
    assert second["rtfx"] == pytest.approx(2 * 5 / levels[1].hold_s)
    assert second["p50_ms"] == pytest.approx(2200, abs=100)
    assert any(r["started_s"] < levels[1].start_s <= levels[1].hold_start_s <= r["ended_s"] for r in rows)


@pytest.mark.e2e
def test_sweep_whose_requests_outlast_the_hold_reports_every_level(model_repository, tmp_path):
    """300 s clips take about a second here, longer than the 0.5 s hold: each level still has its
    row, counting the requests that completed in its hold though they started before it, or
    saying that none did."""
    command = [sys.executable, "-m", "tritonasr.cli", "loadtest", "sweep", "--systems", "tritonasr", "--no-raw",
               "--model-repository", str(model_repository), "--out", str(tmp_path), "--levels", "1,2",
               "--settle", "1", "--hold", "0.5", "--clip-seconds", "300"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = (tmp_path / "report.md").read_text()
    assert WINDOW_RULE in report
    rows = {r["callers"]: r for r in _markdown_rows(report, "| system | clip |") if r["clip"] == ALL}
    sent = requests(tmp_path / "tritonasr")
    levels = windows(tmp_path / "tritonasr")
    assert [w.users for w in levels] == [1, 2] and set(rows) == {"1", "2"}
    for w in levels:
        row = rows[str(w.users)]
        completed = [r for r in sent if w.hold_start_s <= r["ended_s"] <= w.end_s]
        assert int(row["requests"]) == len(completed)
        if completed:
            assert all(r["ok"] and r["started_s"] < w.hold_start_s for r in completed)
            assert float(row["RTFx"]) == pytest.approx(300 * len(completed) / w.hold_s, rel=0.02)
            assert float(row["p50"]) == pytest.approx(np.median([r["latency_ms"] for r in completed]) / 1000, abs=0.01)
        else:
            assert (f"- tritonasr, {w.users} caller{'s' * (w.users != 1)}: no request completed in the 0.5 s hold"
                    in report)


# -- the gateway system: its clients, and a short sweep ------------------------------------------

def test_server_timing_header():
    from tritonasr.loadtest.ws_gateway import server_timing

    assert server_timing("queue;dur=0.1, decode;dur=12.5, triton;dur=840.0") == \
        {"queue": 0.1, "decode": 12.5, "triton": 840.0}
    assert server_timing('cache;desc="hit", db;dur="53"; desc=x, bad;dur=x') == {"db": 53.0}
    assert server_timing("") == {}


def test_gateway_client_addresses_keys_and_wav(monkeypatch):
    from tritonasr.audio import load_audio
    from tritonasr.loadtest.ws_gateway import api_key_from_environment, auth_headers, stream_url, wav_bytes

    assert stream_url("http://127.0.0.1:8080") == "ws://127.0.0.1:8080/v1/stream"
    assert stream_url("https://asr.example.com/") == "wss://asr.example.com/v1/stream"
    assert stream_url("localhost:8080") == "ws://localhost:8080/v1/stream"
    monkeypatch.setenv("TRITONASR_API_KEY", "first-key,second-key")
    assert api_key_from_environment() == "first-key"
    assert auth_headers("first-key") == {"Authorization": "Bearer first-key"}
    monkeypatch.delenv("TRITONASR_API_KEY")
    assert api_key_from_environment() is None and auth_headers(None) == {}
    samples = workload.clip(2, 0)
    audio = load_audio(io.BytesIO(wav_bytes(samples)))
    assert audio.sample_rate == 16000 and audio.samples.size == samples.size
    assert np.abs(audio.samples - samples).max() <= 1 / 32767  # 16-bit PCM


def test_sweep_lists_the_gateway_and_says_when_its_extra_is_missing(monkeypatch, capsys):
    import argparse

    from tritonasr.loadtest import sweep

    assert "gateway" in sweep.SYSTEMS and "gateway" in sweep.DESCRIPTIONS
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    assert parser.parse_args([]).systems == "tritonasr,per-session,sherpa-onnx"  # the baselines' comparison
    command = sweep.GatewayProcess("127.0.0.1:8001", max_inflight=32).command()
    assert command[command.index("--url") + 1] == "127.0.0.1:8001"
    assert command[command.index("--max-inflight") + 1] == "32"
    monkeypatch.setattr(sweep, "missing_gateway_extra", lambda: ("uvicorn",))
    assert sweep.main(parser.parse_args(["--systems", "tritonasr,gateway"])) == 2
    assert "pip install 'tritonasr[gateway]' (not installed: uvicorn)" in capsys.readouterr().err


GATEWAY_KEY = "loadtest-gateway-key"


@pytest.fixture(scope="module")
def loadtest_gateway(server, tmp_path_factory):
    from test_e2e_gateway import Gateway

    running = Gateway(server.grpc_url, "--api-key", GATEWAY_KEY,
                      log=tmp_path_factory.mktemp("loadtest_gateway") / "log")
    yield running
    running.stop()


def _as_sent(samples: np.ndarray) -> np.ndarray:
    """The samples as the gateway decodes them from the users' 16-bit audio."""
    from tritonasr.audio import decode, encode

    return decode(encode(samples, "pcm16"), "pcm16")


@pytest.mark.e2e
def test_gateway_offline_user_gets_the_servers_transcript_and_fails_on_errors(server, loadtest_gateway):
    """GatewayOfflineUser's request: the transcript the client library gets straight from Triton
    for the same 16-bit audio, without the speaker stage; refusals raise."""
    import requests

    from tritonasr.client.offline import OfflineClient
    from tritonasr.gateway.transcriptions import joined_text
    from tritonasr.loadtest.ws_gateway import GatewayError, transcribe

    samples = workload.clip(5, 1)
    with requests.Session() as session:
        results = [transcribe(loadtest_gateway.url, samples, session=session, api_key=GATEWAY_KEY) for _ in range(2)]
        with OfflineClient(server.grpc_url, timeout_s=120) as client:
            direct = client.transcribe(_as_sent(samples), with_speaker=False)
        assert direct["segments"] and all(s.get("speaker") is None for s in direct["segments"])
        for result in results:  # the second one over the session's kept-alive connection
            assert result["text"] == joined_text(direct["segments"])
            assert result["usage"]["seconds"] == pytest.approx(5.0)
        with pytest.raises(GatewayError, match="answered 401: invalid_api_key") as refused:
            transcribe(loadtest_gateway.url, samples, session=session)
        assert refused.value.status == 401
        with pytest.raises(GatewayError, match="answered 400: model_not_found"):
            transcribe(loadtest_gateway.url, samples, session=session, api_key=GATEWAY_KEY, model="whisper-0")
    from tritonasr.serving.server import free_port

    with pytest.raises(GatewayError, match="cannot talk to"):
        transcribe(f"http://127.0.0.1:{free_port()}", samples, api_key=GATEWAY_KEY)


@pytest.mark.e2e
def test_gateway_stream_user_times_the_servers_finals_and_fails_on_refusals(server, loadtest_gateway):
    """GatewayStreamUser's stream, paced in real time: the finals a gRPC stream of the same
    16-bit audio gets, each timed from the frame holding its end to its arrival, and the first
    response; refusals raise with the gateway's error code."""
    import time

    import tritonclient.grpc as grpcclient

    from tritonasr.loadtest.grpc_stream import run_stream
    from tritonasr.loadtest.ws_gateway import stream, stream_url
    from tritonasr.loadtest.ws_stream import WebsocketStreamError

    samples = workload.stream_audio(5, 0)  # two sentences, 6.9 s
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        direct = run_stream(client, _as_sent(samples), chunk_ms=100, realtime=False, with_speaker=False)
    finally:
        client.close()
    assert len(direct.finals) >= 2
    url = stream_url(loadtest_gateway.url)
    seen = []
    began = time.monotonic()
    summary = stream(url, samples, chunk_ms=100, realtime=True, api_key=GATEWAY_KEY, on_segment=seen.append)
    assert time.monotonic() - began >= workload.seconds(samples) - 0.1  # paced as recorded
    assert [(s.start_ms, s.end_ms, s.text) for s in seen] == [(s.start_ms, s.end_ms, s.text) for s in direct.finals]
    assert summary["finals"] == seen and summary["segment_count"] == len(seen)
    assert summary["duration_ms"] == samples.size * 1000 // 16000
    assert summary["chunks"] == -(-samples.size // 1600) and summary["request_id"]
    for segment in seen:
        assert segment.speaker is None  # speaker stage off
        assert segment.latency_ms is not None and 0 <= segment.latency_ms < 5000, segment
        assert 0 <= segment.after_endpoint_ms <= segment.latency_ms
    assert seen[0].received_ms < seen[-1].received_ms - 1000  # the first sentence's final came mid-stream
    assert 0 < summary["first_response_ms"] <= seen[0].received_ms + 1
    with pytest.raises(WebsocketStreamError, match="refused the stream: invalid_api_key"):
        stream(url, samples[:16000], realtime=False)
    with pytest.raises(WebsocketStreamError, match="refused the stream: invalid_option"):
        stream(url, samples[:16000], realtime=False, api_key=GATEWAY_KEY, languge="en")
    from tritonasr.serving.server import free_port

    with pytest.raises(WebsocketStreamError, match="cannot talk to"):
        stream(f"ws://127.0.0.1:{free_port()}/v1/stream", samples[:16000], realtime=False)


@pytest.mark.e2e
def test_short_gateway_sweep_reports_the_gateway(model_repository, tmp_path):
    """`--systems gateway`: the embedded Triton with `tritonasr gateway` in front, swept by
    GatewayOfflineUser: every request answered, its level in the report with Triton's counters,
    the gateway's log in the run directory."""
    command = [sys.executable, "-m", "tritonasr.cli", "loadtest", "sweep", "--systems", "gateway", "--no-raw",
               "--model-repository", str(model_repository), "--out", str(tmp_path), "--levels", "1",
               "--settle", "1", "--hold", "4", "--clip-seconds", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads((tmp_path / "report.json").read_text())
    assert [s["name"] for s in data["run"]["systems"]] == ["gateway"]
    report = (tmp_path / "report.md").read_text()
    rows = {r["clip"]: r for r in _markdown_rows(report, "| system | clip |")}
    assert set(rows) == {"5 s clip", ALL}
    assert all(r["system"] == "gateway" and r["callers"] == "1" for r in rows.values())
    level = rows[ALL]
    assert level["errors"] == "0.0%" and int(level["requests"]) > 0
    assert float(level["RTFx"]) == pytest.approx(float(level["QPS"]) * 5, rel=0.02, abs=0.2)
    with open(tmp_path / "gateway_stats.csv", newline="") as handle:
        aggregated = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    assert int(aggregated["Failure Count"]) == 0 and int(aggregated["Request Count"]) >= int(level["requests"])
    server = {r["model"]: r for r in _markdown_rows(report, "| callers | model |")}
    assert abs(int(server["asr_offline"]["requests"]) - int(level["requests"])) <= 1
    assert "POST /v1/audio/transcriptions 200" in (tmp_path / "gateway.log").read_text()


@pytest.mark.e2e
def test_bench_gateway_alternates_the_paths_over_the_same_work(server, tmp_path, capsys):
    """`tritonasr bench gateway --url`: both paths get every request and stream of every round,
    in alternating order; the gateway's CPU counts in its own rounds; the report compares them."""
    import json

    from tritonasr.cli import main

    out = tmp_path / "bench.json"
    code = main(["bench", "gateway", "--url", server.grpc_url, "--rounds", "2", "--callers", "2", "--streams", "2",
                 "--clip-seconds", "3,5", "--stream-seconds", "5", "--stagger-ms", "200", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(out.read_text())
    order = [line.split(", ")[1] for line in captured.err.splitlines() if " round " in line]
    assert order == ["direct", "gateway", "gateway", "direct"] * 2  # offline, then streams
    offline, streams = report["workloads"]["offline"], report["workloads"]["stream"]
    for path in ("direct", "gateway"):
        assert offline["paths"][path]["results"] == offline["paths"][path]["count"] == 2 * 2 * 2
        assert offline["paths"][path]["errors"] == streams["paths"][path]["errors"] == 0
        assert streams["paths"][path]["results"] >= 2 * 2  # a final per stream at least
        assert offline["paths"][path]["server_cpu_per_audio_s"] > 0
    assert offline["gateway_cpu_ms_per_request"] > 0 and streams["gateway_cores_per_audio_s"] > 0
    assert "| gateway / direct |" in captured.out and "The gateway's own CPU:" in captured.out
    # Each final through the gateway: the server's part of its latency came with it, and the rest
    # (the way in and out through the gateway, on this machine) is positive and small.
    for figures in (offline, streams):
        hop = figures["paths"]["gateway"]["hop_ms"]
        assert figures["paths"]["direct"]["hop_ms"] is None
        assert 0 < hop["p50"] <= hop["max"] < 1000, hop
    assert "What the gateway and the network add to each final" in captured.out
    assert "What the gateway and the network add to each request" in captured.out
