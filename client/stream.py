"""Live streaming through the `asr_stream` model: audio chunks in, segments out as they end.

One gRPC bidirectional stream (tritonclient.grpc.aio) per audio session; one StreamingClient runs
any number of sessions at once from one event loop.

    async with StreamingClient("localhost:8001") as client:
        stream = client.stream_file("call.wav", chunk_ms=100, realtime=True)
        async for segment in stream:
            if segment.final:
                print(segment.start_ms, segment.end_ms, segment.text, segment.latency_ms)
        print(stream.summary)

Each result is timed against the audio it answers: the client keeps, for every chunk, how much
audio had been sent with it and when it left, so `latency_ms` is "the chunk holding the end of
this segment's speech was sent -> this response arrived".
"""

from __future__ import annotations

import asyncio
import bisect
import json
import numbers
import os
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import cycle, repeat

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from tritonasr.audio import (ENCODING_SUBTYPES, SAMPLE_RATE, AudioError, check_encoding, encode, sample_bytes,
                             validate_samples)
from tritonasr.client.connection import AccessDeniedError, Credentials, Retry, access_denied, resolve
from tritonasr.client.offline import (ServerUnavailableError, TranscriptionError, channel_inputs, load_server_audio,
                                      option_inputs, tensor_input)
from tritonasr.contract import LANGUAGES, MAX_CHANNELS, MAX_CHUNK_MS, SAMPLE_RATES, Endpointing
from tritonasr.errors import split_status

# The most audio a stream keeps for a server that takes it over (a whole segment, 60 s, and more).
MAX_KEPT_MS = 90_000
# A chunk of a stream: float32 samples, or the bytes of its byte encoding (bytes or a uint8 array).
Chunk = np.ndarray | bytes
Chunks = Iterable[Chunk] | AsyncIterable[Chunk]
# libsndfile subtypes a stream sends as they are, as the byte encoding of contract.ENCODINGS.
FILE_ENCODINGS = {subtype: encoding for encoding, subtype in ENCODING_SUBTYPES.items()}


class StreamError(TranscriptionError):
    """The server refused or aborted a stream (and has closed it); the message says why.
    `code`: the gRPC status the server gave it (INVALID_ARGUMENT: bad input; UNAVAILABLE: a full
    server; CANCELLED: closed after the server's idle timeout without audio), or None."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class StreamSegment:
    """One result of a live stream: a final segment, or a partial one (`final` False) for the
    segment still open, with the same `segment_index` as the final that replaces it."""

    start_ms: int
    end_ms: int
    text: str
    language: str | None
    emotion: str | None
    event: str | None
    final: bool
    segment_index: int
    # Audio the server had received when it decided the segment ended (finals; None on partials
    # when the server leaves it out).
    endpoint_ms: int | None
    # Client-side timing, in ms (None when there is nothing to time against):
    latency_ms: float | None  # the chunk holding `end_ms` was sent -> this response arrived
    after_endpoint_ms: float | None  # the chunk holding `endpoint_ms` was sent -> arrived
    received_ms: float  # when this response arrived, since the stream started
    # Finals, when the server runs the speaker stage: {"id", "score", "label"[, "embedding"]};
    # None for partials and segments too short to tell.
    speaker: dict | None = None
    words: list[dict] | None = None  # parakeet: [{"text", "start_ms", "end_ms"}]
    # A text-first stream's final whose speaker comes later, in a SpeakerUpdate.
    speaker_pending: bool = False
    channel: int | None = None  # streams with separate channels: the channel it was heard on


@dataclass(frozen=True)
class SpeakerUpdate:
    """A text-first stream's speaker for the final of `segment_index`, sent once it is known."""

    segment_index: int
    speaker: dict | None  # as StreamSegment.speaker
    received_ms: float  # since the stream started


@dataclass(frozen=True)
class StreamSummary:
    """The server's last response on a stream: `{"complete": true, duration_ms, segment_count}`."""

    duration_ms: int
    segment_count: int
    received_ms: float  # since the stream started


