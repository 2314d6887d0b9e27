"""`tritonasr bench stream`: N callers at once, each sending speech in real time (100 ms chunks by
default) through `asr_stream`, and how long each final result takes after its speech ends.

Each stream is its own ~25 s of speech: the test files, in a different order per stream, joined by
1 s of silence (longer than FSMN-VAD's 800 ms end silence, so every file ends a segment). Streams
start at staggered offsets so that they do not all reach the end of a sentence at once.

Per N it reports, over every final segment of every stream: `latency_ms` (the chunk holding the
end of the speech was sent -> the final result arrived) and `after_endpoint_ms` (the chunk that
let the server decide the segment had ended was sent -> arrived), p50/p95/p99; segments; errors;
and the largest N whose p95 latency stays under the target (1 s) with no errors. For a server on
this machine it also reports the CPU each process of the server used per second of streamed audio
(cores per real-time stream), which the machine's noise moves far less than the latencies.

`--overload F` then measures admission control: a server limited to that largest N (the capacity,
or `--capacity N`) is offered N streams, then F x N; streams it refuses at their start are counted
apart, with the time from their first chunk to the refusal. The target (issue 14): at 3x, the
accepted streams' p95 latency at most twice its value at capacity, every refusal within 100 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import numpy as np

from tritonasr.client.endpointing import describe
from tritonasr.contract import ENDPOINTING_PRESETS, Endpointing
from tritonasr.loadtest.common import served
from tritonasr.loadtest.workload import SPEECH_FILES, joined_speech
from tritonasr.paths import add_repository_argument, default_model_repository



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="*", help="speech files (default: the speech corpus's speakers/*.wav and pause_*.wav)")
    parser.add_argument("--url", help="benchmark this running server instead of starting the embedded one")
    add_repository_argument(parser)
    parser.add_argument("--streams", default="1,4,8,16,32", help="comma-separated numbers of concurrent streams")
    parser.add_argument("--chunk-ms", type=int, default=100, help="streamed chunk size")
    parser.add_argument("--seconds", type=float, default=25.0, help="audio per stream (about)")
    parser.add_argument("--gap-ms", type=int, default=1000, help="silence between files within a stream")
    parser.add_argument("--stagger-ms", type=int, default=3000, help="stream starts spread over this long")
    parser.add_argument("--partials", type=int, default=0, metavar="MS", help="partial-result interval (0: none)")
    parser.add_argument("--endpointing", choices=ENDPOINTING_PRESETS, default="default",
                        help="every stream's endpointing preset (`tritonasr stream --help`); each file ends a "
                             "segment only when --gap-ms is longer than the preset's end silence")
    parser.add_argument("--no-speaker", action="store_true", help="skip the server's speaker stage")
    parser.add_argument("--text-first", action="store_true",
                        help="finals as soon as their text is ready, their speaker after (the latency is the text's)")
    parser.add_argument("--target-ms", type=float, default=1000.0, help="p95 latency target")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--overload", type=float, default=0, metavar="F",
                        help="then offer capacity and F x capacity streams to a server limited to the capacity "
                             "(--max-streams): accepted streams' latency, refusals and how fast they come")
    parser.add_argument("--capacity", type=int, default=None, metavar="N",
                        help="with --overload: this capacity instead of the sweep's largest N under --target-ms "
                             "(skips the sweep; with --url, the server's --max-streams)")


def start_offsets(streams: int, stagger_ms: int) -> list[float]:
    """Seconds after the first stream at which each stream starts, evenly spread."""
    return [i * stagger_ms / 1000 / streams for i in range(streams)]


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


async def run_level(url: str, audios: list[np.ndarray], streams: int, args, log=print,
                    server_pid: int | None = None) -> dict:
    """`streams` concurrent real-time streams; latency figures over all their final segments, and
    with `server_pid` the CPU seconds each server process used per second of audio streamed."""
    from tritonasr.loadtest.rss import cpu_seconds
    from tritonasr.client.connection import NO_RETRY
    from tritonasr.client.stream import SpeakerUpdate, StreamError, StreamingClient, split_chunks

    latencies, after_endpoint, errors, partials = [], [], [], 0
    speaker_updates = []  # text-first: ms from a final to its speaker
    refusals = []  # ms from a refused stream's first chunk to its refusal
    segment_count = 0
    audio_samples = 0  # streamed, by all the streams

    async def one(index: int, offset: float, client: StreamingClient) -> None:
        nonlocal partials, segment_count, audio_samples
        samples = joined_speech(audios, index, args.seconds, args.gap_ms)
        audio_samples += samples.size
        stream = client.stream(split_chunks(samples, args.chunk_ms), realtime=True, retry=NO_RETRY,
                               partial_interval_ms=args.partials, endpointing=ENDPOINTING_PRESETS[args.endpointing],
                               with_speaker=not args.no_speaker, text_first=args.text_first)
        await asyncio.sleep(offset)
        received = 0
        try:
            async with stream:
                async for segment in stream:
                    received += 1
                    if isinstance(segment, SpeakerUpdate):
                        speaker_updates.append((segment.received_ms - stream.finals[segment.segment_index].received_ms))
                        continue
                    if not segment.final:
                        partials += 1
                        continue
                    segment_count += 1
                    if segment.latency_ms is not None:
                        latencies.append(segment.latency_ms)
                    if segment.after_endpoint_ms is not None:
                        after_endpoint.append(segment.after_endpoint_ms)
        except StreamError as exc:
            if exc.code == "UNAVAILABLE" and stream.summary is None and not received:
                refusals.append((time.monotonic() - stream.chunk_clock.sent_at(0)) * 1000)
            else:
                errors.append(f"stream {index}: {exc}")
        except Exception as exc:  # noqa: BLE001 - counted and reported, the other streams go on
            errors.append(f"stream {index}: {type(exc).__name__}: {exc}")

    cpu_before = cpu_seconds(server_pid) if server_pid else {}
    client_before = time.process_time()
    began = time.perf_counter()
    async with StreamingClient(url) as client:
        offsets = start_offsets(streams, args.stagger_ms)
        await asyncio.gather(*(one(i, offset, client) for i, offset in enumerate(offsets)))
    wall = time.perf_counter() - began
    audio_s = audio_samples / 16000
    client_cpu = (time.process_time() - client_before) / audio_s
    cpu = {}
    if server_pid:
        cpu = {name: (used - cpu_before.get(name, 0.0)) / audio_s for name, used in cpu_seconds(server_pid).items()}
    for message in errors[:5]:
        log(f"  {message}")
    return {"streams": streams, "segments": segment_count, "partials": partials, "errors": len(errors),
            "refused": len(refusals), "wall_s": wall, "latency_ms": percentiles(latencies),
            "after_endpoint_ms": percentiles(after_endpoint), "speaker_after_final_ms": percentiles(speaker_updates),
            "refusal_ms": {**percentiles(refusals), "max": max(refusals, default=None)},
            "cpu_per_audio_s": cpu, "client_cpu_per_audio_s": client_cpu}


async def warm_up(url: str, samples: np.ndarray) -> None:
    """One stream at full speed first: connections, the models' first runs."""
    from tritonasr.client.stream import StreamingClient, split_chunks

    async with StreamingClient(url) as client:
        await client.check_ready()
        async for _ in client.stream(split_chunks(samples, 100)):
            pass


