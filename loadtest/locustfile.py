"""Locust users for tritonasr and its baselines, and the concurrency sweep that drives them.

    locust -f loadtest/locustfile.py --headless --csv out/tritonasr --host localhost:8001 \\
        --levels 1,2,4,8 --settle 10 --hold 60 TritonOfflineUser

(`tritonasr loadtest sweep` runs this for each system and writes the report.)

The users, by what --host names: TritonOfflineUser and TritonStreamUser, Triton's gRPC
(HOST:PORT); GatewayOfflineUser and GatewayStreamUser, `tritonasr gateway` in front of it
(http://HOST:PORT); WebsocketOfflineUser and WebsocketStreamUser, the baselines (ws://HOST:PORT).
None runs the speaker stage: the baselines have none.

A Locust user is one caller, sending one request or stream after another:
- offline users send whole clips (15 s, 30 s, 60 s by default, mixed) and report each as a
  request named after its length;
- streaming users send a caller's speech in real-time-paced chunks over one stream per call and
  report, per final segment, end of speech -> final ("final after end of speech"), per stream
  the first response ("first response") and the whole stream ("stream"; failures land here).

`SweepShape` steps through the concurrency levels, each held for `--settle` + `--hold` seconds.
Besides Locust's own CSVs, every request goes into `<csv prefix>_requests.csv` with its start
and end times, and a sampler writes each level's hold window (with this process's CPU time) to
`<csv prefix>_levels.csv` and, given `--metrics-url`, Triton's per-model counters over that
window to `<csv prefix>_server.csv`; `tritonasr loadtest report` reads them.
"""
from __future__ import annotations

# Before anything opens a gRPC channel: gRPC's blocking calls then yield to other greenlets.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import csv  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from locust import LoadTestShape, User, constant, events, task  # noqa: E402
from locust.log import greenlet_exception_logger  # noqa: E402

from tritonasr.loadtest import workload  # noqa: E402
from tritonasr.loadtest.sweep_plan import SweepPlan, add_plan_arguments, sample_levels  # noqa: E402

_environment = None  # Locust's, from the init event
_started_at: float | None = None  # monotonic time the sweep began
_requests_csv = None
_sampler: gevent.Greenlet | None = None  # sample_levels, with --csv
_clients: list = []  # the users' gRPC clients (see _quit)


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    add_plan_arguments(parser)
    parser.add_argument("--metrics-url", default="",
                        help="Triton's metrics endpoint, to record queue time and batch sizes per level")


def _options():
    return _environment.parsed_options


@events.init.add_listener
def _init(environment, **_kw) -> None:
    global _environment
    _environment = environment


@events.test_start.add_listener
def _start(environment, **_kw) -> None:
    global _started_at, _requests_csv, _sampler
    _started_at = time.monotonic()
    prefix = environment.parsed_options.csv_prefix
    if prefix:
        # Line-buffered: each request is on disk once written, so a Locust killed when it hangs
        # at exit (see sweep.py) loses none of them.
        handle = open(f"{prefix}_requests.csv", "w", newline="", buffering=1)  # noqa: SIM115 - closed at quit
        _requests_csv = (handle, csv.writer(handle))
        _requests_csv[1].writerow(["kind", "name", "started_s", "ended_s", "latency_ms", "audio_s", "ok", "error"])
        _sampler = gevent.spawn(sample_levels, SweepPlan.from_options(environment.parsed_options), _started_at,
                                prefix, environment.parsed_options.metrics_url)
        # A sampler that fails fails the run (Locust's exit code 2) instead of losing levels quietly.
        _sampler.link_exception(greenlet_exception_logger(logging.getLogger(__name__)))


@events.test_stop.add_listener
def _stop(**_kw) -> None:
    if _requests_csv is not None:
        _requests_csv[0].flush()


@events.quitting.add_listener
def _quit(**_kw) -> None:
    if _requests_csv is not None:
        _requests_csv[0].close()
    # Every gRPC client closed here, while gevent still runs: one left to the garbage collector
    # at exit (a user stopped before its on_stop) hung Locust in grpc's Channel.close.
    for client in _clients:
        client.close()
    _clients.clear()