class ChunkClock:
    """When each chunk left the client, to time responses against the audio they answer.

    Times are in the clock's own seconds (time.monotonic by default); audio positions are ms
    from the start of the stream, whose chunks are counted in samples at its `sample_rate`.
    """

    def __init__(self, start: float, sample_rate: int = SAMPLE_RATE):
        self.start = start
        self.sample_rate = sample_rate
        self._ends: list[int] = []  # cumulative samples sent, after each chunk
        self._sent_at: list[float] = []

    @property
    def samples(self) -> int:
        return self._ends[-1] if self._ends else 0

    @property
    def chunks(self) -> int:
        return len(self._ends)

    def record(self, samples: int, sent_at: float) -> None:
        self._ends.append(self.samples + samples)
        self._sent_at.append(sent_at)

    def sent_at(self, audio_ms: float) -> float | None:
        """When the first chunk reaching `audio_ms` was sent (the last chunk for positions past
        the end, which the server's ms rounding can give); None before anything was sent."""
        if not self._sent_at:
            return None
        i = bisect.bisect_left(self._ends, audio_ms * self.sample_rate / 1000)
        return self._sent_at[min(i, len(self._sent_at) - 1)]

    def delay_ms(self, audio_ms: float, received_at: float) -> float | None:
        sent = self.sent_at(audio_ms)
        return None if sent is None else (received_at - sent) * 1000


def validate_chunk(chunk: Chunk, sample_rate: int = SAMPLE_RATE, encoding: str = "float32",
                   channels: int = 1) -> np.ndarray:
    """A chunk as sent, at most 2 s of audio at `sample_rate` (may be empty): float32 (1-D
    floating-point samples, finite; with several channels interleaved, or frames [n, channels]),
    or for a byte encoding its bytes as uint8, whole frames."""
    if encoding == "float32":
        chunk, unit = np.asarray(chunk), "samples"
        if chunk.ndim == 2 and chunk.shape[1] == channels:
            chunk = chunk.reshape(-1)  # frames [n, channels] -> interleaved
    else:
        chunk, unit = _chunk_bytes(chunk, encoding), f"bytes of {encoding}"
    limit = MAX_CHUNK_MS * sample_rate // 1000 * _chunk_items(encoding) * channels
    if chunk.size > limit:
        raise AudioError(f"an audio chunk may hold at most {MAX_CHUNK_MS} ms ({limit} {unit} at "
                         f"{sample_rate / 1000:g} kHz), got {chunk.size} {unit}")
    if encoding == "float32":
        chunk = validate_samples(chunk, allow_empty=True)
    if chunk.size % (_chunk_items(encoding) * channels):
        whole = "samples" if channels == 1 else f"frames of {channels} channels"
        raise AudioError(f"a chunk of {chunk.size} {unit} does not hold whole {whole}")
    return chunk


def _chunk_bytes(chunk: Chunk, encoding: str) -> np.ndarray:
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return np.frombuffer(chunk, np.uint8)
    if isinstance(chunk, np.ndarray) and chunk.dtype == np.uint8 and chunk.ndim == 1:
        return chunk
    got = f"{chunk.dtype} of shape {chunk.shape}" if isinstance(chunk, np.ndarray) else type(chunk).__name__
    raise AudioError(f"{encoding} audio chunks must be bytes or 1-D uint8 arrays, got {got}")


def _chunk_items(encoding: str) -> int:
    """A chunk's items per sample: 1 (float32), or the byte encoding's bytes."""
    check_encoding(encoding)
    return 1 if encoding == "float32" else sample_bytes(encoding)


def split_chunks(audio: Chunk, chunk_ms: float | Iterable[float] = 100, *, sample_rate: int = SAMPLE_RATE,
                 encoding: str = "float32") -> list[Chunk]:
    """Cuts audio at `sample_rate` (float32 samples or frames [n, channels], or the bytes of a byte
    encoding) into chunks: `chunk_ms` an int for equal chunks (the last one may be shorter), or an
    iterable of sizes in ms for uneven chunks, taken in order and cycled if it runs out (e.g.
    `rng.integers(10, 2001, size=50)`)."""
    sizes = repeat(chunk_ms) if isinstance(chunk_ms, numbers.Real) else cycle(chunk_ms)
    items = _chunk_items(encoding)  # per row of `audio`
    chunks, pos = [], 0
    while pos < len(audio):
        ms = next(sizes, None)
        if ms is None:
            raise ValueError("chunk_ms is an empty sequence")
        if not 0 < ms <= MAX_CHUNK_MS:
            raise ValueError(f"chunk sizes must be over 0 and at most {MAX_CHUNK_MS} ms, got {ms}")
        step = max(1, round(ms * sample_rate / 1000)) * items
        chunks.append(audio[pos: pos + step])
        pos += step
    return chunks


