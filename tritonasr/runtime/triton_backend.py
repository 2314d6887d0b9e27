"""The Python-backend models, kept here so each model_templates/*/1/model.py is a thin adapter.

Only the Triton Python backend stub can import `triton_python_backend_utils`; this module is
imported from those model.py files and nowhere else.
"""
from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import os
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonasr.audio import SAMPLE_RATE, resample, validate_samples
from tritonasr.contract import CHANNEL_MODES, ENDPOINTING_INPUTS, KEEP_MODEL_VALUE, Endpointing, MiB
from tritonasr.errors import (GRPC_STATUS, AccessDenied, AudioError, InputError, OverloadError, RecognitionError,
                              ServiceError, SpeakerError, bounded, classify, shown, with_status)
from tritonasr.models.fbank import Extract, in_pieces
from tritonasr.models.vad import VadSpec
from tritonasr.recognition.admission import (CLIENT_LIMIT, DRAINING, SERVER_LIMIT, Admission, refuse_if_draining,
                                             slot_directory)
from tritonasr.recognition.engines import build_engines, pad_step
from tritonasr.recognition.leaf_calls import LeafCalls
from tritonasr.recognition.offline import OfflinePipeline, Recognizer, check_sample_rate, detect_speech
from tritonasr.recognition.settings import (OfflineSettings, PipelineSettings, RegistrySettings, SpeakerSettings,
                                            StreamSettings)
from tritonasr.recognition.speakers import SpeakerRegistry, build_speaker_stage
from tritonasr.recognition.streaming import (LiveStream, StreamKey, StreamOptions, StreamRegistry,
                                             check_sequence_id, stream_factory)
from tritonasr.runtime.access import Access, parameters_of
from tritonasr.runtime.memory import AudioBudget, release_memory
from tritonasr.runtime.onnx_session import LoopBatcher, OnnxModel, instance_providers


class _TritonLog(logging.Handler):
    """The `tritonasr` logger's records through Triton's own logger, so that the server's
    --log-file, --log-format and --log-verbose apply to them (debug records are verbose ones)."""

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(message)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(message)
        elif record.levelno >= logging.INFO:
            pb_utils.Logger.log_info(message)
        else:
            pb_utils.Logger.log_verbose(message)


log = logging.getLogger("tritonasr")
# Through a queue and a thread of its own: a call to Triton's logger waits on the server, and the
# models log from their event loop.
_log_queue: queue.SimpleQueue = queue.SimpleQueue()
log.handlers = [logging.handlers.QueueHandler(_log_queue)]
log.setLevel(logging.DEBUG)  # Triton filters: info by default, verbose with --log-verbose
log.propagate = False
logging.handlers.QueueListener(_log_queue, _TritonLog()).start()
# Requests at least this large give their freed memory back to the system when they are done.
TRIM_AFTER_BYTES = 16 * MiB


def _parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _version_dir(args: dict) -> Path:
    return Path(args["model_repository"]) / args["model_version"]


class OnnxLeafModel:
    """A leaf model (vad, sensevoice): the batch the dynamic batcher formed runs as one ONNX
    Runtime call. Per-request tensors carry a leading batch dimension of 1."""

    def initialize(self, args: dict) -> None:
        params = _parameters(args)
        self.model = OnnxModel(
            _version_dir(args) / "model.onnx",
            intra_op_threads=int(params.get("intra_op_threads", "0")),
            ragged_inputs=[name for name in params.get("ragged_inputs", "").split(",") if name],
            providers=instance_providers(args),
        )
        self.output_names = [o["name"] for o in json.loads(args["model_config"])["output"]]
        self.access = Access.from_environment()

    def execute(self, requests):
        refusals, requests = refuse_outsiders(self.access, requests)
        return with_refusals(refusals, self._run(requests) if requests else [])

    def _run(self, requests) -> list:
        feeds = []
        for request in requests:
            feeds.append({name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                          for name in self.model.input_names})
        try:
            results = self.model.run_batch(feeds, self.output_names)
        except Exception as exc:  # one bad batch must not take the model down
            log.error("onnx run failed: %s", traceback.format_exc())
            error = _triton_error(classify(exc))
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in result.items()])
                for result in results]


