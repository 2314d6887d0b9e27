"""FunASR's runtime WebSocket protocol at the gateway's root, `ws(s)://HOST:PORT/`: the clients
written for FunASR's runtime servers (its Python and HTML5 clients, voice-assistant and LiveKit
integrations) work unchanged against the gateway. docs/funasr-protocol.md is the full
description; in short:

Client -> server
  1. a JSON configuration: `mode` (offline, online, 2pass; default 2pass), `wav_name`,
     `wav_format` (pcm, or for offline mode any file format tritonasr.audio decodes), `audio_fs`
     (the PCM's rate), `chunk_size` ([5, 10, 5]: partial results every chunk_size[1] * 60 ms),
     `itn`, `svs_itn`, `svs_lang`, `is_speaking` (true); `hotwords`, `chunk_interval`,
     `encoder_chunk_look_back`, `decoder_chunk_look_back` and fields unknown here are accepted and
     ignored. Ours, not FunASR's: `engine` (sensevoice, parakeet), `api_key`.
  2. binary messages: 16-bit little-endian mono PCM at `audio_fs` (offline mode: or a file's bytes)
  3. `{"is_speaking": false}` (or `{"is_finished": true}`): the end of the audio.
  After the session's last message the connection stays open: a new configuration (its fields
  on top of the last ones) or more audio starts the next session; nothing for IDLE_TIMEOUT_S
  closes it (1000).

Server -> client (JSON text), every message {"mode", "wav_name", "text", "is_final", ...}:
  offline  one message: the whole text, `timestamp` and `stamp_sents` (asr_offline)
  online   `online`: the text each partial and final adds to what was sent (deltas)
  2pass    `2pass-online`: the deltas of the open segment's partials; `2pass-offline`: each final
           segment (a VAD segment), with its `timestamp` and `stamp_sents`
  `is_final` is true on the session's last message only, which also carries `"is_end": true`.
  Errors: {"wav_name", "text": "", "is_final": false, "is_end": true, "error"}, then a close:
  1007 bad configuration, JSON or audio; 1008 no or a wrong key, a page from an origin not
  allowed, audio before the configuration, idleness; 1009 too much; 1011 the gateway's or the
  server's failure; 1013 no room on the servers, or Triton unreachable (try again later).
"""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import re
import time
import wave
from collections.abc import AsyncIterator

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from tritonasr.audio import SAMPLE_RATE, AudioError, StreamResampler, decode
from tritonasr.client.stream import StreamError, StreamingClient, StreamSegment
from tritonasr.contract import ENGINES, LANGUAGES, MAX_CHUNK_MS, SAMPLE_RATES
from tritonasr.gateway.access import bearer_key
from tritonasr.gateway.errors import from_failure
from tritonasr.gateway.offline import GATEWAY_RETRY, OfflineRunner
from tritonasr.gateway.settings import GatewaySettings
from tritonasr.gateway.streams import (INTERNAL, INVALID_DATA, NORMAL, POLICY, TOO_BIG, TRY_AGAIN_LATER, Disconnected,
                                       JsonSocket, Refusal, StreamEndpoint, as_refusal, invalid, json_message,
                                       origin_allowed, shown, socket_key)
from tritonasr.gateway.transcriptions import joined_text

log = logging.getLogger("tritonasr.gateway")

MODES = ("offline", "online", "2pass")
CHUNK_UNIT_MS = 60  # FunASR's chunk_size counts 60 ms frames: [5, 10, 5] is a 600 ms chunk
MAX_CHUNK_UNITS = 1000  # partials at most every 60 s (a segment's longest)
MIN_AUDIO_FS, MAX_AUDIO_FS = 8000, 192000  # rates other than 8 and 16 kHz are resampled here
FIRST_MESSAGE_TIMEOUT_S = 10.0  # from the upgrade to the configuration
IDLE_TIMEOUT_S = 60.0  # offline audio, and between sessions: the longest wait for a message
MAX_TEXT_BYTES = 256 * 1024  # a JSON message (hotword lists can be long)
# Audio messages received and not yet sent to Triton: when full the socket is not read, so TCP's
# flow control slows the client down.
QUEUE_MESSAGES = 16
DEFAULT_WAV_NAME = "wav-default-id"  # FunASR's C++ runtime's
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_NOTHING = object()

