"""`WS /v1/stream`: live recognition over a WebSocket, for browsers and any WebSocket client,
bridged to Triton's `asr_stream` by the client library's StreamingClient (so a stream through the
gateway gets the segments a gRPC client gets for the same audio). docs/websocket-stream.md is the
full description; in short:

Client -> server
  1. one JSON text message `{"type": "start", ...options}`; every field optional, unknown fields
     refused (a typo must not silently change a stream):
       sample_rate  16000 (default) or 8000
       encoding     "pcm16" (default: 16-bit little-endian signed, mono), "mulaw", "alaw"
                    (G.711), or "float32" (little-endian IEEE floats in [-1, 1], Web Audio's own)
       language     "auto" (default), "zh", "en", "yue", "ja", "ko"
       engine       "sensevoice" or "parakeet" ("" or absent: the server's default)
       itn          bool, default false: punctuation and numbers (SenseVoice)
       partials_ms  int, default 0: partial results of the open segment about this often (0: none)
       speaker      bool, default true: run the speaker stage
       text_first   bool, default false: finals without waiting for their speaker, which follows
       endpointing  a preset name (contract.ENDPOINTING_PRESETS) or an object of Endpointing fields
                    (end_silence_ms, max_segment_ms, speech_start_ms), optionally with "preset"
       api_key      the caller's key, for browsers (which cannot set headers on a WebSocket);
                    others may send `Authorization: Bearer KEY` on the upgrade request instead
     null for any option means its default.
  2. binary messages: audio in the declared encoding, any size up to 2 s of audio (whole samples).
  3. `{"type": "end"}`: no more audio. The server sends the remaining results, a summary, and
     closes with 1000.

Server -> client (JSON text)
  {"type": "started", "request_id", "sample_rate", "encoding", "max_frame_bytes"}
  {"type": "partial", "index", "start_ms", "end_ms", "text"}
  {"type": "final", "index", "start_ms", "end_ms", "endpoint_ms", "text", "language", "emotion",
   "event", "speaker", "speaker_pending", "words", "triton_ms"}
  {"type": "speaker", "index", "speaker"}                        (text_first streams)
  {"type": "summary", "duration_ms", "segment_count"}             (then close 1000)
  {"type": "error", "code", "message"}                            (then close, code below)

Close codes: 1000 done; 1003 audio before `start`; 1007 bad JSON, a bad option, bad audio (ours
or the server's INVALID_ARGUMENT); 1008 a missing or wrong key, a browser page from an origin not
allowed, a message out of order, no `start` within 10 s, or a stream idle past Triton's timeout
(15 s as shipped) or the gateway's (60 s without any message before `end`);
1009 a message over its limit; 1011 a failure of the gateway or the server; 1013 no room on the
servers (`server_busy`, after the client library's own failover), Triton unreachable
(`triton_unavailable`) or this gateway shutting down (`draining`, gateway/drain.py): try again
later; 1012 (no error message) the gateway stopped with the socket open.

A client gone before `end` cancels its gRPC stream (Triton frees the slot at once); after `end`
the stream is let finish, unread. Audio is forwarded as it arrives, through a queue of at most
QUEUE_MESSAGES messages: while it is full the socket is not read, and TCP slows the client down.

Each socket gets a request id (the upgrade request's X-Request-ID when it is a plain token, else
a new one), sent in `started` and in the one log line written when the socket ends.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from tritonasr.audio import AudioError, sample_bytes
from tritonasr.client.connection import AccessDeniedError
from tritonasr.client.endpointing import endpointing as endpointing_preset
from tritonasr.client.offline import ServerUnavailableError
from tritonasr.client.stream import (SpeakerUpdate, StreamError, StreamingClient, StreamSegment, StreamSummary,
                                     validate_chunk)
from tritonasr.contract import ENDPOINTING_PRESETS, ENGINES, LANGUAGES, MAX_CHUNK_MS, SAMPLE_RATES, Endpointing
from tritonasr.gateway.access import bearer_key, checked_key
from tritonasr.gateway.errors import ApiError
from tritonasr.gateway.offline import GATEWAY_RETRY
from tritonasr.gateway.request_ids import REQUEST_ID_HEADER, request_id
from tritonasr.gateway.settings import GatewaySettings

log = logging.getLogger("tritonasr.gateway")

# What a stream's audio may be sent as (float32: little-endian, as Web Audio's Float32Array is).
ENCODINGS = ("pcm16", "mulaw", "alaw", "float32")
START_FIELDS = ("type", "sample_rate", "encoding", "language", "engine", "itn", "partials_ms", "speaker",
                "text_first", "endpointing", "api_key")
ENDPOINTING_FIELDS = ("preset", *(f.name for f in dataclasses.fields(Endpointing)))
MAX_PARTIALS_MS = 60_000  # a segment is at most 60 s: partials rarer than that are none
MAX_TEXT_BYTES = 4096  # a JSON message (start, end)
START_TIMEOUT_S = 10.0  # from the upgrade to the start message
# Nothing from the client for this long before `end` closes the socket (Triton's own idle
# timeout, 15 s as shipped, usually ends such a stream first; not a stream on its way to another
# server, whose START goes out with the next audio).
IDLE_TIMEOUT_S = 60.0
# Audio messages received and not yet sent to Triton: when full, the socket is not read, so TCP's
# own flow control slows the client down. 16 messages are 1.6 s of 100 ms frames, 32 s at most.
QUEUE_MESSAGES = 16
MAX_REASON_BYTES = 123  # a close frame's reason (RFC 6455)

# Close codes (RFC 6455 section 7.4.1, and IANA's registry for 1013).
NORMAL, UNSUPPORTED_DATA, INVALID_DATA, POLICY, TOO_BIG, INTERNAL, TRY_AGAIN_LATER = \
    1000, 1003, 1007, 1008, 1009, 1011, 1013
# gRPC statuses of a stream's error: the request's fault -> 1007; no room -> 1013.
_CLIENT_FAULTS = ("INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND", "ALREADY_EXISTS")


class Refusal(Exception):
    """Ends a socket: an error message with `code` and `message`, then a close with `close`."""

    def __init__(self, close: int, code: str, message: str):
        super().__init__(message)
        self.close, self.code, self.message = close, code, message


class Disconnected(Exception):
    """The client closed the socket, or the connection was lost."""

    def __init__(self, code: int):
        super().__init__(f"the client disconnected ({code})")
        self.code = code


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    """A start message's options, checked."""

    sample_rate: int = 16000
    encoding: str = "pcm16"
    language: str = "auto"
    engine: str = ""
    itn: bool = False
    partials_ms: int = 0
    speaker: bool = True
    text_first: bool = False
    endpointing: Endpointing | None = None

    @property
    def bytes_per_sample(self) -> int:
        return 4 if self.encoding == "float32" else sample_bytes(self.encoding)

    @property
    def max_frame_bytes(self) -> int:
        return MAX_CHUNK_MS * self.sample_rate // 1000 * self.bytes_per_sample

    def stream_arguments(self) -> dict:
        """StreamingClient.stream's keyword arguments."""
        return dict(sample_rate=self.sample_rate, encoding=self.encoding, language=self.language,
                    engine=self.engine, use_itn=self.itn, partial_interval_ms=self.partials_ms,
                    with_speaker=self.speaker, text_first=self.text_first, endpointing=self.endpointing)


