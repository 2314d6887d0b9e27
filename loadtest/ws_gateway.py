"""Clients of `tritonasr gateway` for the load tests (Locust's GatewayOfflineUser and
GatewayStreamUser): OpenAI's `POST /v1/audio/transcriptions` and the live `WS /v1/stream`
(docs/websocket-stream.md), both without the speaker stage, as every other system is measured.

Synchronous on purpose, like ws_stream.py (whose PacedStream this shares: the same pacing, and
finals timed on the same ChunkClock): `requests` and websockets' sync client run unchanged in
threads and, once gevent has monkey-patched sockets, in Locust's greenlets.

- `transcribe`: one clip as a 16-bit WAV, `model` the server's default engine (OpenAI's
  `whisper-1` names it), `response_format=json`, `speaker=false`; any HTTP error (a 503 from a
  full gateway too) raises GatewayError.
- `stream`: one socket per stream: the start message (`speaker: false`), answered by `started`
  before the clock starts (the handshake, like connecting); then pcm16 frames paced in real
  time and `{"type": "end"}`; finals timed from the frame holding their `end_ms` being sent, the
  first response the first message after `started`.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable

import numpy as np

from tritonasr.audio import SAMPLE_RATE, encode, validate_samples
from tritonasr.client.stream import StreamSegment, split_chunks
from tritonasr.loadtest.ws_stream import PacedStream, WebsocketStreamError, closed_how

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
STREAM_PATH = "/v1/stream"
# OpenAI's model name, which the gateway gives the server's default engine: what the gRPC users
# get by naming none.
DEFAULT_MODEL = "whisper-1"
# (connect, read) seconds for one request: as long as the gateway gives Triton per request.
HTTP_TIMEOUT_S = (10.0, 900.0)


class GatewayError(RuntimeError):
    """The gateway refused or failed a request; the message gives its status and OpenAI-style error."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def api_key_from_environment() -> str | None:
    """The first of $TRITONASR_API_KEY's keys, as every client takes it (None when unset)."""
    from tritonasr.client.connection import Credentials

    return Credentials.from_environment().api_key


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def stream_url(base_url: str) -> str:
    """The gateway's `WS /v1/stream` for its http(s):// address (a ws(s):// one is kept)."""
    base = base_url.rstrip("/")
    for http, ws in (("http://", "ws://"), ("https://", "wss://")):
        if base.startswith(http):
            base = ws + base[len(http):]
    if not base.startswith(("ws://", "wss://")):
        base = "ws://" + base
    return base + STREAM_PATH