# Text units, which FunASR times one by one: each CJK character (kana, hanzi, hangul: the
# characters joined_text sets no space between), and each run of other letters, digits and
# apostrophes (a word). Punctuation and spaces are no units.
_CJK_CHARS = "\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af"
_CJK = re.compile(f"[{_CJK_CHARS}]")
_UNIT = re.compile(f"[{_CJK_CHARS}]|(?:(?![{_CJK_CHARS}])[\\w'\u2019])+")
# Where stamp_sents cuts a segment's text: CJK punctuation anywhere, ASCII punctuation before a
# space or the end (not the point of "3.5").
_CLAUSE_END = re.compile(r"[，。？！、；：…]|[,.?!;:](?=\s|$)")


@dataclasses.dataclass(frozen=True)
class FunasrOptions:
    """A session's configuration, as the JSON messages set it."""

    mode: str = "2pass"
    wav_name: str = DEFAULT_WAV_NAME
    wav_format: str = "pcm"
    audio_fs: int = SAMPLE_RATE
    chunk_size: tuple[int, int, int] = (5, 10, 5)
    itn: bool = True  # FunASR's default
    svs_itn: bool = True
    language: str = "auto"  # svs_lang
    engine: str = ""

    @property
    def use_itn(self) -> bool:
        """SenseVoice's punctuation and numbers, unless `itn` or `svs_itn` turns them off."""
        return self.itn and self.svs_itn

    @property
    def partial_interval_ms(self) -> int:
        return CHUNK_UNIT_MS * self.chunk_size[1]

    @property
    def raw_pcm(self) -> bool:
        return self.wav_format.lower() == "pcm"


def parse_config(payload: dict, base: FunasrOptions) -> FunasrOptions:
    """`base` with the fields of a configuration message (a JSON object) applied; Refusal (1007,
    invalid_option) naming the field at fault. Fields unknown here are ignored, as FunASR's
    servers ignore them."""
    given = {name: value for name, value in payload.items() if value is not None}
    changes = {}
    if "mode" in given:
        if given["mode"] not in MODES:
            raise invalid(f"`mode` must be offline, online or 2pass, got {shown(given['mode'])}")
        changes["mode"] = given["mode"]
    if "wav_name" in given:
        value = given["wav_name"]
        if isinstance(value, bool) or not isinstance(value, (str, int)) or len(str(value)) > 256:
            raise invalid(f"`wav_name` must be a string of at most 256 characters, got {shown(value)}")
        changes["wav_name"] = str(value)
    if "wav_format" in given:
        value = given["wav_format"]
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9]{1,16}", value):
            raise invalid(f"`wav_format` must be a file extension such as pcm, wav or mp3, got {shown(value)}")
        changes["wav_format"] = value
    if "audio_fs" in given:
        value = _whole(given["audio_fs"])
        if value is None or not MIN_AUDIO_FS <= value <= MAX_AUDIO_FS:
            raise invalid(f"`audio_fs` must be a sample rate in Hz from {MIN_AUDIO_FS} to {MAX_AUDIO_FS} "
                           f"(16000 or 8000 go to the server as they are), got {shown(given['audio_fs'])}")
        changes["audio_fs"] = value
    if "chunk_size" in given:
        changes["chunk_size"] = _chunk_size(given["chunk_size"])
    for name in ("itn", "svs_itn"):
        if name in given:
            changes[name] = _flag(name, given[name])
    if "svs_lang" in given:
        if given["svs_lang"] not in LANGUAGES:
            raise invalid(f"`svs_lang` must be one of {', '.join(LANGUAGES)}, got {shown(given['svs_lang'])}")
        changes["language"] = given["svs_lang"]
    if "engine" in given:
        if given["engine"] not in ("", *ENGINES):
            raise invalid(f"`engine` must be one of {', '.join(ENGINES)} (or \"\": the server's default), "
                           f"got {shown(given['engine'])}")
        changes["engine"] = given["engine"]
    return dataclasses.replace(base, **changes)


