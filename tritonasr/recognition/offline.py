"""The offline pipeline: audio -> VAD segments -> an ASR engine (and the speaker stage) -> segments.

Model execution is injected as async callables, so the same logic runs inside the Triton BLS
model (each call an inner inference request) and in-process over ONNX Runtime (tests,
benchmarks).
"""
from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from tritonasr.audio import SAMPLE_RATE, AudioError, resample, validate_samples
from tritonasr.contract import MAX_CHANNELS, SAMPLE_RATES, Endpointing
from tritonasr.errors import CallerGone, InputError
from tritonasr.models.fbank import Extract, in_process
from tritonasr.models.transcript import Segment
from tritonasr.models.endpointing import EndpointDetector, EndpointOptions
from tritonasr.models.vad import VadSpec, chunk_bounds, chunk_samples, split_long_segments
from tritonasr.recognition.engines import AsrEngine
from tritonasr.recognition.settings import OfflineSettings
from tritonasr.recognition.speakers import SpeakerSession, SpeakerStage

# SenseVoice is trained on utterances of at most 30 s; Parakeet's full attention grows with the
# square of the length.
MAX_ASR_SEGMENT_MS = 30_000

# (features [1,T,400], caches) -> (scores [1,T,C], caches)
RunVad = Callable[[np.ndarray, list[np.ndarray]], Awaitable[tuple[np.ndarray, list[np.ndarray]]]]


@dataclass(frozen=True)
class AsrRequest:
    """The engine a request chose and its options in that engine's form."""

    engine: AsrEngine
    query: object


class Recognizer:
    """One segment -> the chosen ASR engine's transcript and (with a speaker stage) the speaker's
    embedding, computed concurrently."""

    def __init__(self, engines: dict[str, AsrEngine], default_engine: str = "",
                 speakers: SpeakerStage | None = None):
        if not engines:
            raise ValueError("no ASR engine is exported: run `tritonasr export sensevoice` or "
                             "`tritonasr export parakeet`")
        self.engines = engines
        self.default_engine = default_engine or next(iter(engines))
        if self.default_engine not in engines:
            raise ValueError(f"the default ASR engine {self.default_engine!r} is not exported "
                             f"(exported: {', '.join(engines)})")
        self.speakers = speakers

    def request(self, engine: str = "", language: str = "auto", use_itn: bool = False) -> AsrRequest:
        """The engine named (the default for ""), with the request's options checked by it."""
        name = engine or self.default_engine
        if name not in self.engines:
            raise InputError(f"unknown ASR engine {name!r}; this server runs: {', '.join(self.engines)}")
        chosen = self.engines[name]
        return AsrRequest(chosen, chosen.query(language, use_itn))

    def speaker_session(self, with_speaker: bool, return_embedding: bool) -> SpeakerSession | None:
        """Speaker labels for one file or stream; None when the request or the deployment has no
        speaker stage."""
        return self.speakers.session(return_embedding) if with_speaker and self.speakers else None

    async def analyse(self, request: AsrRequest, samples: np.ndarray, start_ms: int, end_ms: int,
                      with_speaker: bool, fbank: np.ndarray | None = None) -> tuple[Segment | None, np.ndarray | None]:
        """(segment, speaker embedding or None) of a segment's audio; `fbank`: its rows of the
        VAD's fbank, when the engine shares it."""
        transcript = request.engine.transcribe(samples, start_ms, end_ms, request.query, fbank)
        if not (with_speaker and self.speakers):
            return await transcript, None
        segment, embedding = await asyncio.gather(transcript, self.speakers.embed(samples))
        return segment, embedding


def check_channels(channels: int) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"audio must have 1 to {MAX_CHANNELS} channels, got {channels}")


def split_channels(samples: np.ndarray, channels: int, separate: bool) -> list[np.ndarray]:
    """Interleaved samples (a WAV file's frames) as tracks: one per channel (`separate`), else
    their mix."""
    if samples.size % channels:
        raise AudioError(f"{samples.size} samples do not make whole frames of {channels} channels")
    if channels == 1:
        return [samples]
    frames = samples.reshape(-1, channels)
    if not separate:
        return [frames.mean(axis=1, dtype=np.float32)]
    return [np.ascontiguousarray(frames[:, c]) for c in range(channels)]