def _opened(client):
    """`client`, to be closed when Locust quits (closing twice is harmless)."""
    _clients.append(client)
    return client


class Caller(User):
    """A caller: reports each request both to Locust and, with its times, to _requests.csv."""

    abstract = True
    wait_time = constant(0)
    _numbers = itertools.count()

    def on_start(self) -> None:
        self.number = next(self._numbers)
        self.calls = itertools.count(self.number)

    def report(self, kind: str, name: str, started: float, latency_ms: float, audio_s: float,
               error: BaseException | None = None) -> None:
        self.environment.events.request.fire(
            request_type=kind, name=name, response_time=latency_ms, response_length=0, exception=error,
            context={})
        if _requests_csv is not None:
            _requests_csv[1].writerow([kind, name, f"{started - _started_at:.4f}",
                                       f"{time.monotonic() - _started_at:.4f}", f"{latency_ms:.2f}",
                                       f"{audio_s:.3f}", int(error is None),
                                       "" if error is None else f"{type(error).__name__}: {error}"[:300]])


class OfflineCaller(Caller):
    """Sends whole clips, one after another, cycling through the lengths and variants."""

    abstract = True

    def transcribe(self, samples):
        raise NotImplementedError

    @task
    def one_clip(self) -> None:
        lengths = _options().clip_seconds
        call = next(self.calls)
        seconds = lengths[call % len(lengths)]
        samples = workload.clip(seconds, call)
        started, error = time.monotonic(), None
        try:
            self.transcribe(samples)
        except Exception as exc:  # noqa: BLE001 - a failed request, reported as one
            error = exc
        self.report("offline", f"{seconds:g} s clip", started, (time.monotonic() - started) * 1000, seconds, error)


class StreamCaller(Caller):
    """Streams a caller's speech in real time, one call after another."""

    abstract = True

    def on_start(self) -> None:
        super().on_start()
        # Callers who join together would otherwise reach every sentence end at once.
        gevent.sleep(random.uniform(0, 3))

    def stream(self, samples, on_final):
        """Streams `samples`; calls on_final(start_ms, end_ms, latency_ms, received_at) per final;
        returns the first response's delay in ms."""
        raise NotImplementedError

    @task
    def one_call(self) -> None:
        options = _options()
        samples = workload.stream_audio(options.stream_seconds, next(self.calls))
        audio_s = workload.seconds(samples)
        started = time.monotonic()

        def on_final(start_ms: float, end_ms: float, latency_ms: float) -> None:
            self.report("final", "final after end of speech", started, latency_ms, (end_ms - start_ms) / 1000)

        try:
            first_ms = self.stream(samples, on_final)
        except Exception as exc:  # noqa: BLE001 - a failed stream, reported as one
            self.report("stream", "stream", started, (time.monotonic() - started) * 1000, audio_s, exc)
            return
        if first_ms is not None:
            self.report("first_response", "first response", started, first_ms, 0.0)
        self.report("stream", "stream", started, (time.monotonic() - started) * 1000, audio_s)


class TritonOfflineUser(OfflineCaller):
    """tritonasr's asr_offline over gRPC (--host is the gRPC address)."""

    def on_start(self) -> None:
        from tritonasr.client.connection import NO_RETRY
        from tritonasr.client.offline import OfflineClient

        super().on_start()
        self.client = _opened(OfflineClient(self.host, retry=NO_RETRY))  # a refusal is counted, not hidden

    def on_stop(self) -> None:
        self.client.close()

    def transcribe(self, samples):
        # The baselines have no speaker stage: compare like with like.
        return self.client.transcribe(samples, with_speaker=False)


