"""Whole-file transcription through the `asr_offline` model over Triton gRPC."""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonasr.audio import SAMPLE_RATE, Audio, load_audio, resample, validate_samples
from tritonasr.client.connection import AccessDeniedError, Credentials, Retry, access_denied, resolve
from tritonasr.contract import EXIT_DENIED, EXIT_FAILED, EXIT_UNREACHABLE, LANGUAGES, MAX_CHANNELS, SAMPLE_RATES, Endpointing

# Longer recordings go in pieces: one request holds a file whole in the server's shared memory,
# which never shrinks (10 minutes: 38 MB). Below this, one request is simpler and batches better.
PIECES_ABOVE_S = 600.0


class TranscriptionError(RuntimeError):
    """The server could not transcribe a request; the message is the server's, `status` the gRPC
    status it answered with (e.g. INVALID_ARGUMENT: the request's fault; INTERNAL: the server's),
    None for a failure seen here."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


class ServerUnavailableError(TranscriptionError):
    """The server cannot be reached, or the model is not loaded on it."""


class ServerBusyError(TranscriptionError):
    """The server refused the request for lack of room now (UNAVAILABLE): retry later or on
    another server."""


def exit_code(error: Exception) -> int:
    """A client command's exit code for the error that ended it (tritonasr.contract)."""
    if isinstance(error, ServerUnavailableError):
        return EXIT_UNREACHABLE
    return EXIT_DENIED if isinstance(error, AccessDeniedError) else EXIT_FAILED


# What Triton 2.51 answers (UNAVAILABLE) when asr_offline's queue policy refuses a request.
_QUEUE_REFUSALS = {"Exceeds maximum queue size": "its queue is full",
                   "Request timeout expired": "the request waited in its queue past the queue timeout"}


def busy(model: str, message: str) -> ServerBusyError:
    """A refusal for lack of room, Triton's own queue refusals said in words."""
    why = next((why for text, why in _QUEUE_REFUSALS.items() if text in message), None)
    if why is None:  # the pipeline's own refusal says why already
        return ServerBusyError(message)
    return ServerBusyError(f"{model} is at capacity: {why} (Triton: {message}); retry later or on another server")


