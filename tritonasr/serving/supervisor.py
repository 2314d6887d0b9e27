"""Keeps the embedded Triton server serving when one of its model processes dies.

Triton 2.51's Python backend neither restarts a dead model process (its stub) nor reports it:
the restart of non-decoupled stubs went in python_backend#364 (r24.07), and the stub's health
only reaches readiness with TRITONBACKEND_ModelInstanceReady (python_backend#423, 2025-12).
So after a crash, an OOM kill or `kill -9`, every request the instance gets fails with
"Stub process ... is not healthy" while /v2/health/ready stays 200; unload+load through the
repository API orphans the instance. The supervisor watches the stubs itself, says not-ready
on its own health endpoint at once, and restarts the whole server (the one restore that leaves
nothing behind), a bounded number of times: past that it gives up, not live, and `serve` exits
non-zero so that the orchestrator takes over.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tritonasr.recognition.admission import start_draining
from tritonasr.serving.server import ServerError, TritonServer

STARTING, READY, NOT_READY, RESTARTING, DRAINING, FAILED, STOPPED = (
    "starting", "ready", "not_ready", "restarting", "draining", "failed", "stopped")


class Supervisor:
    """Watches a TritonServer, restarts it when a model process dies or the server stops
    answering, and serves `GET /health/ready` and `GET /health/live` (200 or 503, JSON).

    >>> supervisor = Supervisor(TritonServer(config), health_port=8003).start()
    >>> failure = supervisor.run(stop_event)   # None once stop_event is set
    >>> supervisor.stop()
    """

    def __init__(self, server: TritonServer, health_host: str = "127.0.0.1", health_port: int | None = None,
                 poll_s: float = 0.25, drain_s: float = 1.0, unresponsive_s: float = 15.0,
                 max_restarts: int = 3, restart_window_s: float = 600.0, start_timeout_s: float = 600.0):
        self.server = server
        self.poll_s = poll_s
        # In-flight requests get this long on a server already failing some of them: the restart
        # is mostly the server's cold start (13-14 s for the test models on 2 busy cores).
        self.drain_s = drain_s
        # How long Triton may fail its own readiness probe before it is restarted.
        self.unresponsive_s = unresponsive_s
        # More restarts than this within restart_window_s is a crash loop: give up.
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.start_timeout_s = start_timeout_s
        self.restarts: list[float] = []  # monotonic times of the restarts in the window
        self.restart_count = 0
        self._state, self._reason = STARTING, "tritonserver is starting"
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._failed = threading.Event()
        self._draining = threading.Event()
        self._drain_cut: str | None = None  # what ended a drain early (the server failed meanwhile)
        self._stubs: dict[int, str] = {}  # pid -> "instance (model)" of the processes being watched
        self._last_ready = time.monotonic()
        self._monitor: threading.Thread | None = None
        self._http: ThreadingHTTPServer | None = None
        if health_port is not None:
            self._http = ThreadingHTTPServer((health_host, health_port), _handler(self))
            self._http.daemon_threads = True

    @property
    def health_url(self) -> str | None:
        if self._http is None:
            return None
        host, port = self._http.server_address[:2]
        return f"http://{'localhost' if host in ('0.0.0.0', '::') else host}:{port}"

    def health(self) -> dict:
        """What the health endpoint answers: ready, live, the state and why."""
        with self._lock:
            state, reason = self._state, self._reason
        monitoring = self._monitor is not None and self._monitor.is_alive()
        return {"ready": state == READY and monitoring,
                "live": state in (STARTING, STOPPED) or (state != FAILED and monitoring),
                "state": state, "reason": reason, "restarts": self.restart_count,
                "model_processes": len(self._stubs)}

    def start(self) -> "Supervisor":
        """Serves health (not ready while starting), starts the server (a ServerError if it does
        not come up: a first start that fails is a configuration problem, not a crash) and
        watches it."""
        if self._http is not None:
            threading.Thread(target=self._http.serve_forever, name="health", daemon=True).start()
        if self.server.process is None:
            try:
                self.server.start(self.start_timeout_s)
            except ServerError as exc:
                self._set(FAILED, f"tritonserver did not start: {exc}")
                self._close_http()
                raise
        self._watch_new_server()
        self._monitor = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._monitor.start()
        return self

    def run(self, stop: threading.Event) -> str | None:
        """Blocks until `stop` is set (None) or the supervisor gave up (the reason)."""
        while not stop.wait(0.5):
            if self._failed.is_set():
                return self._reason
        return None

    def drain(self, grace_s: float, hurry: threading.Event | None = None, poll_s: float = 0.25) -> str | None:
        """Readiness off, new streams and offline requests refused (`admission.start_draining`);
        waits until the open streams have ended and the offline requests taken in are answered,
        at most `grace_s` (or until `hurry` is set). None when nothing was left, else what was."""
        self._draining.set()
        if self.server.process is not None:
            start_draining(self.server.process.pid)
        deadline = time.monotonic() + grace_s
        while True:
            left = self.server.work_left()
            if left == {} or self._drain_cut:
                return self._drain_cut
            what = ", ".join(f"{count} {name}" for name, count in left.items()) if left else "metrics unreadable"
            self._set(DRAINING, f"draining: {what} left")
            if time.monotonic() >= deadline or (hurry is not None and hurry.is_set()):
                return what
            time.sleep(poll_s)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """Stops watching and stops the server (SIGTERM, then SIGKILL after `timeout_s`)."""
        self._closing.set()
        code = self.server.stop(timeout_s)  # also ends a restart that is still waiting for ready
        if self._monitor is not None:
            self._monitor.join()
        code = self.server.stop(timeout_s) if self.server.process and self.server.process.poll() is None else code
        self._set(STOPPED, "stopped")
        self._close_http()
        return code

    def _close_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def _set(self, state: str, reason: str) -> None:
        with self._lock:
            if self._draining.is_set() and state in (READY, NOT_READY):
                return  # readiness stays off until the server stops
            self._state, self._reason = state, reason

    def _watch_new_server(self) -> None:
        self._stubs = {pid: _describe(argv) for pid, argv in self.server.stub_processes().items()}
        self._last_ready = time.monotonic()
        self._set(READY, f"serving; {len(self._stubs)} model processes")

    def _loop(self) -> None:
        while not self._closing.wait(self.poll_s):
            problem = self._check()
            if problem and self._draining.is_set():
                self._drain_cut = f"{problem} while draining"  # its streams are gone: no restart
            elif problem and not self._closing.is_set():
                self._recover(problem)
            if self._failed.is_set():
                return

    def _check(self) -> str | None:
        """Why the server must be restarted, or None. Sets not-ready while Triton is."""
        process = self.server.process
        if process is None or process.poll() is not None:
            return f"tritonserver exited ({process.returncode if process else None})"
        alive = self.server.stub_processes()
        for pid in [pid for pid in self._stubs if pid not in alive]:
            name = self._stubs.pop(pid)
            # A stub also goes when its model is unloaded (explicit model control): only a dead
            # process under a model Triton still serves, or under a server no longer ready, is a fault.
            if self._model_ready(_model_of(name)) or not self._triton_ready():
                return f"model process {name} (pid {pid}) died"
        for pid, argv in alive.items():  # models loaded since (explicit model control)
            self._stubs.setdefault(pid, _describe(argv))
        if self._triton_ready():
            self._last_ready = time.monotonic()
            self._set(READY, f"serving; {len(self._stubs)} model processes")
            return None
        silent = time.monotonic() - self._last_ready
        if silent > self.unresponsive_s:
            return f"tritonserver not ready for {silent:.0f} s"
        self._set(NOT_READY, "tritonserver reports not ready, or does not answer")
        return None

    def _recover(self, problem: str) -> None:
        self._set(RESTARTING, problem)
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.restart_window_s]
        if len(self.restarts) >= self.max_restarts:
            reason = (f"{problem}; {len(self.restarts)} restarts in the last {self.restart_window_s:.0f} s: "
                      "giving up")
            print(f"tritonasr: {reason}", file=sys.stderr, flush=True)
            self.server.stop(self.drain_s)
            self._set(FAILED, reason)
            self._failed.set()
            return
        self.restarts.append(now)
        self.restart_count += 1
        print(f"tritonasr: {problem}: restarting tritonserver", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            self.server.restart(self.drain_s, self.start_timeout_s)
        except ServerError as exc:
            # The next check sees the server down and tries again, within the restart budget.
            self._set(RESTARTING, f"{problem}; the restart failed: {exc}")
            return
        if self._closing.is_set():
            return
        self._watch_new_server()
        print(f"tritonasr: ready again after {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)

    def _triton_ready(self) -> bool:
        return _http_ok(f"{self.server.http_url}/v2/health/ready")

    def _model_ready(self, model: str) -> bool:
        return _http_ok(f"{self.server.http_url}/v2/models/{model}/ready")


def _describe(argv: list[str]) -> str:
    """`instance (model)` from a stub's command line (see tritonasr.serving.server.stub_processes)."""
    return f"{argv[8]} ({Path(argv[1]).parent.parent.name})"


def _model_of(described: str) -> str:
    return described[described.rindex("(") + 1:-1]


def _http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except OSError:  # refused, timed out, or an HTTP error status
        return False


def _handler(supervisor: Supervisor) -> type[BaseHTTPRequestHandler]:
    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            kind = {"/health/ready": "ready", "/health/live": "live", "/health": "ready"}.get(self.path)
            if kind is None:
                self.send_error(404, "GET /health/ready or /health/live")
                return
            health = supervisor.health()
            body = json.dumps(health).encode()
            self.send_response(200 if health[kind] else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # probes every few seconds: no access log
            pass

    return Health
