"""The HTTP gateway (`tritonasr gateway`, the real process, served by uvicorn) in front of the
session's real tritonserver. OpenAI's official Python client, unchanged, is the caller: its
results equal the client library's for the same audio, in every response format; bad input,
wrong keys, oversized uploads and a saturated gateway get the status that says whose fault it is,
in OpenAI's error body, and the gateway goes on serving."""
from __future__ import annotations

import io
import json
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import yaml

from tritonasr.audio import load_audio
from tritonasr.client.formats import render
from tritonasr.gateway.transcriptions import joined_text
from tritonasr.paths import deploy_files
from tritonasr.serving.dashboard import expression_metrics
from tritonasr.serving.server import free_port

from conftest import DATA

pytestmark = pytest.mark.e2e

KEY = "gateway-test-key"
MAX_UPLOAD_MB = 4
SPEECH = DATA / "pause_1s.wav"


class Gateway:
    """`tritonasr gateway` in a process of its own, on a free port, and its metrics on another
    (`metrics_url`); with `certs` (make_certs' directory) it serves HTTPS and WSS."""

    def __init__(self, triton_url: str, *extra: str, log: Path, certs: Path | None = None):
        self.port = free_port()
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log = log
        tls = ["--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key")] if certs else []
        self.context = ssl.create_default_context(cafile=str(certs / "ca.crt")) if certs else None
        if "--jobs-db" not in extra:  # its own, beside its log: never the user's default database
            extra = (*extra, "--jobs-db", str(log.with_name(log.name + ".jobs.db")))
        self.url = f"{'https' if certs else 'http'}://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tritonasr.cli", "gateway", "--url", triton_url, "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), *tls, *extra],
            stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2, context=self.context) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the gateway did not come up: " + log.read_text())

    def wait_for_log(self, pattern: str, timeout_s: float = 5.0) -> str:
        """The log once a line matches `pattern` (lines are written when a request or socket ends,
        which its client may see first)."""
        deadline = time.monotonic() + timeout_s
        while not re.search(pattern, self.log.read_text()):
            assert time.monotonic() < deadline, f"no log line like {pattern!r}: " + self.log.read_text()
            time.sleep(0.05)
        return self.log.read_text()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def server_gauge(server, name: str) -> float:
    """The sum of the server's `name` gauges now."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, flags=re.M))


def open_streams(server) -> float:
    """The streams the server holds now."""
    return server_gauge(server, "tritonasr_open_streams")


def wait_for_open_streams(server, count: float, timeout_s: float) -> float:
    """Seconds until the server holds `count` streams."""
    began = time.monotonic()
    while open_streams(server) != count:
        assert time.monotonic() - began < timeout_s, f"{open_streams(server):g} streams open, waited for {count:g}"
        time.sleep(0.1)
    return time.monotonic() - began


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    running = Gateway(server.grpc_url, "--api-key", KEY, "--max-upload-mb", str(MAX_UPLOAD_MB),
                      "--cors-origin", "https://app.example.com", log=tmp_path_factory.mktemp("gateway") / "log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def openai_client(gateway):
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def direct(server):
    """The client library's results for SPEECH, by engine."""
    from tritonasr.client.offline import OfflineClient

    with OfflineClient(server.grpc_url, timeout_s=120) as client:
        return {engine: client.transcribe_file(SPEECH, engine=engine) for engine in ("sensevoice", "parakeet")}


def _times(segments) -> list[tuple[float, float]]:
    return [(round(s.start, 3), round(s.end, 3)) for s in segments]


def test_openai_client_gets_the_same_transcript(openai_client, direct):
    expected = direct["sensevoice"]["segments"]
    assert len(expected) >= 2
    with SPEECH.open("rb") as f:
        result = openai_client.audio.transcriptions.create(model="sensevoice", file=f)
    assert result.text == joined_text(expected)
    assert result.usage.seconds == pytest.approx(load_audio(SPEECH).duration_ms / 1000)
    # OpenAI's own model names take the server's default engine (sensevoice here).
    with SPEECH.open("rb") as f:
        assert openai_client.audio.transcriptions.create(model="whisper-1", file=f).text == result.text


def test_metrics_count_the_transcription(gateway, openai_client, direct):
    """The gateway's own metrics, scraped over HTTP from its metrics port, count the request by its
    route; the API's port has no /metrics."""
    wanted = {"route": "/v1/audio/transcriptions", "method": "POST", "status": "200"}

    def transcriptions_ok() -> float:
        text = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
        return sum(float(value) for labels, value in
                   re.findall(r"^tritonasr_gateway_requests_total\{(.*)\} (\S+)$", text, flags=re.M)
                   if dict(re.findall(r'(\w+)="([^"]*)"', labels)) == wanted)

    before = transcriptions_ok()
    with SPEECH.open("rb") as f:
        assert openai_client.audio.transcriptions.create(model="sensevoice", file=f).text == \
            joined_text(direct["sensevoice"]["segments"])
    gateway.wait_for_log(r"POST /v1/audio/transcriptions 200")  # (counted as the response ends)
    assert transcriptions_ok() == before + 1
    text = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
    assert re.search(r'^tritonasr_gateway_request_seconds_count\{route="/v1/audio/transcriptions"\} [1-9]', text,
                     flags=re.M)
    assert re.search(r"^tritonasr_gateway_offline_inflight 0\.0$", text, flags=re.M)
    assert httpx.get(f"{gateway.url}/metrics", timeout=10).status_code == 404
    # Every metric the gateway's alert rules watch is on this port.
    rules = yaml.safe_load((deploy_files() / "prometheus" / "alerts.yml").read_text())
    (group,) = [group for group in rules["groups"] if group["name"] == "tritonasr-gateway"]
    watched = set().union(*(expression_metrics(rule["expr"]) for rule in group["rules"])) - {"up"}
    assert {"tritonasr_gateway_requests_total", "tritonasr_gateway_max_inflight"} <= watched
    served = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", text, flags=re.M))
    assert not watched - served, f"the gateway's alerts watch metrics it does not serve: {sorted(watched - served)}"