def refuse_outsiders(access: Access, requests) -> tuple[list, list]:
    """A leaf model's batch split in two: by position, the error response of each request that
    did not come from a pipeline (None for the others), and the others."""
    refusals = []
    for request in requests:
        try:
            access.check_internal(parameters_of(request.parameters()))
            refusals.append(None)
        except AccessDenied as exc:
            refusals.append(pb_utils.InferenceResponse(error=_triton_error(exc)))
    return refusals, [request for request, refused in zip(requests, refusals) if refused is None]


def with_refusals(refusals: list, responses: list) -> list:
    """The batch's responses in order: the refusals, and `responses` to the others."""
    answered = iter(responses)
    return [refused or next(answered) for refused in refusals]


class PipelineMetrics:
    """The pipelines' own Prometheus metrics, on Triton's /metrics beside its per-model counters
    (the Python backend's custom metrics API). Labelled by model and model_instance (not
    `instance`, which Prometheus sets to the scrape target): every instance is its own process,
    and two processes may not register the same labels."""

    FAMILIES = {
        "open_streams": ("tritonasr_open_streams", "GAUGE", "Live streams holding state in asr_stream"),
        "inflight_requests": ("tritonasr_inflight_requests", "GAUGE",
                              "Offline requests asr_offline is working on (those queued before it: "
                              "nv_inference_pending_request_count)"),
        "calls": ("tritonasr_requests_total", "COUNTER",
                  "Client calls taken in: asr_offline requests, asr_stream streams opened (refused ones too)"),
        "max_streams": ("tritonasr_max_streams", "GAUGE",
                        "asr_stream: open streams this server takes at once, all instances (0: no limit)"),
        "max_inflight_requests": ("tritonasr_max_inflight_requests", "GAUGE",
                                  "asr_offline: requests this instance works on at once"),
        "segments": ("tritonasr_segments_total", "COUNTER", "Final segments transcribed, by ASR engine"),
        "audio": ("tritonasr_audio_seconds_total", "COUNTER",
                  "Seconds of audio received (whole files and stream chunks)"),
        "latency": ("tritonasr_final_latency_seconds", "HISTOGRAM",
                    "Streams: from the arrival of the chunk that ended a segment's speech to its final"),
        "decodes_ahead": ("tritonasr_decodes_ahead_total", "COUNTER",
                          "asr_stream: segments decoded before their end silence was complete, by result: used by "
                          "their final, or void (speech resumed: the decode was thrown away)"),
        "errors": ("tritonasr_errors_total", "COUNTER", "Failed requests and streams, by kind"),
        "rejected": ("tritonasr_rejected_total", "COUNTER",
                     "Streams and requests refused for lack of room, by the limit that refused them"),
    }
    # End of speech -> final: most finals should land in the first buckets on a GPU server.
    LATENCY_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]

    def __init__(self, model: str, instance: str, reasons: tuple[str, ...] = ()):
        self.labels = {"model": model, "model_instance": instance}
        # Families must outlive their metrics: both are kept here.
        self.families = {key: pb_utils.MetricFamily(name=name, kind=getattr(pb_utils.MetricFamily, kind),
                                                    description=description)
                         for key, (name, kind, description) in self.FAMILIES.items()}
        self.open_streams = self.metric("open_streams")
        self.calls = self.metric("calls")
        self.audio = self.metric("audio")
        self.latency = self.families["latency"].Metric(labels=self.labels, buckets=self.LATENCY_BUCKETS)
        self._by_label: dict[tuple[str, str], object] = {}
        for reason in reasons:  # on /metrics from the start, at 0, so rates and alerts see them
            self._labelled("rejected", "reason", reason)

    def metric(self, family: str):
        """This instance's metric of `family` (a key of FAMILIES)."""
        return self.families[family].Metric(labels=self.labels)

    def _labelled(self, family: str, key: str, value: str):
        metric = self._by_label.get((family, value))
        if metric is None:
            metric = self.families[family].Metric(labels={**self.labels, key: value})
            self._by_label[(family, value)] = metric
        return metric

    def segments(self, engine: str, count: int = 1) -> None:
        self._labelled("segments", "engine", engine).increment(count)

    def audio_received(self, seconds: float) -> None:
        self.audio.increment(seconds)

    def final_sent(self, engine: str, latency_s: float) -> None:
        self.segments(engine)
        self.latency.observe(latency_s)

    def decoded_ahead(self, result: str, count: int) -> None:
        self._labelled("decodes_ahead", "result", result).increment(count)

    def failed(self, exc: BaseException, model: str) -> ServiceError:
        """The error to report for `exc`, counted once: under its kind, or a refusal under its
        reason (internal faults logged)."""
        error = classify(exc)
        if error is not exc:
            log.error("%s failed: %s", model, "".join(traceback.format_exception(exc)))
        elif isinstance(error, RecognitionError):
            log.error("%s: %s", model, error)
        if error.kind:
            self._labelled("errors", "kind", error.kind).increment(1)
        if isinstance(error, OverloadError):
            self._labelled("rejected", "reason", error.reason).increment(1)
        return error