def ends_audio(payload: dict) -> bool:
    """Whether a JSON message ends the session's audio: `is_speaking` false (or 0), or C++
    runtime clients' `is_finished` true."""
    speaking = payload.get("is_speaking")
    return speaking is False or (type(speaking) is int and speaking == 0) or payload.get("is_finished") is True


def _chunk_size(value) -> tuple[int, int, int]:
    """[5, 10, 5], or FunASR's Python server's other spelling "5,10,5"."""
    parts = value.split(",") if isinstance(value, str) else value
    sizes = [_whole(part) for part in parts] if isinstance(parts, (list, tuple)) else []
    if len(sizes) != 3 or any(size is None or size < 0 for size in sizes) or not 1 <= sizes[1] <= MAX_CHUNK_UNITS:
        raise invalid(f"`chunk_size` must be three whole numbers of 60 ms frames such as [5, 10, 5], the middle "
                       f"one 1 to {MAX_CHUNK_UNITS}, got {shown(value)}")
    return tuple(sizes)


def _whole(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise invalid(f"`{name}` must be true or false, got {shown(value)}")


# -- texts and timestamps ------------------------------------------------------------------------

def continued(previous: str, text: str) -> str:
    """`text`, stripped, as it continues a transcript ending in `previous`: after a space unless
    both sides are CJK (transcriptions.joined_text's rule), so that the concatenation of the texts
    a client is sent is the transcript."""
    piece = text.strip()
    if previous and piece and not (_CJK.match(previous[-1]) and _CJK.match(piece[0])):
        return " " + piece
    return piece


def _units(text: str) -> list[tuple[int, int]]:
    return [match.span() for match in _UNIT.finditer(text)]


def unit_times(text: str, start_ms: int, end_ms: int, words: list[dict] | None = None) -> list[list[int]]:
    """[start_ms, end_ms] of each unit of `text` (a segment's, spanning start_ms..end_ms): from
    the segment's `words` (Parakeet's) when their units are the text's, each word's span shared
    evenly by its units; otherwise the segment's span shared by the units in proportion to their
    characters (an approximation: no engine here times SenseVoice's characters)."""
    spans = _units(text)
    if not spans:
        return []
    if words:
        pieces, times = [], []
        for word in words:
            units = [word["text"][a:b] for a, b in _units(word["text"])]
            pieces += units
            times += _shared(int(word["start_ms"]), int(word["end_ms"]), [len(unit) for unit in units], even=True)
        if pieces == [text[a:b] for a, b in spans]:
            return times
    return _shared(int(start_ms), int(end_ms), [b - a for a, b in spans])


def _shared(start_ms: int, end_ms: int, sizes: list[int], even: bool = False) -> list[list[int]]:
    """start..end cut into len(sizes) consecutive intervals, in proportion to `sizes` (or evenly)."""
    weights = [1] * len(sizes) if even else sizes
    total, done, out = sum(weights), 0, []
    span = max(0, end_ms - start_ms)
    for weight in weights:
        first = start_ms + round(span * done / total)
        done += weight
        out.append([first, start_ms + round(span * done / total)])
    return out


def stamp_sents(text: str, times: list[list[int]]) -> list[dict]:
    """FunASR's sentence timestamps of a segment's `text` (its units timed by `times`): one entry
    per clause, cut after each punctuation mark: {"text_seg": its units joined by spaces, "punc":
    the mark ("" for none), "start", "end", "ts_list": its units' [start, end]}."""
    spans = _units(text)
    sentences, first = [], 0
    cuts = [(m.end(), m.group()) for m in _CLAUSE_END.finditer(text)] + [(len(text) + 1, "")]
    for cut, punc in cuts:
        last = first
        while last < len(spans) and spans[last][0] < cut:
            last += 1
        if last > first:
            sentences.append({"text_seg": " ".join(text[a:b] for a, b in spans[first:last]), "punc": punc,
                              "start": times[first][0], "end": times[last - 1][1],
                              "ts_list": [list(pair) for pair in times[first:last]]})
        first = last
    return sentences


def timed(segments: list[dict]) -> dict:
    """`timestamp` (FunASR's JSON string of [start_ms, end_ms] pairs, one per unit) and
    `stamp_sents` of segments ({"text", "start_ms", "end_ms", "words"?})."""
    pairs, sentences = [], []
    for segment in segments:
        text = segment["text"].strip()
        times = unit_times(text, segment["start_ms"], segment["end_ms"], segment.get("words"))
        pairs += times
        sentences += stamp_sents(text, times)
    return {"timestamp": json.dumps(pairs), "stamp_sents": sentences}


def result_message(mode: str, wav_name: str, text: str, is_final: bool = False,
                   segments: list[dict] | None = None) -> dict:
    """A result as FunASR words it; with `segments` (those the text is of), their timestamps."""
    message = {"mode": mode, "wav_name": wav_name, "text": text, "is_final": is_final}
    if segments is not None:
        message.update(timed(segments))
    return message


class Transcript:
    """A streaming session's messages, from the stream's partials and finals. FunASR's clients
    append each online text to what they show, and show each 2pass-offline text in place of the
    online ones since the last: so online texts are what a result adds to the text already sent for
    its segment, and a text that changes text already sent is held back (nothing can be taken back)
    until it adds to it again, or until the final."""

    def __init__(self, mode: str, wav_name: str):
        self.mode, self.wav_name = mode, wav_name
        self.online_mode = "online" if mode == "online" else "2pass-online"
        self.tail = ""  # the end of the finals' text so far
        self.index: int | None = None  # the open segment's
        self.shown = ""  # its text sent in online messages

    def messages(self, segment: StreamSegment) -> list[dict]:
        text = continued(self.tail, segment.text)
        shown = self.shown if segment.segment_index == self.index else ""
        if not segment.final:
            self.index = segment.segment_index
            if len(text) > len(shown) and text.startswith(shown):
                self.shown = text
                return [result_message(self.online_mode, self.wav_name, text[len(shown):])]
            self.shown = shown
            return []
        self.index, self.shown = None, ""
        if not text:
            return []
        self.tail = (self.tail + text)[-16:]
        if self.mode == "2pass":
            return [result_message("2pass-offline", self.wav_name, text, segments=[
                {"text": segment.text, "start_ms": segment.start_ms, "end_ms": segment.end_ms,
                 "words": segment.words}])]
        added = text[len(shown):] if text.startswith(shown) else correction(shown, text)
        return [result_message("online", self.wav_name, added)] if added else []


def correction(shown: str, text: str) -> str:
    """What online mode sends at a final `text` that changed the segment's text already `shown`:
    the final from the start of the first word that differs, after a space where one is needed.
    The client then shows both the first words and the corrected ones (2pass mode has no such
    artefact: its 2pass-offline replaces the online text)."""
    start = len(os.path.commonprefix([shown, text]))
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "'\u2019") and not _CJK.match(text[start - 1]):
        start -= 1
    rest = text[start:].lstrip()
    if shown and rest and not shown[-1].isspace() and not (_CJK.match(shown[-1]) and _CJK.match(rest[0])):
        return " " + rest
    return rest