@dataclass(frozen=True)
class FileAudio:
    """A file's audio as a stream sends it (load_stream_audio)."""

    data: Chunk  # float32 samples (frames [n, channels] for several), or the bytes of `encoding`
    sample_rate: int
    encoding: str
    channels: int = 1

    def chunks(self, chunk_ms: float | Iterable[float] = 100) -> list[Chunk]:
        return split_chunks(self.data, chunk_ms, sample_rate=self.sample_rate, encoding=self.encoding)


def load_stream_audio(path: str | os.PathLike, keep_channels: bool = False) -> FileAudio:
    """Any audio file as a stream sends it: an 8 kHz file as it is (the server resamples it), in
    its own encoding when it is mono 16-bit PCM, mu-law or A-law, else float32 (downmixed, or
    with `keep_channels` its frames); files at other rates resampled to 16 kHz float32
    (load_server_audio)."""
    audio = load_server_audio(path, keep_channels=keep_channels)
    if audio.samples.ndim == 2:
        return FileAudio(audio.samples, audio.sample_rate, "float32", audio.samples.shape[1])
    mono_telephony = audio.sample_rate != SAMPLE_RATE and audio.source_channels == 1
    encoding = FILE_ENCODINGS.get(audio.subtype) if mono_telephony else None  # (libsndfile's files only)
    if encoding is None:
        return FileAudio(audio.samples, audio.sample_rate, "float32")
    # Encoded again from the decoded samples: the file's bytes (mu-law's -0 becomes +0).
    return FileAudio(encode(audio.samples, encoding), audio.sample_rate, encoding)


