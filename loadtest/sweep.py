"""`tritonasr loadtest sweep`: each system started in turn, swept by Locust through the same
concurrency levels with the same audio, stopped; then the report.

Systems (`--systems`; the first three by default, in this order):
- tritonasr: the embedded Triton server on the model repository (VAD + SenseVoice only; the
  speaker stage is off in every request, as the baselines have none), called over gRPC;
- per-session: FunASR AutoModel (FSMN-VAD + SenseVoiceSmall, PyTorch) with one worker per session
  behind a WebSocket front (loadtest/per_session.py), the same weights;
- sherpa-onnx: sherpa-onnx-offline-websocket-server with the same SenseVoice weights exported in
  its format (offline workload only: it has no streaming endpoint for SenseVoice);
- gateway: the same embedded Triton server with `tritonasr gateway` (a subprocess, the `gateway`
  extra) in front of it, called over HTTP (OpenAI's transcriptions) and WebSocket (/v1/stream).
  Not in the default list, which compares tritonasr with the baselines: `--systems
  tritonasr,gateway` measures what the gateway adds to direct gRPC, side by side in the report.
The raw ceiling (offline workload) is the served SenseVoice graph alone in-process, at its best
batch size, over the speech segments of the same clips: measured first, with nothing else running.

Locust runs as a subprocess per system (its gevent patching stays out of this process), on the
same machine as the system under test: the report gives the load generator's CPU per level.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from tritonasr.loadtest.processes import ServerProcess
from tritonasr.loadtest.sweep_plan import SweepPlan, add_plan_arguments
from tritonasr.paths import add_repository_argument, default_model_repository

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SYSTEMS = ("tritonasr", "per-session", "sherpa-onnx", "gateway")
# The comparison with the baselines; the gateway is measured against tritonasr on request.
DEFAULT_SYSTEMS = ("tritonasr", "per-session", "sherpa-onnx")
# What each system is, for the report.
DESCRIPTIONS = {
    "tritonasr": "Triton 2.51 (embedded, Python backend + ONNX Runtime), FSMN-VAD -> SenseVoiceSmall, the callers' "
                 "segments sharing its instances (batched on a GPU, one at a time per instance on a CPU), speaker "
                 "stage off; gRPC",
    "per-session": "FunASR AutoModel (FSMN-VAD + SenseVoiceSmall, PyTorch), one worker thread per session, no "
                   "batching across sessions; WebSocket",
    "sherpa-onnx": "sherpa-onnx-offline-websocket-server (C++, ONNX Runtime), the same SenseVoiceSmall weights in "
                   "sherpa-onnx's format, each clip decoded whole as one utterance (no VAD), batches across "
                   "connections; WebSocket",
    "gateway": "`tritonasr gateway` (Starlette + uvicorn, one process) in front of the same embedded Triton as "
               "tritonasr: OpenAI's POST /v1/audio/transcriptions with 16-bit WAV uploads, or WS /v1/stream with "
               "pcm16 frames, the server's default engine, speaker stage off; HTTP / WebSocket",
}


@dataclass(frozen=True)
class Target:
    """A running system: where Locust points, with which user class."""

    url: str
    user_class: str
    metrics_url: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, from {', '.join(SYSTEMS)} (default: {','.join(DEFAULT_SYSTEMS)}; "
                             "tritonasr,gateway: the gateway's cost over direct gRPC)")
    parser.add_argument("--workload", choices=("offline", "stream"), default="offline",
                        help="offline: whole clips through each system's file endpoint; stream: real-time "
                             "streams (tritonasr, gateway and per-session)")
    add_repository_argument(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: loadtest-results/<date-time>)")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw ceiling measurement")
    parser.add_argument("--raw-batch-sizes", default="1,2,4,8", help="comma-separated batch sizes of the in-process baseline")
    parser.add_argument("--raw-min-seconds", type=float, default=10.0, help="timed seconds per raw batch size")
    parser.add_argument("--sherpa-max-batch", type=int, default=8, help="sherpa-onnx's --max-batch-size")
    add_plan_arguments(parser)


# At the sweep's end each user finishes the call in progress (up to this long) instead of being
# killed in the middle of it: Locust then hung at exit in 2 of 8 short sweeps, closing the killed
# calls' gRPC channels during garbage collection (0 of 10 with it).
STOP_TIMEOUT_S = 60
# How long Locust may take past the sweep to stop its users and write its files: a stuck load
# generator fails the sweep instead of hanging it.
LOCUST_GRACE_S = STOP_TIMEOUT_S + 60


def locust_command(target: Target, prefix: Path, args) -> list[str]:
    """The Locust run for one system: headless, the sweep shape, CSVs under `prefix`."""
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
               "--loglevel", "WARNING", "--csv", str(prefix), "--host", target.url,
               "--levels", ",".join(map(str, args.levels)), "--settle", str(args.settle), "--hold", str(args.hold),
               "--clip-seconds", ",".join(f"{s:g}" for s in args.clip_seconds),
               "--stream-seconds", str(args.stream_seconds), "--chunk-ms", str(args.chunk_ms),
               "--partials", str(args.partials), "--stop-timeout", str(STOP_TIMEOUT_S)]
    if target.metrics_url:
        command += ["--metrics-url", target.metrics_url]
    return command + [target.user_class]


class GatewayProcess(ServerProcess):
    """`tritonasr gateway --url TRITON` on a free loopback port, serving once `GET /healthz`
    answers 200. Its admission limit (--max-inflight) is raised to `max_inflight`, so that it
    never refuses a caller whom direct gRPC would serve: the sweep measures its overhead, not its
    limit. Keys: the gateway's default, $TRITONASR_API_KEY, which the Locust users send too."""

    name = "gateway"

    def __init__(self, triton_url: str, max_inflight: int = 16, log_path: Path | None = None):
        from tritonasr.serving.server import free_port

        super().__init__(log_path)
        self.triton_url = triton_url
        self.max_inflight = max_inflight
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tritonasr.cli", "gateway", "--url", self.triton_url, "--host", "127.0.0.1",
                "--port", str(self.port), "--max-inflight", str(self.max_inflight),
                "--jobs-db", str(self.log_path.with_suffix(".jobs.db")), "--job-workers", "0",  # no jobs here
                # Between load levels a caller still connected is not one to wait two minutes for.
                "--drain-seconds", "5",
                "--metrics-port", "0"]  # no metrics port: nothing scrapes it here, and 8082 may be taken

    def ready(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        try:
            with opener.open(f"{self.url}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False


def missing_gateway_extra() -> tuple[str, ...]:
    """The distributions of the `gateway` extra that are not installed (none when all are, or when
    tritonasr is not installed as a distribution and nothing can be known)."""
    from tritonasr.cli import _lacking

    return _lacking("gateway")


def sweep_server(repository: Path):
    """tritonasr's server as the sweep measures it: VAD + SenseVoice, no speaker model."""
    from tritonasr.serving.server import ServerConfig, TritonServer, free_port

    models = ["vad", "sensevoice", "asr_offline", "asr_stream"]
    return TritonServer(ServerConfig(repository, free_port(), free_port(), free_port(), models=models,
                                     asr_engine="sensevoice"))


@contextmanager
def start_system(name: str, repository: Path, workload: str, args, log: Callable[[str], None],
                 run_dir: Path | None = None) -> Iterator[Target]:
    """`run_dir`: where the gateway's log goes (default: a temporary file)."""
    if name == "tritonasr":
        with sweep_server(repository) as server:
            user = "TritonOfflineUser" if workload == "offline" else "TritonStreamUser"
            yield Target(server.grpc_url, user, server.metrics_url)
    elif name == "gateway":
        gateway_log = run_dir / "gateway.log" if run_dir is not None else None
        with sweep_server(repository) as server, \
                GatewayProcess(server.grpc_url, max(16, *args.levels), gateway_log) as gateway:
            log(f"gateway: serving on {gateway.url} in front of Triton {server.grpc_url} (log {gateway.log_path})")
            user = "GatewayOfflineUser" if workload == "offline" else "GatewayStreamUser"
            yield Target(gateway.url, user, server.metrics_url)
    elif name == "per-session":
        from tritonasr.loadtest.per_session import PerSessionServer, baseline_model_dirs

        sensevoice_dir, vad_dir = baseline_model_dirs(repository)
        with PerSessionServer(sensevoice_dir, vad_dir) as server:
            yield Target(server.url, "WebsocketOfflineUser" if workload == "offline" else "WebsocketStreamUser")
    elif name == "sherpa-onnx":
        from tritonasr.export.sherpa_onnx import sherpa_model_for
        from tritonasr.loadtest.sherpa_server import SherpaOnnxServer

        with SherpaOnnxServer(sherpa_model_for(repository, progress=log), max_batch_size=args.sherpa_max_batch) as server:
            yield Target(server.url, "WebsocketOfflineUser")
    else:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")


def raw_ceiling(repository: Path, args, log: Callable[[str], None]) -> dict:
    """The SenseVoice graph alone, in-process, over the speech of every clip the users send."""
    from tritonasr.loadtest import workload
    from tritonasr.loadtest.bench_offline import raw_throughput

    clips = workload.all_clips(args.clip_seconds)
    batches = [int(b) for b in args.raw_batch_sizes.split(",") if b]
    by_batch = raw_throughput(repository, clips, batches, args.raw_min_seconds, log)
    best = max(by_batch, key=by_batch.get)
    return {"description": "the served SenseVoice ONNX graph alone in ONNX Runtime, in-process, over the speech "
                           "segments of the same clips (VAD cut beforehand, features precomputed, neighbours of "
                           "similar length batched)",
            "by_batch": {str(b): v for b, v in by_batch.items()}, "best_batch": best, "best": by_batch[best]}


def machine() -> tuple[str, str]:
    """(this machine in words, its GPU or "")."""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().replace("\n", ", ")
    except (OSError, subprocess.SubprocessError):
        gpu = ""
    return f"{platform.node()} ({platform.processor() or platform.machine()})", gpu


def main(args) -> int:
    from tritonasr.loadtest.report import render, unmeasured, write_report

    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        log(f"error: unknown system(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SYSTEMS)}")
        return 2
    if "gateway" in systems and missing_gateway_extra():
        log("error: the gateway system runs `tritonasr gateway`, which needs the gateway extra: pip install "
            f"'tritonasr[gateway]' (not installed: {', '.join(missing_gateway_extra())})")
        return 2
    repository = (args.model_repository or default_model_repository()).resolve()
    if not (repository / "sensevoice" / "1" / "meta.json").exists():
        log(f"error: no exported SenseVoice in {repository}; run `tritonasr export vad` and "
            "`tritonasr export sensevoice ...` first")
        return 2
    run_dir = (args.out or Path("loadtest-results") / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    name, gpu = machine()
    plan = SweepPlan.from_options(args)
    run = {"date": date.today().isoformat(), "machine": name, "gpu": gpu, "cpus": os.cpu_count(),
           "command": shlex.join(["tritonasr", "loadtest", "sweep", *sys.argv[3:]]) if sys.argv[1:2] == ["loadtest"]
           else shlex.join(sys.argv),
           "workload": args.workload, "repository": str(repository),
           "plan": {"levels": list(plan.levels), "settle_s": plan.settle_s, "hold_s": plan.hold_s},
           "clip_seconds": list(args.clip_seconds), "stream_seconds": args.stream_seconds,
           "systems": [], "raw": None}
    if args.workload == "offline" and not args.no_raw:
        log("raw ceiling: the SenseVoice graph alone, in-process…")
        run["raw"] = raw_ceiling(repository, args, log)
    log(f"sweeping {', '.join(systems)}: levels {', '.join(map(str, plan.levels))}, "
        f"{plan.duration_s:.0f} s in all; results in {run_dir}")
    failed = False
    for system in systems:
        entry = {"name": system, "description": DESCRIPTIONS[system]}
        run["systems"].append(entry)
        if system == "sherpa-onnx" and args.workload == "stream":
            entry["skipped"] = "sherpa-onnx-offline-websocket-server has no streaming endpoint"
            continue
        log(f"{system}: starting…")
        with start_system(system, repository, args.workload, args, log, run_dir) as target:
            log(f"{system}: ready at {target.url}; sweeping ({plan.duration_s:.0f} s)…")
            try:
                code = subprocess.run(locust_command(target, run_dir / system, args),
                                      timeout=plan.duration_s + LOCUST_GRACE_S).returncode
            except subprocess.TimeoutExpired:  # (run() has killed it)
                code = f"killed: still running {LOCUST_GRACE_S} s after the sweep's end"
        missing = unmeasured(run_dir / system, plan.levels)
        if isinstance(code, str) and not missing:
            # gRPC under gevent now and then hangs Locust at interpreter exit, after every level
            # and request was written: the measurement is whole.
            log(f"warning: {system}: Locust hung at exit and was killed; every level was recorded")
            entry["locust_killed_at_exit"] = True
        elif code not in (0, 1):  # 1: some request failed (the report counts it); others: a crash
            log(f"error: Locust exited with {code} on {system}")
            entry["locust_exit_code"] = code
            failed = True
        if missing:
            ended = code if isinstance(code, str) else f"exit code {code}"
            entry["not_measured"] = f"Locust ended before their hold windows did ({ended})"
            log(f"error: {system}: {', '.join(map(str, missing))} callers not measured: {entry['not_measured']}")
            failed = True
        log(f"{system}: stopped")
        (run_dir / "run.json").write_text(json.dumps(run, indent=2))
    (run_dir / "run.json").write_text(json.dumps(run, indent=2))
    report = write_report(run_dir)
    print(render(report))
    log(f"report: {run_dir / 'report.md'} (plots: latency.png, throughput.png)")
    return 1 if failed else 0


def report_main(args) -> int:
    from tritonasr.loadtest.report import render, write_report

    if not (args.run_dir / "run.json").exists():
        print(f"error: {args.run_dir} holds no run.json (the output of `tritonasr loadtest sweep`)", file=sys.stderr)
        return 2
    print(render(write_report(args.run_dir)))
    return 0