def check_sample_rate(sample_rate: int) -> None:
    if sample_rate not in SAMPLE_RATES:
        raise AudioError(f"audio must be at {' or '.join(f'{r} Hz' for r in SAMPLE_RATES)}; got "
                         f"{sample_rate} Hz (resample it on the client)")


def endpoint_options(vad: VadSpec, endpointing: Endpointing) -> EndpointOptions:
    """The VAD model's endpointing with what a request changed (None: the model's value)."""
    changed = {name: value for name, value in vars(endpointing).items() if value is not None}
    try:
        return dataclasses.replace(vad.endpoint, **changed) if changed else vad.endpoint
    except ValueError as exc:  # e.g. a speech_start_ms this model's vote window cannot hold
        raise InputError(f"endpointing: {exc}") from None


async def detect_speech(vad: VadSpec, run_vad: RunVad, samples: np.ndarray, fbank: np.ndarray | None = None,
                        endpoint: EndpointOptions | None = None) -> list[tuple[int, int]]:
    """A whole recording's speech segments (ms), as FunASR's offline VAD finds them with
    `endpoint` (default: the model's own options)."""
    frontend = vad.frontend
    fbank = frontend.fbank(samples) if fbank is None else fbank
    detector = EndpointDetector(endpoint or vad.endpoint, online=False)
    caches = vad.zero_caches()
    bounds = chunk_bounds(frontend.num_lfr_frames(fbank.shape[0]))
    segments: list[tuple[int, int]] = []
    for i, (start, stop) in enumerate(bounds):
        scores, caches = await run_vad(frontend.lfr(fbank, start, stop)[None], caches)
        wave = samples[chunk_samples(frontend, start, stop, samples.size)]
        segments += detector.feed(scores[0], wave, final=i == len(bounds) - 1)
    return segments