class TritonStreamUser(StreamCaller):
    """tritonasr's asr_stream over gRPC, one bidirectional stream per call."""

    def on_start(self) -> None:
        import tritonclient.grpc as grpcclient

        from tritonasr.client.connection import Credentials

        super().on_start()
        # TLS and keys from the $TRITONASR_* variables, as for every client.
        self.credentials = Credentials.from_environment()
        self.client = _opened(grpcclient.InferenceServerClient(self.host, **self.credentials.grpc_options()))

    def on_stop(self) -> None:
        self.client.close()

    def stream(self, samples, on_final):
        from tritonasr.loadtest.grpc_stream import run_stream

        options = _options()
        result = run_stream(self.client, samples, chunk_ms=options.chunk_ms, realtime=True,
                            headers=self.credentials.headers(),
                            partial_interval_ms=options.partials, with_speaker=False,
                            on_segment=lambda s: on_final(s.start_ms, s.end_ms, s.latency_ms))
        return result.first_response_ms


class WebsocketOfflineUser(OfflineCaller):
    """sherpa-onnx's offline websocket protocol (the sherpa-onnx server, the per-session
    baseline); --host is the ws:// address."""

    def transcribe(self, samples):
        from tritonasr.loadtest.ws_offline import OfflineWebsocketError, transcribe

        result = transcribe(self.host, samples)
        if "error" in result:  # a refusal arrives as a result message: count it as a failure
            raise OfflineWebsocketError(result["error"])
        return result


class WebsocketStreamUser(StreamCaller):
    """The per-session baseline's /stream endpoint."""

    def stream(self, samples, on_final):
        from tritonasr.loadtest.ws_stream import stream

        options = _options()
        summary = stream(f"{self.host}/stream", samples, chunk_ms=options.chunk_ms, realtime=True,
                         on_segment=lambda s: on_final(s.start_ms, s.end_ms, s.latency_ms))
        return summary["first_response_ms"]


class GatewayOfflineUser(OfflineCaller):
    """`tritonasr gateway`'s OpenAI `POST /v1/audio/transcriptions` (--host is its http://
    address): each clip as a 16-bit WAV, the server's default engine, speaker stage off; one
    HTTP session (kept-alive connections) per caller; any HTTP error, a 503 too, fails the request.
    The key: the first of $TRITONASR_API_KEY's, as a Bearer token."""

    def on_start(self) -> None:
        import requests

        from tritonasr.loadtest.ws_gateway import api_key_from_environment

        super().on_start()
        self.api_key = api_key_from_environment()
        self.session = requests.Session()

    def on_stop(self) -> None:
        self.session.close()

    def transcribe(self, samples):
        from tritonasr.loadtest.ws_gateway import transcribe

        return transcribe(self.host, samples, session=self.session, api_key=self.api_key)


class GatewayStreamUser(StreamCaller):
    """`tritonasr gateway`'s `WS /v1/stream` (--host is its http:// address), one socket per call:
    pcm16 frames of --chunk-ms paced in real time, speaker stage off, --partials as partials_ms."""

    def on_start(self) -> None:
        from tritonasr.loadtest.ws_gateway import api_key_from_environment, stream_url

        super().on_start()
        self.api_key = api_key_from_environment()
        self.url = stream_url(self.host)

    def stream(self, samples, on_final):
        from tritonasr.loadtest.ws_gateway import stream

        options = _options()
        summary = stream(self.url, samples, chunk_ms=options.chunk_ms, realtime=True, api_key=self.api_key,
                         partials_ms=options.partials,
                         on_segment=lambda s: on_final(s.start_ms, s.end_ms, s.latency_ms))
        return summary["first_response_ms"]


class SweepShape(LoadTestShape):
    """Steps through --levels concurrent users, each level held --settle + --hold seconds; stops
    once the sampler has recorded the last level."""

    def tick(self):
        plan = SweepPlan.from_options(self.runner.environment.parsed_options)
        level = plan.level_at(self.get_run_time())
        if level is not None:
            return level, level  # every new caller joins within a second
        # Stopping on a timer lost the last level whenever the sampler's scrape of Triton's
        # metrics at its end took longer: the callers go on until it is done.
        if _sampler is not None and not _sampler.ready():
            return plan.levels[-1], plan.levels[-1]
        return None
