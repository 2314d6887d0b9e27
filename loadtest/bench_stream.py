"""`tritonasr bench stream`: N callers at once, each sending speech in real time (100 ms chunks by
default) through `asr_stream`, and how long each final result takes after its speech ends.

Each stream is its own ~25 s of speech: the test files, in a different order per stream, joined by
1 s of silence (longer than FSMN-VAD's 800 ms end silence, so every file ends a segment). Streams
start at staggered offsets so that they do not all reach the end of a sentence at once.

Per N it reports, over every final segment of every stream: `latency_ms` (the chunk holding the
end of the speech was sent -> the final result arrived) and `after_endpoint_ms` (the chunk that
let the server decide the segment had ended was sent -> arrived), p50/p95/p99; segments; errors;
and the largest N whose p95 latency stays under the target (1 s) with no errors.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from tritonasr.loadtest.common import server_url
from tritonasr.loadtest.workload import SPEECH_FILES, joined_speech
from tritonasr.paths import default_model_repository



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="*", help="speech files (default: tests/data/speakers/*.wav and pause_*.wav)")
    parser.add_argument("--url", help="benchmark this running server instead of starting the embedded one")
    parser.add_argument("--model-repository", type=Path, default=None)
    parser.add_argument("--streams", default="1,4,8,16,32", help="comma-separated numbers of concurrent streams")
    parser.add_argument("--chunk-ms", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=25.0, help="audio per stream (about)")
    parser.add_argument("--gap-ms", type=int, default=1000, help="silence between files within a stream")
    parser.add_argument("--stagger-ms", type=int, default=3000, help="stream starts spread over this long")
    parser.add_argument("--partials", type=int, default=0, metavar="MS", help="partial-result interval (0: none)")
    parser.add_argument("--target-ms", type=float, default=1000.0, help="p95 latency target")
    parser.add_argument("--json", type=Path, help="also write the results here")


def start_offsets(streams: int, stagger_ms: int) -> list[float]:
    """Seconds after the first stream at which each stream starts, evenly spread."""
    return [i * stagger_ms / 1000 / streams for i in range(streams)]


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


async def run_level(url: str, audios: list[np.ndarray], streams: int, args, log=print) -> dict:
    """`streams` concurrent real-time streams; latency figures over all their final segments."""
    from tritonasr.client.stream import StreamingClient, split_chunks

    latencies, after_endpoint, errors, partials = [], [], [], 0
    segment_count = 0

    async def one(index: int, offset: float, client: StreamingClient) -> None:
        nonlocal partials, segment_count
        samples = joined_speech(audios, index, args.seconds, args.gap_ms)
        stream = client.stream(split_chunks(samples, args.chunk_ms), realtime=True,
                               partial_interval_ms=args.partials)
        await asyncio.sleep(offset)
        try:
            async with stream:
                async for segment in stream:
                    if not segment.final:
                        partials += 1
                        continue
                    segment_count += 1
                    if segment.latency_ms is not None:
                        latencies.append(segment.latency_ms)
                    if segment.after_endpoint_ms is not None:
                        after_endpoint.append(segment.after_endpoint_ms)
        except Exception as exc:  # noqa: BLE001 - counted and reported, the other streams go on
            errors.append(f"stream {index}: {type(exc).__name__}: {exc}")

    began = time.perf_counter()
    async with StreamingClient(url) as client:
        offsets = start_offsets(streams, args.stagger_ms)
        await asyncio.gather(*(one(i, offset, client) for i, offset in enumerate(offsets)))
    wall = time.perf_counter() - began
    for message in errors[:5]:
        log(f"  {message}")
    return {"streams": streams, "segments": segment_count, "partials": partials, "errors": len(errors),
            "wall_s": wall, "latency_ms": percentiles(latencies), "after_endpoint_ms": percentiles(after_endpoint)}


async def warm_up(url: str, samples: np.ndarray) -> None:
    """One stream at full speed first: connections, the models' first runs."""
    from tritonasr.client.stream import StreamingClient, split_chunks

    async with StreamingClient(url) as client:
        await client.check_ready()
        async for _ in client.stream(split_chunks(samples, 100)):
            pass


def best_streams(levels: list[dict], target_ms: float) -> int | None:
    """The largest N whose p95 latency is under the target, with no errors."""
    good = [level["streams"] for level in levels
            if not level["errors"] and level["latency_ms"]["p95"] is not None
            and level["latency_ms"]["p95"] < target_ms]
    return max(good, default=None)


def main(args) -> int:
    from tritonasr.audio import load_audio
    from tritonasr.client.offline import ServerUnavailableError
    from tritonasr.client.stream import StreamError

    repository = (args.model_repository or default_model_repository()).resolve()
    files = args.files or SPEECH_FILES
    audios = [load_audio(f).samples for f in files]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    levels = []
    with server_url(args.url, repository, log) as url:
        try:
            asyncio.run(warm_up(url, audios[0]))
        except ServerUnavailableError as exc:
            log(f"error: {exc}")
            return 2
        except StreamError as exc:
            log(f"error: the warm-up stream failed: {exc}")
            return 1
        for streams in [int(x) for x in args.streams.split(",") if x]:
            log(f"{streams} streams of ~{args.seconds:g} s, real time…")
            level = asyncio.run(run_level(url, audios, streams, args, log))
            lat = level["latency_ms"]
            log(f"  {level['segments']} segments, {level['errors']} errors, latency p50 "
                f"{_ms(lat['p50'])} p95 {_ms(lat['p95'])}")
            levels.append(level)
    report = {"date": date.today().isoformat(),
              "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "cpus": os.cpu_count(), "url": args.url or "embedded", "repository": str(repository),
              "files": len(files), "seconds_per_stream": args.seconds, "chunk_ms": args.chunk_ms,
              "partial_interval_ms": args.partials, "target_ms": args.target_ms, "levels": levels,
              "best_streams": best_streams(levels, args.target_ms)}
    print(render_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def render_markdown(report: dict) -> str:
    lines = ["| streams | segments | errors | latency p50 | p95 | p99 | after endpoint p50 | p95 | p99 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for level in report["levels"]:
        lat, end = level["latency_ms"], level["after_endpoint_ms"]
        figures = [lat["p50"], lat["p95"], lat["p99"], end["p50"], end["p95"], end["p99"]]
        lines.append(f"| {level['streams']} | {level['segments']} | {level['errors']} | "
                     + " | ".join(_ms(v) for v in figures) + " |")
    best = report["best_streams"]
    lines.append("")
    lines.append(f"Largest number of streams with p95 latency under {report['target_ms']:.0f} ms and no errors: "
                 + (f"**{best}**" if best is not None else "none of those tried"))
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} ms"