# -- audio -----------------------------------------------------------------------------------------

class PcmInput:
    """A stream's binary messages (16-bit little-endian mono PCM at `rate`) as its chunks: bytes
    of pcm16 at 8 or 16 kHz (the server resamples 8 kHz), else float32 resampled here to 16 kHz;
    each at most MAX_CHUNK_MS; a byte cut off from its sample waits for the next message."""

    def __init__(self, rate: int):
        self.rate = rate
        self.native = rate in SAMPLE_RATES
        self.sample_rate = rate if self.native else SAMPLE_RATE
        self.encoding = "pcm16" if self.native else "float32"
        self._resampler = None if self.native else StreamResampler(rate)
        self._carry = b""
        self.bytes = 0

    def chunks(self, data: bytes, last: bool = False) -> list:
        data = self._carry + data
        whole = len(data) - len(data) % 2
        data, self._carry = data[:whole], data[whole:]
        self.bytes += len(data)
        if self.native:
            step = MAX_CHUNK_MS * self.rate // 1000 * 2
            return [data[i:i + step] for i in range(0, len(data), step)]
        samples = self._resampler.feed(decode(data, "pcm16"), last=last)
        step = MAX_CHUNK_MS * SAMPLE_RATE // 1000
        return [samples[i:i + step] for i in range(0, len(samples), step)]

    def empty(self):
        return np.zeros(0, np.uint8 if self.native else np.float32)

    @property
    def seconds(self) -> float:
        return self.bytes / 2 / self.rate


