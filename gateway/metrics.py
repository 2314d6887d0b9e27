"""The gateway's own Prometheus metrics, served on a port of their own (`--metrics-port`, 8082,
on `--metrics-host`, loopback unless told), never on the API's: callers do not see them.

Each app has its own registry (several apps in one process, as the tests make, each count their
own). Labels are bounded: a route is its path template (`/v1/jobs/{job_id}`), never a raw path;
a path no route matches is "other". What is a level now (work open, the drain, the offline
runner's turns) is read when scraped, not kept up to date in many places.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import Scope

PREFIX = "tritonasr_gateway_"
OTHER_ROUTE = "other"
# HTTP requests: a probe takes a millisecond, a transcription of an hour of audio minutes.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
# What a job worker did with a file it held: the file's final status (done, failed), queued
# again after a passing failure (retried), or its result thrown away, the claim lost (discarded).
JOB_RESULTS = ("done", "failed", "retried", "discarded")


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(f"{PREFIX}requests_total", "HTTP requests answered, by route (its path template; "
                                "'other': no route matched), method and status code",
                                ["route", "method", "status"], registry=self.registry)
        self.request_seconds = Histogram(f"{PREFIX}request_seconds", "HTTP requests' durations, from their "
                                         "arrival to the end of their response, by route",
                                         ["route"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self.open_sockets = Gauge(f"{PREFIX}open_sockets", "WebSockets open now, by route (/v1/stream; /: FunASR's "
                                  "protocol)", ["route"], registry=self.registry)
        self.job_files = Counter(f"{PREFIX}job_files_total", "job files this process's workers finished with, by "
                                 "result: done, failed (the file's final status), retried (a passing failure, "
                                 "queued again), discarded (the claim was lost: cancelled, or taken over)",
                                 ["result"], registry=self.registry)
        for result in JOB_RESULTS:  # (each series exists from the start, at 0)
            self.job_files.labels(result)
        self._open_work = Gauge(f"{PREFIX}open_work", "HTTP requests and WebSockets being served now (not the "
                                "probes): what a drain waits for", registry=self.registry)
        self._draining = Gauge(f"{PREFIX}draining", "1 while this gateway drains (shutting down: new work "
                               "refused), else 0", registry=self.registry)
        self._offline_waiting = Gauge(f"{PREFIX}offline_waiting", "offline transcriptions (requests and job "
                                      "files) waiting for a turn now", registry=self.registry)
        self._offline_inflight = Gauge(f"{PREFIX}offline_inflight", "offline transcriptions (requests and job "
                                       "files) holding a turn now: being decoded or at Triton",
                                       registry=self.registry)
        self._max_inflight = Gauge(f"{PREFIX}max_inflight", "capacity: offline transcriptions this process works "
                                   "on at once (--max-inflight)", registry=self.registry)

    def read_at_scrape(self, *, open_work: Callable[[], float], draining: Callable[[], bool],
                       offline_waiting: Callable[[], float], offline_inflight: Callable[[], float],
                       max_inflight: float) -> None:
        """The levels, each read when the metrics are scraped."""
        self._open_work.set_function(open_work)
        self._draining.set_function(lambda: 1.0 if draining() else 0.0)
        self._offline_waiting.set_function(offline_waiting)
        self._offline_inflight.set_function(offline_inflight)
        self._max_inflight.set(max_inflight)

    def job_file(self, result: str) -> None:
        self.job_files.labels(result).inc()

    def exposition(self) -> str:
        """The metrics now, in Prometheus's text format (what the metrics port serves)."""
        return generate_latest(self.registry).decode()

    def serve(self, host: str, port: int):
        """Serves the metrics on host:port from a thread; returns the server (its `shutdown()` and
        `server_close()` stop it)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The path template of the route that took (or would take) the request: the router's, once it
    has routed; else the first route that matches (a request refused before routing)."""
    route = scope.get("route")
    if route is None:
        for candidate in routes:
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:
                route = candidate
                break
    path = getattr(route, "path", None)
    if path is None:
        return OTHER_ROUTE
    return f"{path}/{{path}}" if isinstance(route, Mount) else path