class SegmentSlots:
    """Slots for segments in the leaf models, shared by the requests of one pipeline. A free slot
    goes to the waiting segment whose request is due first: due = when the request came plus
    `short_first` x its audio's seconds. Short recordings pass long ones that came a little
    before them (their latency then follows their length, not the load), and a long one's turn
    still comes, once the requests after it are due later than it is. 0: first come, first served."""

    def __init__(self, slots: int, short_first: float):
        self.free = slots
        self.short_first = short_first
        self._waiting: list[tuple[float, int, asyncio.Future]] = []  # a heap: (due, arrival, granted)
        self._arrivals = itertools.count()  # ties (one request's segments) in order of arrival

    def due(self, audio_s: float) -> float:
        """The due time of a request arriving now with `audio_s` seconds of audio."""
        return asyncio.get_running_loop().time() + self.short_first * audio_s

    @asynccontextmanager
    async def slot(self, due: float):
        if self.free and not self._waiting:
            self.free -= 1
        else:
            granted = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (due, next(self._arrivals), granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._release()  # it was handed the slot as it was cancelled: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            granted = heapq.heappop(self._waiting)[2]
            if not granted.done():  # (a cancelled waiter's turn is skipped)
                granted.set_result(None)
                return
        self.free += 1


class OfflinePipeline:
    def __init__(self, vad: VadSpec, recognizer: Recognizer, run_vad: RunVad,
                 max_audio_s: float = OfflineSettings.max_audio_seconds, max_asr_segment_ms: int = MAX_ASR_SEGMENT_MS,
                 fbank: Extract | None = None,
                 max_inflight_segments: int = OfflineSettings.max_inflight_segments,
                 short_first: float = OfflineSettings.short_first):
        self.vad = vad
        self.run_vad = run_vad
        self.fbank = fbank or in_process(vad.frontend.fbank)  # the VAD's, which SenseVoice shares
        self.recognizer = recognizer
        self.max_audio_s = max_audio_s
        self.max_asr_segment_ms = max_asr_segment_ms
        self.segment_slots = SegmentSlots(max_inflight_segments, short_first)

    def check_size(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> None:
        """The request's rate, channel count and length: checked before anything is computed on
        its audio (validating a huge input costs several copies of it)."""
        check_sample_rate(sample_rate)
        check_channels(channels)
        seconds = samples.size / channels / sample_rate
        if seconds > self.max_audio_s:
            raise AudioError(f"audio is {seconds:.0f} s long; this server accepts at most "
                             f"{self.max_audio_s:.0f} s per request: send longer recordings as a stream, "
                             "in chunks (the tritonasr client does so by itself)")

    def check_audio(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE, channels: int = 1,
                    separate: bool = False) -> list[np.ndarray]:
        """The request's audio at 16 kHz: one track per channel (`separate`), else one mixed track.
        `samples` holds `channels` interleaved channels, as a WAV file's frames do."""
        self.check_size(samples, sample_rate, channels)
        tracks = split_channels(validate_samples(samples), channels, separate)
        return [resample(track, sample_rate) for track in tracks]

    async def transcribe(self, samples: np.ndarray, language: str = "auto", use_itn: bool = False,
                         sample_rate: int = SAMPLE_RATE, with_speaker: bool = True,
                         return_embedding: bool = False, engine: str = "",
                         endpointing: Endpointing = Endpointing(), channels: int = 1,
                         separate_channels: bool = False, cancelled: Callable[[], bool] | None = None) -> dict:
        """with_speaker: run the speaker stage (when deployed); False skips it for this request.
        engine: the ASR engine ("" for the deployment's default). channels: how many interleaved
        channels `samples` holds; separate_channels: recognise each on its own (segments carry
        "channel", ordered by start) instead of their mix. cancelled: asked before each segment
        goes to the leaf models; True stops the work (CallerGone)."""
        tracks = self.check_audio(samples, sample_rate, channels, separate_channels)
        request = self.recognizer.request(engine, language, use_itn)
        endpoint = endpoint_options(self.vad, endpointing)
        speakers = self.recognizer.speaker_session(with_speaker, return_embedding)
        due = self.segment_slots.due(tracks[0].size * len(tracks) / SAMPLE_RATE)

        async def recognise(track: np.ndarray) -> list[tuple[Segment | None, np.ndarray | None]]:
            fbank = await self.fbank(track)
            speech = await detect_speech(self.vad, self.run_vad, track, fbank, endpoint)

            async def analyse(start_ms: int, end_ms: int):
                async with self.segment_slots.slot(due):
                    if cancelled is not None and cancelled():
                        raise CallerGone("the caller cancelled the request; its work stopped")
                    return await self.analyse(request, track, fbank, start_ms, end_ms, speakers is not None)

            pieces = split_long_segments(speech, self.max_asr_segment_ms)
            return await asyncio.gather(*(analyse(s, e) for s, e in pieces))

        found = [(segment, embedding, channel)
                 for channel, results in enumerate(await asyncio.gather(*(recognise(t) for t in tracks)))
                 for segment, embedding in results if segment is not None]
        found.sort(key=lambda item: (item[0].start_ms, item[2]))  # (one track: already in order)
        segments = []
        for segment, embedding, channel in found:  # in order: speaker labels are given in order of speech
            segment.speaker = speakers.describe(embedding) if speakers else None
            segments.append({**segment.to_dict(), "channel": channel} if separate_channels else segment.to_dict())
        return {"duration_ms": int(tracks[0].size * 1000 // SAMPLE_RATE), "segments": segments}

    async def analyse(self, request: AsrRequest, samples: np.ndarray, fbank: np.ndarray, start_ms: int,
                      end_ms: int, with_speaker: bool) -> tuple[Segment | None, np.ndarray | None]:
        first, last = start_ms * SAMPLE_RATE // 1000, min(samples.size, end_ms * SAMPLE_RATE // 1000)
        shift = self.vad.frontend.frame_shift
        seg_fbank = None
        # When the engine uses the VAD's kaldi fbank, its features are cut from the fbank already
        # computed (frames are local, so this is exact) instead of computing it twice.
        if request.engine.shares_fbank(self.vad.frontend) and start_ms % shift == 0:
            frame0 = start_ms // shift
            seg_fbank = fbank[frame0: frame0 + self.vad.frontend.num_frames(last - first)]
        return await self.recognizer.analyse(request, samples[first:last], start_ms, end_ms, with_speaker, seg_fbank)