class _PipelineModel:
    """What the BLS models share: the leaf models they call (vad, ASR engines, speaker) and how."""

    REJECTION_REASONS: tuple[str, ...] = ()  # the limits that may refuse this model's requests

    def initialize(self, args: dict) -> None:
        self.params = _parameters(args)
        self.config = json.loads(args["model_config"])
        self.repository = Path(args["model_repository"]).parent
        self.settings = PipelineSettings.from_parameters(self.params)
        speaker_settings = SpeakerSettings.from_parameters(self.params)
        self.calls = LeafCalls(self._infer, self.settings, speaker_settings.model)
        self.vad_spec = VadSpec.load(self.repository / self.settings.vad_model / "1")
        # The front ends: served models where the repository build put them (GPU targets), else
        # computed here, per request, on the CPU.
        served_fbank = self._served_frontend(self.settings.fbank_model)
        self.vad_fbank = served_fbank and in_pieces(served_fbank, self.vad_spec.frontend)
        self.speakers = build_speaker_stage(self.repository, speaker_settings, self.calls.speaker,
                                            self._served_frontend(self.settings.speaker_fbank_model))
        self.metrics = PipelineMetrics(args["model_name"], args["model_instance_name"], self.REJECTION_REASONS)
        self.access = Access.from_environment()

    def _caller(self, request) -> str:
        """Who sent the request (a digest of its API key); refuses callers without a valid key."""
        return self.access.caller(parameters_of(request.parameters()))

    def _recognizer(self) -> Recognizer:
        """The exported engines, the default one first ("": the first exported)."""
        calls, settings = self.calls, self.settings
        engines = build_engines(self.repository, settings, calls.sensevoice, calls.parakeet_encoder,
                                calls.parakeet_decoder, fbank=self.vad_fbank,
                                mel=self._served_frontend(settings.mel_model))
        calls.pad_steps = {name: pad_step(engine.frame_ms, settings.pad_segments_ms) for name, engine in engines.items()}
        return Recognizer(engines, settings.default_asr_engine, self.speakers)

    def _served_frontend(self, model: str) -> Extract | None:
        """The served front-end model named `model` ("": none)."""
        return self.calls.frontend(model) if model else None

    async def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
            requested_output_names=outputs,
            parameters=self.access.internal_parameters(),
        )
        response = await request.async_exec()
        if response.has_error():  # keeps the leaf model's code: UNAVAILABLE stays UNAVAILABLE
            error = response.error()
            raise RecognitionError(f"{model}: {error.message()}", code=_code_name(error.code()))
        return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs]


