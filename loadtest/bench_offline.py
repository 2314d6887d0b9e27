"""`tritonasr bench offline`: audio seconds transcribed per wall second through Triton at several
concurrencies, next to the raw ONNX Runtime throughput of the same SenseVoice graph in-process
at its best batch size, measured in the same run on the same machine.

The raw figure is the ceiling: the SenseVoice graph alone over the speech segments of the same
files (already cut, features precomputed, batches of similar lengths), counted in the same
audio seconds (the files' durations) as the served figure. With `--engine parakeet` the
baseline is NeMo's own batched transcribe() of the same segments instead. Each concurrency runs with the
speaker stage and without it (WITH_SPEAKER=false), one after the other on the same server, so
the stage's cost is a ratio from one run.

`--burst N` instead sends N requests of `--burst-seconds` of speech at once and reports how many
were served and how long they took, and how many were refused (asr_offline's queue policy) and
how fast.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np

from tritonasr.loadtest.common import server_url
from tritonasr.paths import add_repository_argument, default_model_repository, speech_dir

DEFAULT_FILES = sorted(str(p) for p in speech_dir().rglob("*.wav"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="*", help="audio files (default: the package's speech corpus)")
    parser.add_argument("--url", help="benchmark this running server instead of starting the embedded one")
    add_repository_argument(parser)
    parser.add_argument("--concurrency", default="1,8", help="comma-separated concurrencies")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the files per concurrency")
    parser.add_argument("--raw-batch-sizes", default="1,2,4,8", help="comma-separated batch sizes of the in-process baseline")
    parser.add_argument("--min-seconds", type=float, default=10.0, help="minimum timed seconds per raw setting")
    parser.add_argument("--engine", choices=["sensevoice", "parakeet"], default="sensevoice",
                        help="ASR engine; the in-process baseline is its raw ONNX graph (sensevoice) or "
                             "NeMo's own batched transcribe() (parakeet)")
    parser.add_argument("--speaker-stage", choices=["both", "on", "off"], default="both",
                        help="served runs with the speaker stage, without it, or both (default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--burst", type=int, default=0, metavar="N",
                        help="only send N requests at once (overload: served vs refused, and how fast)")
    parser.add_argument("--burst-seconds", type=float, default=60.0, help="speech per burst request")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _speech(local, audios: list[np.ndarray]) -> list[np.ndarray]:
    """The speech segments of the files, as the server cuts them (VAD, at most 30 s)."""
    from tritonasr.models.vad import split_long_segments

    return [samples[start * 16: end * 16] for samples in audios
            for start, end in split_long_segments(local.speech_segments(samples), 30_000)]


def _timed(run_all, min_seconds: float) -> float:
    """Seconds per pass of `run_all`, after one untimed pass (ONNX Runtime plans each new shape
    on first sight), over at least `min_seconds`."""
    run_all()
    passes, began = 0, time.perf_counter()
    while True:
        run_all()
        passes += 1
        elapsed = time.perf_counter() - began
        if elapsed >= min_seconds:
            return elapsed / passes


def raw_throughput(repository: Path, audios: list[np.ndarray], batch_sizes: list[int], min_seconds: float,
                   progress=print) -> dict[int, float]:
    """Audio seconds per wall second of the sensevoice graph alone, per batch size."""
    from tritonasr.runtime.in_process import LocalPipeline

    local = LocalPipeline(repository, default_engine="sensevoice")
    sensevoice = local.recognizer.engines["sensevoice"]
    query = sensevoice.query("auto", False)
    feats = sorted((sensevoice.spec.frontend.features(s) for s in _speech(local, audios)), key=len)
    # Neighbours have similar lengths: the least padding, the best case.
    audio_s = sum(a.size for a in audios) / 16000
    progress(f"raw sensevoice: {len(feats)} segments, {audio_s:.1f} s of audio")
    results = {}
    for batch in batch_sizes:
        requests = []
        for i in range(0, len(feats), batch):
            group = feats[i: i + batch]
            longest = max(len(f) for f in group)
            requests.append({
                "speech": np.stack([np.pad(f, ((0, longest - len(f)), (0, 0))) for f in group]),
                "speech_lengths": np.array([len(f) for f in group], dtype=np.int32),
                "language": np.full(len(group), query[0], dtype=np.int32),
                "textnorm": np.full(len(group), query[1], dtype=np.int32),
            })

        def run_all():
            for feeds in requests:
                local.model("sensevoice").run(feeds, ["token_ids", "encoder_out_lens"])

        results[batch] = audio_s / _timed(run_all, min_seconds)
        progress(f"raw batch {batch}: {results[batch]:.1f} audio s / s")
    return results


def nemo_throughput(repository: Path, audios: list[np.ndarray], batch_sizes: list[int], min_seconds: float,
                    progress=print) -> dict[int, float]:
    """Audio seconds per wall second of NeMo's own batched transcribe() of the same speech
    segments, with the weights the parakeet graphs were exported from."""
    from tritonasr.export.parakeet import load_model
    from tritonasr.runtime.in_process import LocalPipeline

    meta = json.loads((repository / "parakeet_decoder" / "1" / "meta.json").read_text())
    model = load_model(meta["source"])
    segments = sorted(_speech(LocalPipeline(repository, default_engine="parakeet"), audios), key=len)
    audio_s = sum(a.size for a in audios) / 16000
    progress(f"NeMo transcribe(): {len(segments)} segments, {audio_s:.1f} s of audio")
    results = {}
    for batch in batch_sizes:
        results[batch] = audio_s / _timed(lambda: model.transcribe(segments, batch_size=batch, verbose=False),
                                          min_seconds)
        progress(f"NeMo batch {batch}: {results[batch]:.1f} audio s / s")
    return results


def served_throughput(url: str, audios: list[np.ndarray], concurrency: int, rounds: int,
                      with_speaker: bool = True, engine: str = "") -> dict:
    from tritonasr.client.connection import NO_RETRY
    from tritonasr.client.offline import OfflineClient

    jobs = [a for _ in range(rounds) for a in audios]
    clients = {}

    def one(samples: np.ndarray) -> float:
        import threading

        client = clients.setdefault(threading.get_ident(), OfflineClient(url, retry=NO_RETRY))
        began = time.perf_counter()
        client.transcribe(samples, with_speaker=with_speaker, engine=engine)
        return time.perf_counter() - began

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, audios[:concurrency]))  # warm-up: connections, model caches
        began = time.perf_counter()
        latencies = list(pool.map(one, jobs))
        wall = time.perf_counter() - began
    audio_s = sum(a.size for a in jobs) / 16000
    latencies.sort()
    return {"concurrency": concurrency, "engine": engine, "speaker_stage": with_speaker, "requests": len(jobs),
            "audio_s": audio_s, "wall_s": wall,
            "throughput": audio_s / wall, "latency_p50_s": statistics.median(latencies),
            "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def burst(url: str, audios: list[np.ndarray], count: int, seconds: float) -> dict:
    """`count` requests of `seconds` of speech each, all sent at once."""
    from tritonasr.client.connection import NO_RETRY
    from tritonasr.client.offline import OfflineClient, ServerBusyError
    from tritonasr.loadtest.workload import joined_speech

    samples = joined_speech(audios, 0, seconds, 1000)

    def one(_) -> tuple[str, float]:
        with OfflineClient(url, retry=NO_RETRY) as client:
            began = time.perf_counter()
            try:
                client.transcribe(samples)
                outcome = "served"
            except ServerBusyError as exc:
                outcome = "refused: " + ("queue full" if "queue is full" in str(exc) else "queue timeout"
                                         if "queue timeout" in str(exc) else str(exc))
            return outcome, time.perf_counter() - began

    with ThreadPoolExecutor(count) as pool:
        outcomes = list(pool.map(one, range(count)))
    result = {"requests": count, "seconds": samples.size / 16000, "outcomes": {}}
    for outcome in sorted({o for o, _ in outcomes}):
        took = sorted(t for o, t in outcomes if o == outcome)
        result["outcomes"][outcome] = {"count": len(took), "p50_s": statistics.median(took),
                                       "p95_s": took[min(len(took) - 1, int(0.95 * len(took)))], "max_s": took[-1]}
    return result


def main(args) -> int:
    from tritonasr.audio import load_audio

    repository = (args.model_repository or default_model_repository()).resolve()
    files = args.files or DEFAULT_FILES
    audios = [load_audio(f).samples for f in files]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.burst:
        with server_url(args.url, repository, log) as url:
            result = burst(url, audios, args.burst, args.burst_seconds)
        print(f"{result['requests']} requests of {result['seconds']:.0f} s at once:\n\n"
              "| outcome | requests | p50 | p95 | slowest |\n|---|---:|---:|---:|---:|")
        for outcome, r in result["outcomes"].items():
            print(f"| {outcome} | {r['count']} | {r['p50_s']:.2f} s | {r['p95_s']:.2f} s | {r['max_s']:.2f} s |")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return 0
    baseline = nemo_throughput if args.engine == "parakeet" else raw_throughput
    raw = baseline(repository, audios, _ints(args.raw_batch_sizes), args.min_seconds, log)
    best_batch = max(raw, key=raw.get)
    served = []
    with server_url(args.url, repository, log) as url:
        for concurrency in _ints(args.concurrency):
            for with_speaker in {"both": (True, False), "on": (True,), "off": (False,)}[args.speaker_stage]:
                result = served_throughput(url, audios, concurrency, args.rounds, with_speaker, args.engine)
                result["ratio_to_raw"] = result["throughput"] / raw[best_batch]
                log(f"served concurrency {concurrency}, speaker stage {'on' if with_speaker else 'off'}: "
                    f"{result['throughput']:.1f} audio s / s ({result['ratio_to_raw']:.0%} of raw)")
                served.append(result)
    report = {"date": date.today().isoformat(), "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "cpus": __import__("os").cpu_count(), "files": len(files), "repository": str(repository),
              "engine": args.engine,
              "raw": {str(k): v for k, v in raw.items()}, "raw_best_batch": best_batch, "served": served}
    print(render_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def render_markdown(report: dict) -> str:
    best = report["raw"][str(report["raw_best_batch"])]
    lines = ["| system | setting | audio s / wall s | vs raw best | p50 latency | p95 latency |",
             "|---|---|---:|---:|---:|---:|"]
    for batch, value in report["raw"].items():
        system = ("NeMo transcribe(), in-process" if report["engine"] == "parakeet"
                  else "raw SenseVoice ONNX Runtime, in-process")
        lines.append(f"| {system} | batch {batch} | {value:.1f} | {value / best:.0%} | | |")
    for r in report["served"]:
        stage = "with speaker stage" if r["speaker_stage"] else "without speaker stage"
        lines.append(f"| tritonasr asr_offline, {report['engine']} (gRPC) | concurrency {r['concurrency']}, {stage} | "
                     f"{r['throughput']:.1f} | {r['ratio_to_raw']:.0%} | {r['latency_p50_s']:.2f} s | "
                     f"{r['latency_p95_s']:.2f} s |")
    return "\n".join(lines)
