"""`tritonasr loadtest report RUN_DIR`: a sweep's CSVs -> report.md, report.json and PNG plots.

Each level is measured over its hold window as the sampler recorded it, by WINDOW_RULE (which
every report states). Latency percentiles are exact (numpy over every request), not Locust's
rounded histogram.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ALL = "all"
# Counting what completed, wherever it started, measures a level whose requests outlast its hold.
WINDOW_RULE = ("Each level is measured over its hold window, the last --hold seconds of the level: throughput "
               "(QPS; audio s / s = the audio seconds of the requests completed in the window / its length) "
               "counts every request that completed inside the window, including those that started before it; "
               "latency percentiles and the error rate cover the same requests.")
TARGET_LEVEL = 8  # the targets apply at this many callers and more
TARGETS = ("at least 3x per-session audio throughput", "at least the peer server's throughput",
           "at least 80% of the raw ceiling", "lower p95 latency than both baselines")


@dataclass(frozen=True)
class Window:
    index: int
    users: int
    start_s: float
    hold_start_s: float
    end_s: float
    client_cpu_s: float | None  # None: not recorded

    @property
    def hold_s(self) -> float:
        return self.end_s - self.hold_start_s


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def windows(prefix: Path) -> list[Window]:
    return [Window(int(r["level"]), int(r["users"]), float(r["start_s"]), float(r["hold_start_s"]),
                   float(r["end_s"]), float(r["client_cpu_s"]) if r["client_cpu_s"] else None)
            for r in _read_csv(Path(f"{prefix}_levels.csv"))]


def unmeasured(prefix: Path, levels) -> list[int]:
    """The planned levels (callers) without a recorded hold window; all of them when the requests
    file was never written (not even its header): then no level's requests are known."""
    requests_csv = Path(f"{prefix}_requests.csv")
    if not requests_csv.exists() or requests_csv.stat().st_size == 0:
        return list(levels)
    recorded = {w.index for w in windows(prefix)}
    return [users for index, users in enumerate(levels) if index not in recorded]


def requests(prefix: Path) -> list[dict]:
    rows = _read_csv(Path(f"{prefix}_requests.csv"))
    for r in rows:
        for key in ("started_s", "ended_s", "latency_ms", "audio_s"):
            r[key] = float(r[key])
        r["ok"] = r["ok"] == "1"
    return rows


def level_figures(rows: list[dict], window: Window, kind: str) -> dict:
    """The figures of one level for requests of `kind` (already filtered to one name or not)."""
    done = [r for r in rows if r["kind"] == kind and window.hold_start_s <= r["ended_s"] <= window.end_s]
    failed = [r for r in done if not r["ok"]]
    latencies = [r["latency_ms"] for r in done if r["ok"]]
    audio_s = sum(r["audio_s"] for r in done if r["ok"])
    figures = {"users": window.users, "completed": len(done), "failed": len(failed),
               "error_rate": len(failed) / len(done) if done else 0.0,
               "qps": len(latencies) / window.hold_s, "audio_s": audio_s,
               "rtfx": audio_s / window.hold_s,
               "client_cpu": None if window.client_cpu_s is None else window.client_cpu_s / window.hold_s}
    if latencies:
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        figures.update(mean_ms=float(np.mean(latencies)), p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99),
                       max_ms=float(max(latencies)))
    else:
        figures.update(mean_ms=None, p50_ms=None, p95_ms=None, p99_ms=None, max_ms=None)
    return figures


def server_figures(prefix: Path) -> list[dict]:
    """Per level and model: mean batch size (inferences / executions), queue time per request, and
    the run each request was part of: Triton adds a batch's compute time once for each request in
    it, so per request it is the mean run, weighted by the runs' batch sizes (per execution it
    would count each run once per request in it)."""
    out = []
    for r in _read_csv(Path(f"{prefix}_server.csv")):
        requests_, inferences, executions = float(r["requests"]), float(r["inferences"]), float(r["executions"])
        out.append({"users": int(r["users"]), "model": r["model"], "requests": int(requests_),
                    "mean_batch": inferences / executions if executions else None,
                    "queue_ms": float(r["queue_us"]) / 1000 / requests_ if requests_ else None,
                    "compute_ms": float(r["compute_us"]) / 1000 / inferences if inferences else None})
    return out


def system_results(run_dir: Path, system: dict, run: dict) -> dict:
    """{"levels": {name: [figures per level]}, "server": [...], "not_measured": [callers]} for
    one system of a run."""
    prefix = run_dir / system["name"]
    rows, levels = requests(prefix), windows(prefix)
    if run["workload"] == "offline":
        names = sorted({r["name"] for r in rows if r["kind"] == "offline"}, key=lambda n: float(n.split()[0]))
        by_name = {name: [level_figures([r for r in rows if r["name"] == name], w, "offline") for w in levels]
                   for name in names}
        by_name[ALL] = [level_figures(rows, w, "offline") for w in levels]
    else:
        by_name = {kind: [level_figures(rows, w, kind) for w in levels]
                   for kind in ("final", "first_response", "stream")}
    return {"levels": by_name, "server": server_figures(prefix),
            "not_measured": unmeasured(prefix, run["plan"]["levels"])}


def build(run_dir: Path) -> dict:
    run = json.loads((run_dir / "run.json").read_text())
    results = {s["name"]: system_results(run_dir, s, run) for s in run["systems"] if not s.get("skipped")}
    return {"run": run, "results": results, "targets": targets(run, results)}


def targets(run: dict, results: dict) -> list[dict]:
    """The issue's targets for tritonasr at TARGET_LEVEL callers and more (offline workload)."""
    if run["workload"] != "offline" or "tritonasr" not in results:
        return []
    ours = {f["users"]: f for f in results["tritonasr"]["levels"][ALL]}
    other = {name: {f["users"]: f for f in r["levels"][ALL]} for name, r in results.items() if name != "tritonasr"}
    raw = (run.get("raw") or {}).get("best")
    checks = []
    for users, mine in sorted(ours.items()):
        if users < TARGET_LEVEL:
            continue
        session, peer = other.get("per-session", {}).get(users), other.get("sherpa-onnx", {}).get(users)
        checks.append({"users": users, "checks": [
            _check(session and session["rtfx"] and mine["rtfx"] / session["rtfx"], lambda v: v >= 3, "{:.1f}x"),
            _check(peer and peer["rtfx"] and mine["rtfx"] / peer["rtfx"], lambda v: v >= 1, "{:.2f}x"),
            _check(raw and mine["rtfx"] / raw, lambda v: v >= 0.8, "{:.0%}"),
            _check(_p95_margin(mine, [session, peer]), lambda v: v > 0, "{:.2f} s lower"),
        ]})
    return checks


def _p95_margin(mine: dict, baselines: list[dict | None]) -> float | None:
    """How much lower our p95 is than the lower of the baselines' (None without figures)."""
    theirs = [b["p95_ms"] for b in baselines if b and b["p95_ms"] is not None]
    if mine["p95_ms"] is None or not theirs:
        return None
    return (min(theirs) - mine["p95_ms"]) / 1000


def _check(value, passes, fmt: str) -> dict:
    if value is None or value is False:
        return {"value": None, "text": "not measured", "met": None}
    return {"value": value, "text": fmt.format(value), "met": bool(passes(value))}


# -- rendering -----------------------------------------------------------------------------------

def _s(ms: float | None) -> str:
    return "–" if ms is None else f"{ms / 1000:.2f}"


def _ms(ms: float | None) -> str:
    return _num(ms, ".0f")


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _callers(n: int) -> str:
    return f"{n} caller" + "s" * (n != 1)


def render(report: dict) -> str:
    run, results = report["run"], report["results"]
    lines = [f"Sweep of {run['date']} on {run['machine']} ({run['cpus']} CPUs{', ' + run['gpu'] if run.get('gpu') else ''}); "
             f"workload **{run['workload']}**; levels {', '.join(map(str, run['plan']['levels']))} callers, "
             f"each {run['plan']['settle_s']:g} s settle + {run['plan']['hold_s']:g} s measured.",
             "", f"Command: `{run['command']}`", "", WINDOW_RULE, ""]
    for s in run["systems"]:
        lines.append(f"- **{s['name']}**: {s['description']}" + (f" (skipped: {s['skipped']})" if s.get("skipped") else ""))
    if run.get("raw"):
        raw = run["raw"]
        lines.append(f"- **raw ceiling**: {raw['description']}: best {raw['best']:.1f} audio s / s at batch "
                     f"{raw['best_batch']} ({', '.join(f'batch {b}: {v:.1f}' for b, v in raw['by_batch'].items())})")
    lines.append("")
    lines += _offline_tables(run, results) if run["workload"] == "offline" else _stream_tables(results)
    lines += _gateway_overhead(run, results)
    lines += _unreported(run, results)
    if report["targets"]:
        lines += ["", f"Targets at {TARGET_LEVEL}+ callers (tritonasr against the others, all clip lengths pooled):", "",
                  "| callers | " + " | ".join(TARGETS) + " |", "|---:|" + "---|" * len(TARGETS)]
        for row in report["targets"]:
            cells = [("✅ " if c["met"] else "❌ " if c["met"] is False else "") + c["text"] for c in row["checks"]]
            lines.append(f"| {row['users']} | " + " | ".join(cells) + " |")
    server = [(name, r["server"]) for name, r in results.items() if r["server"]]
    for name, rows in server:
        lines += ["", f"Server side ({name}, Triton metrics over each hold window): mean batch size = inferences / "
                  "executions; queue time per request; run: the compute time of the model run each request was "
                  "part of (with its batch).", "",
                  "| callers | model | requests | mean batch | queue ms / request | run ms / request |",
                  "|---:|---|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['users']} | {r['model']} | {r['requests']} | {_num(r['mean_batch'], '.2f')} | "
                         f"{_ms(r['queue_ms'])} | {_ms(r['compute_ms'])} |")
    return "\n".join(lines) + "\n"


def _offline_tables(run: dict, results: dict) -> list[str]:
    lines = ["Per clip length and concurrency (latency in seconds; RTFx = audio seconds transcribed per wall "
             "second by the whole service; client CPU = the load generator's share of one core):", "",
             "| system | clip | callers | requests | errors | mean | p50 | p95 | p99 | QPS | RTFx | client CPU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        for clip, levels in result["levels"].items():
            for f in levels:
                lines.append(f"| {name} | {clip} | {f['users']} | {f['completed']} | {f['error_rate']:.1%} | "
                             f"{_s(f['mean_ms'])} | {_s(f['p50_ms'])} | {_s(f['p95_ms'])} | {_s(f['p99_ms'])} | "
                             f"{f['qps']:.2f} | {f['rtfx']:.1f} | {_num(f['client_cpu'], '.0%')} |")
    raw = (run.get("raw") or {}).get("best")
    session = {f["users"]: f for f in results.get("per-session", {}).get("levels", {}).get(ALL, [])}
    lines += ["", "Throughput side by side (audio s / s, all clip lengths):", "",
              "| system | callers | audio s / s | vs raw ceiling | vs per-session (x) | p95 latency (s) |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        for f in result["levels"][ALL]:
            base = session.get(f["users"])
            vs_raw = _num(raw and f["rtfx"] / raw, ".0%")
            vs_session = _num(base and base["rtfx"] and f["rtfx"] / base["rtfx"], ".2f")
            lines.append(f"| {name} | {f['users']} | {f['rtfx']:.1f} | {vs_raw} | {vs_session} | {_s(f['p95_ms'])} |")
    return lines


def _stream_tables(results: dict) -> list[str]:
    lines = ["Per concurrency (callers = live streams; latency in ms; final = end of speech -> final result; "
             "first = first response after the first chunk):", "",
             "| system | streams | finals | failed streams | final mean | p50 | p95 | p99 | first p50 | first p95 | "
             "audio s / s | client CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        for final, first, stream in zip(result["levels"]["final"], result["levels"]["first_response"],
                                        result["levels"]["stream"]):
            lines.append(f"| {name} | {final['users']} | {final['completed']} | {stream['failed']} | "
                         f"{_ms(final['mean_ms'])} | {_ms(final['p50_ms'])} | {_ms(final['p95_ms'])} | "
                         f"{_ms(final['p99_ms'])} | {_ms(first['p50_ms'])} | {_ms(first['p95_ms'])} | "
                         f"{final['rtfx']:.1f} | {_num(final['client_cpu'], '.0%')} |")
    return lines


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}"


def _gateway_overhead(run: dict, results: dict) -> list[str]:
    """The gateway beside direct gRPC to the same server, level by level (both in the run)."""
    if "tritonasr" not in results or "gateway" not in results:
        return []
    offline = run["workload"] == "offline"
    key = ALL if offline else "final"
    ours = {f["users"]: f for f in results["tritonasr"]["levels"][key]}
    lines = ["", "The gateway against direct gRPC to the same server, at the same callers ("
             + ("all clip lengths; latency in s" if offline else "end of speech -> final; latency in ms")
             + "; overhead = gateway - tritonasr, in ms; x = gateway / tritonasr):", ""]
    if offline:
        lines += ["| callers | p50 tritonasr | p50 gateway | p50 overhead | p95 tritonasr | p95 gateway | p95 x | "
                  "audio s / s tritonasr | audio s / s gateway | throughput x | gateway errors |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| streams | p50 tritonasr | p50 gateway | p50 overhead | p95 tritonasr | p95 gateway | p95 x | "
                  "first p50 tritonasr | first p50 gateway | gateway failed streams |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    firsts = {name: {f["users"]: f for f in results[name]["levels"].get("first_response", [])}
              for name in ("tritonasr", "gateway")}
    streams = {f["users"]: f for f in results["gateway"]["levels"].get("stream", [])}
    show = _s if offline else _ms
    for g in results["gateway"]["levels"][key]:
        t = ours.get(g["users"])
        if t is None:
            continue
        overhead = None if g["p50_ms"] is None or t["p50_ms"] is None else g["p50_ms"] - t["p50_ms"]
        cells = [show(t["p50_ms"]), show(g["p50_ms"]), _ms(overhead), show(t["p95_ms"]), show(g["p95_ms"]),
                 _ratio(g["p95_ms"], t["p95_ms"])]
        if offline:
            cells += [f"{t['rtfx']:.1f}", f"{g['rtfx']:.1f}", _ratio(g["rtfx"], t["rtfx"]), f"{g['error_rate']:.1%}"]
        else:
            first_t, first_g = firsts["tritonasr"].get(g["users"], {}), firsts["gateway"].get(g["users"], {})
            cells += [_ms(first_t.get("p50_ms")), _ms(first_g.get("p50_ms")),
                      str(streams.get(g["users"], {}).get("failed", 0))]
        lines.append(f"| {g['users']} | " + " | ".join(cells) + " |")
    return lines


def _unreported(run: dict, results: dict) -> list[str]:
    """What the tables cannot say: levels not measured, and levels in which nothing completed."""
    key = ALL if run["workload"] == "offline" else "final"
    reasons = {s["name"]: s.get("not_measured") for s in run["systems"]}
    lines = []
    for name, result in results.items():
        for users in result["not_measured"]:
            reason = reasons[name] or "no hold window was recorded"
            lines.append(f"- **{name}, {_callers(users)}: not measured**: {reason}")
        for f in result["levels"][key]:
            if not f["completed"]:
                lines.append(f"- {name}, {_callers(f['users'])}: no request completed in the "
                             f"{run['plan']['hold_s']:g} s hold: latency exceeds the hold; raise --hold")
    return [""] + lines if lines else []


def plot(report: dict, run_dir: Path) -> list[Path]:
    """latency.png and throughput.png against concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run, results = report["run"], report["results"]
    key = ALL if run["workload"] == "offline" else "final"
    unit = 1000 if run["workload"] == "offline" else 1
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    timed = False
    for name, result in results.items():
        levels = [f for f in result["levels"][key] if f["p95_ms"] is not None]
        timed = timed or bool(levels)
        users = [f["users"] for f in levels]
        line, = ax.plot(users, [f["p95_ms"] / unit for f in levels], marker="o", label=f"{name} p95")
        ax.plot(users, [f["p50_ms"] / unit for f in levels], marker=".", linestyle="--", color=line.get_color(),
                label=f"{name} p50")
    # An empty log axis cannot be drawn (no level completed a request).
    ax.set(xscale="log", yscale="log" if timed else "linear", xlabel="concurrent callers",
           ylabel="latency (s)" if unit == 1000 else "end of speech -> final (ms)",
           title=f"Latency against concurrency ({run['workload']})")
    _finish(ax, run)
    paths.append(_save(fig, run_dir / "latency.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, result in results.items():
        levels = result["levels"][key]
        ax.plot([f["users"] for f in levels], [f["rtfx"] for f in levels], marker="o", label=name)
    if run.get("raw") and run["workload"] == "offline":
        ax.axhline(run["raw"]["best"], color="grey", linestyle=":", label="raw ceiling")
    ax.set(xscale="log", xlabel="concurrent callers", ylabel="audio seconds / wall second",
           title=f"Throughput against concurrency ({run['workload']})")
    ax.set_ylim(bottom=0)
    _finish(ax, run)
    paths.append(_save(fig, run_dir / "throughput.png"))
    plt.close("all")
    return paths


def _finish(ax, run: dict) -> None:
    levels = run["plan"]["levels"]
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_report(run_dir: Path) -> dict:
    """report.md, report.json, latency.png and throughput.png in `run_dir`; returns the report."""
    report = build(run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot(report, run_dir)
    (run_dir / "report.md").write_text(render(report) + "\n![latency](latency.png)\n![throughput](throughput.png)\n")
    return report
