"""`tritonasr bench memory`: does the server give memory back? (issue 14, bounded memory)

Three measurements, each reading the RSS of tritonserver and of every model process from /proc
(loadtest/rss.py) before and after:
- large: `--repeats` consecutive transcriptions of `--large-seconds` of speech (2 hours: 460 MB of
  float32 each) by the client library, which sends recordings this long in pieces (`--one-request`:
  as one asr_offline request each, which the server refuses past its max_audio_seconds). Target:
  the memory the last one leaves is within 20% of what the first left.
- oversize: one asr_offline request of `--oversize-seconds` (over the server's limit): how fast it
  is refused, with which error, and what it cost.
- abandoned: `--streams` live streams opened by one client (START and a second of speech each),
  then left silent until the server expires them. Target: RSS within 20% of before.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from tritonasr.loadtest.common import ServedTarget, served
from tritonasr.loadtest.rss import SERVER, Snapshot, snapshot
from tritonasr.loadtest.triton_metrics import gauge_sum
from tritonasr.loadtest.workload import joined_speech, speech
from tritonasr.paths import add_repository_argument, default_model_repository

SCENARIOS = ("large", "oversize", "abandoned")
SETTLE_S = 3.0  # after each step, before reading RSS: the server's sweeps and trims run each second


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="measure this running server (on this machine) instead of the embedded one")
    parser.add_argument("--metrics-url", help="its metrics endpoint (default: http://HOST:8002/metrics)")
    add_repository_argument(parser)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from {', '.join(SCENARIOS)}")
    parser.add_argument("--large-seconds", type=float, default=7200.0, help="large: each recording's length")
    parser.add_argument("--repeats", type=int, default=3, help="large: recordings one after another")
    parser.add_argument("--one-request", action="store_true",
                        help="large: send each recording in one asr_offline request, not in pieces")
    parser.add_argument("--oversize-seconds", type=float, default=10800.0,
                        help="oversize: the request's length (over the server's limit)")
    parser.add_argument("--streams", type=int, default=400, help="abandoned: streams opened and left silent")
    parser.add_argument("--json", type=Path, help="also write the results here")


def _row(label: str, snap: Snapshot, seconds: float | None = None, note: str = "") -> dict:
    return {"step": label, "footprint_mb": snap.total.pss_mb, "total_mb": snap.total.rss_mb,
            "server_mb": snap.by_process[SERVER].rss_mb,
            "models_mb": {m: u.rss_mb for m, u in snap.by_process.items() if m != SERVER},
            "anon_mb": snap.total.anon_kb / 1024, "shm_files_mb": snap.shm_files_kb / 1024,
            "seconds": seconds, "note": note}


def _settled(pid: int) -> Snapshot:
    time.sleep(SETTLE_S)
    return snapshot(pid)


def run_large(target: ServedTarget, args, log) -> list[dict]:
    from tritonasr.client.connection import NO_RETRY
    from tritonasr.client.offline import PIECES_ABOVE_S, OfflineClient

    audio = joined_speech(speech(), 0, args.large_seconds)[: int(args.large_seconds * 16000)]
    rows = []
    with OfflineClient(target.url, timeout_s=3600, pieces_above_s=math.inf if args.one_request else PIECES_ABOVE_S,
                       retry=NO_RETRY) \
            as client:
        client.transcribe(audio[:160000], with_speaker=False)  # warm: first runs of every model
        rows.append(_row("warm (one 10 s request)", _settled(target.pid)))
        for i in range(args.repeats):
            began = time.perf_counter()
            result = client.transcribe(audio)
            took = time.perf_counter() - began
            rows.append(_row(f"after {args.large_seconds / 60:g}-min recording {i + 1}", _settled(target.pid), took,
                             f"{len(result['segments'])} segments"))
            log(f"  request {i + 1}: {took:.0f} s, footprint {rows[-1]['footprint_mb']:.0f} MB")
    return rows


def run_oversize(target: ServedTarget, args, log) -> list[dict]:
    from tritonasr.client.connection import NO_RETRY
    from tritonasr.client.offline import OfflineClient, TranscriptionError

    audio = np.zeros(int(args.oversize_seconds * 16000), np.float32)
    rows = [_row("before", snapshot(target.pid))]
    with OfflineClient(target.url, timeout_s=3600, pieces_above_s=math.inf, retry=NO_RETRY) as client:
        began = time.perf_counter()
        try:
            client.transcribe(audio)
            note = "accepted"
        except TranscriptionError as exc:
            note = str(exc)[:160]
        took = time.perf_counter() - began
    rows.append(_row(f"after one {args.oversize_seconds / 60:g}-min request", _settled(target.pid), took, note))
    log(f"  answered in {took:.1f} s: {note}")
    return rows


async def _abandon_streams(url: str, count: int) -> int:
    """Opens `count` streams that each send a second of speech and then fall silent; returns
    once the server has closed them all (how many ended with its error)."""
    from tritonasr.client.connection import NO_RETRY
    from tritonasr.client.stream import StreamError, StreamingClient, split_chunks

    silent = asyncio.Event()  # never set: the callers stall without hanging up
    audio = speech()

    async def chunks(index: int):
        for chunk in split_chunks(joined_speech(audio, index, 1.0)[:16000], 100):
            yield chunk
        await silent.wait()

    async def one(client: StreamingClient, index: int) -> bool:
        try:
            async for _ in client.stream(chunks(index), retry=NO_RETRY):
                pass
        except StreamError:
            return True  # closed by the server for idleness, as expected
        return False

    async with StreamingClient(url) as client:
        return sum(await asyncio.gather(*(one(client, i) for i in range(count))))


def run_abandoned(target: ServedTarget, args, log) -> list[dict]:
    rows = [_row("before", _settled(target.pid))]
    peak: list[Snapshot] = []

    async def watch(task):
        while not task.done():
            peak.append(snapshot(target.pid))
            await asyncio.sleep(1.0)

    async def scenario():
        task = asyncio.ensure_future(_abandon_streams(target.url, args.streams))
        await watch(task)
        return await task

    began = time.perf_counter()
    closed = asyncio.run(scenario())
    took = time.perf_counter() - began
    highest = max(peak, key=lambda s: s.total.rss_kb)
    rows.append(_row(f"{args.streams} streams open (peak)", highest))
    open_left = gauge_sum(target.metrics_url, "tritonasr_open_streams")
    rows.append(_row("after they expired", _settled(target.pid), took,
                     f"{closed} closed by the server, {open_left:.0f} still open"))
    log(f"  {closed} streams expired in {took:.0f} s; footprint {rows[0]['footprint_mb']:.0f} -> "
        f"{rows[-1]['footprint_mb']:.0f} MB")
    return rows


RUNNERS = {"large": run_large, "oversize": run_oversize, "abandoned": run_abandoned}


def main(args) -> int:
    repository = (args.model_repository or default_model_repository()).resolve()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        log(f"error: unknown scenarios {', '.join(sorted(unknown))}")
        return 2
    results = {}
    with served(args.url, repository, log, args.metrics_url) as target:
        if target.pid is None:
            log(f"error: no tritonserver serving {args.url} runs on this machine: its memory cannot be read")
            return 2
        for name in scenarios:
            log(f"{name}…")
            results[name] = RUNNERS[name](target, args, log)
    report = {"date": date.today().isoformat(), "machine": f"{platform.node()} {platform.machine()}",
              "cpus": os.cpu_count(), "url": args.url or "embedded", "repository": str(repository),
              "results": results}
    print(render_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def render_markdown(report: dict) -> str:
    lines = []
    for name, rows in report["results"].items():
        models = sorted({m for row in rows for m in row["models_mb"]})
        lines += [f"### {name}", "", "| step | footprint (PSS) | summed RSS | tritonserver | " + " | ".join(models)
                  + " | private (anon) | /dev/shm regions | took | note |",
                  "|---|" + "---:|" * (len(models) + 6) + "---|"]
        for row in rows:
            took = "" if row["seconds"] is None else f"{row['seconds']:.1f} s"
            lines.append(f"| {row['step']} | {row['footprint_mb']:.0f} MB | {row['total_mb']:.0f} MB | "
                         f"{row['server_mb']:.0f} MB | "
                         + " | ".join(f"{row['models_mb'].get(m, 0):.0f}" for m in models)
                         + f" | {row['anon_mb']:.0f} MB | {row['shm_files_mb']:.0f} MB | {took} | {row['note']} |")
        if name == "large" and len(rows) > 2:
            lines.append(f"\nThe last request left {_change(rows[-1], rows[1])} of what the first left "
                         "(target: within ±20%).")
        if name == "abandoned":
            lines.append(f"\nAfter expiry: {_change(rows[-1], rows[0])} of before (target: within ±20%).")
        lines.append("")
    return "\n".join(lines)


def _change(row: dict, reference: dict) -> str:
    return (f"footprint {row['footprint_mb'] / reference['footprint_mb'] - 1:+.0%}, "
            f"summed RSS {row['total_mb'] / reference['total_mb'] - 1:+.0%}")
