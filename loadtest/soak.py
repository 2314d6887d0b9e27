"""`tritonasr loadtest soak --minutes N`: offline requests and live streams together for N
minutes, while the RSS of tritonserver and of every model process is sampled from /proc.

Writes soak.csv (one row per sample: RSS per process, /dev/shm regions, open streams, work done,
errors) and soak.md (the summary). Targets (issue 14): RSS growth under 5% after the warm-up
(the first 5 minutes), no errors, and no stream left open at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tritonasr.loadtest.common import served
from tritonasr.loadtest.rss import SERVER, snapshot
from tritonasr.loadtest.triton_metrics import gauge_sum
from tritonasr.loadtest.workload import clip, stream_audio
from tritonasr.paths import add_repository_argument, default_model_repository

GROWTH_TARGET = 0.05
OPEN_STREAMS = "tritonasr_open_streams"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the soak runs")
    parser.add_argument("--warmup-minutes", type=float, default=5.0,
                        help="RSS growth is measured from the end of this (at most half the run)")
    parser.add_argument("--url", help="soak this running server (on this machine) instead of the embedded one")
    parser.add_argument("--metrics-url", help="its metrics endpoint (default: http://HOST:8002/metrics)")
    add_repository_argument(parser)
    parser.add_argument("--streams", type=int, default=2, help="live streams at all times (real time)")
    parser.add_argument("--offline", type=int, default=1, help="concurrent offline callers")
    parser.add_argument("--clip-seconds", default="10,30,60", help="offline clip lengths, used in turn")
    parser.add_argument("--stream-seconds", type=float, default=25.0, help="audio per stream (about)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--out", type=Path, default=None, help="directory for soak.csv and soak.md "
                        "(default: loadtest-results/soak-<date-time>)")


@dataclass
class Counters:
    offline: int = 0
    streams: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, what: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")


def offline_caller(url: str, index: int, lengths: list[float], deadline: float, counters: Counters) -> None:
    from tritonasr.client.connection import NO_RETRY
    from tritonasr.client.offline import OfflineClient

    with OfflineClient(url, timeout_s=600, retry=NO_RETRY) as client:
        n = index
        while time.monotonic() < deadline:
            try:
                client.transcribe(clip(lengths[n % len(lengths)], n))
                with counters.lock:
                    counters.offline += 1
            except Exception as exc:  # noqa: BLE001 - counted; the soak goes on
                counters.error("offline", exc)
            n += 1


async def stream_callers(url: str, count: int, seconds: float, deadline: float, counters: Counters) -> None:
    from tritonasr.client.connection import NO_RETRY
    from tritonasr.client.stream import StreamingClient, split_chunks

    async def caller(client: StreamingClient, index: int) -> None:
        await asyncio.sleep(index * 1.5)  # staggered, so that segments do not all end together
        n = index
        while time.monotonic() < deadline:
            try:
                async with client.stream(split_chunks(stream_audio(seconds, n), 100), realtime=True,
                                         retry=NO_RETRY) as stream:
                    async for _ in stream:
                        pass
                counters.streams += 1
            except Exception as exc:  # noqa: BLE001
                counters.error("stream", exc)
            n += count

    async with StreamingClient(url) as client:
        await asyncio.gather(*(caller(client, i) for i in range(count)))


def growth(rows: list[dict], warmup_s: float) -> tuple[float, float, float]:
    """(RSS at the end of the warm-up, at the end of the load, growth): each the mean total RSS
    over a window (a minute, less for short runs) so one sample's in-flight request does not decide."""
    loaded = [r for r in rows if r["phase"] == "load"]
    end_s = loaded[-1]["t_s"]
    window = max(min(60.0, (end_s - warmup_s) / 3), 1e-9)
    start = [r["total_mb"] for r in loaded if warmup_s <= r["t_s"] < warmup_s + window] or [loaded[0]["total_mb"]]
    end = [r["total_mb"] for r in loaded if r["t_s"] > end_s - window]
    before, after = sum(start) / len(start), sum(end) / len(end)
    return before, after, after / before - 1