def best_streams(levels: list[dict], target_ms: float) -> int | None:
    """The largest N whose p95 latency is under the target, with no errors or refusals."""
    good = [level["streams"] for level in levels
            if not level["errors"] and not level["refused"] and level["latency_ms"]["p95"] is not None
            and level["latency_ms"]["p95"] < target_ms]
    return max(good, default=None)


def _run_levels(url: str, audios: list[np.ndarray], counts: list[int], args, log,
                server_pid: int | None = None) -> list[dict]:
    levels = []
    for streams in counts:
        log(f"{streams} streams of ~{args.seconds:g} s, real time…")
        level = asyncio.run(run_level(url, audios, streams, args, log, server_pid))
        lat, refusal = level["latency_ms"], level["refusal_ms"]
        log(f"  {level['segments']} segments, {level['errors']} errors, {level['refused']} refused "
            f"(slowest refusal {_ms(refusal['max'])}), latency p50 {_ms(lat['p50'])} p95 {_ms(lat['p95'])}")
        levels.append(level)
    return levels


def main(args) -> int:
    from tritonasr.audio import load_audio
    from tritonasr.client.offline import ServerUnavailableError
    from tritonasr.client.stream import StreamError

    repository = (args.model_repository or default_model_repository()).resolve()
    files = args.files or SPEECH_FILES
    audios = [load_audio(f).samples for f in files]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.overload and args.url and not args.capacity:
        log("error: --overload against --url needs --capacity N, the server's --max-streams")
        return 2

    def measure(max_streams: int, counts: list[int]) -> list[dict]:
        """`counts` streams at a time, on a server limited to `max_streams` (0: no limit)."""
        with served(args.url, repository, log, server_args={"max_streams": max_streams}) as target:
            asyncio.run(warm_up(target.url, audios[0]))
            return _run_levels(target.url, audios, counts, args, log, target.pid)

    levels, admitted, capacity = [], [], args.capacity
    try:
        if capacity is None:  # the machine's capacity: the sweep runs without a limit
            levels = measure(0, [int(x) for x in args.streams.split(",") if x])
            capacity = best_streams(levels, args.target_ms)
        if args.overload and capacity:
            admitted = measure(capacity, [capacity, round(args.overload * capacity)])
    except ServerUnavailableError as exc:
        log(f"error: {exc}")
        return 2
    except StreamError as exc:
        log(f"error: the warm-up stream failed: {exc}")
        return 1
    report = {"date": date.today().isoformat(),
              "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "cpus": os.cpu_count(), "url": args.url or "embedded", "repository": str(repository),
              "files": len(files), "seconds_per_stream": args.seconds, "chunk_ms": args.chunk_ms,
              "partial_interval_ms": args.partials, "speaker_stage": not args.no_speaker, "text_first": args.text_first,
              "endpointing": {"preset": args.endpointing, **asdict(ENDPOINTING_PRESETS[args.endpointing])},
              "target_ms": args.target_ms, "levels": levels,
              "best_streams": best_streams(levels, args.target_ms) if levels else None,
              "capacity": capacity, "overload": args.overload, "admission": admitted}
    print(render_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def render_markdown(report: dict) -> str:
    endpointing = dict(report["endpointing"])
    preset = endpointing.pop("preset")
    lines = [f"Endpointing preset `{preset}`: {describe(Endpointing(**endpointing))}. Speaker stage: "
             + ("off" if not report.get("speaker_stage", True) else
                "on, each final's speaker after it (text first)" if report.get("text_first") else
                "on, each final with its speaker"), ""]
    if report["levels"]:
        lines += ["| streams | segments | errors | latency p50 | p95 | p99 | after endpoint p50 | p95 | p99 |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for level in report["levels"]:
            lat, end = level["latency_ms"], level["after_endpoint_ms"]
            figures = [lat["p50"], lat["p95"], lat["p99"], end["p50"], end["p95"], end["p99"]]
            lines.append(f"| {level['streams']} | {level['segments']} | {level['errors']} | "
                         + " | ".join(_ms(v) for v in figures) + " |")
        if report.get("text_first"):
            lines += ["", "Speaker after its final (text first): " + ", ".join(
                f"{level['streams']} streams p50 {_ms(level['speaker_after_final_ms']['p50'])}, "
                f"p95 {_ms(level['speaker_after_final_ms']['p95'])}" for level in report["levels"])]
        cpu_levels = [level for level in report["levels"] if level.get("cpu_per_audio_s")]
        if cpu_levels:
            names = sorted({name for level in cpu_levels for name in level["cpu_per_audio_s"]},
                           key=lambda name: -cpu_levels[-1]["cpu_per_audio_s"].get(name, 0.0))
            lines += ["", "CPU seconds per second of streamed audio (= cores per real-time stream), by server process, "
                      "and this benchmark's own client beside them (on the same cores when the server is embedded):",
                      "", "| streams | " + " | ".join(names) + " | all | client |",
                      "|---:|" + "---:|" * (len(names) + 2)]
            for level in cpu_levels:
                used = level["cpu_per_audio_s"]
                lines.append(f"| {level['streams']} | " + " | ".join(f"{used.get(name, 0.0):.3f}" for name in names)
                             + f" | {sum(used.values()):.3f} | {level['client_cpu_per_audio_s']:.3f} |")
        best = report["best_streams"]
        lines.append("")
        lines.append(f"Largest number of streams with p95 latency under {report['target_ms']:.0f} ms and no "
                     "errors: " + (f"**{best}**" if best is not None else "none of those tried"))
    if report["admission"]:
        lines += ["", f"Admission control, `--max-streams {report['capacity']}`:", "",
                  "| streams offered | accepted | refused | errors | accepted latency p50 | p95 | p99 "
                  "| refusal p50 | p95 | slowest |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for level in report["admission"]:
            lat, refusal = level["latency_ms"], level["refusal_ms"]
            accepted = level["streams"] - level["refused"] - level["errors"]
            figures = [lat["p50"], lat["p95"], lat["p99"], refusal["p50"], refusal["p95"], refusal["max"]]
            lines.append(f"| {level['streams']} | {accepted} | {level['refused']} | {level['errors']} | "
                         + " | ".join(_ms(v) for v in figures) + " |")
        at_capacity, overloaded = (level["latency_ms"]["p95"] for level in report["admission"])
        if at_capacity and overloaded:
            lines += ["", f"Accepted streams' p95 latency at {report['overload']:g}x capacity: "
                          f"{overloaded / at_capacity:.2f}x its value at capacity (target: at most 2x); "
                          f"slowest refusal {_ms(report['admission'][-1]['refusal_ms']['max'])} (target: 100 ms)"]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} ms"