def wav_bytes(samples: np.ndarray) -> bytes:
    """16 kHz mono samples as a 16-bit PCM WAV file."""
    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, validate_samples(np.asarray(samples)), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def transcribe(base_url: str, samples: np.ndarray, *, session=None, api_key: str | None = None,
               model: str = DEFAULT_MODEL, timeout_s: float | tuple[float, float] = HTTP_TIMEOUT_S,
               timings: dict[str, float] | None = None) -> dict:
    """One clip through `POST {base_url}/v1/audio/transcriptions`: OpenAI's json answer
    ({"text", "usage"}). `session`: a requests.Session to reuse its connections (one per caller);
    `timings`: given the answer's Server-Timing durations (ms by name: queue, decode, triton).
    Raises GatewayError on any answer but 200 with a JSON object holding "text", and on a
    gateway that cannot be reached."""
    import requests

    wav = wav_bytes(samples)
    url = base_url.rstrip("/") + TRANSCRIPTIONS_PATH
    poster = session if session is not None else requests
    try:
        response = poster.post(url, files={"file": ("clip.wav", wav, "audio/wav")},
                               data={"model": model, "response_format": "json", "speaker": "false"},
                               headers=auth_headers(api_key), timeout=timeout_s)
    except requests.RequestException as exc:
        raise GatewayError(f"cannot talk to {url}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise GatewayError(f"{url} answered {response.status_code}: {_error_text(response)}", response.status_code)
    try:
        result = response.json()
    except ValueError:
        result = None
    if not isinstance(result, dict) or not isinstance(result.get("text"), str):
        raise GatewayError(f"{url} answered 200 without a transcript: {response.text[:200]!r}", 200)
    if timings is not None:
        timings.update(server_timing(response.headers.get("Server-Timing", "")))
    return result


def server_timing(header: str) -> dict[str, float]:
    """A Server-Timing header's durations: {name: ms} (metrics without a `dur` are left out)."""
    durations = {}
    for metric in filter(None, (part.strip() for part in header.split(","))):
        name, *params = (field.strip() for field in metric.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "dur":
                try:
                    durations[name] = float(value.strip().strip('"'))
                except ValueError:
                    pass
    return durations


def _error_text(response) -> str:
    """OpenAI's error body's code and message, or the start of whatever came."""
    try:
        error = response.json()["error"]
        return f"{error.get('code') or error.get('type')}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return repr(response.text[:200])


def stream(url: str, samples: np.ndarray, chunk_ms: float = 100, realtime: bool = True,
           on_segment: Callable[[StreamSegment], None] | None = None, timeout_s: float = 120.0,
           open_timeout_s: float = 10.0, api_key: str | None = None, partials_ms: int = 0,
           **options) -> dict:
    """Streams `samples` (16 kHz mono float) to the gateway's `url` (ws://host:port/v1/stream) as
    pcm16 messages of `chunk_ms`, calling `on_segment` per final as it arrives (timed as
    ws_stream.stream times them). `api_key`: sent as `Authorization: Bearer` on the upgrade;
    `options`: more fields of the start message (language, engine, endpointing, ...; `speaker`
    is false unless given).

    Returns the summary as ws_stream.stream does ("duration_ms", "segment_count", "received_ms",
    "first_response_ms", "finals", "chunks"), with "request_id" (the gateway's, from `started`)
    and "hops_ms": per final, its latency here minus its `triton_ms` (the network's part and the
    gateway's).
    Raises WebsocketStreamError when the gateway refuses the stream (its error code and
    message), closes it early, cannot be reached or sends no summary within `timeout_s` after
    the last frame."""
    samples = validate_samples(np.asarray(samples), allow_empty=True)
    pcm = encode(samples, "pcm16")
    frames = [(len(frame) // 2, bytes(frame)) for frame in split_chunks(pcm, chunk_ms, encoding="pcm16")]
    start = {"type": "start", "encoding": "pcm16", "sample_rate": SAMPLE_RATE, "speaker": False,
             "partials_ms": partials_ms, **options}
    session = _GatewayStream(url, start, on_segment)
    summary = session.run(frames, realtime=realtime, timeout_s=timeout_s, open_timeout_s=open_timeout_s,
                          headers=auth_headers(api_key))
    summary.update(request_id=session.request_id, hops_ms=session.hops_ms)
    return summary


class _GatewayStream(PacedStream):
    """`WS /v1/stream`: start -> started, audio, end; typed JSON messages, errors as
    {"type": "error", "code", "message"} before the close."""

    def __init__(self, url: str, start: dict, on_segment):
        super().__init__(url, on_segment)
        self.start = start
        self.request_id: str | None = None
        self.hops_ms: list[float] = []

    def begin(self, conn, timeout_s: float) -> None:
        from websockets.exceptions import ConnectionClosed

        conn.send(json.dumps(self.start))
        try:
            message = conn.recv(timeout=timeout_s)
        except TimeoutError:
            raise WebsocketStreamError(f"{self.url} did not answer the start message within {timeout_s:g} s") from None
        except ConnectionClosed as exc:
            raise WebsocketStreamError(f"{self.url} closed the stream {closed_how(exc)} after the start message") \
                from None
        payload = self.parsed(message)
        self._refusal(payload)
        if payload.get("type") != "started":
            raise self.unexpected(message, "the start message was answered by something else than `started`")
        self.request_id = payload.get("request_id")

    def end(self, conn) -> None:
        conn.send(json.dumps({"type": "end"}))

    def handle(self, message: str | bytes, received_at: float) -> None:
        payload = self.parsed(message)
        self._refusal(payload)
        kind = payload.get("type")
        try:
            if kind == "summary":
                self.complete(int(payload["duration_ms"]), int(payload["segment_count"]), received_at)
            elif kind == "final":
                segment = self.timed_segment(payload, int(payload["index"]), True, received_at)
                if segment.latency_ms is not None and payload.get("triton_ms") is not None:
                    self.hops_ms.append(segment.latency_ms - float(payload["triton_ms"]))
                self.add_final(segment)
            elif kind not in ("partial", "speaker"):  # partials and late speakers: not timed here
                raise ValueError(f"a message of type {kind!r} during the stream")
        except (KeyError, TypeError, ValueError) as exc:
            raise self.unexpected(message, repr(exc)) from None

    def _refusal(self, payload: dict) -> None:
        if payload.get("type") == "error":
            raise WebsocketStreamError(f"{self.url} refused the stream: {payload.get('code')}: "
                                       f"{payload.get('message')}")