class ModelClient:
    """A synchronous gRPC client for one model taking tensors and answering JSON in RESULT;
    not thread-safe, use one per thread."""

    sends_admin_key = False  # the model has calls that need the admin key

    def __init__(self, url: str = "localhost:8001", model: str = "asr_offline",
                 timeout_s: float | None = None, credentials: Credentials | None = None, retry: Retry = Retry()):
        """credentials: TLS and keys (None: from the $TRITONASR_* environment variables).
        retry: how a request no server took is tried again (NO_RETRY: never); timeout_s is per try."""
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.retry = retry
        self.credentials = resolve(credentials)
        self.headers = self.credentials.headers(admin=self.sends_admin_key)
        self._client = grpcclient.InferenceServerClient(url, **self.credentials.grpc_options())

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_ready(self) -> None:
        """Raises ServerUnavailableError unless the server answers and the model is ready."""
        try:
            ready = self._client.is_model_ready(self.model, headers=self.headers, client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise ServerUnavailableError(
                f"cannot reach the Triton server at {self.url} ({e.message()})"
            ) from None
        if not ready:
            raise ServerUnavailableError(
                f"model '{self.model}' is not loaded on the Triton server at {self.url} "
                "(unknown model, or it failed to load: see the server log)"
            )

    def infer(self, inputs: list[grpcclient.InferInput]) -> dict:
        for delay in self.retry.delays():
            try:
                return self._infer_once(inputs)
            except (ServerBusyError, ServerUnavailableError):  # nothing was done: try again
                time.sleep(delay)
        return self._infer_once(inputs)

    def _infer_once(self, inputs: list[grpcclient.InferInput]) -> dict:
        try:
            response = self._client.infer(
                self.model, inputs, outputs=[grpcclient.InferRequestedOutput("RESULT")],
                headers=self.headers, client_timeout=self.timeout_s,
            )
        except InferenceServerException as e:
            # Connection and model problems are told apart from a rejected request.
            self.check_ready()
            if e.status() == "StatusCode.UNAVAILABLE":
                raise busy(self.model, e.message()) from None
            status = (e.status() or "").removeprefix("StatusCode.") or None
            raise access_denied(e.message()) or TranscriptionError(e.message(), status) from None
        return json.loads(response.as_numpy("RESULT").item())


class OfflineClient(ModelClient):
    """Whole recordings: up to `pieces_above_s` in one asr_offline request, longer ones in pieces
    through `stream_model` (client/pieces.py), with the same result."""

    def __init__(self, url: str = "localhost:8001", model: str = "asr_offline", timeout_s: float | None = None,
                 credentials: Credentials | None = None, stream_model: str = "asr_stream",
                 pieces_above_s: float = PIECES_ABOVE_S, retry: Retry = Retry()):
        super().__init__(url, model, timeout_s, credentials, retry)
        self.stream_model = stream_model
        self.pieces_above_s = pieces_above_s

    def transcribe(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE,
                   language: str = "auto", use_itn: bool = False, with_speaker: bool = True,
                   return_embedding: bool = False, engine: str = "",
                   on_progress: Callable[[int, int], None] | None = None,
                   endpointing: Endpointing | None = None, separate_channels: bool = False) -> dict:
        """Transcribes float samples in [-1, 1] at `sample_rate` (mono, or [frames, channels]);
        returns the server's result JSON. 8 kHz samples go as they are (see sent_audio).
        engine: sensevoice or parakeet; "" for the server's default.
        on_progress: for recordings sent in pieces, told (ms done, ms in all) as the server goes.
        endpointing: how speech is cut into segments (None: the server's VAD values).
        separate_channels: each channel recognised on its own (a call's agent and customer), its
            segments marked with "channel"; else their mix."""
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
        samples = np.asarray(samples)
        if samples.ndim == 2 and not separate_channels:
            samples = samples.mean(axis=1, dtype=np.float32)
        options = dict(language=language, use_itn=use_itn, engine=engine, with_speaker=with_speaker,
                       return_embedding=return_embedding, endpointing=endpointing)
        channels = samples.shape[1] if samples.ndim == 2 else 1
        if not 1 <= channels <= MAX_CHANNELS:
            raise TranscriptionError(f"at most {MAX_CHANNELS} channels can be recognised separately, got {channels}")
        if channels > 1:  # frames [n, channels], each channel recognised on its own
            if sample_rate not in SAMPLE_RATES:
                samples, sample_rate = resample(samples, sample_rate), SAMPLE_RATE
            audio, rate = np.ascontiguousarray(samples, np.float32), sample_rate
            validate_samples(audio.reshape(-1))
        else:
            audio, rate = sent_audio(samples.reshape(-1), sample_rate)
        if len(audio) > self.pieces_above_s * rate:
            from tritonasr.client.pieces import transcribe_in_pieces  # (it imports this module)

            return transcribe_in_pieces(self, audio, on_progress, sample_rate=rate, channels=channels,
                                        separate_channels=channels > 1, **options)
        return self.infer([tensor_input("AUDIO", audio.reshape(1, -1), "FP32"),  # (frames interleaved)
                           tensor_input("SAMPLE_RATE", np.array([[rate]], dtype=np.int32), "INT32"),
                           *channel_inputs(channels, channels > 1), *option_inputs(**options)])

    def transcribe_file(self, path: str | os.PathLike, language: str = "auto",
                        use_itn: bool = False, return_embedding: bool = False, engine: str = "",
                        with_speaker: bool = True, on_progress: Callable[[int, int], None] | None = None,
                        endpointing: Endpointing | None = None, separate_channels: bool = False) -> dict:
        """Loads any audio file (load_server_audio) and returns `{"file", "duration_ms", "segments"}`;
        separate_channels: see `transcribe`."""
        audio = load_server_audio(path, keep_channels=separate_channels)
        result = self.transcribe(audio.samples, audio.sample_rate, language, use_itn, with_speaker=with_speaker,
                                 return_embedding=return_embedding, engine=engine, endpointing=endpointing,
                                 on_progress=on_progress, separate_channels=separate_channels)
        return {"file": str(path), "duration_ms": audio.duration_ms,
                "segments": result["segments"]}


def server_audio(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Checked samples at the server's 16 kHz (other rates are converted here)."""
    return resample(validate_samples(samples), sample_rate)


def sent_audio(samples: np.ndarray, sample_rate: int) -> tuple[np.ndarray, int]:
    """Checked samples and their rate as a request carries them: as they are at a rate the server
    takes (contract.SAMPLE_RATES: it resamples 8 kHz itself, and half the bytes travel), else
    converted to 16 kHz here."""
    if sample_rate in SAMPLE_RATES:
        return validate_samples(samples), sample_rate
    return server_audio(samples, sample_rate), SAMPLE_RATE


def load_server_audio(path: str | os.PathLike, keep_channels: bool = False) -> Audio:
    """load_audio, except that a file at a rate the server takes (8 kHz) keeps its rate."""
    return load_audio(path, keep_rates=SAMPLE_RATES, keep_channels=keep_channels)


def option_inputs(language: str, use_itn: bool, engine: str, with_speaker: bool, return_embedding: bool,
                   endpointing: Endpointing | None) -> list[grpcclient.InferInput]:
    """The recognition options of an asr_offline request, as a stream's START carries them too."""
    return [tensor_input("LANGUAGE", np.array([[language.encode()]], dtype=np.object_), "BYTES"),
            tensor_input("USE_ITN", np.array([[use_itn]], dtype=np.bool_), "BOOL"),
            tensor_input("ENGINE", np.array([[engine.encode()]], dtype=np.object_), "BYTES"),
            tensor_input("WITH_SPEAKER", np.array([[with_speaker]], dtype=np.bool_), "BOOL"),
            tensor_input("RETURN_EMBEDDING", np.array([[return_embedding]], dtype=np.bool_), "BOOL"),
            *endpointing_inputs(endpointing)]


def channel_inputs(channels: int, separate: bool) -> list[grpcclient.InferInput]:
    """CHANNEL_COUNT and CHANNELS, as asr_offline and asr_stream's START take them; each left out
    at its default (1, mix), so that mono requests work with servers before them."""
    inputs = []
    if channels != 1:
        inputs.append(tensor_input("CHANNEL_COUNT", np.array([[channels]], dtype=np.int32), "INT32"))
    if separate:
        inputs.append(tensor_input("CHANNELS", np.array([[b"separate"]], dtype=np.object_), "BYTES"))
    return inputs


def endpointing_inputs(endpointing: Endpointing | None) -> list[grpcclient.InferInput]:
    values = (endpointing or Endpointing()).inputs()
    return [tensor_input(name, np.array([[value]], dtype=np.int32), "INT32") for name, value in values.items()]


def tensor_input(name: str, data: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor
