"""`tritonasr bench gateway`: what `tritonasr gateway` adds to direct gRPC, on the same server in
one run.

Rounds alternate between the two paths over the same work (direct then gateway, gateway then
direct, ...: the drift of a shared machine falls on both alike), and each path's figures pool its
rounds. Beside latency, the gateway process's own CPU time (read from /proc) per request and per
second of streamed audio: what the gateway needs on cores of its own. Where the server already
uses every core, each CPU-second of the gateway's is taken from the server, and the latency
difference shows it.

- offline: --callers threads, each sending one clip of every --clip-seconds length (a different
  variant and order per caller) one after the other: direct with the client library's
  OfflineClient, through the gateway as 16-bit WAV to `POST /v1/audio/transcriptions` (as the
  sweep's users do). Latency per request; through the gateway also each request's hop: its
  latency minus the gateway's time in Triton (its `Server-Timing`): the upload, the decoding, a
  wait for a turn and the answer.
- stream: --streams real-time streams at once, their starts spread over --stagger-ms: direct
  with tritonclient's gRPC stream, through the gateway over `WS /v1/stream` (pcm16). End of
  speech -> final for every final, timed from the chunk holding the segment's end being sent.
  Through the gateway also each final's hop: its latency here minus its `triton_ms` (the server's
  part, as the gateway timed it), which is what the gateway and the network add to that final
  alone, unlike the two paths' difference, which the server's own swings from round to round
  also move.

The server is the sweep's (VAD + SenseVoice, no speaker stage), embedded, or --url.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import date
from pathlib import Path

import numpy as np

from tritonasr.loadtest import workload
from tritonasr.loadtest.bench_stream import percentiles, start_offsets
from tritonasr.loadtest.rss import cpu_seconds, find_server_pid, process_cpu_seconds
from tritonasr.paths import add_repository_argument, default_model_repository

PATHS = ("direct", "gateway")
WORKLOADS = ("offline", "stream")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_repository_argument(parser)
    parser.add_argument("--url", default=None,
                        help="a running Triton's gRPC address (default: an embedded server on the repository)")
    parser.add_argument("--workload", choices=(*WORKLOADS, "both"), default="both",
                        help="offline requests, live streams, or both (default: both)")
    parser.add_argument("--callers", type=int, default=8, help="concurrent offline callers")
    parser.add_argument("--streams", type=int, default=8, help="concurrent real-time streams")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each path per workload, alternated")
    parser.add_argument("--clip-seconds", default="15,30,60", help="offline clip lengths: each caller sends one of each")
    parser.add_argument("--stream-seconds", type=float, default=30.0, help="audio per stream")
    parser.add_argument("--chunk-ms", type=int, default=100, help="streamed chunk size")
    parser.add_argument("--stagger-ms", type=int, default=3000, help="stream starts spread over this long")
    parser.add_argument("--json", type=Path, help="also write the results here")


class Paths:
    """Callers of the two paths to one server: `offline(caller)` and `stream(caller)` make a
    caller's function for one clip or one stream."""

    def __init__(self, triton_url: str, gateway_url: str, chunk_ms: int):
        self.triton_url, self.gateway_url, self.chunk_ms = triton_url, gateway_url, chunk_ms

    def offline(self, path: str) -> tuple[Callable[[np.ndarray], float | None], Callable[[], None]]:
        """(send one clip, close) for one caller of `path`; through the gateway, a send returns the
        ms the gateway spent in Triton for it (its Server-Timing)."""
        if path == "direct":
            from tritonasr.client.connection import NO_RETRY
            from tritonasr.client.offline import OfflineClient

            client = OfflineClient(self.triton_url, retry=NO_RETRY)

            def send_direct(clip: np.ndarray) -> None:
                client.transcribe(clip, with_speaker=False)

            return send_direct, client.close
        import requests

        from tritonasr.loadtest.ws_gateway import api_key_from_environment, transcribe

        session, key = requests.Session(), api_key_from_environment()

        def send(clip: np.ndarray) -> float | None:
            timings: dict[str, float] = {}
            transcribe(self.gateway_url, clip, session=session, api_key=key, timings=timings)
            return timings.get("triton")

        return send, session.close

    def stream(self, path: str, samples: np.ndarray) -> tuple[list[float], list[float]]:
        """One real-time stream of `path`: its finals' end of speech -> final, and (through the
        gateway) their hops, in ms."""
        if path == "direct":
            import tritonclient.grpc as grpcclient

            from tritonasr.client.connection import Credentials
            from tritonasr.loadtest.grpc_stream import run_stream

            credentials = Credentials.from_environment()
            client = grpcclient.InferenceServerClient(self.triton_url, **credentials.grpc_options())
            try:
                result = run_stream(client, samples, chunk_ms=self.chunk_ms, realtime=True, with_speaker=False,
                                    headers=credentials.headers())
            finally:
                client.close()
            finals, hops = result.finals, []
        else:
            from tritonasr.loadtest.ws_gateway import api_key_from_environment, stream, stream_url

            result = stream(stream_url(self.gateway_url), samples, chunk_ms=self.chunk_ms,
                            api_key=api_key_from_environment())
            finals, hops = result["finals"], result["hops_ms"]
        return [segment.latency_ms for segment in finals if segment.latency_ms is not None], hops


def _in_threads(work: list[Callable[[], None]]) -> list[str]:
    """Runs each function in a thread of its own; the errors, as text."""
    errors: list[str] = []

    def run(function: Callable[[], None]) -> None:
        try:
            function()
        except Exception as exc:  # noqa: BLE001 - counted and reported, the others go on
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(function,)) for function in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def offline_round(paths: Paths, path: str, callers: int, lengths: list[float]) -> dict:
    latencies: list[float] = []
    hops: list[float] = []

    def caller(index: int) -> None:
        send, close = paths.offline(path)
        try:
            for k in range(len(lengths)):
                clip = workload.clip(lengths[(index + k) % len(lengths)], index)
                began = time.perf_counter()
                triton_ms = send(clip)
                latencies.append((time.perf_counter() - began) * 1000)
                if triton_ms is not None:
                    hops.append(latencies[-1] - triton_ms)
        finally:
            close()

    errors = _in_threads([lambda i=i: caller(i) for i in range(callers)])
    return {"latencies_ms": latencies, "hops_ms": hops, "errors": errors, "count": callers * len(lengths),
            "audio_s": callers * sum(lengths)}


def stream_round(paths: Paths, path: str, streams: int, seconds: float, stagger_ms: int) -> dict:
    latencies: list[float] = []
    hops: list[float] = []
    audios = [workload.stream_audio(seconds, i) for i in range(streams)]

    def one(index: int, offset: float) -> None:
        time.sleep(offset)
        stream_latencies, stream_hops = paths.stream(path, audios[index])
        latencies.extend(stream_latencies)
        hops.extend(stream_hops)

    errors = _in_threads([lambda i=i, o=o: one(i, o) for i, o in enumerate(start_offsets(streams, stagger_ms))])
    return {"latencies_ms": latencies, "hops_ms": hops, "errors": errors, "count": streams,
            "audio_s": sum(workload.seconds(a) for a in audios)}


def measured(run: Callable[[], dict], gateway_pid: int, server_pid: int | None) -> dict:
    """`run`'s figures with the CPU seconds the gateway, the server and this process used meanwhile."""
    gateway, server, own = process_cpu_seconds(gateway_pid), _server_cpu(server_pid), time.process_time()
    began = time.perf_counter()
    figures = run()
    figures.update(wall_s=time.perf_counter() - began, gateway_cpu_s=process_cpu_seconds(gateway_pid) - gateway,
                   server_cpu_s=None if server is None else _server_cpu(server_pid) - server,
                   client_cpu_s=time.process_time() - own)
    return figures


def _server_cpu(server_pid: int | None) -> float | None:
    return sum(cpu_seconds(server_pid).values()) if server_pid else None


def summary(rounds: list[dict]) -> dict:
    """One path's rounds pooled."""
    latencies = [ms for r in rounds for ms in r["latencies_ms"]]
    hops = [ms for r in rounds for ms in r.get("hops_ms", ())]
    count, audio_s = sum(r["count"] for r in rounds), sum(r["audio_s"] for r in rounds)
    server = [r["server_cpu_s"] for r in rounds]
    return {"rounds": len(rounds), "count": count, "results": len(latencies), "errors": sum(len(r["errors"]) for r in rounds),
            "latency_ms": {**percentiles(latencies), "mean": float(np.mean(latencies)) if latencies else None},
            "p50_by_round": [percentiles(r["latencies_ms"])["p50"] for r in rounds],
            "p95_by_round": [percentiles(r["latencies_ms"])["p95"] for r in rounds],
            "hop_ms": {**percentiles(hops), "max": max(hops)} if hops else None,
            "gateway_cpu_s": sum(r["gateway_cpu_s"] for r in rounds),
            "server_cpu_per_audio_s": None if None in server else sum(server) / audio_s,
            "client_cpu_per_audio_s": sum(r["client_cpu_s"] for r in rounds) / audio_s,
            "audio_s": audio_s, "wall_s": sum(r["wall_s"] for r in rounds)}


def run_workload(name: str, paths: Paths, args, gateway_pid: int, server_pid: int | None, log) -> dict:
    lengths = [float(s) for s in args.clip_seconds.split(",") if s]
    if name == "offline":
        run = lambda path: offline_round(paths, path, args.callers, lengths)  # noqa: E731
        level = f"{args.callers} callers"
    else:
        run = lambda path: stream_round(paths, path, args.streams, args.stream_seconds, args.stagger_ms)  # noqa: E731
        level = f"{args.streams} streams"
    rounds: dict[str, list[dict]] = {path: [] for path in PATHS}
    for index in range(args.rounds):
        for path in PATHS if index % 2 == 0 else PATHS[::-1]:
            figures = measured(lambda: run(path), gateway_pid, server_pid)
            rounds[path].append(figures)
            p = percentiles(figures["latencies_ms"])
            log(f"{name} round {index + 1}/{args.rounds}, {path}, {level}: p50 {_ms(p['p50'])} p95 {_ms(p['p95'])} ms, "
                f"{len(figures['errors'])} errors, gateway CPU {figures['gateway_cpu_s']:.2f} s")
            for error in figures["errors"][:3]:
                log(f"  {error}")
    paths_summary = {path: summary(rounds[path]) for path in PATHS}
    gateway = paths_summary["gateway"]
    direct_cpu = paths_summary["direct"]["gateway_cpu_s"]  # an idle gateway's own ticking, for scale
    return {"level": level, "paths": paths_summary,
            "latencies_ms_by_round": {path: [r["latencies_ms"] for r in rounds[path]] for path in PATHS},
            "gateway_cpu_ms_per_request": gateway["gateway_cpu_s"] / gateway["count"] * 1000,
            "gateway_cores_per_audio_s": gateway["gateway_cpu_s"] / gateway["audio_s"],
            "idle_gateway_cpu_s": direct_cpu}


def main(args) -> int:
    from tritonasr.client.offline import ServerUnavailableError
    from tritonasr.loadtest.processes import ServerProcessError
    from tritonasr.loadtest.sweep import GatewayProcess, sweep_server

    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    repository = (args.model_repository or default_model_repository()).resolve()
    if args.url is None and not (repository / "sensevoice" / "1" / "meta.json").exists():
        log(f"error: no exported SenseVoice in {repository}; run `tritonasr export vad` and "
            "`tritonasr export sensevoice ...` first, or give --url")
        return 2
    if args.rounds < 1 or args.callers < 1 or args.streams < 1:
        log("error: --rounds, --callers and --streams must be at least 1")
        return 2
    workloads = WORKLOADS if args.workload == "both" else (args.workload,)
    report = {"date": date.today().isoformat(), "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "cpus": os.cpu_count(), "url": args.url or "embedded", "repository": str(repository),
              "command": "tritonasr bench gateway " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "gateway"]
              else " ".join(sys.argv), "rounds": args.rounds, "workloads": {}}
    try:
        with ExitStack() as stack:
            if args.url is None:
                log("starting the embedded Triton server (VAD + SenseVoice)…")
                server = stack.enter_context(sweep_server(repository))
                triton_url, server_pid = server.grpc_url, server.process.pid
            else:
                triton_url, server_pid = args.url, find_server_pid(int(args.url.rpartition(":")[2]))
            gateway = stack.enter_context(GatewayProcess(triton_url, max(16, args.callers)))
            log(f"gateway on {gateway.url} in front of Triton {triton_url}")
            paths = Paths(triton_url, gateway.url, args.chunk_ms)
            for path in PATHS:  # connections made, the models' first runs done
                send, close = paths.offline(path)
                send(workload.clip(5, 0))
                close()
            for name in workloads:
                report["workloads"][name] = run_workload(name, paths, args, gateway.process.pid, server_pid, log)
    except (ServerUnavailableError, ServerProcessError) as exc:
        log(f"error: {exc}")
        return 2
    print(render_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    failed = any(p["errors"] for w in report["workloads"].values() for p in w["paths"].values())
    return 1 if failed else 0


def render_markdown(report: dict) -> str:
    lines = [f"`tritonasr gateway` against direct gRPC to the same server, {report['date']}, {report['machine']} "
             f"({report['cpus']} CPUs), {report['rounds']} rounds of each path per workload, alternated; "
             f"`{report['command']}`", ""]
    for name, result in report["workloads"].items():
        direct, gateway = result["paths"]["direct"], result["paths"]["gateway"]
        unit = "request" if name == "offline" else "final (end of speech -> final)"
        lines += [f"{name}, {result['level']}, latency per {unit} in ms (all rounds pooled):", "",
                  "| path | results | errors | p50 | p95 | mean | p50 by round | p95 by round | server CPU s / audio s |",
                  "|---|---:|---:|---:|---:|---:|---|---|---:|"]
        for path, figures in (("direct gRPC", direct), ("gateway", gateway)):
            lat = figures["latency_ms"]
            lines.append(f"| {path} | {figures['results']} | {figures['errors']} | {_ms(lat['p50'])} | {_ms(lat['p95'])} "
                         f"| {_ms(lat['mean'])} | {' '.join(map(_ms, figures['p50_by_round']))} "
                         f"| {' '.join(map(_ms, figures['p95_by_round']))} | {_num(figures['server_cpu_per_audio_s'])} |")
        d, g = direct["latency_ms"], gateway["latency_ms"]
        if None not in (d["p50"], g["p50"], d["p95"], g["p95"]):
            lines.append(f"| gateway − direct | | | {g['p50'] - d['p50']:+.0f} | {g['p95'] - d['p95']:+.0f} | "
                         f"{g['mean'] - d['mean']:+.0f} | | | |")
            lines.append(f"| gateway / direct | | | {g['p50'] / d['p50']:.3f} | {g['p95'] / d['p95']:.3f} | "
                         f"{g['mean'] / d['mean']:.3f} | | | |")
        hop = gateway["hop_ms"]
        if hop:
            what = ("request (its latency minus the gateway's time in Triton, its Server-Timing" if name == "offline"
                    else "final (its latency minus its `triton_ms`")
            lines += ["", f"What the gateway and the network add to each {what}, {gateway['results']} results): "
                          f"p50 {hop['p50']:.1f} ms, p95 {hop['p95']:.1f} ms, p99 {hop['p99']:.1f} ms, "
                          f"max {hop['max']:.1f} ms."]
        lines += ["", f"The gateway's own CPU: {result['gateway_cpu_ms_per_request']:.1f} ms per "
                      f"{'request' if name == 'offline' else 'stream'}, {result['gateway_cores_per_audio_s']:.4f} "
                      f"CPU s per audio s (idle while direct rounds ran: {result['idle_gateway_cpu_s']:.2f} s in all).",
                  ""]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
