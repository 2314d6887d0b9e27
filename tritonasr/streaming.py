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
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from tritonasr.audio import AudioError, validate_samples
from tritonasr.features import Extract, Frontend
from tritonasr.pipeline import MAX_ASR_SEGMENT_MS, SAMPLE_RATE, Recognizer, RunVad, check_sample_rate
from tritonasr.vad import SegmentTracker, VadSpec, chunk_samples, split_long_segments

# Audio kept behind the VAD's position while no segment is open: FunASR dates a segment's start
# up to ~400 ms (its 200 ms decision window plus 200 ms look-back) before it decides it.
RETAIN_MS = 1000
# Closed stream ids remembered, so a late chunk is told why its stream is gone.
CLOSED_REMEMBERED = 10_000


class StreamError(ValueError):
    """A request that does not fit its stream's state (never started, closed, over capacity)."""


class Sink(Protocol):
    """Where one request's responses go, in order; `finish` is called exactly once, last."""

    def send(self, payload: dict) -> None: ...

    def fail(self, message: str) -> None: ...

    def finish(self) -> None: ...


@dataclass(frozen=True)
class StreamOptions:
    language: str = "auto"
    use_itn: bool = False
    partial_interval_ms: int = 0  # 0: no partial results
    engine: str = ""  # the ASR engine; "" for the deployment's default
    with_speaker: bool = True  # run the speaker stage (when deployed)
    return_embedding: bool = False  # each final segment's speaker embedding in its "speaker" field