def parse_start(payload: dict) -> StreamOptions:
    """The options of a start message (a JSON object whose `type` is "start"); Refusal (1007,
    invalid_option) naming the field at fault otherwise."""
    unknown = [name for name in payload if name not in START_FIELDS]
    if unknown:
        raise invalid(f"unknown field{'s' if len(unknown) > 1 else ''} in the start message: "
                       f"{', '.join(map(repr, unknown))}; known: {', '.join(START_FIELDS[1:])}")
    given = {name: value for name, value in payload.items() if value is not None and name not in ("type", "api_key")}
    options = {}
    if "sample_rate" in given:
        options["sample_rate"] = _choice(given, "sample_rate", SAMPLE_RATES)
    if "encoding" in given:
        options["encoding"] = _choice(given, "encoding", ENCODINGS)
    if "language" in given:
        options["language"] = _choice(given, "language", LANGUAGES)
    if "engine" in given:
        options["engine"] = _choice(given, "engine", ("", *ENGINES))
    for name in ("itn", "speaker", "text_first"):
        if name in given:
            if not isinstance(given[name], bool):
                raise invalid(f"`{name}` must be true or false, got {shown(given[name])}")
            options[name] = given[name]
    if "partials_ms" in given:
        value = given["partials_ms"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PARTIALS_MS:
            raise invalid(f"`partials_ms` must be a whole number of ms from 0 (no partials) to {MAX_PARTIALS_MS}, "
                           f"got {shown(value)}")
        options["partials_ms"] = value
    if "endpointing" in given:
        options["endpointing"] = _endpointing(given["endpointing"])
    return StreamOptions(**options)


def _endpointing(value) -> Endpointing:
    presets = ", ".join(ENDPOINTING_PRESETS)
    if isinstance(value, str):
        if value not in ENDPOINTING_PRESETS:
            raise invalid(f"unknown endpointing preset {shown(value)}: use one of {presets}, or an object of "
                           f"{', '.join(ENDPOINTING_FIELDS[1:])}")
        return ENDPOINTING_PRESETS[value]
    if not isinstance(value, dict):
        raise invalid(f"`endpointing` must be a preset name ({presets}) or an object, got {shown(value)}")
    unknown = [name for name in value if name not in ENDPOINTING_FIELDS]
    if unknown:
        raise invalid(f"unknown endpointing field {unknown[0]!r}: use {', '.join(ENDPOINTING_FIELDS)}")
    preset = value.get("preset") or "default"
    if preset not in ENDPOINTING_PRESETS:
        raise invalid(f"unknown endpointing preset {shown(preset)}: use one of {presets}")
    overrides = {name: value.get(name) for name in ENDPOINTING_FIELDS[1:]}
    for name, given in overrides.items():
        if given is not None and (isinstance(given, bool) or not isinstance(given, int)):
            raise invalid(f"endpointing `{name}` must be a whole number of ms, got {shown(given)}")
    try:
        return endpointing_preset(preset, **overrides)
    except ValueError as exc:
        raise invalid(f"endpointing: {exc}") from None


def _choice(given: dict, name: str, choices: tuple):
    value = given[name]
    # (1 == True in Python: a bool is no sample rate)
    if isinstance(value, bool) or value not in choices or type(value) is not type(choices[-1]):
        raise invalid(f"`{name}` must be one of {', '.join(map(json.dumps, choices))}, got {shown(value)}")
    return value


def shown(value) -> str:
    """A value quoted in a refusal, cut short."""
    return json.dumps(value, ensure_ascii=False)[:60]


def invalid(message: str) -> Refusal:
    return Refusal(INVALID_DATA, "invalid_option", message)


def segment_message(item: StreamSegment | SpeakerUpdate) -> dict:
    """What the client gets for one of the stream's results. Of the client library's timings, which
    are the gateway's, only `triton_ms`: the audio ending the segment went to Triton -> the final
    came back, the server's part of what the caller measures (the rest is the network and us)."""
    if isinstance(item, SpeakerUpdate):
        return {"type": "speaker", "index": item.segment_index, "speaker": item.speaker}
    if not item.final:
        return {"type": "partial", "index": item.segment_index, "start_ms": item.start_ms, "end_ms": item.end_ms,
                "text": item.text}
    return {"type": "final", "index": item.segment_index, "start_ms": item.start_ms, "end_ms": item.end_ms,
            "endpoint_ms": item.endpoint_ms, "text": item.text, "language": item.language, "emotion": item.emotion,
            "event": item.event, "speaker": item.speaker, "speaker_pending": item.speaker_pending,
            "words": item.words, "triton_ms": None if item.latency_ms is None else round(item.latency_ms, 1)}


def as_refusal(error: BaseException) -> Refusal | None:
    """How a stream's failure (the client library's errors, bad audio) is told to the client;
    None for what is no such failure: the gateway's own fault."""
    if isinstance(error, Refusal):
        return error
    if isinstance(error, AudioError):
        return Refusal(INVALID_DATA, "invalid_audio", str(error))
    if isinstance(error, AccessDeniedError):  # Triton refused the key the gateway took
        unauthenticated = str(error).startswith("unauthenticated:")
        return Refusal(POLICY, "invalid_api_key" if unauthenticated else "permission_denied", str(error))
    if isinstance(error, ServerUnavailableError):
        return Refusal(TRY_AGAIN_LATER, "triton_unavailable", str(error))
    if isinstance(error, StreamError):
        code = error.code or ""
        if code == "UNAVAILABLE":  # no room, or draining, on every server the failover tried
            return Refusal(TRY_AGAIN_LATER, "server_busy", str(error))
        if code == "INTERNAL" and "RST_STREAM" in str(error):  # a balancer reset it: its server went
            return Refusal(TRY_AGAIN_LATER, "triton_unavailable", str(error))
        if code in _CLIENT_FAULTS:
            return Refusal(INVALID_DATA, code.lower(), str(error))
        if code == "CANCELLED":  # the server's idle timeout
            return Refusal(POLICY, "idle_timeout", str(error))
        if code == "DEADLINE_EXCEEDED":
            return Refusal(TRY_AGAIN_LATER, "triton_unavailable", str(error))
        return Refusal(INTERNAL, "upstream_error", str(error))
    return None


def close_reason(message: str) -> str:
    """`message` cut to fit a close frame (123 bytes of UTF-8)."""
    data = message.encode()
    if len(data) <= MAX_REASON_BYTES:
        return message
    return data[:MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


def origin_allowed(websocket: WebSocket, settings: GatewaySettings) -> bool:
    """Browsers send the page's Origin with the upgrade and WebSockets have no CORS: the gateway
    takes sockets from its own origin and from those of --cors-origin, as for HTTP. Non-browser
    clients send no Origin."""
    origin = websocket.headers.get("origin")
    if origin is None or "*" in settings.cors_origins or origin in settings.cors_origins:
        return True
    host = websocket.headers.get("host", "")
    return bool(host) and urlsplit(origin).netloc.lower() == host.lower()


class StreamEndpoint:
    """`WS /v1/stream`: `serve` is the route's endpoint; one StreamingClient per API key (each its
    own gRPC channel), made in the event loop that serves the sockets; `close` at shutdown."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self._clients: dict[str | None, StreamingClient] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self, api_key: str | None) -> StreamingClient:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # (a gRPC aio channel belongs to the loop it was made in)
            self._loop, self._clients = loop, {}
        client = self._clients.get(api_key)
        if client is None:
            client = self._clients[api_key] = StreamingClient(
                self.settings.triton_url,
                credentials=dataclasses.replace(self.settings.triton_tls, api_key=api_key))
        return client

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    async def serve(self, websocket: WebSocket) -> None:
        await _Session(websocket, self).run()


def json_message(text: str, max_bytes: int = MAX_TEXT_BYTES) -> dict:
    """A client's JSON text message, which must be an object of at most `max_bytes`."""
    if len(text.encode()) > max_bytes:
        raise Refusal(TOO_BIG, "message_too_large", f"a text message may hold at most {max_bytes} bytes")
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise Refusal(INVALID_DATA, "invalid_json", f"a text message must be a JSON object: {exc}") from None
    if not isinstance(payload, dict):
        raise Refusal(INVALID_DATA, "invalid_json", f"a text message must be a JSON object, got {shown(payload)}")
    return payload


def socket_key(settings: GatewaySettings, given, *elsewhere: str | None, how: str) -> str | None:
    """The key a socket's client gave (`given`, from its first message, else the first of
    `elsewhere`), checked; what goes to Triton (None when the gateway asks for no key). `how`
    tells a client without one where to put it."""
    if given is not None and not isinstance(given, str):
        raise Refusal(POLICY, "invalid_api_key", "`api_key` must be a string")
    presented = given or next((key for key in elsewhere if key), None)
    if settings.api_keys and not presented:
        raise Refusal(POLICY, "invalid_api_key", f"an API key is required: {how}")
    try:
        return checked_key(presented, settings)
    except ApiError as exc:
        raise Refusal(POLICY, exc.code or "invalid_api_key", exc.message) from None


class JsonSocket:
    """A WebSocket spoken to in JSON text messages, which notes when its client has gone."""

    def __init__(self, websocket: WebSocket):
        self.ws = websocket
        self.gone = False  # the client closed the socket: nothing more to send
        self.request_id = request_id(websocket.headers.get(REQUEST_ID_HEADER))

    async def _fail(self, error: Exception, refusal: Refusal | None) -> tuple[int, str]:
        """Tells the client `refusal` (None: the gateway's own fault, logged) and closes; the close
        code and error code, for the log line."""
        if refusal is None:
            log.error("socket %s failed: %s", self.request_id, error, exc_info=error)
            refusal = Refusal(INTERNAL, "internal_error", f"the gateway failed; request id {self.request_id}")
        await self._refuse(refusal)
        return refusal.close, refusal.code

    async def _receive(self) -> dict:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            self.gone = True
            raise Disconnected(message.get("code") or 1005)
        return message

    async def _send(self, message: dict, quiet: bool = False) -> None:
        """Sends `message`; a client gone, before or meanwhile, raises Disconnected (`quiet`: is
        only noted)."""
        try:
            if self.gone:
                raise RuntimeError("the socket is closed")
            await self.ws.send_text(json.dumps(message, ensure_ascii=False))
        except (WebSocketDisconnect, OSError, RuntimeError):  # (RuntimeError: Starlette's, once closed)
            self.gone = True
            if not quiet:
                raise Disconnected(1006) from None

    async def _close(self, code: int, reason: str = "") -> None:
        try:
            await self.ws.close(code, close_reason(reason))
        except (WebSocketDisconnect, OSError, RuntimeError):
            self.gone = True


class _Session(JsonSocket):
    """One socket: its start message, then audio in and results out until the end or an error."""

    def __init__(self, websocket: WebSocket, endpoint: StreamEndpoint):
        super().__init__(websocket)
        self.endpoint = endpoint
        self.settings = endpoint.settings
        self.options: StreamOptions | None = None
        self.ended = False  # the client sent `end`
        self.muted = False  # the stream's results go nowhere (the socket is being refused)
        self.finals = 0
        self.audio_bytes = 0

    async def run(self) -> None:
        started = time.monotonic()
        close, why = 1006, ""
        try:
            try:
                await self.ws.accept()
            except (WebSocketDisconnect, OSError):
                raise Disconnected(1006) from None
            if not origin_allowed(self.ws, self.settings):
                raise Refusal(POLICY, "origin_not_allowed", f"pages from {self.ws.headers['origin'][:80]} may not "
                                                            "use this gateway (its --cors-origin)")
            self.options, api_key = await self._start()
            client = self.endpoint.client(api_key)
            await self._send({"type": "started", "request_id": self.request_id, "sample_rate": self.options.sample_rate,
                              "encoding": self.options.encoding, "max_frame_bytes": self.options.max_frame_bytes})
            await self._bridge(client)
            close = NORMAL
        except Disconnected as exc:
            close, why = exc.code, "client closed"
        except Exception as exc:  # noqa: BLE001 - every failure is told to the client; the gateway goes on
            close, why = await self._fail(exc, as_refusal(exc))
        finally:
            options = self.options
            seconds = self.audio_bytes / options.bytes_per_sample / options.sample_rate if options else 0.0
            log.info("%s WS %s %d%s %.0f ms, %.1f s of audio, %d finals", self.request_id, self.ws.url.path, close,
                     f" {why}" if why else "", (time.monotonic() - started) * 1000, seconds, self.finals)

    # -- the start -----------------------------------------------------------------------------

    async def _start(self) -> tuple[StreamOptions, str | None]:
        try:
            message = await asyncio.wait_for(self._receive(), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise Refusal(POLICY, "idle_timeout", f"no start message within {START_TIMEOUT_S:g} s") from None
        if message.get("bytes") is not None:
            raise Refusal(UNSUPPORTED_DATA, "start_required",
                          'audio before the start message: send {"type": "start", ...} first')
        payload = json_message(message.get("text") or "")
        if payload.get("type") != "start":
            raise Refusal(POLICY, "start_required",
                          f'the first message must be {{"type": "start", ...}}, got type {shown(payload.get("type"))}')
        api_key = socket_key(self.settings, payload.get("api_key"), bearer_key(self.ws),
                             how='"api_key" in the start message, or `Authorization: Bearer KEY` on the upgrade request')
        return parse_start(payload), api_key

    # -- the stream ----------------------------------------------------------------------------

    async def _bridge(self, client: StreamingClient) -> None:
        """Audio from the socket to Triton, results back, until the summary (then close 1000) or a
        failure (raised). A client gone (or refused) before `end` cancels the gRPC stream: the
        server frees it at once, as for any caller hanging up. After `end` the server is let finish
        what it has, its results going nowhere, before the socket is closed: a cancel while Triton
        2.51 finishes a stream can crash it (server#7368)."""
        queue: asyncio.Queue = asyncio.Queue(QUEUE_MESSAGES)
        live = client.stream(self._chunks(queue), retry=GATEWAY_RETRY, **self.options.stream_arguments())
        pump = asyncio.create_task(self._pump(live))
        reader = asyncio.create_task(self._read(queue))
        try:
            await asyncio.wait({pump, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():  # the reader stopped: a refusal, or the client gone
                error = reader.exception()
                if self.ended:
                    self.muted = True
                    await asyncio.gather(pump, return_exceptions=True)
                else:
                    live.cancel()
                raise error
            reader.cancel()
            summary: StreamSummary = pump.result()
            await self._send({"type": "summary", "duration_ms": summary.duration_ms,
                              "segment_count": summary.segment_count})
            await self._close(NORMAL)
        finally:
            for task in (pump, reader):
                task.cancel()
            await asyncio.gather(pump, reader, return_exceptions=True)
            live.cancel()

    async def _chunks(self, queue: asyncio.Queue) -> AsyncIterator:
        """The stream's chunks: an empty one first, so that the START (and with it the server's
        refusal when it has no room) goes out at once rather than with the first audio."""
        yield np.zeros(0, np.float32 if self.options.encoding == "float32" else np.uint8)
        while (chunk := await queue.get()) is not None:
            yield chunk

    async def _pump(self, live) -> StreamSummary:
        async with live:
            async for item in live:
                if isinstance(item, StreamSegment) and item.final:
                    self.finals += 1
                if not (self.gone or self.muted):
                    await self._send(segment_message(item), quiet=True)
        return live.summary

    async def _read(self, queue: asyncio.Queue) -> None:
        """Audio messages into `queue` (waiting while it is full), `end` as None; raises Refusal
        for a message out of place, Disconnected when the client goes. Never returns."""
        options = self.options
        while True:
            if self.ended:
                message = await self._receive()
            else:
                try:
                    message = await asyncio.wait_for(self._receive(), IDLE_TIMEOUT_S)
                except asyncio.TimeoutError:
                    raise Refusal(POLICY, "idle_timeout", f"no message for {IDLE_TIMEOUT_S:g} s") from None
            data = message.get("bytes")
            if data is None:
                payload = json_message(message.get("text") or "")
                kind = payload.get("type")
                if kind != "end" or self.ended:
                    raise Refusal(POLICY, "unexpected_message", f"unexpected message of type {shown(kind)}"
                                  + (" after end" if self.ended else ': only audio and {"type": "end"} follow start'))
                if len(payload) > 1:
                    raise invalid(f'{{"type": "end"}} takes no fields, got {", ".join(map(repr, payload))}')
                self.ended = True
                await queue.put(None)
                continue
            if self.ended:
                raise Refusal(POLICY, "unexpected_message", "audio after end")
            if len(data) > options.max_frame_bytes:
                raise Refusal(TOO_BIG, "frame_too_large",
                              f"an audio message may hold at most {MAX_CHUNK_MS} ms: {options.max_frame_bytes} bytes "
                              f"of {options.encoding} at {options.sample_rate} Hz, got {len(data)}")
            if not data:
                continue
            if options.encoding == "float32":
                if len(data) % 4:
                    raise Refusal(INVALID_DATA, "invalid_audio",
                                  f"a message of {len(data)} bytes of float32 does not hold whole samples")
                data = np.frombuffer(data, "<f4")
            chunk = validate_chunk(data, options.sample_rate, options.encoding)  # AudioError: 1007
            self.audio_bytes += chunk.size * (4 if options.encoding == "float32" else 1)
            await queue.put(chunk)

    async def _refuse(self, refusal: Refusal) -> None:
        """The error message, then the close; nothing when the client has gone."""
        if not self.gone:
            await self._send({"type": "error", "code": refusal.code, "message": refusal.message}, quiet=True)
        if not self.gone:
            await self._close(refusal.close, close_reason(refusal.message))
