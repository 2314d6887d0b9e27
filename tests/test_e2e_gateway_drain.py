"""SIGTERM to the real `tritonasr gateway` in front of the session's real tritonserver: it drains.
A stream open at the signal gets every final it would have got; new streams and transcriptions
are refused with "draining" while reads go on; readiness is off and liveness on; the gateway
exits 0 once the stream has ended, long before its drain time, or closes what is still open when
that time is up."""
from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from conftest import DATA
from test_e2e_gateway import KEY, Gateway, wait_for_open_streams
from test_e2e_gateway_stream import FINAL_KEYS, reference, ws_stream

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {KEY}"}
START = {"type": "start", "api_key": KEY, "speaker": False}


def _finals(result: dict) -> list[dict]:
    return [{key: m[key] for key in FINAL_KEYS} for m in result["messages"] if m["type"] == "final"]


def _stream_in_background(gateway, frames, pause_s: float) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(ws_stream(gateway, START, frames, pause_s=pause_s)))
    thread.start()
    return thread, result


def test_sigterm_lets_the_open_stream_finish_and_refuses_new_work(server, tmp_path):
    expected = reference(server, DATA / "pause_1s.wav", with_speaker=False)
    gateway = Gateway(server.grpc_url, "--api-key", KEY, log=tmp_path / "log")
    try:
        # Real time: the stream is still sending when the signal comes, and for seconds after.
        thread, result = _stream_in_background(gateway, expected["frames"], pause_s=0.1)
        wait_for_open_streams(server, 1, timeout_s=30)
        time.sleep(0.5)
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{gateway.url}/readyz").status_code != 503:
            assert time.monotonic() < deadline, "still ready after SIGTERM"
            time.sleep(0.05)
        assert httpx.get(f"{gateway.url}/readyz").json() == {"status": "draining"}
        assert httpx.get(f"{gateway.url}/healthz").status_code == 200  # draining is not dead

        refused = ws_stream(gateway, START, expected["frames"][:5])
        assert refused["code"] == 1013 and refused["reason"].startswith("draining")
        assert [m["code"] for m in refused["messages"]] == ["draining"]
        posted = httpx.post(f"{gateway.url}/v1/audio/transcriptions", headers=AUTH, data={"model": "sensevoice"},
                            files={"file": ("a.wav", (DATA / "pause_1s.wav").read_bytes())})
        assert posted.status_code == 503 and posted.json()["error"]["code"] == "draining"
        assert posted.headers["Retry-After"]
        assert httpx.get(f"{gateway.url}/v1/jobs", headers=AUTH).status_code == 200  # reads go on
        assert thread.is_alive(), "the stream ended before the checks: it proves nothing"

        thread.join(timeout=60)
        assert result["code"] == 1000, result
        assert _finals(result) == expected["finals"]
        assert result["messages"][-1]["type"] == "summary"
        assert gateway.process.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 60  # not the 120 s drain time: it ended with the stream
        gateway.wait_for_log("drained in")
    finally:
        if gateway.process.poll() is None:
            gateway.process.kill()


def test_what_is_open_when_the_drain_time_is_up_is_closed(server, tmp_path):
    expected = reference(server, DATA / "pause_1s.wav", with_speaker=False)
    gateway = Gateway(server.grpc_url, "--api-key", KEY, "--drain-seconds", "2", log=tmp_path / "log")
    try:
        # Slower than real time: the stream would go on far past the drain time.
        thread, result = _stream_in_background(gateway, expected["frames"], pause_s=0.5)
        wait_for_open_streams(server, 1, timeout_s=30)
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=30) == 0
        assert 2 <= time.monotonic() - signalled < 20
        thread.join(timeout=30)
        assert result["code"] == 1012, result  # uvicorn's "service restart": reconnect
        gateway.wait_for_log(r"drain time \(2 s\) is up with 1 open")
    finally:
        if gateway.process.poll() is None:
            gateway.process.kill()