def check_chunk(samples: np.ndarray, max_samples: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A chunk as the stream takes it: 16 kHz, 1-D, finite floats, at most `max_samples`."""
    check_sample_rate(sample_rate)
    samples = np.asarray(samples)
    if samples.ndim == 2 and samples.shape[0] == 1:
        samples = samples[0]
    if samples.size > max_samples:
        raise AudioError(f"chunk of {samples.size * 1000 // SAMPLE_RATE} ms is longer than this server's "
                         f"limit of {max_samples * 1000 // SAMPLE_RATE} ms: send smaller chunks")
    return validate_samples(samples, allow_empty=True)  # an END request may carry no audio


class SampleBuffer:
    """A stream's recent audio, addressed by sample number since the stream began."""

    def __init__(self, capacity: int = 4 * SAMPLE_RATE):
        self._initial = capacity
        self._data = np.empty(capacity, dtype=np.float32)
        self.start = 0  # sample number of _data[0]
        self.end = 0  # one past the newest sample

    def append(self, samples: np.ndarray) -> None:
        used, n = self.end - self.start, samples.size
        if used + n > self._data.size:
            grown = np.empty(max(2 * self._data.size, used + n), dtype=np.float32)
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
        if drop < SAMPLE_RATE:
            return
        used = self.end - self.start - drop
        if self._data.size > self._initial and used < self._data.size // 4:
            # Give back what a long segment made us grow to.
            smaller = np.empty(max(2 * used, self._initial), dtype=np.float32)
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
    snip_edges depend only on their own 400 samples, so both give the same frames."""

    def __init__(self, frontend: Frontend, fbank: Extract | None = None):
        self.frontend = frontend
        self._served = fbank
        self._online = frontend.online_fbank() if fbank is None else None
        self._pending = np.zeros(0, dtype=np.float32)  # served: samples from the next frame's start
        self._ready = 0  # fbank frames computed
        self._frames = np.zeros((0, frontend.n_mels), dtype=np.float32)  # fbank frames from _first on
        self._first = 0
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
            ready = self._online.num_frames_ready
            if ready == self._ready:
                return np.zeros((0, self.frontend.n_mels), dtype=np.float32)
            new = np.stack([self._online.get_frame(i) for i in range(self._ready, ready)])
            self._online.pop(ready - self._ready)
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
        new = await self._new_frames()
        if new.shape[0]:
            self._frames = np.concatenate([self._frames, new])
            self._ready += new.shape[0]
        ready = self._ready
        if self.finished:
            count = self.frontend.num_lfr_frames(ready) - self.taken
        else:
            count = self.frontend.lfr_frames_ready(ready) - self.taken - 1
            count -= count % step
        if count <= 0 or ready == 0:
            return np.zeros((0, self.frontend.dim), dtype=np.float32)
        index = self.frontend.lfr_index(self.taken, self.taken + count, ready) - self._first
        feats = self._frames[index].reshape(count, self.frontend.dim)
        self.taken += count
        needed_from = max(0, self.taken * self.frontend.lfr_n - (self.frontend.lfr_m - 1) // 2)
        if needed_from > self._first:
            self._frames = self._frames[needed_from - self._first:]
            self._first = needed_from
        return feats


class Endpointer:
    """FSMN-VAD over a live stream: scores new frames a step at a time with the stream's caches
    and feeds them to FunASR's state machine in online mode."""

    def __init__(self, spec: VadSpec, run_vad: RunVad, step_frames: int, fbank: Extract | None = None):
        self.spec = spec
        self.run_vad = run_vad
        self.step_frames = step_frames
        self.features = OnlineFeatures(spec.frontend, fbank)
        self.caches = spec.zero_caches()
        self.tracker = SegmentTracker(spec, online=True)
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
        return self.tracker.feed(scores[0], audio.get(window.start, window.stop), is_final=final)


@dataclass
class _Output:
    kind: str  # "final" | "partial" | "complete"
    segment: asyncio.Future | None = None  # of (Segment | None, speaker embedding | None)
    endpoint_ms: int = 0
    arrived: float = 0.0  # time.monotonic() when the chunk that closed the segment arrived


# Told of each final sent: (engine, seconds from the arrival of the chunk that ended its speech).
OnFinal = Callable[[str, float], None]


class LiveStream:
    """One caller's stream. `push` takes chunks in arrival order; each chunk's responses leave
    through its own sink after every earlier chunk's, so the caller sees segments in order."""

    def __init__(self, stream_id: int, vad: VadSpec, recognizer: Recognizer, run_vad: RunVad,
                 options: StreamOptions, vad_step_ms: int = 100, max_segment_ms: int = MAX_ASR_SEGMENT_MS,
                 on_final: OnFinal = lambda engine, latency_s: None, fbank: Extract | None = None):
        self.id = stream_id
        self.on_final = on_final
        self.options = options
        self.request = recognizer.request(options.engine, options.language, options.use_itn)
        self.recognizer = recognizer
        self.speakers = recognizer.speaker_session(options.with_speaker, options.return_embedding)
        self.max_segment_ms = max_segment_ms
        self.endpointer = Endpointer(vad, run_vad, max(1, vad_step_ms // vad.frontend.frame_ms), fbank)
        self.audio = SampleBuffer()
        self.lock = asyncio.Lock()
        self.open_start_ms: int | None = None  # start of the segment being spoken, once decided
        self.last_partial_ms = 0
        self.partial: asyncio.Future | None = None
        self.segments_sent = 0
        self.failed: str | None = None
        self.closed: str | None = None
        self.busy = 0  # chunks being handled
        self.last_active = time.monotonic()
        self._delivered: asyncio.Future | None = None

    @property
    def received_ms(self) -> int:
        return self.audio.end * 1000 // SAMPLE_RATE

    async def push(self, samples: np.ndarray, final: bool, sink: Sink) -> None:
        """Adds the next chunk (checked by `check_chunk`); `final` ends the stream."""
        self.busy += 1
        self.last_active = arrived = time.monotonic()
        try:
            async with self.lock:
                if self.closed or self.failed:
                    raise StreamError(f"stream {self.id} is closed ({self.closed or self.failed})")
                outputs = await self._advance(samples, final, arrived)
                previous = self._delivered
                self._delivered = asyncio.ensure_future(self._deliver(previous, outputs, sink))
        finally:
            self.busy -= 1
            self.last_active = time.monotonic()

    async def _advance(self, samples: np.ndarray, final: bool, arrived: float) -> list[_Output]:
        if samples.size:
            self.audio.append(samples)
            self.endpointer.features.accept(samples)
        if final:
            self.endpointer.features.finish()
        decisions = await self.endpointer.advance(self.audio, final)
        outputs = []
        for start_ms, end_ms in decisions:
            if start_ms >= 0:
                self.open_start_ms = self.last_partial_ms = start_ms
            if end_ms >= 0 and self.open_start_ms is not None:
                for piece in split_long_segments([(self.open_start_ms, end_ms)], self.max_segment_ms):
                    outputs.append(_Output("final", self._recognize(*piece, final=True), self.received_ms, arrived))
                self.open_start_ms = None
        if self._partial_due():
            position = self.endpointer.position_ms
            self.last_partial_ms = position
            self.partial = self._recognize(max(self.open_start_ms, position - self.max_segment_ms), position,
                                           final=False)
            outputs.append(_Output("partial", self.partial))
        if final:
            outputs.append(_Output("complete"))
        keep_ms = self.endpointer.position_ms - RETAIN_MS
        if self.open_start_ms is not None:
            keep_ms = min(keep_ms, self.open_start_ms)
        self.audio.discard_before(max(0, keep_ms) * SAMPLE_RATE // 1000)
        return outputs

    def _partial_due(self) -> bool:
        interval = self.options.partial_interval_ms
        return (interval > 0 and self.open_start_ms is not None
                and self.endpointer.position_ms - self.last_partial_ms >= interval
                and (self.partial is None or self.partial.done()))

    def _recognize(self, start_ms: int, end_ms: int, final: bool) -> asyncio.Future:
        """A future of (segment, speaker embedding); partials get no embedding."""
        samples = self.audio.get(start_ms * SAMPLE_RATE // 1000, end_ms * SAMPLE_RATE // 1000)
        return asyncio.ensure_future(self.recognizer.analyse(self.request, samples, start_ms, end_ms,
                                                             with_speaker=final and self.speakers is not None))

    async def _deliver(self, previous: asyncio.Future | None, outputs: list[_Output], sink: Sink) -> None:
        if previous is not None:
            await previous  # never raises: errors are caught below
        try:
            for output in outputs:
                if output.kind == "complete":
                    sink.send({"complete": True, "duration_ms": self.received_ms,
                               "segment_count": self.segments_sent})
                    continue
                segment, embedding = await output.segment
                if segment is None or self.failed:
                    continue
                if output.kind == "final" and self.speakers:  # finals come in order: labels too
                    segment.speaker = self.speakers.describe(embedding)
                payload = {**segment.to_dict(), "final": output.kind == "final",
                           "segment_index": self.segments_sent}
                if output.kind == "final":
                    payload["endpoint_ms"] = output.endpoint_ms
                    self.segments_sent += 1
                sink.send(payload)
                if output.kind == "final":
                    self.on_final(self.request.engine.name, time.monotonic() - output.arrived)
        except Exception as exc:  # a failed model call ends this stream, not the server
            self.failed = self.failed or f"recognition failed: {exc}"
            for output in outputs:
                if output.segment is not None:
                    output.segment.cancel()
            sink.fail(f"stream {self.id}: {self.failed}")
        finally:
            sink.finish()


StreamFactory = Callable[[int, StreamOptions], LiveStream]


class StreamRegistry:
    """The live streams of one model instance, by id; closes idle ones and enforces a limit."""

    def __init__(self, factory: StreamFactory, idle_timeout_s: float, max_streams: int,
                 on_change: Callable[[int], None] = lambda count: None):
        self.factory = factory
        self.idle_timeout_s = idle_timeout_s
        self.max_streams = max_streams
        self.on_change = on_change
        self.streams: dict[int, LiveStream] = {}
        self._closed: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self.streams)

    def open(self, stream_id: int, options: StreamOptions) -> LiveStream:
        if stream_id in self.streams:  # a new START on a live id begins a new stream
            self.close(stream_id, "restarted by a new start")
        if len(self.streams) >= self.max_streams:
            raise StreamError(f"this server instance is at its limit of {self.max_streams} open streams; "
                              "retry later or add instances")
        stream = self.factory(stream_id, options)
        self.streams[stream_id] = stream
        self._closed.pop(stream_id, None)
        self.on_change(len(self.streams))
        return stream

    def get(self, stream_id: int) -> LiveStream:
        stream = self.streams.get(stream_id)
        if stream is not None:
            return stream
        reason = self._closed.get(stream_id)
        if reason:
            raise StreamError(f"stream {stream_id} is closed ({reason})")
        raise StreamError(f"stream {stream_id} is not open: its first request must carry sequence_start")

    def close(self, stream_id: int, reason: str) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        stream.closed = reason
        self._closed[stream_id] = reason
        while len(self._closed) > CLOSED_REMEMBERED:
            self._closed.popitem(last=False)
        self.on_change(len(self.streams))

    def expire(self, now: float | None = None) -> list[int]:
        """Closes streams that sent nothing for `idle_timeout_s` (a client that vanished)."""
        now = time.monotonic() if now is None else now
        idle = [sid for sid, s in self.streams.items()
                if s.busy == 0 and now - s.last_active > self.idle_timeout_s]
        for stream_id in idle:
            self.close(stream_id, f"no audio for {self.idle_timeout_s:g} s")
        return idle


def stream_factory(vad: VadSpec, recognizer: Recognizer, run_vad: RunVad, vad_step_ms: int = 100,
                   on_final: OnFinal = lambda engine, latency_s: None, fbank: Extract | None = None) -> StreamFactory:
    return lambda stream_id, options: LiveStream(stream_id, vad, recognizer, run_vad, options, vad_step_ms,
                                                 on_final=on_final, fbank=fbank)