class OfflineAsrModel(_PipelineModel):
    """asr_offline: whole recordings in, segments out (JSON), through the vad and sensevoice
    models. Each request's inner calls are awaited concurrently with every other request's."""

    REJECTION_REASONS = (DRAINING,)

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        self.slots = slot_directory(os.getppid())  # where a drain is announced (admission.start_draining)
        limits = OfflineSettings.from_parameters(self.params)
        self.pipeline = OfflinePipeline(self.vad_spec, self._recognizer(), self.calls.vad, fbank=self.vad_fbank,
                                        max_audio_s=limits.max_audio_seconds,
                                        max_inflight_segments=limits.max_inflight_segments,
                                        short_first=limits.short_first)
        self.budget = AudioBudget(int(limits.max_inflight_audio_mb * MiB))
        self.metrics.metric("max_inflight_requests").set(limits.max_inflight_requests)
        inflight = self.metrics.metric("inflight_requests")
        inflight.set(0)
        self.requests = _RequestPool("asr_offline", limits.max_inflight_requests, on_change=inflight.set)

    async def _handle(self, request) -> dict:
        self._caller(request)
        # Those already taken in finish; one that reaches the model after the drain began goes
        # back to its caller untouched, to retry elsewhere.
        refuse_if_draining(self.slots, "requests")
        audio = _required(request, "AUDIO")
        sample_rate = int(_scalar(_input(request, "SAMPLE_RATE"), SAMPLE_RATE))
        channels = int(_scalar(_input(request, "CHANNEL_COUNT"), 1))
        self.pipeline.check_size(audio, sample_rate, channels)  # before the budget counts it
        with self.budget.reserve(audio.nbytes * SAMPLE_RATE // sample_rate):  # as it is at 16 kHz
            try:
                return await self._transcribe(request, audio, sample_rate, channels)
            finally:
                if audio.nbytes >= TRIM_AFTER_BYTES:
                    release_memory()

    async def _transcribe(self, request, audio: np.ndarray, sample_rate: int, channels: int) -> dict:
        engine = _text(request, "ENGINE", "")
        result = await self.pipeline.transcribe(
            audio.reshape(-1),  # [1, N]: one recording per request (max_batch_size 1)
            language=_text(request, "LANGUAGE", "auto"),
            use_itn=bool(_scalar(_input(request, "USE_ITN"), False)),
            sample_rate=sample_rate,
            with_speaker=bool(_scalar(_input(request, "WITH_SPEAKER"), True)),
            return_embedding=bool(_scalar(_input(request, "RETURN_EMBEDDING"), False)),
            engine=engine,
            endpointing=_endpointing(request),
            channels=channels,
            separate_channels=_separate_channels(request),
            cancelled=request.is_cancelled,  # a caller past its deadline frees what it held
        )
        self.metrics.audio_received(audio.size / channels / sample_rate)
        self.metrics.segments(self.pipeline.recognizer.request(engine).engine.name, len(result["segments"]))
        return result

    def execute(self, requests):
        self.metrics.calls.increment(len(requests))
        for request in requests:
            self.requests.submit(request, _respond("asr_offline", self._handle(request), self.metrics))
        self.requests.wait_for_room()
        return None  # each request is answered through its response sender when it is done

    def finalize(self) -> None:
        self.requests.close()


class _RequestPool:
    """A non-decoupled model's requests worked on concurrently, each answered on its own.

    A coroutine `execute` of a non-decoupled Python model holds its instance until the whole batch
    is answered (Triton 2.51's stub runs it to the end), so a short recording waited for the
    longest one in its batch and new requests for all of them. Here `execute` hands each request to
    an event loop of the instance's own and returns; the request answers through its response
    sender when it is done. Once `limit` requests are in flight `execute` waits for one to finish,
    so the instance takes no more and the rest wait in Triton's queue, under its queue policy."""

    def __init__(self, model: str, limit: int, on_change: Callable[[int], None] = lambda in_flight: None):
        self.model = model
        self.limit = limit
        self.on_change = on_change  # told the number in flight after each change
        self.in_flight = 0
        self._room = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{model} requests", daemon=True)
        self._thread.start()

    def submit(self, request, answer) -> None:
        """Starts the coroutine `answer` (a response for `request`) on the loop."""
        with self._room:
            self.in_flight += 1
            self.on_change(self.in_flight)
        asyncio.run_coroutine_threadsafe(self._send(request.get_response_sender(), answer), self._loop)

    async def _send(self, sender, answer) -> None:
        try:
            sender.send(await answer, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # the caller is gone; the response has nowhere to go
            log.warning("%s: a response could not be sent: %s", self.model, traceback.format_exc())
        finally:
            with self._room:
                self.in_flight -= 1
                self.on_change(self.in_flight)
                self._room.notify()

    def wait_for_room(self) -> None:
        with self._room:
            self._room.wait_for(lambda: self.in_flight < self.limit)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class SpeakerRegistryModel(_PipelineModel):
    """speaker_registry: voiceprints of recordings (embed) and the enrolled speakers (enroll,
    remove, list), in the store asr_offline and asr_stream identify against."""

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        if self.speakers is None:
            raise RuntimeError(f"speaker_registry needs the {self.calls.speaker_model!r} model: run `tritonasr export speaker`")
        self.max_seconds = RegistrySettings.from_parameters(self.params).max_audio_seconds
        self.registry = SpeakerRegistry(self.speakers, self._detect_speech, SAMPLE_RATE)

    async def _detect_speech(self, samples: np.ndarray) -> list[tuple[int, int]]:
        fbank = await self.vad_fbank(samples) if self.vad_fbank else None
        return await detect_speech(self.vad_spec, self.calls.vad, samples, fbank)

    async def _handle(self, request) -> dict:
        self._caller(request)
        _required(request, "ACTION")  # (Triton 2.51 checks required inputs only by their number)
        action = _text(request, "ACTION", "")
        handler = {"embed": self._embed, "enroll": self._enroll, "remove": self._remove, "list": self._list}.get(action)
        if handler is None:
            raise SpeakerError(f"unknown ACTION {shown(action)}: use embed, enroll, remove or list")
        if action in ("enroll", "remove"):  # changes who segments are attributed to
            self.access.check_admin(parameters_of(request.parameters()), action)
        return await handler(request)

    async def _embed(self, request) -> dict:
        sample_rate = int(_scalar(_input(request, "SAMPLE_RATE"), SAMPLE_RATE))
        check_sample_rate(sample_rate)
        samples = _required(request, "AUDIO").reshape(-1)
        if samples.size > self.max_seconds * sample_rate:
            raise AudioError(f"enrollment audio is limited to {self.max_seconds:g} s")
        return await self.registry.embed(resample(validate_samples(samples), sample_rate))

    async def _enroll(self, request) -> dict:
        return self.registry.enroll(_name(request, "enroll"), _required(request, "EMBEDDINGS"),
                                    _required(request, "SPEECH_MS"), bool(_scalar(_input(request, "REPLACE"), False)))

    async def _remove(self, request) -> dict:
        return self.registry.remove(_name(request, "remove"))

    async def _list(self, request) -> dict:
        return self.registry.list()

    async def execute(self, requests):
        return [await _respond("speaker_registry", self._handle(r), self.metrics) for r in requests]


class StreamingAsrModel(_PipelineModel):
    """asr_stream: decoupled; one request per chunk, sequence controls from Triton's sequence
    batcher. Requests are handled as tasks, so chunks of many streams overlap on one instance
    while each stream's own chunks are taken in order (`LiveStream.push`)."""

    REJECTION_REASONS = (SERVER_LIMIT, CLIENT_LIMIT, DRAINING)

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        self.metrics.open_streams.set(0)
        settings = StreamSettings.from_parameters(self.params)
        self.metrics.metric("max_streams").set(settings.max_streams)
        # The streams' VAD steps run here, batched per turn of the event loop: a 100 ms step is
        # ~0.1 ms of FSMN, less than its request through the server would cost (BENCHMARKS.md).
        vad = LoopBatcher(OnnxModel(self.repository / self.settings.vad_model / "1" / "model.onnx",
                                    intra_op_threads=1, providers=["CPUExecutionProvider"]))
        run_vad = LeafCalls(lambda model, inputs, outputs: vad.infer(inputs, outputs), self.settings).vad
        factory = stream_factory(self.vad_spec, self._recognizer(), run_vad, fbank=self.vad_fbank,
                                 vad_step_ms=settings.vad_step_ms, max_chunk_ms=settings.max_chunk_ms,
                                 decode_ahead_ms=settings.decode_ahead_ms, on_decode_ahead=self.metrics.decoded_ahead,
                                 on_final=self.metrics.final_sent, on_failure=self._stream_failed)
        # Triton forgets an idle sequence without telling the model; we keep the same clock.
        idle_us = int(self.config["sequence_batching"].get("max_sequence_idle_microseconds", 1_000_000))
        self.streams = StreamRegistry(factory, idle_us / 1e6, Admission.for_this_server(settings),
                                      on_change=self.metrics.open_streams.set,
                                      require_token=settings.require_stream_token)
        self._sweeper: asyncio.Future | None = None
        # Seconds of audio taken in, not yet added to the counter: a metric update is a round trip
        # to the server that holds up this instance's event loop, so it goes once a second
        # (per call it was a fifth of this process's time at 16 streams: BENCHMARKS.md).
        self._audio_unreported = 0.0

    async def execute(self, requests):
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._close_idle_streams())
        # Returns once each chunk is taken in (its VAD step done); segments are sent later by
        # the stream. The backend runs the next execute() meanwhile.
        received = await asyncio.gather(*(self._handle(request) for request in requests))
        self._audio_unreported += sum(received)
        return None

    async def _handle(self, request) -> float:
        """Takes in one chunk; returns the seconds of audio it brought."""
        sink = _ResponseSink(request.get_response_sender())
        chunk = stream = None
        seconds = 0.0
        try:
            chunk = _Chunk.read(request, self._caller(request))
            if chunk.start:
                self.metrics.calls.increment(1)
                stream = self.streams.open(chunk.key, chunk.options(), chunk.token)
            else:
                stream = self.streams.get(chunk.key, chunk.token, chunk.end)
                chunk.check_no_options()
            rate = _scalar(_input(request, "SAMPLE_RATE"), None)
            samples = stream.reader.read(_input(request, "AUDIO"), _input(request, "AUDIO_BYTES"),
                                         None if rate is None else int(rate))
            seconds = stream.reader.seconds(samples)
            await stream.push(samples, chunk.end, sink)
            if chunk.end:
                self.streams.close(stream, "ended")
        except Exception as exc:
            error = self.metrics.failed(exc, "asr_stream")
            sink.fail(error)
            sink.finish()
            # Only the stream this chunk belongs to ends (never one it was refused entry to).
            if stream is not None:
                self.streams.close(stream, f"closed after an error: {error}", failed=True)
            elif chunk is not None and chunk.start:
                self.streams.refused(chunk.key, chunk.token, f"refused at its start: {error}")
        return seconds

    def _stream_failed(self, stream: LiveStream, error: ServiceError) -> None:
        self.metrics.failed(error, "asr_stream")
        self.streams.close(stream, f"closed after an error: {error}", failed=True)

    def _expired(self, stream: LiveStream, error: ServiceError) -> None:
        self.metrics.failed(error, "asr_stream")
        log.info("asr_stream: %s", error)

    async def _close_idle_streams(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._report_audio()
            if self.streams.expire(before_close=self._expired):
                release_memory()  # abandoned streams come in crowds: give their memory back

    def _report_audio(self) -> None:
        if self._audio_unreported:
            self.metrics.audio_received(self._audio_unreported)
            self._audio_unreported = 0.0

    def finalize(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._report_audio()


# The inputs of asr_stream read from a START request only (see _Chunk.options).
STREAM_OPTIONS = ("LANGUAGE", "ENGINE", "USE_ITN", "PARTIAL_INTERVAL_MS", "WITH_SPEAKER", "RETURN_EMBEDDING",
                  "CHANNEL_COUNT", "CHANNELS",
                  "ENCODING", "TEXT_FIRST", *ENDPOINTING_INPUTS.values())


@dataclass
class _Chunk:
    key: StreamKey
    token: str  # the stream_token request parameter ("" when not sent)
    start: bool
    end: bool
    request: object

    @classmethod
    def read(cls, request, caller: str) -> "_Chunk":
        # The correlation id as the client sent it (an int, or a str for string ids); the CORRID
        # control tensor would turn every string id into one number.
        key = StreamKey(check_sequence_id(request.correlation_id()), caller)
        token = parameters_of(request.parameters()).get("stream_token", "")
        if not isinstance(token, str) or len(token) > 256:
            raise InputError("stream_token must be a string of at most 256 characters")
        return cls(key, token, bool(_scalar(_input(request, "START"), 0)), bool(_scalar(_input(request, "END"), 0)),
                   request)

    def check_no_options(self) -> None:
        """Options count on a START only: one sent later would be silently ignored."""
        sent = [tensor.name() for tensor in self.request.inputs() if tensor.name() in STREAM_OPTIONS]
        if sent:
            raise InputError(f"{', '.join(sent)} can only be set on a stream's START request; "
                             "later requests carry AUDIO or AUDIO_BYTES (and SAMPLE_RATE) only")

    def options(self) -> StreamOptions:
        """The stream's options, which its START carries."""
        request = self.request
        partial_interval_ms = int(_scalar(_input(request, "PARTIAL_INTERVAL_MS"), 0))
        if partial_interval_ms < 0:  # (the client library refuses it too)
            raise InputError(f"PARTIAL_INTERVAL_MS must be >= 0 (0: no partials), got {partial_interval_ms}")
        return StreamOptions(language=_text(request, "LANGUAGE", "auto"),
                             use_itn=bool(_scalar(_input(request, "USE_ITN"), False)),
                             partial_interval_ms=partial_interval_ms, engine=_text(request, "ENGINE", ""),
                             with_speaker=bool(_scalar(_input(request, "WITH_SPEAKER"), True)),
                             return_embedding=bool(_scalar(_input(request, "RETURN_EMBEDDING"), False)),
                             endpointing=_endpointing(request),
                             sample_rate=int(_scalar(_input(request, "SAMPLE_RATE"), SAMPLE_RATE)),
                             encoding=_text(request, "ENCODING", "float32"),
                             text_first=bool(_scalar(_input(request, "TEXT_FIRST"), False)),
                             channels=int(_scalar(_input(request, "CHANNEL_COUNT"), 1)),
                             separate_channels=_separate_channels(request))


class _ResponseSink:
    """A request's response sender as a `Sink`."""

    def __init__(self, sender):
        self.sender = sender

    def send(self, payload: dict) -> None:
        self.sender.send(_json_response(payload))

    def fail(self, error: ServiceError) -> None:
        self.sender.send(pb_utils.InferenceResponse(
            error=pb_utils.TritonError(with_status(error), getattr(pb_utils.TritonError, error.code))))

    def finish(self) -> None:
        self.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def cancelled(self) -> bool:
        return self.sender.is_cancelled()


def _code_name(code) -> str:
    """The name of a pb_utils.TritonError code (which exists only once the stub has started)."""
    return next((name for name in GRPC_STATUS if getattr(pb_utils.TritonError, name) == code), "INTERNAL")


def _triton_error(error: ServiceError) -> "pb_utils.TritonError":
    return pb_utils.TritonError(bounded(str(error)), getattr(pb_utils.TritonError, error.code))


async def _respond(model: str, work, metrics: PipelineMetrics) -> "pb_utils.InferenceResponse":
    """The JSON result of `work`, or the error a bad request earned (only that request fails)."""
    try:
        return _json_response(await work)
    except Exception as exc:
        return pb_utils.InferenceResponse(error=_triton_error(metrics.failed(exc, model)))


def _json_response(payload: dict):
    data = np.array([[json.dumps(payload, ensure_ascii=False).encode()]], dtype=np.object_)
    return pb_utils.InferenceResponse([pb_utils.Tensor("RESULT", data)])


def _input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _required(request, name: str) -> np.ndarray:
    value = _input(request, name)
    if value is None:
        raise InputError(f"this request needs the {name} input")
    return value


def _scalar(value: np.ndarray | None, default):
    if value is None:
        return default
    if value.size == 0:
        raise InputError("an option tensor is empty")
    return value.reshape(-1)[0]


def _separate_channels(request) -> bool:
    """CHANNELS: "separate" recognises each channel on its own; "mix" (the default) their mix."""
    mode = _text(request, "CHANNELS", CHANNEL_MODES[0])
    if mode not in CHANNEL_MODES:
        raise InputError(f"CHANNELS must be one of {', '.join(CHANNEL_MODES)}, got {shown(mode)}")
    return mode == "separate"


def _endpointing(request) -> Endpointing:
    """The request's END_SILENCE_MS, MAX_SEGMENT_MS and SPEECH_START_MS (absent or
    KEEP_MODEL_VALUE: the VAD model's value)."""
    values = {}
    for field, name in ENDPOINTING_INPUTS.items():
        value = int(_scalar(_input(request, name), KEEP_MODEL_VALUE))
        if value != KEEP_MODEL_VALUE:
            values[field] = value
            try:
                Endpointing(**{field: values[field]})
            except ValueError as exc:
                raise InputError(f"{name}: {exc}") from None
    return Endpointing(**values)


# Longest text option (LANGUAGE, ENGINE, ACTION, NAME), in bytes.
MAX_TEXT_BYTES = 1024


def _text(request, name: str, default: str) -> str:
    value = _scalar(_input(request, name), default)
    if not isinstance(value, bytes):
        return str(value)
    if len(value) > MAX_TEXT_BYTES:
        raise InputError(f"{name} is {len(value)} bytes long; at most {MAX_TEXT_BYTES}")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise InputError(f"{name} is not valid UTF-8 text") from None


def _name(request, action: str) -> str:
    name = _text(request, "NAME", "")
    if not name:
        raise SpeakerError(f"{action} needs a NAME")
    return name
