"""Dead model processes: `kill -9` of each model's Python stub under load, against its own real
tritonserver (not the session's) watched by the Supervisor. Health goes not-ready at once, the
server is serving again within 30 s without a hand on it, with the same results as before, and
still stops cleanly on SIGTERM; a crash loop gives up, not live."""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tritonasr.audio import load_audio
from tritonasr.client.offline import OfflineClient
from tritonasr.client.stream import StreamingClient, split_chunks
from tritonasr.serving.server import ServerConfig, TritonServer, free_port, stub_processes
from tritonasr.serving.supervisor import Supervisor

from conftest import DATA

pytestmark = pytest.mark.e2e

AUDIO = "pause_1s.wav"
# One process of each model the pipelines use; of a model with two instances (asr_offline, asr_stream,
# sensevoice), one is killed.
VICTIMS = ["sensevoice", "vad", "asr_offline", "asr_stream", "speaker"]
DETECT_S = 2.0
RESTORE_S = 30.0


def _health(url: str, kind: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/health/{kind}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _wait_health(url: str, kind: str, status: int, timeout_s: float) -> tuple[float, dict]:
    """Seconds until /health/<kind> answers `status`, and its body."""
    start = time.monotonic()
    while True:
        code, body = _health(url, kind)
        elapsed = time.monotonic() - start
        if code == status or elapsed > timeout_s:
            return elapsed, body
        time.sleep(0.05)


def _stream_finals(url: str, samples) -> list[tuple]:
    """The finals' fields; a stream that another server took over mid-way (the client's failover
    after a kill) has its anonymous speaker labels from two servers: they are left out then."""
    async def collect():
        async with StreamingClient(url, finish_timeout_s=30) as client:
            stream = client.stream(split_chunks(samples, 100))
            finals = [s async for s in stream if s.final]
            return [(s.start_ms, s.end_ms, s.text, s.language, s.emotion, s.event,
                     None if stream.failovers else (s.speaker or {}).get("label")) for s in finals]
    return asyncio.run(collect())


def _same_stream(result: list[tuple], expected: list[tuple]) -> bool:
    if all(final[-1] is None for final in result):  # taken over: labels not compared
        expected = [final[:-1] + (None,) for final in expected]
    return result == expected


def _offline(url: str, samples) -> list[dict]:
    with OfflineClient(url, timeout_s=60) as client:
        return client.transcribe(samples)["segments"]


def _retry(call, since: float):
    """call()'s result once it succeeds, within RESTORE_S of `since`."""
    while True:
        try:
            return call()
        except Exception:  # noqa: BLE001 - a caller reconnecting to the restarted server
            if time.monotonic() - since > RESTORE_S:
                raise
            time.sleep(0.2)


def _supervised(repository: Path, models: list[str] | None = None, **options) -> Supervisor:
    # A restart is a cold start: on 2 cores, each Python model process that starts costs seconds.
    # So the models the pipelines use (not Parakeet's, nor speaker_registry), and no second
    # process per model for config auto-completion (no model here has auto_complete_config).
    # Triton's own exit timeout stays short: a drain waits for nothing the test needs.
    config = ServerConfig(repository, free_port(), free_port(), free_port(), models=models,
                          extra_args=["--exit-timeout-secs=5", "--disable-auto-complete-config"])
    return Supervisor(TritonServer(config, echo_log=bool(os.environ.get("TRITONASR_ECHO_SERVER_LOG"))),
                      health_port=free_port(), **options)


class Load:
    """Offline requests and live streams in a loop, in a process of their own: its gRPC channels
    and their reconnect backoff are its own, as another caller's are. Every result that comes
    back is kept, to be compared with the undisturbed one."""

    def __init__(self, url: str, samples, workers: int = 1):
        context = multiprocessing.get_context("spawn")
        self._queue = context.Queue()
        self._done = context.Event()
        self._process = context.Process(target=_load, args=(url, samples, workers, self._queue, self._done))
        self.results: list[tuple[float, str, object]] = []  # (time, kind, result or None on failure)

    def __enter__(self) -> "Load":
        self._process.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        deadline = time.monotonic() + 90
        while self._process.is_alive() and time.monotonic() < deadline:
            self._collect()  # a child blocked on a full queue would never exit
            self._process.join(timeout=0.2)
        self._collect()

    def successes(self, kind: str, since: float) -> list:
        self._collect()
        return [result for at, k, result in self.results if k == kind and at > since and result is not None]

    def _collect(self) -> None:
        while not self._queue.empty():
            self.results.append(self._queue.get())


def _load(url: str, samples, workers: int, results, done) -> None:
    def offline():
        while not done.is_set():
            try:
                result = _offline(url, samples)
            except Exception:  # noqa: BLE001 - failures while the server restarts are expected
                result = None
                time.sleep(0.2)
            results.put((time.monotonic(), "offline", result))

    def streams():
        while not done.is_set():
            try:
                result = _stream_finals(url, samples)
            except Exception:  # noqa: BLE001 - as above
                result = None
                time.sleep(0.2)
            results.put((time.monotonic(), "stream", result))

    threads = [threading.Thread(target=target) for target in [offline, streams] * workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _victim(server: TritonServer, model: str) -> int:
    pids = sorted(pid for pid, argv in server.stub_processes().items() if Path(argv[1]).parent.parent.name == model)
    assert pids, f"no model process of {model}"
    return pids[-1]


def test_kill_9_of_each_model_process_under_load_is_recovered(model_repository):
    samples = load_audio(DATA / AUDIO).samples
    regions: set[str] = set()
    supervisor = _supervised(model_repository, VICTIMS, max_restarts=len(VICTIMS) + 1).start()
    server, health = supervisor.server, supervisor.health_url
    try:
        assert _health(health, "ready")[0] == 200 and _health(health, "live")[0] == 200
        offline = _offline(server.grpc_url, samples)
        streamed = _stream_finals(server.grpc_url, samples)
        assert len(offline) == 2 and len(streamed) == 2

        timings = {}
        with Load(server.grpc_url, samples) as load:
            for model in VICTIMS:
                time.sleep(2)  # load runs on the (re)started server before the kill
                old_server_pid = server.process.pid
                victim = _victim(server, model)
                regions |= _shm_regions(server)
                os.kill(victim, signal.SIGKILL)
                killed = time.monotonic()

                detect_s, body = _wait_health(health, "ready", 503, DETECT_S)
                assert body["ready"] is False, f"{model}: still ready {detect_s:.1f} s after the kill"
                assert model in body["reason"] and str(victim) in body["reason"], body
                assert _health(health, "live")[0] == 200  # being handled: no reason to kill the pod

                body = _wait_health(health, "ready", 200, RESTORE_S)[1]
                ready_s = time.monotonic() - killed
                assert body["ready"], f"{model}: not ready {ready_s:.0f} s after the kill: {body}"
                assert server.process.pid != old_server_pid
                assert not stub_processes(old_server_pid), "the old server's model processes outlived it"

                # Served again, by fresh callers, with what the undisturbed server answered.
                assert _retry(lambda: _offline(server.grpc_url, samples), killed) == offline, model
                assert _retry(lambda: _stream_finals(server.grpc_url, samples), killed) == streamed, model
                timings[model] = (detect_s, ready_s, time.monotonic() - killed)
            recovered = time.monotonic()
            # The load's own callers get through again too (after their gRPC reconnect backoff).
            while not (load.successes("offline", recovered) and load.successes("stream", recovered)):
                assert time.monotonic() - recovered < RESTORE_S, "the load did not get through again"
                time.sleep(0.5)
        print("\nkill -9 -> health not ready, -> health ready, -> offline and stream results (s):",
              {model: tuple(round(t, 2) for t in times) for model, times in timings.items()})

        # Whatever the load got back, before, between and after the kills, was right.
        assert all(result == offline for result in load.successes("offline", 0))
        assert all(_same_stream(result, streamed) for result in load.successes("stream", 0)), \
            [result for result in load.successes("stream", 0) if not _same_stream(result, streamed)]
        assert supervisor.restart_count == len(VICTIMS)
    finally:
        server_pid = server.process.pid if server.process else None
        regions |= _shm_regions(server)
        code = supervisor.stop()
    # SIGTERM after the restarts: a clean exit, no model process or shared memory left behind.
    assert code == 0, server.log_tail()
    assert not stub_processes(server_pid)
    assert not [region for region in regions if (Path("/dev/shm") / region).exists()]
    assert _health_is_down(health)


def _shm_regions(server: TritonServer) -> set[str]:
    return {argv[2].lstrip("/") for argv in server.stub_processes().values()}


def _health_is_down(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/health/live", timeout=2)
    except urllib.error.HTTPError:
        return False
    except OSError:
        return True
    return False


def test_a_crash_loop_gives_up_not_live(model_repository, tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(model_repository / "vad", repository / "vad")
    supervisor = _supervised(repository, max_restarts=1).start()
    server, health = supervisor.server, supervisor.health_url
    stop = threading.Event()
    try:
        os.kill(_victim(server, "vad"), signal.SIGKILL)
        assert not _wait_health(health, "ready", 503, DETECT_S)[1]["ready"]
        assert _wait_health(health, "ready", 200, RESTORE_S)[1]["ready"]
        assert supervisor.restart_count == 1
        os.kill(_victim(server, "vad"), signal.SIGKILL)  # the second death within the window
        elapsed, body = _wait_health(health, "live", 503, 30)
        assert body["state"] == "failed" and "giving up" in body["reason"], body
        assert _health(health, "ready")[0] == 503
        assert supervisor.run(stop) == body["reason"]  # what `serve` exits non-zero with
        assert server.process.poll() is not None and not stub_processes(server.process.pid)
    finally:
        supervisor.stop()