class LiveStream:
    """One audio session on the server. Iterate it (once) for StreamSegment results as they
    arrive; when the iteration ends, `summary` holds the server's end-of-stream summary.

    Stopping early (break, an exception, cancelling the task) cancels the gRPC call, as a caller
    who hangs up would; `async with stream:` or `await stream.aclose()` does it at a known point.
    Errors: StreamError (the server refused the stream), ServerUnavailableError (no connection),
    AudioError (a bad chunk; the stream is cancelled).
    """

    def __init__(self, client: StreamingClient, chunks: Chunks, *, language: str, use_itn: bool,
                 partial_interval_ms: int, realtime: bool, engine: str = "", with_speaker: bool = True,
                 return_embedding: bool = False, endpointing: Endpointing | None = None,
                 sample_rate: int = SAMPLE_RATE, encoding: str = "float32", text_first: bool = False,
                 channels: int = 1, separate_channels: bool = False, retry: Retry = Retry(),
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = asyncio.sleep):
        self.client = client
        self.retry = retry
        self.sequence_id, self.token = new_stream_identity()
        self.sample_rate = sample_rate
        self.encoding = encoding
        self.language = language
        self.use_itn = use_itn
        self.partial_interval_ms = partial_interval_ms
        self.engine = engine
        self.with_speaker = with_speaker
        self.return_embedding = return_embedding
        self.endpointing = endpointing
        self.text_first = text_first
        self.channels = channels
        self.separate_channels = separate_channels
        self.realtime = realtime
        self.summary: StreamSummary | None = None
        # The finals so far by segment index, each with its speaker once known (text-first streams
        # get it in a later SpeakerUpdate, merged in here).
        self.finals: dict[int, StreamSegment] = {}
        self.chunk_clock: ChunkClock | None = None  # set when the stream starts
        self._chunks = chunks
        self._now = clock
        self._sleep = sleep
        self._started = False
        self._call = None
        self._ended = False  # the server closed the call
        self._stop_sending = asyncio.Event()  # set on a server error: half-close, send no more
        self._server_silent = False  # no answer within finish_timeout_s: nothing to wait for
        self._closed = False
        self._send_error: BaseException | None = None
        self._last_activity: float | None = None  # set once the END chunk is sent
        # Failover: the caller's chunks are pulled once, whatever the server; those sent since the
        # audio the last final confirmed are kept, to be sent again to the next server.
        self._source: AsyncIterator | None = None
        self._pull: asyncio.Future | None = None  # a pull from the source not taken yet
        self._kept: list[np.ndarray] = []  # chunks sent from frame _kept_from on
        self._kept_from = 0
        self._kept_frames = 0
        self._resume_frame = 0  # where a next server starts: the end of the last final, 10 ms-aligned
        self.failovers = 0  # servers that took the stream over
        self._offset_ms = 0  # of this server's timeline in the stream's
        self._index_base = 0  # finals delivered before this server took over
        self._delivered_end_ms = -1

    @property
    def complete(self) -> bool:
        return self.summary is not None

    def __aiter__(self) -> AsyncIterator[StreamSegment]:
        if self._started:
            raise RuntimeError("a LiveStream can be iterated only once")
        self._started = True
        return self._results()

    def cancel(self) -> None:
        """Cancels the gRPC call (nothing if it is over or not started)."""
        self._closed = True
        self._cancel_call()

    def _cancel_call(self) -> None:
        if self._call is not None and not self._ended:
            self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> LiveStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()

    # -- sending -------------------------------------------------------------------------------

    async def requests(self) -> AsyncIterator[dict]:
        """The request dicts for `stream_infer`, paced in real time if asked; records each send.
        On a server that took the stream over, the audio kept since the last final goes first."""
        if self.chunk_clock is None:
            self.chunk_clock = ChunkClock(self._now(), self.sample_rate)
            self._source = _aiter(self._chunks)
        clock, stop = self.chunk_clock, self._stop_sending  # this call's: a next one has its own
        items = self._items_per_frame
        no_audio = np.zeros(0, np.float32 if self.encoding == "float32" else np.uint8)
        first = True
        try:
            for audio in self._replay():
                yield self._request(audio, start=first, end=False)
                first = False
            while True:
                chunk = await self._next_chunk(stop)
                if chunk is None:
                    break
                audio = validate_chunk(chunk, self.sample_rate, self.encoding, self.channels)
                samples = audio.size // items
                if self.realtime:
                    # A chunk covering audio [a, b) leaves at start + b, as if recorded live.
                    delay = clock.start + (clock.samples + samples) / self.sample_rate - self._now()
                    if delay > 0:
                        await self._sleep(delay)
                clock.record(samples, self._now())
                if self.retry.attempts > 1:
                    self._keep(audio)
                yield self._request(audio, start=first, end=False)
                first = False
            if stop.is_set():
                return  # the server closed the stream: end the call without an END request
            # The END flag travels on an empty chunk after the last one.
            self._last_activity = self._now()
            clock.record(0, self._last_activity)
            yield self._request(no_audio, start=first, end=True)
        except Exception as exc:
            # gRPC swallows what a request iterator raises (it only cancels the call):
            # keep it for the reader to raise in its place.
            self._send_error = exc
            raise

    @property
    def _items_per_frame(self) -> int:
        return _chunk_items(self.encoding) * self.channels

    async def _next_chunk(self, stop: asyncio.Event) -> Chunk | None:
        """The caller's next chunk; None at its end or once `stop` is set (the server ended the
        call). A pull still waiting then is kept for the next server: no chunk is lost."""
        if stop.is_set():
            return None
        if self._pull is None:
            self._pull = asyncio.ensure_future(anext(self._source))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({self._pull, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not self._pull.done():
            return None
        pull, self._pull = self._pull, None
        try:
            return pull.result()
        except StopAsyncIteration:
            return None

    def _replay(self) -> Iterator[np.ndarray]:
        """The kept chunks from the resume point on (the first one cut there)."""
        frame = self._kept_from
        for audio in self._kept:
            frames = audio.size // self._items_per_frame
            if frame + frames > self._resume_frame:
                yield audio[max(0, self._resume_frame - frame) * self._items_per_frame:]
            frame += frames

    def _confirmed(self, end_ms: int) -> None:
        """A final up to `end_ms` arrived: a next server starts there (on the 10 ms frame grid,
        so that its features fall on the same frames); chunks before it are not needed again."""
        grid = self.sample_rate // 100
        self._resume_frame = max(self._resume_frame, int(end_ms) * self.sample_rate // 1000 // grid * grid)
        while self._kept:
            frames = self._kept[0].size // self._items_per_frame
            if self._kept_from + frames > self._resume_frame:
                break
            self._kept.pop(0)
            self._kept_from += frames
            self._kept_frames -= frames

    def _keep(self, audio: np.ndarray) -> None:
        """Keeps a chunk sent, for a next server. A segment is at most 60 s (longer speech is cut),
        so audio older than MAX_KEPT_MS before the newest is in a final already or silence: a
        stream of silence keeps no more than that."""
        self._kept.append(audio)
        self._kept_frames += audio.size // self._items_per_frame
        grid = self.sample_rate // 100
        while self._kept_frames > MAX_KEPT_MS * self.sample_rate // 1000:
            frames = self._kept.pop(0).size // self._items_per_frame
            self._kept_from += frames
            self._kept_frames -= frames
            self._resume_frame = max(self._resume_frame, -(-self._kept_from // grid) * grid)

    def _request(self, audio: np.ndarray, start: bool, end: bool) -> dict:
        options = dict(sample_rate=self.sample_rate, encoding=self.encoding, language=self.language,
                       use_itn=self.use_itn, partial_interval_ms=self.partial_interval_ms, engine=self.engine,
                       with_speaker=self.with_speaker, return_embedding=self.return_embedding,
                       endpointing=self.endpointing, text_first=self.text_first, channels=self.channels,
                       separate_channels=self.separate_channels)
        return stream_request(self.client.model, self.sequence_id, audio, start, end, token=self.token, **options)

    # -- receiving -----------------------------------------------------------------------------

    async def _results(self) -> AsyncIterator[StreamSegment]:
        """The results of the calls that carry the stream: a server that refuses it for lack of room
        (or draining) or vanishes mid-stream is replaced through the client's URL (a balancer), the
        audio after the last final sent again, with `retry`'s backoff."""
        delays = self.retry.delays()
        try:
            while True:
                try:
                    async for item in self._one_call():
                        yield item
                    return
                except (StreamError, ServerUnavailableError) as exc:
                    delay = next(delays, None) if self._fails_over(exc) else None
                    if delay is None:
                        raise
                await self._sleep(delay)
                self._take_over()
        finally:
            if self._pull is not None:
                self._pull.cancel()  # the caller stopped: no more pulls from its source

    def _fails_over(self, exc: Exception) -> bool:
        """Whether another server may carry on: for a refusal for lack of room or a drain and for a
        server gone; not after the caller's own cancel, a bad chunk or any other error of the
        stream's own (bad input, access, idleness), nor for streams of separate channels (each
        channel's finals confirm a different point)."""
        if self._closed or self._send_error is not None or self.separate_channels or self.summary is not None:
            return False
        if isinstance(exc, ServerUnavailableError):  # the connection to it was lost
            return True
        # Refused for lack of room or draining; or a balancer reset the call because the server
        # behind it went (nginx: INTERNAL, "RST_STREAM"; the server's own errors come in-band).
        return isinstance(exc, StreamError) and (exc.code == "UNAVAILABLE" or (
            exc.code == "INTERNAL" and "RST_STREAM" in str(exc)))

    def _take_over(self) -> None:
        """A new call, on whichever server the URL reaches now, from the resume point."""
        self.failovers += 1
        self._stop_sending.set()  # the last call's sender, if gRPC still runs it, sends no more
        self.sequence_id, self.token = new_stream_identity()
        self._offset_ms = self._resume_frame * 1000 // self.sample_rate
        self._index_base = len(self.finals)
        self._call = None
        self._ended = False
        self._stop_sending = asyncio.Event()
        self._server_silent = False
        self._last_activity = None

    async def _one_call(self) -> AsyncIterator[StreamSegment]:
        try:
            self._call = self.client._grpc.stream_infer(self.requests(), headers=self.client.headers)
        except InferenceServerException as exc:
            raise StreamError(exc.message()) from None
        try:
            async for segment in self.read(self._responses(self._call)):
                yield segment
            await self._wait_for_server_close()
        except (StreamError, AccessDeniedError):
            # The server refused the stream: stop sending and let it answer what is in flight
            # before the call is closed, since cancelling it could crash the server (see below).
            self._stop_sending.set()
            if not self._server_silent:
                await self._wait_for_server_close()
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ServerUnavailableError(
                    f"cannot reach the Triton server at {self.client.url} ({exc.details()})") from None
            raise StreamError(f"the stream failed: {exc.code().name}: {exc.details()}", exc.code().name) from None
        except asyncio.CancelledError:
            # gRPC raises CancelledError when the call was cancelled locally: by a bad chunk,
            # by cancel() from elsewhere, or because this task is being cancelled.
            if self._send_error is not None:
                raise self._send_error from None
            task = asyncio.current_task()
            if self._closed and not (task and getattr(task, "cancelling", lambda: 0)()):
                raise StreamError("the stream was cancelled by the client") from None
            raise
        finally:
            self._cancel_call()

    async def _wait_for_server_close(self, timeout_s: float = 10.0) -> None:
        """After the summary or an error, lets the server end the call (our side has stopped
        sending) rather than cancelling it: Triton 2.51's gRPC server can crash when a client
        cancels a stream it is still finishing (triton-inference-server/server#7368, fixed in
        24.12)."""
        async def drain():
            while True:
                try:
                    await self._call.__anext__()
                except (StopAsyncIteration, grpc.aio.AioRpcError):
                    return  # the call is over, with or without an error

        try:
            await asyncio.wait_for(drain(), timeout_s)
            self._ended = True
        except asyncio.TimeoutError:
            pass  # cancelled in _results' finally

    async def _responses(self, call) -> AsyncIterator[tuple]:
        """The call's (result, error) items; gives up when the server says nothing for
        `finish_timeout_s` after the END chunk was sent."""
        timeout_s = self.client.finish_timeout_s
        while True:
            pending = asyncio.ensure_future(call.__anext__())
            try:
                while True:
                    if self._last_activity is None or timeout_s is None:
                        wait = None if timeout_s is None else 0.5  # END not sent yet: look again soon
                    else:
                        wait = self._last_activity + timeout_s - self._now()
                        if wait <= 0:
                            self._server_silent = True
                            raise StreamError(f"no response from the server {timeout_s:g} s after "
                                              "the end of the audio")
                    done, _ = await asyncio.wait({pending}, timeout=wait)
                    if done:
                        break
                try:
                    item = pending.result()
                except StopAsyncIteration:
                    return
            finally:
                if not pending.done():
                    pending.cancel()
            if self._last_activity is not None:
                self._last_activity = self._now()
            yield item

    async def read(self, responses: AsyncIterator[tuple]) -> AsyncIterator[StreamSegment]:
        """StreamSegments from `(InferResult, InferenceServerException)` items, until the
        end-of-stream summary (kept in `summary`)."""
        async for result, error in responses:
            received_at = self._now()
            if error is not None:
                message, code = split_status(error.message())
                raise access_denied(message) or StreamError(message, code)
            # A server that took the stream over answers in its own timeline and numbering.
            item = parse_response(result, self.chunk_clock, received_at, self._offset_ms)
            if isinstance(item, StreamSummary):
                self.summary = replace(item, segment_count=len(self.finals)) if self.failovers else item
                return
            if isinstance(item, StreamSegment) and self.failovers and item.end_ms <= self._delivered_end_ms:
                continue  # (an earlier server's final has it)
            if isinstance(item, (StreamSegment, SpeakerUpdate)):
                item = replace(item, segment_index=item.segment_index + self._index_base)
            if isinstance(item, SpeakerUpdate) and item.segment_index in self.finals:
                self.finals[item.segment_index] = replace(self.finals[item.segment_index], speaker=item.speaker,
                                                          speaker_pending=False)
            elif isinstance(item, StreamSegment) and item.final:
                self.finals[item.segment_index] = item
                self._delivered_end_ms = max(self._delivered_end_ms, item.end_ms)
                if not self.separate_channels:
                    self._confirmed(item.end_ms)
            yield item
        raise StreamError("the server closed the stream before its end-of-stream response")


class StreamingClient:
    """An asyncio gRPC client for `asr_stream`; create it inside the event loop that uses it."""

    def __init__(self, url: str = "localhost:8001", model: str = "asr_stream",
                 finish_timeout_s: float | None = 120.0, credentials: Credentials | None = None):
        """credentials: TLS and keys (None: from the $TRITONASR_* environment variables)."""
        self.url = url
        self.model = model
        self.credentials = resolve(credentials)
        self.headers = self.credentials.headers()
        # After the last chunk is sent, the longest silence from the server before giving up.
        self.finish_timeout_s = finish_timeout_s
        self._grpc = grpcaio.InferenceServerClient(url, **self.credentials.grpc_options())

    async def close(self) -> None:
        await self._grpc.close()

    async def __aenter__(self) -> StreamingClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def check_ready(self, timeout_s: float | None = 10.0) -> None:
        """Raises ServerUnavailableError unless the server answers and the model is ready."""
        try:
            ready = await self._grpc.is_model_ready(self.model, headers=self.headers, client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise ServerUnavailableError(
                f"cannot reach the Triton server at {self.url} ({exc.message()})") from None
        if not ready:
            raise ServerUnavailableError(
                f"model '{self.model}' is not loaded on the Triton server at {self.url} "
                "(unknown model, or it failed to load: see the server log)")

    def stream(self, chunks: Chunks, *, language: str = "auto", use_itn: bool = False,
               partial_interval_ms: int = 0, realtime: bool = False, engine: str = "",
               with_speaker: bool = True, return_embedding: bool = False,
               endpointing: Endpointing | None = None, sample_rate: int = SAMPLE_RATE,
               encoding: str = "float32", text_first: bool = False, channels: int = 1,
               separate_channels: bool = False, retry: Retry = Retry()) -> LiveStream:
        """A live stream of `chunks` (audio at `sample_rate`, 0 to 2000 ms each, sizes may
        differ; a sync or async iterable). Nothing is sent until the stream is iterated.

        sample_rate: 8000 or 16000 (contract.SAMPLE_RATES); the server resamples 8 kHz.
        encoding: what the chunks hold (contract.ENCODINGS): "float32" arrays, or the bytes
            (bytes or uint8 arrays) of "pcm16" (little-endian), "mulaw" or "alaw".

        realtime: send each chunk when its audio would have been recorded (for files).
        partial_interval_ms: ask for partial results of the open segment this often (0: none).
        engine: the ASR engine, sensevoice or parakeet ("": the server's default).
        with_speaker: False skips the server's speaker stage for this stream.
        return_embedding: each final's speaker field carries the segment's speaker embedding.
        endpointing: how speech is cut into segments (None: the server's VAD values).
        text_first: each final comes as soon as its text is ready (speaker None, speaker_pending
            True when the speaker stage runs) and its speaker after it, as a SpeakerUpdate;
            `LiveStream.finals` has them merged. False: each final waits for its speaker.
        channels: how many channels the chunks hold (float32 frames [n, channels] or interleaved;
            bytes interleaved), 1 to contract.MAX_CHANNELS. The server recognises their mix, or
            with separate_channels each on its own: finals then carry `channel`, each channel's
            sent as its speech ends; speaker labels are the stream's, across channels.
        retry: a server that refuses the stream for lack of room or draining, or vanishes
            mid-stream, is replaced through the client's URL (a balancer), the audio after the
            last final sent again: each segment reaches the caller once, in the stream's timeline
            (`failovers` counts the takeovers; anonymous speaker labels are the new server's).
            NO_RETRY: the first error ends the stream. Not for separate channels.
        """
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
        if not isinstance(partial_interval_ms, numbers.Integral) or partial_interval_ms < 0:
            raise ValueError(f"partial_interval_ms must be a whole number >= 0, got {partial_interval_ms!r}")
        if sample_rate not in SAMPLE_RATES:
            raise ValueError(f"sample_rate must be one of {', '.join(map(str, SAMPLE_RATES))}, got {sample_rate!r}")
        check_encoding(encoding)
        if not 1 <= channels <= MAX_CHANNELS:
            raise ValueError(f"channels must be 1 to {MAX_CHANNELS}, got {channels!r}")
        return LiveStream(self, chunks, language=language, use_itn=bool(use_itn),
                          partial_interval_ms=int(partial_interval_ms), realtime=realtime,
                          engine=engine, with_speaker=bool(with_speaker), return_embedding=bool(return_embedding),
                          endpointing=endpointing, sample_rate=int(sample_rate), encoding=encoding,
                          text_first=bool(text_first), channels=int(channels),
                          separate_channels=bool(separate_channels), retry=retry)

    def stream_file(self, path: str | os.PathLike, chunk_ms: float | Iterable[float] = 100,
                    separate_channels: bool = False, **options) -> LiveStream:
        """Streams any audio file as load_stream_audio reads it (8 kHz as it is, else 16 kHz), in
        chunks of `chunk_ms` (see split_chunks), its channels mixed or each recognised on its
        own (`separate_channels`); `options` are those of stream()."""
        audio = load_stream_audio(path, keep_channels=separate_channels)
        return self.stream(audio.chunks(chunk_ms), sample_rate=audio.sample_rate, encoding=audio.encoding,
                           channels=audio.channels, separate_channels=separate_channels, **options)


def new_stream_identity() -> tuple[int, str]:
    """A new stream's (sequence id, token). The token is sent with every chunk: the server refuses
    chunks on the id without it, so nobody else can add audio to the stream or receive its
    segments."""
    return secrets.randbits(63) or 1, secrets.token_urlsafe(16)  # sequence id 0: "no sequence"


def stream_request(model: str, sequence_id: int, chunk: Chunk, start: bool, end: bool, *,
                   sample_rate: int = SAMPLE_RATE, encoding: str = "float32",
                   language: str = "auto", use_itn: bool = False, partial_interval_ms: int = 0, engine: str = "",
                   with_speaker: bool = True, return_embedding: bool = False, endpointing: Endpointing | None = None,
                   text_first: bool = False, channels: int = 1, separate_channels: bool = False,
                   token: str = "") -> dict:
    """The keyword arguments of one `stream_infer` request (tritonclient's aio and sync clients
    take the same ones) carrying `chunk` of sequence `sequence_id`: float32 samples in AUDIO, or
    for a byte encoding its bytes (bytes or a uint8 array) in AUDIO_BYTES; `sample_rate` and
    `encoding`, `channels` (interleaved in `chunk`): the stream's; `token`: the stream's secret,
    the same on every chunk ("" for none)."""
    if encoding == "float32":
        inputs = [tensor_input("AUDIO", chunk.reshape(1, -1), "FP32")]  # (channels interleaved)
    else:
        inputs = [tensor_input("AUDIO_BYTES", np.frombuffer(chunk, np.uint8)[np.newaxis, :], "UINT8")]
    if start:
        # Options go on the START request only, so that the other requests of every stream
        # carry the same single input and batch together on the server.
        inputs += [
            tensor_input("SAMPLE_RATE", np.array([[sample_rate]], np.int32), "INT32"),
            tensor_input("PARTIAL_INTERVAL_MS", np.array([[partial_interval_ms]], np.int32), "INT32"),
            *option_inputs(language, use_itn, engine, with_speaker, return_embedding, endpointing),
        ]
        # Each left out at its default, so that such streams work with servers before it.
        if encoding != "float32":
            inputs.append(tensor_input("ENCODING", np.array([[encoding.encode()]], np.object_), "BYTES"))
        if text_first:
            inputs.append(tensor_input("TEXT_FIRST", np.array([[True]], np.bool_), "BOOL"))
        inputs += channel_inputs(channels, separate_channels)
    return {"model_name": model, "inputs": inputs, "outputs": [grpcaio.InferRequestedOutput("RESULT")],
            "sequence_id": sequence_id, "sequence_start": start, "sequence_end": end,
            "parameters": {"stream_token": token} if token else None}


def parse_response(result, clock: ChunkClock, received_at: float,
                   offset_ms: int = 0) -> StreamSegment | SpeakerUpdate | StreamSummary:
    """One response of `asr_stream` (an InferResult): a segment, or the end-of-stream summary;
    `offset_ms`: where the server's timeline starts in the stream's (a server that took it over)."""
    raw = result.as_numpy("RESULT").reshape(-1)[0]
    try:
        payload = json.loads(raw)
        if payload.get("complete"):
            return StreamSummary(int(payload["duration_ms"]) + offset_ms, int(payload["segment_count"]),
                                 (received_at - clock.start) * 1000)
        if payload.get("speaker_update"):
            return SpeakerUpdate(int(payload["segment_index"]), payload.get("speaker"),
                                 (received_at - clock.start) * 1000)
        return _segment(payload, clock, received_at, offset_ms)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise StreamError(f"unexpected result from the server ({exc!r}): {raw!r}") from None


def _segment(payload: dict, clock: ChunkClock, received_at: float, offset_ms: int = 0) -> StreamSegment:
    end_ms = int(payload["end_ms"]) + offset_ms
    final = bool(payload["final"])
    # Only a final segment has an endpoint; partials may leave it out.
    endpoint_ms = int(payload["endpoint_ms"]) + offset_ms if final or payload.get("endpoint_ms") is not None else None
    words = payload.get("words")
    if words and offset_ms:
        words = [{**word, "start_ms": word["start_ms"] + offset_ms, "end_ms": word["end_ms"] + offset_ms}
                 for word in words]
    return StreamSegment(
        start_ms=int(payload["start_ms"]) + offset_ms, end_ms=end_ms, text=payload["text"],
        language=payload.get("language"), emotion=payload.get("emotion"), event=payload.get("event"),
        final=final, segment_index=int(payload["segment_index"]), endpoint_ms=endpoint_ms,
        latency_ms=clock.delay_ms(end_ms, received_at),
        after_endpoint_ms=None if endpoint_ms is None else clock.delay_ms(endpoint_ms, received_at),
        received_ms=(received_at - clock.start) * 1000, speaker=payload.get("speaker"), words=words,
        speaker_pending=bool(payload.get("speaker_pending", False)), channel=payload.get("channel"),
    )


async def _aiter(chunks: Chunks) -> AsyncIterator[np.ndarray]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk
