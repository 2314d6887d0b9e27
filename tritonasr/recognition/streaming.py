"""Live streams: chunks of audio in, each segment's transcript out as soon as the speaker pauses.

A `LiveStream` holds one caller's state between chunks: the online fbank, the FSMN caches,
FunASR's endpointing state machine (online mode) and the audio still needed. Its segments are
the offline pipeline's for the same audio, whatever the chunk sizes: features are computed
frame-exactly, the FSMN carries its caches, and the state machine sees the same frames.

Model calls are injected, as in OfflinePipeline, so the same code runs in the Triton BLS model
and in-process. Nothing here knows about Triton: results leave through a `Sink`.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from tritonasr.audio import SAMPLE_RATE, AudioError, StreamResampler, check_encoding, decode, validate_samples
from tritonasr.contract import MAX_CHUNK_MS, Endpointing
from tritonasr.errors import IdleTimeout, RecognitionError, ServiceError, StreamError
from tritonasr.models.endpointing import EndpointDetector, EndpointOptions
from tritonasr.models.fbank import Extract, Frontend
from tritonasr.models.vad import VadSpec, chunk_samples, split_long_segments
from tritonasr.recognition.admission import Admission, Ticket
from tritonasr.recognition.offline import (MAX_ASR_SEGMENT_MS, Recognizer, RunVad, check_channels, check_sample_rate,
                                           endpoint_options, split_channels)
from tritonasr.recognition.settings import StreamSettings

# Audio kept behind the VAD's position while no segment is open: FunASR dates a segment's start
# up to ~400 ms (its 200 ms decision window plus 200 ms look-back) before it decides it.
RETAIN_MS = 1000
# Closed stream ids remembered, so a late chunk is told why its stream is gone.
CLOSED_REMEMBERED = 10_000
# A stream silent this long is asked whether its caller hung up (one call to the backend each).
HANGUP_CHECK_S = 1.0


class Sink(Protocol):
    """Where one request's responses go, in order; `finish` is called exactly once, last."""

    def send(self, payload: dict) -> None: ...

    def fail(self, error: ServiceError) -> None: ...

    def finish(self) -> None: ...

    def cancelled(self) -> bool:
        """The caller hung up (its gRPC stream is gone)."""


@dataclass(frozen=True)
class StreamKey:
    """What a stream is known by. Triton routes chunks by sequence id alone, so anyone who knows
    an id can send chunks on it; the principal (the authenticated caller, "" without
    authentication) keeps callers' streams apart, and a stream's token (below) its chunks."""

    id: int
    principal: str = ""


def check_sequence_id(value: object) -> int:
    """Triton passes string sequence ids through, but the sequence batcher's CORRID is a uint64:
    every string id would be one stream. Only integers are streams here."""
    if isinstance(value, str):
        raise StreamError("sequence ids must be integers (1 .. 2**64-1); string ids are refused")
    if not isinstance(value, (int, np.integer)) or not 0 < int(value) < 2 ** 64:
        raise StreamError("a stream needs a sequence id (an integer, 1 .. 2**64-1)")
    return int(value)


@dataclass(frozen=True)
class StreamOptions:
    language: str = "auto"
    use_itn: bool = False
    partial_interval_ms: int = 0  # 0: no partial results
    engine: str = ""  # the ASR engine; "" for the deployment's default
    with_speaker: bool = True  # run the speaker stage (when deployed)
    return_embedding: bool = False  # each final segment's speaker embedding in its "speaker" field
    endpointing: Endpointing = Endpointing()  # how this stream is cut into segments
    sample_rate: int = SAMPLE_RATE  # the rate its chunks are at
    encoding: str = "float32"  # what its chunks carry: float32 samples (AUDIO) or bytes (AUDIO_BYTES)
    # Finals go out as soon as their text is ready, their speaker in an update after; else each
    # final waits for its speaker.
    text_first: bool = False
    channels: int = 1  # interleaved in each chunk, as a WAV file's frames
    separate_channels: bool = False  # each channel recognised on its own, else their mix


class ChunkReader:
    """A stream's chunks, as it declared them (rate, encoding, channels), to interleaved samples
    at its rate: checked one by one, in any order (`read`); split into its tracks (each channel,
    or their mix) and resampled to 16 kHz in the stream's order (`tracks`)."""

    def __init__(self, options: StreamOptions, max_chunk_ms: int):
        check_sample_rate(options.sample_rate)
        check_encoding(options.encoding)
        check_channels(options.channels)
        self.sample_rate = options.sample_rate
        self.encoding = options.encoding
        self.channels = options.channels
        self.separate = options.separate_channels
        self.max_samples = max_chunk_ms * options.sample_rate // 1000 * options.channels
        self.resamplers = [StreamResampler(options.sample_rate)
                           for _ in range(options.channels if self.separate else 1)]

    def seconds(self, samples: np.ndarray) -> float:
        return samples.size / self.channels / self.sample_rate

    def read(self, audio: np.ndarray | None, audio_bytes: np.ndarray | None, sample_rate: int | None) -> np.ndarray:
        """A chunk's samples (float32, at the stream's rate): AUDIO for a float32 stream,
        AUDIO_BYTES for the others; a SAMPLE_RATE it carries must be the stream's."""
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise AudioError(f"this stream was opened at {self.sample_rate} Hz; a chunk says {sample_rate} Hz")
        wanted, given = ("AUDIO", audio) if self.encoding == "float32" else ("AUDIO_BYTES", audio_bytes)
        if given is None:  # (Triton 2.51 checks required inputs only by their number)
            raise AudioError(f"a {self.encoding} stream's chunks carry {wanted} (an END request may carry it empty)")
        given = np.asarray(given)
        if given.ndim == 2 and given.shape[0] == 1:
            given = given[0]
        if self.encoding != "float32":
            if given.dtype != np.uint8 or given.ndim != 1:
                raise AudioError(f"AUDIO_BYTES must be 1-D bytes (uint8), got {given.dtype} {given.shape}")
            given = decode(given.tobytes(), self.encoding)
        if given.size > self.max_samples:
            per_ms = self.sample_rate * self.channels / 1000
            raise AudioError(f"chunk of {given.size / per_ms:.0f} ms is longer than this server's "
                             f"limit of {self.max_samples / per_ms:.0f} ms: send smaller chunks")
        samples = validate_samples(given, allow_empty=True)  # an END request may carry no audio
        if samples.size % self.channels:
            raise AudioError(f"a chunk of {samples.size} samples does not hold whole frames of {self.channels} channels")
        return samples

    def tracks(self, samples: np.ndarray, final: bool) -> list[np.ndarray]:
        tracks = split_channels(samples, self.channels, self.separate)
        return [resampler.feed(track, last=final) for resampler, track in zip(self.resamplers, tracks)]


class SampleBuffer:
    """A stream's recent audio (or rows of its features, `row` wide), addressed by sample (row)
    number since the stream began."""

    def __init__(self, capacity: int = 4 * SAMPLE_RATE, row: tuple[int, ...] = (), min_drop: int = SAMPLE_RATE):
        self._initial = capacity
        self._data = np.empty((capacity, *row), dtype=np.float32)
        self._min_drop = min_drop
        self.start = 0  # sample number of _data[0]
        self.end = 0  # one past the newest sample

    def append(self, samples: np.ndarray) -> None:
        used, n, size = self.end - self.start, len(samples), len(self._data)
        if used + n > size:
            grown = np.empty((max(2 * size, used + n), *self._data.shape[1:]), dtype=np.float32)
            grown[:used] = self._data[:used]
            self._data = grown
        self._data[used:used + n] = samples
        self.end += n

    def get(self, start: int, stop: int) -> np.ndarray:
        if start < self.start:
            raise ValueError(f"samples from {start} were already dropped (buffer starts at {self.start})")
        return self._data[start - self.start:min(stop, self.end) - self.start].copy()

    def discard_before(self, sample: int) -> None:
        drop = min(sample, self.end) - self.start
        # Moving the kept samples costs a copy: do it a second at a time, not every chunk.
        if drop < self._min_drop:
            return
        used, size = self.end - self.start - drop, len(self._data)
        if size > self._initial and used < size // 4:
            # Give back what a long segment made us grow to.
            smaller = np.empty((max(2 * used, self._initial), *self._data.shape[1:]), dtype=np.float32)
            smaller[:used] = self._data[drop:drop + used]
            self._data = smaller
        else:
            self._data[:used] = self._data[drop:drop + used]
        self.start += drop


class OnlineFeatures:
    """LFR fbank frames of a growing waveform: exactly `Frontend.features` of the whole of it.

    The fbank runs in-process (kaldi-native-fbank's online fbank), or, given `fbank`, in a served
    front end: each step sends the samples from the next frame's start on (at 100 ms chunks, the
    same 1840 samples from every stream, which batch together on the device). Kaldi frames with
    snip_edges depend only on their own 400 samples, so both give the same frames, and a segment
    starting on a frame boundary has the stream's frames from there on as its own fbank
    (`fbank_of`: the ASR engine takes them instead of computing them again)."""

    def __init__(self, frontend: Frontend, fbank: Extract | None = None):
        self.frontend = frontend
        self._served = fbank
        self._online = frontend.online_fbank() if fbank is None else None
        self._pending = np.zeros(0, dtype=np.float32)  # served: samples from the next frame's start
        # The fbank frames computed, by frame number: those the next LFR frames need, and those of
        # the audio the stream keeps (from its open segment's start).
        second = 1000 // frontend.frame_shift
        self._kept = SampleBuffer(second, (frontend.n_mels,), min_drop=second)
        self.taken = 0  # LFR frames handed out
        self.finished = False

    def accept(self, samples: np.ndarray) -> None:
        if self._online is not None:
            self._online.accept_waveform(self.frontend.fs, samples * self.frontend.scale)
        else:
            self._pending = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])

    def finish(self) -> None:
        if self._online is not None:
            self._online.input_finished()
        self.finished = True

    async def _new_frames(self) -> np.ndarray:
        if self._online is not None:
            ready, made = self._online.num_frames_ready, self._kept.end
            if ready == made:
                return np.zeros((0, self.frontend.n_mels), dtype=np.float32)
            new = np.stack([self._online.get_frame(i) for i in range(made, ready)])
            self._online.pop(ready - made)
            return new.astype(np.float32, copy=False)
        count = self.frontend.num_frames(self._pending.size)
        if count == 0:
            return np.zeros((0, self.frontend.n_mels), dtype=np.float32)
        hop, window = self.frontend.samples_per_frame, self.frontend.samples_per_window
        new = await self._served(self._pending[:(count - 1) * hop + window])
        self._pending = self._pending[count * hop:]
        return new

    async def take(self, step: int) -> np.ndarray:
        """The next LFR frames: all of them once finished, else whole `step`s of those ready,
        always keeping one back so the final call has a frame to close the stream on."""
        self._kept.append(await self._new_frames())
        ready = self._kept.end
        if self.finished:
            count = self.frontend.num_lfr_frames(ready) - self.taken
        else:
            count = self.frontend.lfr_frames_ready(ready) - self.taken - 1
            count -= count % step
        if count <= 0 or ready == 0:
            return np.zeros((0, self.frontend.dim), dtype=np.float32)
        index = self.frontend.lfr_index(self.taken, self.taken + count, ready)  # ascending
        first = int(index[0, 0])
        feats = self._kept.get(first, int(index[-1, -1]) + 1)[index - first].reshape(count, self.frontend.dim)
        self.taken += count
        return feats

    def fbank_of(self, start: int, count: int) -> np.ndarray | None:
        """The fbank of the `count` samples from sample `start`, from the frames computed so far;
        None where they cannot give it (a start between frames, frames dropped or not yet made)."""
        hop = self.frontend.samples_per_frame
        first, frames = start // hop, self.frontend.num_frames(count)
        if start % hop or first < self._kept.start or first + frames > self._kept.end:
            return None
        return self._kept.get(first, first + frames)

    def discard_before(self, sample: int) -> None:
        """Frames of audio before `sample` will not be asked for again (those the next LFR frames
        need are kept all the same)."""
        needed = self.taken * self.frontend.lfr_n - (self.frontend.lfr_m - 1) // 2
        self._kept.discard_before(min(sample // self.frontend.samples_per_frame, max(0, needed)))


class Endpointer:
    """FSMN-VAD over a live stream: scores new frames a step at a time with the stream's caches
    and feeds them to the endpointing state machine (FunASR's decisions) in online mode."""

    def __init__(self, spec: VadSpec, run_vad: RunVad, step_frames: int, fbank: Extract | None = None,
                 endpoint: EndpointOptions | None = None):
        self.spec = spec
        self.run_vad = run_vad
        self.step_frames = step_frames
        self.features = OnlineFeatures(spec.frontend, fbank)
        self.caches = spec.zero_caches()
        self.detector = EndpointDetector(endpoint or spec.endpoint, online=True)
        self.frames_scored = 0

    @property
    def position_ms(self) -> int:
        return self.frames_scored * self.spec.frontend.frame_ms

    async def advance(self, audio: SampleBuffer, final: bool) -> list[tuple[int, int]]:
        """Scores what the audio received so far allows; returns the state machine's decisions."""
        feats = await self.features.take(self.step_frames)
        if feats.shape[0] == 0:
            return []
        scores, self.caches = await self.run_vad(feats[None], self.caches)
        start, stop = self.frames_scored, self.frames_scored + feats.shape[0]
        window = chunk_samples(self.spec.frontend, start, stop, audio.end)
        self.frames_scored = stop
        return self.detector.feed(scores[0], audio.get(window.start, window.stop), final=final)


@dataclass
class _Output:
    kind: str  # "final" | "partial" | "complete"
    segment: asyncio.Future | None = None  # of (Segment | None, speaker embedding | None)
    endpoint_ms: int = 0
    arrived: float = 0.0  # time.monotonic() when the chunk that closed the segment arrived
    embedding: asyncio.Future | None = None  # text-first finals: their speaker embedding, sent after
    channel: int | None = None  # streams with separate channels: the segment's


def _unread(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a void decode's failure is nobody's


class _Track:
    """What a stream keeps per track (its one track, or each channel of a stream recognised per
    channel): the audio still needed, the VAD's state and the segment being spoken."""

    def __init__(self, channel: int | None, endpointer: Endpointer):
        self.channel = channel
        self.endpointer = endpointer
        self.audio = SampleBuffer()
        self.open_start_ms: int | None = None  # start of the segment being spoken, once decided
        self.last_partial_ms = 0
        self.partial: asyncio.Future | None = None
        # The open segment decoded ahead, up to the end its trailing silence will give it: each
        # piece's (start ms, end ms) -> its `_recognize` futures.
        self.ahead: dict[tuple[int, int], tuple[asyncio.Future, asyncio.Future | None]] = {}
        self.ahead_end_ms: int | None = None

    def drop_ahead(self) -> int:
        """Speech went on (or the segment closed elsewhere): what was decoded ahead is not it.
        A decode already sent runs to its end, unread (a leaf model's request is not taken
        back); a text-first embedding that has not begun is cancelled. How many were dropped."""
        dropped = len(self.ahead)
        for text, embedding in self.ahead.values():
            text.add_done_callback(_unread)
            if embedding is not None:
                embedding.add_done_callback(_unread)
                if not text.done():
                    embedding.cancel()
        self.ahead, self.ahead_end_ms = {}, None
        return dropped

    def accept(self, samples: np.ndarray, final: bool) -> None:
        if samples.size:
            self.audio.append(samples)
            self.endpointer.features.accept(samples)
        if final:
            self.endpointer.features.finish()


# Told of each final sent: (engine, seconds from the arrival of the chunk that ended its speech).
OnFinal = Callable[[str, float], None]


# Told of segments decoded ahead: ("used" by their final, or "void": speech resumed), and how many.
OnDecodeAhead = Callable[[str, int], None]


# Told when recognition fails on a stream: the model counts it and closes that stream.
OnFailure = Callable[["LiveStream", ServiceError], None]


class LiveStream:
    """One caller's stream. `push` takes chunks in arrival order; each chunk's responses leave
    through its own sink after every earlier chunk's, so the caller sees segments in order.

    The last chunk's sink stays open (unfinished) until the next chunk's responses are sent or
    the stream closes: a stream closed for idleness still has a sender to tell its caller why,
    and a caller who hung up shows as that sender cancelled."""

    def __init__(self, key: StreamKey, vad: VadSpec, recognizer: Recognizer, run_vad: RunVad,
                 options: StreamOptions, vad_step_ms: int = 100, max_segment_ms: int = MAX_ASR_SEGMENT_MS,
                 on_final: OnFinal = lambda engine, latency_s: None, fbank: Extract | None = None,
                 on_failure: OnFailure = lambda stream, error: None, max_chunk_ms: int = MAX_CHUNK_MS,
                 decode_ahead_ms: int = StreamSettings.decode_ahead_ms,
                 on_decode_ahead: OnDecodeAhead = lambda result, count: None):
        self.key = key
        self.id = key.id
        self.token = ""  # set by StreamRegistry.open
        self.on_final = on_final
        self.on_failure = on_failure
        self.options = options
        self.reader = ChunkReader(options, max_chunk_ms)
        self.request = recognizer.request(options.engine, options.language, options.use_itn)
        self._shares_fbank = self.request.engine.shares_fbank(vad.frontend)  # the VAD's frames serve the ASR
        self.recognizer = recognizer
        self.speakers = recognizer.speaker_session(options.with_speaker, options.return_embedding)
        self.max_segment_ms = max_segment_ms
        self.decode_ahead_ms = decode_ahead_ms
        self.on_decode_ahead = on_decode_ahead
        endpoint = endpoint_options(vad, options.endpointing)
        step_frames = max(1, vad_step_ms // vad.frontend.frame_ms)
        self.tracks = [_Track(i if options.separate_channels else None,
                              Endpointer(vad, run_vad, step_frames, fbank, endpoint))
                       for i in range(len(self.reader.resamplers))]
        self.lock = asyncio.Lock()
        self.segments_sent = 0
        self.failed: str | None = None
        self.closed: str | None = None
        self.busy = 0  # chunks being handled
        self.last_active = time.monotonic()
        self._delivered: asyncio.Future | None = None
        self._held: Sink | None = None  # the last delivered chunk's sink, still open
        self._sink: Sink | None = None  # the open sink speaker updates go through: the newest chunk's
        self._speaker_updates: deque = deque()  # (segment index, embedding future) of text-first finals
        self._speaker_task: asyncio.Future | None = None
        self._notice: ServiceError | None = None  # why it closed, for the held sink

    def close(self, reason: str, failed: bool = False, notice: ServiceError | None = None) -> None:
        """Marks the stream closed; `notice` goes to its caller through the held sink. Chunks
        still being delivered are sent (an ended stream) or dropped (a failed one)."""
        if self.closed is None:
            self._notice = notice
        self.closed = self.closed or reason
        if failed:
            self.failed = self.failed or reason
            for _, embedding in self._speaker_updates:
                embedding.cancel()
            self._speaker_updates.clear()
        for track in self.tracks:
            self._drop_ahead(track)
        if self._delivered is None or self._delivered.done():
            self._release()

    def hung_up(self) -> bool:
        return self._held is not None and self._held.cancelled()

    def _release(self) -> None:
        sink, self._held = self._held, None
        if sink is not None:
            if sink is self._sink:
                self._sink = None
            if self._notice is not None:
                sink.fail(self._notice)
                self._notice = None
            sink.finish()

    @property
    def received_ms(self) -> int:
        return self.tracks[0].audio.end * 1000 // SAMPLE_RATE

    async def push(self, samples: np.ndarray, final: bool, sink: Sink) -> None:
        """Adds the next chunk (read by `self.reader`, at the stream's rate); `final` ends the stream."""
        self.busy += 1
        self.last_active = arrived = time.monotonic()
        try:
            async with self.lock:
                if self.closed or self.failed:
                    raise StreamError(f"stream {self.id} is closed ({self.closed or self.failed})",
                                      kind=None if self.failed else "")  # a failure counts once
                outputs = await self._advance(self.reader.tracks(samples, final), final, arrived)
                previous = self._delivered
                self._delivered = asyncio.ensure_future(self._deliver(previous, outputs, sink, final))
        finally:
            self.busy -= 1
            self.last_active = time.monotonic()

    async def _advance(self, tracks: list[np.ndarray], final: bool, arrived: float) -> list[_Output]:
        """The outputs of a chunk (one array per track): the finals it ended, by start (then
        channel), the partials due, and at the end the stream's summary."""
        for track, samples in zip(self.tracks, tracks):
            track.accept(samples, final)
        # The tracks' VAD steps go out together (the vad model batches them).
        decided = await asyncio.gather(*(self._advance_track(track, final, arrived) for track in self.tracks))
        finals = sorted((item for track_finals, _ in decided for item in track_finals), key=lambda item: item[0])
        outputs = [output for _, output in finals] + [partial for _, partial in decided if partial is not None]
        if final:
            outputs.append(_Output("complete"))
        return outputs

    async def _advance_track(self, track: _Track, final: bool,
                             arrived: float) -> tuple[list[tuple[tuple[int, int], _Output]], _Output | None]:
        """A track's finals ((start ms, channel), output) and its partial, if one is due."""
        finals = []
        for start_ms, end_ms in await track.endpointer.advance(track.audio, final):
            if start_ms >= 0:
                track.open_start_ms = track.last_partial_ms = start_ms
            if end_ms >= 0 and track.open_start_ms is not None:
                for piece in split_long_segments([(track.open_start_ms, end_ms)], self.max_segment_ms):
                    ahead = track.ahead.pop(piece, None)
                    if ahead is not None:
                        self.on_decode_ahead("used", 1)
                    text, embedding = ahead or self._recognize(track, *piece, final=True)
                    output = _Output("final", text, self.received_ms, arrived, embedding, track.channel)
                    finals.append(((piece[0], track.channel or 0), output))
                track.open_start_ms = None
                self._drop_ahead(track)
        self._decode_ahead(track)
        partial = None
        if self._partial_due(track):
            position = track.endpointer.position_ms
            track.last_partial_ms = position
            track.partial, _ = self._recognize(track, max(track.open_start_ms, position - self.max_segment_ms),
                                               position, final=False)
            partial = _Output("partial", track.partial, channel=track.channel)
        keep_ms = track.endpointer.position_ms - RETAIN_MS
        if track.open_start_ms is not None:
            keep_ms = min(keep_ms, track.open_start_ms)
        keep = max(0, keep_ms) * SAMPLE_RATE // 1000
        track.audio.discard_before(keep)
        track.endpointer.features.discard_before(keep)
        return finals, partial

    def _decode_ahead(self, track: _Track) -> None:
        """Starts the open segment's decode once its trailing silence would close it within
        `decode_ahead_ms`, from where it would then end, so that its final is (nearly) ready when
        the silence completes. If speech resumes first, that decode is thrown away."""
        closing = track.endpointer.detector.closing() if self.decode_ahead_ms and track.open_start_ms is not None else None
        end_ms = None
        if closing is not None:
            left_ms, closing_end_ms = closing
            if left_ms <= self.decode_ahead_ms and closing_end_ms <= track.endpointer.position_ms:
                end_ms = closing_end_ms
        if end_ms == track.ahead_end_ms:
            return
        self._drop_ahead(track)
        if end_ms is not None:
            track.ahead_end_ms = end_ms
            track.ahead = {piece: self._recognize(track, *piece, final=True)
                           for piece in split_long_segments([(track.open_start_ms, end_ms)], self.max_segment_ms)}

    def _drop_ahead(self, track: _Track) -> None:
        dropped = track.drop_ahead()
        if dropped:
            self.on_decode_ahead("void", dropped)

    def _partial_due(self, track: _Track) -> bool:
        interval = self.options.partial_interval_ms
        return (interval > 0 and track.open_start_ms is not None
                and track.endpointer.position_ms - track.last_partial_ms >= interval
                and (track.partial is None or track.partial.done()))

    def _recognize(self, track: _Track, start_ms: int, end_ms: int,
                   final: bool) -> tuple[asyncio.Future, asyncio.Future | None]:
        """A future of (segment, speaker embedding), and for a text-first stream's final the
        embedding's own future (the first then has None); partials get no embedding."""
        start = start_ms * SAMPLE_RATE // 1000
        samples = track.audio.get(start, end_ms * SAMPLE_RATE // 1000)
        fbank = track.endpointer.features.fbank_of(start, samples.size) if self._shares_fbank else None
        with_speaker = final and self.speakers is not None
        separate = with_speaker and self.options.text_first
        text = asyncio.ensure_future(self.recognizer.analyse(self.request, samples, start_ms, end_ms,
                                                             with_speaker=with_speaker and not separate, fbank=fbank))
        return text, asyncio.ensure_future(self._embed_after(text, samples)) if separate else None

    async def _embed_after(self, text: asyncio.Future, samples: np.ndarray):
        """The speaker embedding, started once the text is done: the speaker model does not
        compete with the ASR model for the final that callers wait for."""
        await asyncio.wait([text])
        return await self.recognizer.speakers.embed(samples)

    async def _deliver(self, previous: asyncio.Future | None, outputs: list[_Output], sink: Sink,
                       last: bool) -> None:
        if previous is not None:
            await previous  # never raises: errors are caught below
        self._release()  # the previous chunk's sink: this one takes its place
        self._sink = sink
        try:
            for output in outputs:
                if output.kind == "complete":
                    await self._speakers_sent()
                    sink.send({"complete": True, "duration_ms": self.received_ms,
                               "segment_count": self.segments_sent})
                    continue
                segment, embedding = await output.segment
                if segment is None or self.failed:
                    if output.embedding is not None:
                        output.embedding.cancel()
                    continue
                if output.kind == "final" and self.speakers and output.embedding is None:
                    segment.speaker = self.speakers.describe(embedding)  # finals come in order: labels too
                payload = {**segment.to_dict(), "final": output.kind == "final",
                           "segment_index": self.segments_sent}
                if output.channel is not None:
                    payload["channel"] = output.channel
                if output.embedding is not None:
                    payload["speaker_pending"] = True
                    self._speaker_updates.append((self.segments_sent, output.embedding))
                if output.kind == "final":
                    payload["endpoint_ms"] = output.endpoint_ms
                    self.segments_sent += 1
                sink.send(payload)
                if output.kind == "final":
                    self.on_final(self.request.engine.name, time.monotonic() - output.arrived)
                if output.embedding is not None and (self._speaker_task is None or self._speaker_task.done()):
                    self._speaker_task = asyncio.ensure_future(self._send_speakers())
        except Exception as exc:  # a failed model call ends this stream, not the server
            self._fail(exc, [output.segment for output in outputs] + [output.embedding for output in outputs])
            last = True
        finally:
            if last or self.closed:
                if self._notice is not None:
                    sink.fail(self._notice)
                    self._notice = None
                sink.finish()
                self._sink = None
            else:
                self._held = sink

    def _fail(self, exc: BaseException, pending: list) -> None:
        """Ends the stream after a failed model call: its work in flight cancelled, the caller
        told through the current sink."""
        error = exc if isinstance(exc, ServiceError) else RecognitionError(f"recognition failed: {exc}")
        self.failed = self.failed or str(error)
        for future in pending + [embedding for _, embedding in self._speaker_updates]:
            if future is not None:
                future.cancel()
        self._speaker_updates.clear()
        if self._sink is not None:
            self._sink.fail(error)
        self.on_failure(self, error)

    async def _send_speakers(self) -> None:
        """Text-first finals' speakers, in the order of the finals (labels are given in that
        order), each through whichever of the stream's senders is open when it is ready."""
        while self._speaker_updates and not self.failed:
            index, embedding = self._speaker_updates[0]
            try:
                speaker = self.speakers.describe(await embedding)
                self._speaker_updates.popleft()
                if self._sink is not None:
                    self._sink.send({"segment_index": index, "speaker": speaker, "speaker_update": True})
            except asyncio.CancelledError:
                return
            except Exception as exc:  # noqa: BLE001 - as a failed final would
                self._fail(exc, [])
                return

    async def _speakers_sent(self) -> None:
        if self._speaker_task is not None:
            await self._speaker_task


StreamFactory = Callable[[StreamKey, StreamOptions], LiveStream]


@dataclass(frozen=True)
class _Closed:
    reason: str
    token: str
    failed: bool  # closed by an error (already counted) rather than by its END


class StreamRegistry:
    """The live streams of one model instance, by key; refuses a second START on a live key,
    checks each chunk's token against its stream's, closes idle streams, and admits a stream only
    with a ticket from `admission` (the server's limits), which it gives back when the stream closes.

    A stream's token is what its START carried ("" for none). Chunks with another token are
    refused and leave the stream alone: they can neither add audio to it nor receive its
    segments. `require_token` refuses streams without one."""

    def __init__(self, factory: StreamFactory, idle_timeout_s: float, admission: Admission,
                 on_change: Callable[[int], None] = lambda count: None, require_token: bool = False):
        self.factory = factory
        self.idle_timeout_s = idle_timeout_s
        self.admission = admission
        self.on_change = on_change
        self.require_token = require_token
        self.streams: dict[StreamKey, LiveStream] = {}
        self._tickets: dict[StreamKey, Ticket] = {}
        self._closed: OrderedDict[StreamKey, _Closed] = OrderedDict()

    def __len__(self) -> int:
        return len(self.streams)

    def open(self, key: StreamKey, options: StreamOptions, token: str = "") -> LiveStream:
        if key in self.streams:
            # Restarting it would hand the live caller's stream to whoever sent this START.
            raise StreamError(f"stream {key.id} is already open: a START on a live sequence id is refused "
                              "(start a new stream with a new id)", code="ALREADY_EXISTS")
        if self.require_token and not token:
            raise StreamError("this server requires a stream_token request parameter on every chunk of a stream")
        ticket = self.admission.admit(key.principal)  # first: a full server refuses at once
        try:
            stream = self.factory(key, options)
        except BaseException:
            ticket.release()
            raise
        stream.token = token
        self.streams[key] = stream
        self._tickets[key] = ticket
        self._closed.pop(key, None)
        self.on_change(len(self.streams))
        return stream

    def get(self, key: StreamKey, token: str = "", end: bool = False) -> LiveStream:
        """The stream a chunk belongs to; `end`: the chunk carries END."""
        stream = self.streams.get(key)
        if stream is not None:
            if not hmac.compare_digest(stream.token.encode(), token.encode()):
                if end:
                    # Triton's sequence batcher ended the sequence before the model saw this END:
                    # the stream gets no more chunks. Tell its caller now rather than at idle.
                    self.close(stream, "ended by an END from another caller", failed=True, notice=StreamError(
                        f"stream {key.id} was ended by an END request without its stream_token "
                        "(Triton ends a sequence on any END for its id)", kind=None))
                raise StreamError(f"stream {key.id} belongs to another caller: this chunk's stream_token "
                                  "is not the one its START carried")
            return stream
        closed = self._closed.get(key)
        if closed is not None and hmac.compare_digest(closed.token.encode(), token.encode()):
            # Its failure was counted when it closed; the caller's late chunks are not new errors.
            raise StreamError(f"stream {key.id} is closed ({closed.reason})", kind=None if closed.failed else "")
        raise StreamError(f"stream {key.id} is not open: its first request must carry sequence_start")

    def refused(self, key: StreamKey, token: str, reason: str) -> None:
        """Remembers a START that failed, so its caller's next chunks are told why."""
        if key not in self.streams:
            self._remember(key, _Closed(reason, token, True))

    def close(self, stream: LiveStream, reason: str, failed: bool = False,
              notice: ServiceError | None = None) -> None:
        """Closes this stream object, and only it: a chunk of an old stream can never close a
        newer one on the same id."""
        stream.close(reason, failed, notice)
        if self.streams.get(stream.key) is not stream:
            return
        del self.streams[stream.key]
        self._tickets.pop(stream.key).release()
        self._remember(stream.key, _Closed(reason, stream.token, failed))
        self.on_change(len(self.streams))

    def _remember(self, key: StreamKey, closed: _Closed) -> None:
        self._closed[key] = closed
        self._closed.move_to_end(key)
        while len(self._closed) > CLOSED_REMEMBERED:
            self._closed.popitem(last=False)

    def expire(self, now: float | None = None,
               before_close: OnFailure = lambda stream, error: None) -> list[tuple[LiveStream, ServiceError]]:
        """Closes streams whose caller hung up, and streams that sent nothing for
        `idle_timeout_s` (a caller that stalled: told why, if it still listens). Returns them,
        each with its error (one that does not `notify` for a hang-up); `before_close` is told of
        each before its caller is (so that what it counts is counted when the caller hears)."""
        now = time.monotonic() if now is None else now
        closing = []
        for stream in list(self.streams.values()):
            idle_s = now - stream.last_active
            if stream.busy or idle_s < HANGUP_CHECK_S:
                continue
            if stream.hung_up():
                closing.append((stream, "the caller hung up",
                                ServiceError(f"stream {stream.id}: the caller hung up", code="CANCELLED", kind=None,
                                             notify=False)))
            elif idle_s > self.idle_timeout_s:
                reason = f"no audio for {self.idle_timeout_s:g} s"
                closing.append((stream, reason, IdleTimeout(f"stream {stream.id} was closed: {reason}")))
        for stream, reason, error in closing:
            before_close(stream, error)
            self.close(stream, reason, failed=True, notice=error if error.notify else None)
        return [(stream, error) for stream, _, error in closing]


def stream_factory(vad: VadSpec, recognizer: Recognizer, run_vad: RunVad, vad_step_ms: int = 100,
                   on_final: OnFinal = lambda engine, latency_s: None, fbank: Extract | None = None,
                   on_failure: OnFailure = lambda stream, error: None, max_chunk_ms: int = MAX_CHUNK_MS,
                   decode_ahead_ms: int = StreamSettings.decode_ahead_ms,
                   on_decode_ahead: OnDecodeAhead = lambda result, count: None) -> StreamFactory:
    return lambda key, options: LiveStream(key, vad, recognizer, run_vad, options, vad_step_ms,
                                           on_final=on_final, fbank=fbank, on_failure=on_failure,
                                           max_chunk_ms=max_chunk_ms, decode_ahead_ms=decode_ahead_ms,
                                           on_decode_ahead=on_decode_ahead)
