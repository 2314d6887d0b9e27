"""Load tests: the sweep's timetable, the report's arithmetic, Triton's metrics, and a short
sweep of every system end to end (real Triton, real baselines, Locust as a subprocess) whose
report is parsed back and checked against what was sent."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tritonasr.loadtest import workload
from tritonasr.loadtest.report import ALL, Window, level_figures
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
        _row("offline", 8.0, 13.0, 5000),  # started at the previous level: throughput, not latency
        _row("offline", 12.0, 14.0, 2000),
        _row("offline", 14.0, 16.0, 2000),
        _row("offline", 16.0, 19.0, 3000, ok=False),
        _row("offline", 19.0, 23.0, 4000),  # ended after the hold
        _row("final", 12.0, 14.0, 100),  # another kind
    ]
    f = level_figures(rows, window, "offline")
    assert (f["completed"], f["failed"], f["timed"]) == (4, 1, 2)
    assert f["error_rate"] == 0.25
    assert f["qps"] == pytest.approx(3 / 10)
    assert f["rtfx"] == pytest.approx(30 / 10)
    assert f["p50_ms"] == 2000 and f["max_ms"] == 2000
    assert f["client_cpu"] == pytest.approx(0.1)


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