def main(args) -> int:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    repository = (args.model_repository or default_model_repository()).resolve()
    out = args.out or Path("loadtest-results") / f"soak-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    lengths = [float(x) for x in args.clip_seconds.split(",") if x]
    duration_s = args.minutes * 60
    warmup_s = min(args.warmup_minutes * 60, duration_s / 2)
    with served(args.url, repository, log, args.metrics_url) as target:
        if target.pid is None:
            log(f"error: no tritonserver serving {args.url} runs on this machine: its memory cannot be read")
            return 2
        models = sorted(m for m in snapshot(target.pid).by_process if m != SERVER)
        columns = ["t_s", "phase", "total_mb", f"{SERVER}_mb", *(f"{m}_mb" for m in models), "anon_mb",
                   "shm_files_mb", "open_streams", "offline_done", "streams_done", "errors"]
        counters = Counters()
        began = time.monotonic()
        deadline = began + duration_s
        workers = [threading.Thread(target=offline_caller, args=(target.url, i, lengths, deadline, counters))
                   for i in range(args.offline)]
        workers.append(threading.Thread(target=lambda: asyncio.run(
            stream_callers(target.url, args.streams, args.stream_seconds, deadline, counters))))
        for worker in workers:
            worker.start()
        rows: list[dict] = []

        def sample(phase: str) -> dict:
            snap = snapshot(target.pid)
            row = {"t_s": round(time.monotonic() - began, 1), "phase": phase, "total_mb": snap.total.rss_mb,
                   f"{SERVER}_mb": snap.by_process[SERVER].rss_mb,
                   **{f"{m}_mb": snap.by_process.get(m).rss_mb if m in snap.by_process else 0.0 for m in models},
                   "anon_mb": snap.total.anon_kb / 1024, "shm_files_mb": snap.shm_files_kb / 1024,
                   "open_streams": int(gauge_sum(target.metrics_url, OPEN_STREAMS)),
                   "offline_done": counters.offline, "streams_done": counters.streams,
                   "errors": len(counters.errors)}
            rows.append(row)
            return row

        with open(out / "soak.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            while any(w.is_alive() for w in workers):
                row = sample("load")
                writer.writerow({k: f"{v:.1f}" if isinstance(v, float) else v for k, v in row.items()})
                f.flush()
                if int(row["t_s"]) % 60 < args.interval:
                    log(f"  {row['t_s'] / 60:.1f} min: RSS {row['total_mb']:.0f} MB, {row['open_streams']} open "
                        f"streams, {row['offline_done']} requests, {row['streams_done']} streams, {row['errors']} errors")
                time.sleep(args.interval)
            for worker in workers:
                worker.join()
            time.sleep(2.0)  # the last stream's state is freed within a second of its end
            writer.writerow({k: f"{v:.1f}" if isinstance(v, float) else v for k, v in sample("end").items()})
    summary = {"minutes": args.minutes, "warmup_s": warmup_s, "url": args.url or "embedded",
               "repository": str(repository), "streams": args.streams, "offline": args.offline,
               "clip_seconds": lengths, "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
               "date": datetime.now().isoformat(timespec="minutes"), "rows": rows, "errors": counters.errors,
               "offline_done": counters.offline, "streams_done": counters.streams}
    (out / "soak.md").write_text(render_markdown(summary))
    print((out / "soak.md").read_text())
    log(f"wrote {out / 'soak.csv'} and {out / 'soak.md'}")
    before, after, grew = growth(rows, warmup_s)
    return 0 if grew < GROWTH_TARGET and not counters.errors and rows[-1]["open_streams"] == 0 else 1


def render_markdown(summary: dict) -> str:
    rows = summary["rows"]
    before, after, grew = growth(rows, summary["warmup_s"])
    first, warm, last = rows[0], min(rows, key=lambda r: abs(r["t_s"] - summary["warmup_s"])), rows[-1]
    processes = [k for k in rows[0] if k.endswith("_mb") and k not in ("total_mb", "anon_mb", "shm_files_mb")]
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    lines = [
        f"# Soak: {summary['minutes']:g} minutes ({summary['date']})", "",
        f"- Machine: {summary['machine']}; server: {summary['url']} ({summary['repository']})",
        f"- Load: {summary['streams']} real-time streams at all times, {summary['offline']} offline caller(s) "
        f"with clips of {', '.join(f'{s:g}' for s in summary['clip_seconds'])} s in turn",
        f"- Done: {summary['offline_done']} offline requests, {summary['streams_done']} streams", "",
        "| | RSS growth after warm-up | errors | open streams at the end |",
        "|---|---:|---:|---:|",
        f"| measured | {grew:+.1%} ({before:.0f} -> {after:.0f} MB) | {len(summary['errors'])} | {last['open_streams']} |",
        f"| target | < {GROWTH_TARGET:.0%}: {verdict(grew < GROWTH_TARGET)} | 0: {verdict(not summary['errors'])} "
        f"| 0: {verdict(last['open_streams'] == 0)} |", "",
        f"Growth compares the mean total RSS over a window at the end of the warm-up "
        f"({summary['warmup_s'] / 60:g} min) with the same window at the end of the load.", "",
        "| process (MB) | start | end of warm-up | end |", "|---|---:|---:|---:|",
    ]
    for key in [*processes, "total_mb", "anon_mb", "shm_files_mb"]:
        lines.append(f"| {key.removesuffix('_mb')} | {first[key]:.0f} | {warm[key]:.0f} | {last[key]:.0f} |")
    if summary["errors"]:
        lines += ["", "First errors:", *(f"- {e}" for e in summary["errors"][:10])]
    return "\n".join(lines) + "\n"
