"""The concurrency sweep's timetable, shared by the Locust shape, the sampler that records each
level's hold window, and the report that cuts the results by those windows."""
from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass

DEFAULT_LEVELS = (1, 2, 4, 8, 16, 32)


def number_list(kind):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise ValueError(f"expected positive numbers, got {text!r}")
        return values
    parse.__name__ = f"{kind.__name__} list"
    return parse


def add_plan_arguments(parser) -> None:
    """The sweep's options, on Locust's command line (and the sweep command's)."""
    group = parser.add_argument_group("tritonasr sweep")
    group.add_argument("--levels", type=number_list(int), default=DEFAULT_LEVELS,
                       help="concurrent callers per level (default 1,2,4,8,16,32)")
    group.add_argument("--settle", type=float, default=10.0,
                       help="seconds at each level before measuring (callers join, queues fill)")
    group.add_argument("--hold", type=float, default=60.0, help="measured seconds per level")
    group.add_argument("--clip-seconds", type=number_list(float), default=(15.0, 30.0, 60.0),
                       help="offline clip lengths, mixed (default 15,30,60)")
    group.add_argument("--stream-seconds", type=float, default=30.0, help="audio per streamed call")
    group.add_argument("--chunk-ms", type=int, default=100, help="streamed chunk size")
    group.add_argument("--partials", type=int, default=0, metavar="MS",
                       help="partial results every MS on tritonasr streams (0: none)")


@dataclass(frozen=True)
class SweepPlan:
    levels: tuple[int, ...]
    settle_s: float
    hold_s: float

    @classmethod
    def from_options(cls, options) -> SweepPlan:
        return cls(tuple(options.levels), float(options.settle), float(options.hold))

    @property
    def level_s(self) -> float:
        return self.settle_s + self.hold_s

    @property
    def duration_s(self) -> float:
        return self.level_s * len(self.levels)

    def level_at(self, elapsed_s: float) -> int | None:
        """The number of callers `elapsed_s` into the sweep; None once it is over."""
        index = int(elapsed_s // self.level_s)
        return self.levels[index] if index < len(self.levels) else None

    def hold_window(self, index: int) -> tuple[float, float, float]:
        """(level start, hold start, level end) of level `index`, in seconds into the sweep."""
        start = index * self.level_s
        return start, start + self.settle_s, start + self.level_s


LEVEL_FIELDS = ["level", "users", "start_s", "hold_start_s", "end_s", "client_cpu_s"]
SERVER_FIELDS = ["level", "users", "model", "requests", "inferences", "executions", "queue_us", "compute_us"]


def sample_levels(plan: SweepPlan, started_at: float, prefix: str, metrics_url: str = "") -> None:
    """Runs beside the users (a greenlet): at each level's hold start and end, reads this
    process's CPU time and Triton's counters; writes one row per level as it ends, so a sweep
    cut short keeps what it measured. The sweep shape keeps the users running until it returns."""
    import gevent
    import psutil

    from tritonasr.loadtest.triton_metrics import counter_deltas, scrape

    process = psutil.Process()

    def cpu_s() -> float:
        times = process.cpu_times()
        return times.user + times.system

    def counters(index: int) -> dict | None:
        """Triton's counters, or None without them: a metrics endpoint that does not answer
        costs that level its server rows, not its own row."""
        if not metrics_url:
            return None
        try:
            return scrape(metrics_url)
        except (OSError, ValueError) as error:
            logging.getLogger(__name__).warning("level %d: no server figures, Triton's metrics failed: %s",
                                                index, error)
            return None

    def server_rows(index: int, users: int, before: gevent.Greenlet, after: gevent.Greenlet) -> None:
        if before.get() is not None and after.get() is not None:
            for model, delta in counter_deltas(before.get(), after.get()).items():
                server.writerow([index, users, model] + [delta[f] for f in SERVER_FIELDS[3:]])
            server_file.flush()

    with open(f"{prefix}_levels.csv", "w", newline="") as levels_file, \
            open(f"{prefix}_server.csv", "w", newline="") as server_file:
        levels, server = csv.writer(levels_file), csv.writer(server_file)
        levels.writerow(LEVEL_FIELDS)
        server.writerow(SERVER_FIELDS)
        writing = []
        for index, users in enumerate(plan.levels):
            start, hold_start, end = plan.hold_window(index)
            _sleep_until(started_at + hold_start)
            cpu_before, hold_began = cpu_s(), time.monotonic() - started_at
            # The scrapes run beside the timetable: under load Triton's metrics can take seconds
            # to answer, which would shift every later window.
            before = gevent.spawn(counters, index)
            _sleep_until(started_at + end)
            cpu_used, hold_ended = cpu_s() - cpu_before, time.monotonic() - started_at
            levels.writerow([index, users, f"{start:.3f}", f"{hold_began:.3f}", f"{hold_ended:.3f}", f"{cpu_used:.3f}"])
            levels_file.flush()
            writing.append(gevent.spawn(server_rows, index, users, before, gevent.spawn(counters, index)))
        gevent.joinall(writing)


def _sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.monotonic()))