def offline_file(data: bytes, options: FunasrOptions) -> io.BytesIO:
    """A whole offline session's audio as a file for load_audio: raw PCM (wav_format pcm) in a WAV
    header of `audio_fs`, unless it starts with a WAV header of its own (FunASR's HTML5 client
    sends .wav files as "PCM"); any other wav_format: the bytes as they came (load_audio finds the
    format from the data)."""
    if options.raw_pcm and not (data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE"):
        if len(data) % 2:
            raise AudioError(f"{options.wav_name}: {len(data)} bytes of 16-bit PCM do not hold whole samples")
        out = io.BytesIO()
        with wave.open(out, "wb") as file:
            file.setnchannels(1)
            file.setsampwidth(2)
            file.setframerate(options.audio_fs)
            file.writeframes(data)
        out.seek(0)
        return out
    return io.BytesIO(data)


# -- the endpoint ----------------------------------------------------------------------------------

class FunasrEndpoint:
    """`WS /`: `serve` is the route's endpoint. Offline sessions go through the gateway's
    OfflineRunner (its bounds), streams through the StreamEndpoint's clients (one per API key)."""

    def __init__(self, settings: GatewaySettings, runner: OfflineRunner, streams: StreamEndpoint):
        self.settings, self.runner, self.streams = settings, runner, streams

    async def serve(self, websocket: WebSocket) -> None:
        await _Connection(websocket, self).run()


def _refusal(error: BaseException, retry_after_s: int) -> Refusal | None:
    """How a failure is told to the client; None for the gateway's own faults."""
    if isinstance(error, (Refusal, StreamError)):
        return as_refusal(error)
    try:
        api = from_failure(error, retry_after_s)
    except Exception:  # noqa: BLE001 - not one of the failures told to callers
        return as_refusal(error)
    close = {400: INVALID_DATA, 415: INVALID_DATA, 413: TOO_BIG, 401: POLICY, 403: POLICY,
             503: TRY_AGAIN_LATER, 504: TRY_AGAIN_LATER}.get(api.status, INTERNAL)
    return Refusal(close, api.code or "upstream_error", api.message)


class _Connection(JsonSocket):
    """One socket: its configuration and key, then sessions until the client closes it."""

    def __init__(self, websocket: WebSocket, endpoint: FunasrEndpoint):
        super().__init__(websocket)
        self.endpoint, self.settings = endpoint, endpoint.settings
        self.options: FunasrOptions | None = None
        self.api_key: str | None = None
        self.sessions = 0

    async def run(self) -> None:
        started, close, why = time.monotonic(), 1006, ""
        try:
            try:
                offered = self.ws.scope.get("subprotocols") or []
                # FunASR's servers speak "binary", which its clients offer (browsers fail a socket
                # whose requested subprotocol is not taken).
                await self.ws.accept(subprotocol="binary" if "binary" in offered else None)
            except (WebSocketDisconnect, OSError):
                raise Disconnected(1006) from None
            if not origin_allowed(self.ws, self.settings):
                raise Refusal(POLICY, "origin_not_allowed", f"pages from {self.ws.headers['origin'][:80]} may not "
                                                            "use this gateway (its --cors-origin)")
            try:
                message = await asyncio.wait_for(self._receive(), FIRST_MESSAGE_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise Refusal(POLICY, "idle_timeout",
                              f"no configuration within {FIRST_MESSAGE_TIMEOUT_S:g} s") from None
            if message.get("bytes") is not None:
                raise Refusal(POLICY, "config_required", 'audio before the configuration: send FunASR\'s JSON first '
                                                         '({"mode": "2pass", "is_speaking": true, ...})')
            payload = json_message(message.get("text") or "", MAX_TEXT_BYTES)
            self.api_key = socket_key(self.settings, payload.get("api_key"), bearer_key(self.ws),
                                      self.ws.query_params.get("api_key"),
                                      how='`Authorization: Bearer KEY` on the upgrade, ?api_key=KEY, or "api_key" in '
                                          "the first message")
            options, audio = FunasrOptions(), None
            while True:
                if payload is not None:
                    options = parse_config(payload, options)
                self.options = options
                await self._session(options, audio, ended=payload is not None and ends_audio(payload))
                try:
                    message = await asyncio.wait_for(self._receive(), IDLE_TIMEOUT_S)
                except asyncio.TimeoutError:
                    await self._close(NORMAL, f"no new session within {IDLE_TIMEOUT_S:g} s")
                    close, why = NORMAL, "idle"
                    return
                audio = message.get("bytes")
                payload = None if audio is not None else json_message(message.get("text") or "", MAX_TEXT_BYTES)
        except Disconnected as exc:
            close, why = exc.code, "client closed"
        except Exception as exc:  # noqa: BLE001 - every failure is told to the client; the gateway goes on
            close, why = await self._fail(exc, _refusal(exc, self.settings.retry_after_s))
        finally:
            log.info("%s WS / (FunASR) %d%s %.0f ms, %d sessions", self.request_id, close, f" {why}" if why else "",
                     (time.monotonic() - started) * 1000, self.sessions)

    # -- sessions ----------------------------------------------------------------------------------

    async def _session(self, options: FunasrOptions, audio: bytes | None, ended: bool) -> None:
        """One utterance (or file): its audio, then its results; the last with is_final true."""
        self.sessions += 1
        started = time.monotonic()
        if options.mode == "offline":
            seconds, results = await self._offline(options, audio, ended)
        else:
            if not options.raw_pcm:
                raise invalid(f"{options.mode} mode takes 16-bit PCM only (wav_format pcm), got wav_format "
                               f"{shown(options.wav_format)}: send files in offline mode")
            seconds, results = await self._stream(options, audio, ended)
        log.info("%s FunASR %s session %d: %.1f s of audio, %d results, %.0f ms", self.request_id, options.mode,
                 self.sessions, seconds, results, (time.monotonic() - started) * 1000)

    async def _offline(self, options: FunasrOptions, audio: bytes | None, ended: bool) -> tuple[float, int]:
        data = bytearray(audio or b"")
        while not ended:
            if len(data) > self.settings.max_upload_bytes:
                raise Refusal(TOO_BIG, "upload_too_large",
                              f"offline audio may be at most {self.settings.max_upload_bytes} bytes")
            try:
                message = await asyncio.wait_for(self._receive(), IDLE_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise Refusal(POLICY, "idle_timeout", f"no message for {IDLE_TIMEOUT_S:g} s before "
                                                      '{"is_speaking": false}') from None
            if message.get("bytes") is not None:
                data += message["bytes"]
            else:
                ended = ends_audio(json_message(message.get("text") or "", MAX_TEXT_BYTES))
        if len(data) > self.settings.max_upload_bytes:
            raise Refusal(TOO_BIG, "upload_too_large",
                          f"offline audio may be at most {self.settings.max_upload_bytes} bytes")
        if not data:
            segments, seconds = [], 0.0
        else:
            file = offline_file(bytes(data), options)
            name = f"{options.wav_name}.{options.wav_format}"
            decoded, result = await self.endpoint.runner.transcribe(
                file, name, self.api_key, engine=options.engine, language=options.language, use_itn=options.use_itn,
                with_speaker=False)
            segments, seconds = result["segments"], decoded.duration_ms / 1000
        message = result_message("offline", options.wav_name, joined_text(segments), is_final=True, segments=segments)
        await self._send({**message, "is_end": True}, quiet=True)
        return seconds, 1

    async def _stream(self, options: FunasrOptions, audio: bytes | None, ended: bool) -> tuple[float, int]:
        """Audio from the socket to asr_stream until `is_speaking` false, results back until the
        stream's end. A client gone before the end cancels the gRPC stream (the server frees it at
        once); one gone after it lets the server finish (as /v1/stream does)."""
        pcm = PcmInput(options.audio_fs)
        queue: asyncio.Queue = asyncio.Queue(QUEUE_MESSAGES)
        state = _StreamState(Transcript(options.mode, options.wav_name))
        client: StreamingClient = self.endpoint.streams.client(self.api_key)
        live = client.stream(self._chunks(queue, pcm), retry=GATEWAY_RETRY, sample_rate=pcm.sample_rate,
                             encoding=pcm.encoding, language=options.language, use_itn=options.use_itn,
                             partial_interval_ms=options.partial_interval_ms, engine=options.engine,
                             with_speaker=False)
        pump = asyncio.create_task(self._pump(live, state))
        reader = asyncio.create_task(self._read(queue, pcm, state, audio, ended))
        try:
            await asyncio.wait({pump, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and reader.exception() is not None:
                live.cancel()  # a refusal, or the client gone before the end: free the server's stream
                raise reader.exception()
            await pump  # (raises the stream's failure)
        finally:
            for task in (pump, reader):
                task.cancel()
            await asyncio.gather(pump, reader, return_exceptions=True)
        last = state.held or {"mode": options.mode, "wav_name": options.wav_name, "text": "", "is_final": True}
        await self._send({**last, "is_final": True, "is_end": True}, quiet=True)
        return pcm.seconds, state.results + 1

    async def _chunks(self, queue: asyncio.Queue, pcm: PcmInput) -> AsyncIterator:
        """The stream's chunks: an empty one first, so that the START (and with it the server's
        refusal when it has no room) goes out at once; then what the reader queued, the chunks
        waiting joined (up to MAX_CHUNK_MS) so that a client sending faster than real time makes
        fewer, larger requests."""
        yield pcm.empty()
        limit = MAX_CHUNK_MS * pcm.sample_rate // 1000 * (2 if pcm.native else 1)
        pending = _NOTHING
        while True:
            chunk = await queue.get() if pending is _NOTHING else pending
            pending = _NOTHING
            if chunk is None:
                return
            parts, size = [chunk], len(chunk)
            while not queue.empty():
                following = queue.get_nowait()
                if following is None or size + len(following) > limit:
                    pending = following
                    break
                parts.append(following)
                size += len(following)
            yield b"".join(parts) if pcm.native else np.concatenate(parts)

    async def _pump(self, live, state: _StreamState) -> None:
        async with live:
            async for item in live:
                if not isinstance(item, StreamSegment):
                    continue  # (speaker updates: streams here run without the speaker stage)
                for message in state.transcript.messages(item):
                    state.results += 1
                    if state.ended:
                        # After the end of the audio the last message is held back: it goes out
                        # with is_final true once the stream is complete.
                        message, state.held = state.held, message
                    if message is not None:
                        await self._send(message, quiet=True)

    async def _read(self, queue: asyncio.Queue, pcm: PcmInput, state: _StreamState, audio: bytes | None,
                    ended: bool) -> None:
        """`audio` (the message that started the session, if audio) and the audio messages that
        follow into `queue` until the end of the audio (then None); JSON messages before it change
        nothing (a session's settings are those it started with). Raises Refusal for bad input,
        Disconnected when the client goes."""
        while True:
            for chunk in pcm.chunks(audio or b"", last=ended):
                if len(chunk):
                    await queue.put(chunk)
            if ended:
                state.ended = True
                await queue.put(None)
                return
            message = await self._receive()
            audio = message.get("bytes")
            if audio is None:
                ended = ends_audio(json_message(message.get("text") or "", MAX_TEXT_BYTES))

    async def _refuse(self, refusal: Refusal) -> None:
        """FunASR's Python server's error acknowledgement (its client raises the `error`), then
        the close; nothing when the client has gone."""
        wav_name = self.options.wav_name if self.options else DEFAULT_WAV_NAME
        await self._send({"wav_name": wav_name, "text": "", "is_final": False, "is_end": True,
                          "error": f"{refusal.code}: {refusal.message}"}, quiet=True)
        if not self.gone:
            await self._close(refusal.close, refusal.message)


@dataclasses.dataclass
class _StreamState:
    transcript: Transcript
    ended: bool = False  # the client sent the end of the audio
    held: dict | None = None  # the last message since the end, not sent yet
    results: int = 0