def test_verbose_json_has_the_segments_and_our_extras(openai_client, direct):
    expected = direct["sensevoice"]["segments"]
    with SPEECH.open("rb") as f:
        result = openai_client.audio.transcriptions.create(model="sensevoice", file=f, response_format="verbose_json")
    assert [s.text for s in result.segments] == [s["text"] for s in expected]
    assert _times(result.segments) == [(s["start_ms"] / 1000, s["end_ms"] / 1000) for s in expected]
    for got, segment in zip(result.segments, expected):
        ours = {k: segment[k] for k in ("speaker", "language", "emotion", "event") if segment.get(k) is not None}
        assert got.model_extra == ours
    assert result.segments[0].model_extra["speaker"]["label"]
    with SPEECH.open("rb") as f:  # the language asked for, by OpenAI's name for it
        english = openai_client.audio.transcriptions.create(model="sensevoice", file=f, language="en",
                                                            response_format="verbose_json")
    assert english.language == "english"


def test_word_timestamps_from_parakeet(openai_client, direct):
    expected = [w for s in direct["parakeet"]["segments"] for w in s["words"]]
    assert expected
    with SPEECH.open("rb") as f:
        result = openai_client.audio.transcriptions.create(
            model="parakeet", file=f, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert [(w.word, w.start, w.end) for w in result.words] == [
        (w["text"], w["start_ms"] / 1000, w["end_ms"] / 1000) for w in expected]
    with SPEECH.open("rb") as f, pytest.raises(openai.BadRequestError) as refused:
        openai_client.audio.transcriptions.create(model="sensevoice", file=f, response_format="verbose_json",
                                                  timestamp_granularities=["word"])
    assert "parakeet" in refused.value.message


@pytest.mark.parametrize("response_format", ["text", "srt", "vtt"])
def test_text_formats(openai_client, direct, response_format):
    result = direct["sensevoice"]
    with SPEECH.open("rb") as f:
        text = openai_client.audio.transcriptions.create(model="sensevoice", file=f, response_format=response_format)
    expected = joined_text(result["segments"]) + "\n" if response_format == "text" else render(result, response_format)
    assert text == expected


def test_diarized_json_names_the_speakers(openai_client, direct):
    expected = direct["sensevoice"]["segments"]
    with SPEECH.open("rb") as f:
        result = openai_client.audio.transcriptions.create(model="sensevoice", file=f, response_format="diarized_json")
    assert [(s.speaker, s.text) for s in result.segments] == [
        (s["speaker"].get("id") or s["speaker"]["label"], s["text"]) for s in expected]


def test_mp3_and_stereo_files(openai_client, direct, tmp_path):
    """Another format, and both channels of a call recognised apart (`channels=separate`)."""
    samples = load_audio(SPEECH).samples
    stereo = tmp_path / "call.flac"
    sf.write(stereo, np.stack([samples, np.zeros_like(samples)], axis=1), 16000)
    with stereo.open("rb") as f:
        result = openai_client.audio.transcriptions.create(
            model="sensevoice", file=f, response_format="verbose_json", extra_body={"channels": "separate"})
    assert [s.model_extra["channel"] for s in result.segments] == [0] * len(direct["sensevoice"]["segments"])
    assert [s.text for s in result.segments] == [s["text"] for s in direct["sensevoice"]["segments"]]


# --- what callers get wrong, and what the gateway cannot do ------------------------------------

def _post(gateway, files=None, data=None, headers=None, key=KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **(headers or {})} if key else (headers or {})
    return httpx.post(f"{gateway.url}/v1/audio/transcriptions", files=files, data=data, headers=headers, timeout=120)


def _error(response: httpx.Response) -> dict:
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_keys_are_checked(gateway, openai_client):
    speech = SPEECH.read_bytes()
    for key, why in ((None, "required"), ("wrong-key", "not valid")):
        response = _post(gateway, files={"file": ("a.wav", speech)}, data={"model": "sensevoice"}, key=key)
        assert response.status_code == 401 and why in _error(response)["message"]
        assert response.headers["WWW-Authenticate"] == "Bearer"
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong-key", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.audio.transcriptions.create(model="sensevoice", file=io.BytesIO(speech))


@pytest.mark.parametrize("data, files, status, code", [
    ({"model": "whisper-large"}, True, 400, "model_not_found"),
    ({}, True, 400, "missing_model"),
    ({"model": "sensevoice"}, False, 400, "missing_file"),
    ({"model": "sensevoice", "language": "xx"}, True, 400, "unsupported_language"),
    ({"model": "sensevoice", "response_format": "xml"}, True, 400, "unsupported_response_format"),
    ({"model": "sensevoice", "timestamp_granularities[]": "word"}, True, 400, "unsupported_granularity"),
    ({"model": "sensevoice", "stream": "true"}, True, 400, "unsupported_stream"),
])
def test_bad_requests_say_what_is_wrong(gateway, data, files, status, code):
    response = _post(gateway, files={"file": ("a.wav", SPEECH.read_bytes())} if files else {"x": ("x", b"")},
                     data=data)
    assert response.status_code == status, response.text
    assert _error(response)["code"] == code


def test_bad_audio(gateway, tmp_path):
    garbage = _post(gateway, files={"file": ("a.wav", b"this is not audio at all" * 100)}, data={"model": "sensevoice"})
    assert garbage.status_code == 415 and "a.wav" in _error(garbage)["message"]
    silent = tmp_path / "nan.wav"
    sf.write(silent, np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    nan = _post(gateway, files={"file": ("nan.wav", silent.read_bytes())}, data={"model": "sensevoice"})
    assert nan.status_code == 400 and _error(nan)["code"] == "invalid_audio"


def test_uploads_over_the_limit_are_refused(gateway):
    big = b"\0" * (MAX_UPLOAD_MB * (1 << 20) + 1)
    declared = _post(gateway, files={"file": ("big.wav", big)}, data={"model": "sensevoice"})
    assert declared.status_code == 413 and _error(declared)["code"] == "upload_too_large"

    def chunks():  # no Content-Length: the limit is checked as the bytes arrive
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n\r\n"
        for _ in range(MAX_UPLOAD_MB + 1):
            yield b"\0" * (1 << 20)
    streamed = httpx.post(f"{gateway.url}/v1/audio/transcriptions", content=chunks(), timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413


def test_request_ids_and_cors(gateway):
    response = _post(gateway, files={"file": ("a.wav", SPEECH.read_bytes())}, data={"model": "sensevoice"},
                     headers={"X-Request-ID": "caller-42"})
    assert response.status_code == 200 and response.headers["X-Request-ID"] == "caller-42"
    # Where the request's time went: the server's part within what the caller waited.
    timing = dict(part.split(";dur=") for part in response.headers["Server-Timing"].split(", "))
    assert set(timing) == {"queue", "decode", "triton"}
    assert 0 < float(timing["triton"]) < response.elapsed.total_seconds() * 1000
    made = _post(gateway, files={"file": ("a.wav", b"")}, data={"model": "nope"}, headers={"X-Request-ID": "bad id!"})
    assert made.headers["X-Request-ID"] != "bad id!" and len(made.headers["X-Request-ID"]) == 32
    gateway.wait_for_log("caller-42 POST /v1/audio/transcriptions 200")  # the log line of that request
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{gateway.url}/v1/audio/transcriptions", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    other = httpx.options(f"{gateway.url}/v1/audio/transcriptions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_a_saturated_gateway_answers_503_with_retry_after(server, tmp_path, direct):
    """One turn, taken by a long recording: a second request waits 0.2 s for it, then is told to
    come back; the first one's result is whole."""
    busy = Gateway(server.grpc_url, "--max-inflight", "1", "--queue-timeout", "0.2", log=tmp_path / "log")
    try:
        long = io.BytesIO()
        sf.write(long, np.tile(load_audio(SPEECH).samples, 12), 16000, format="WAV")
        first: dict = {}

        def transcribe_long():
            first["response"] = _post(busy, files={"file": ("long.wav", long.getvalue())}, data={"model": "sensevoice"},
                                      key=None)

        thread = threading.Thread(target=transcribe_long)
        thread.start()
        deadline = time.monotonic() + 30
        while not server_gauge(server, "tritonasr_inflight_requests"):  # the turn is taken
            assert time.monotonic() < deadline and thread.is_alive(), "the long request never reached the server"
            time.sleep(0.02)
        refused = _post(busy, files={"file": ("a.wav", SPEECH.read_bytes())}, data={"model": "sensevoice"}, key=None)
        thread.join()
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert _error(refused)["code"] == "server_busy"
        assert first["response"].status_code == 200
        assert len(json.loads(first["response"].text)["text"]) > 0
        again = _post(busy, files={"file": ("a.wav", SPEECH.read_bytes())}, data={"model": "sensevoice"}, key=None)
        assert again.status_code == 200 and again.json()["text"] == joined_text(direct["sensevoice"]["segments"])
    finally:
        busy.stop()


def test_non_loopback_gateway_needs_keys(server):
    result = subprocess.run([sys.executable, "-m", "tritonasr.cli", "gateway", "--url", server.grpc_url,
                             "--host", "0.0.0.0", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "--api-key" in result.stderr
