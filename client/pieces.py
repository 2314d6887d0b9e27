"""Long recordings sent in pieces: through `asr_stream`, as fast as the server takes them.

A request to asr_offline arrives whole in the Python backend's shared memory, whose regions grow to
the largest request an instance has held and never shrink: one 2-hour request grows a region by
460 MB, once per asr_offline instance. Sent as a stream, a recording of any length occupies the
server only by the chunks in flight and the audio of the segment being spoken, and the stream's
final segments are asr_offline's for the same audio (tests/test_e2e_offline.py compares them).

Flow control: each chunk is sent with Triton's empty final response enabled, so the server answers
every chunk once it is taken in and the segments it ended are sent; the client keeps at most
WINDOW_CHUNKS unanswered.
"""
from __future__ import annotations

import json
import queue
from typing import TYPE_CHECKING, Callable

import numpy as np

from tritonasr.audio import SAMPLE_RATE
from tritonasr.client.connection import access_denied
from tritonasr.client.offline import TranscriptionError, busy
from tritonasr.client.stream import StreamError, new_stream_identity, split_chunks, stream_request
from tritonasr.contract import MAX_CHUNK_MS
from tritonasr.errors import split_status

if TYPE_CHECKING:
    from tritonasr.client.offline import OfflineClient

# Chunks in flight: 8 x 2 s is what one upload holds in the server at most (1 MB of audio), and
# enough to keep the server busy while answers travel back.
WINDOW_CHUNKS = 8
# After the server refused a chunk, how long its answers to the others in flight may take.
DRAIN_S = 10.0
# What a stream's final adds to a segment of asr_offline's result.
STREAM_ONLY_KEYS = ("final", "segment_index", "endpoint_ms")
# Told, after each answered chunk, of (ms of audio the server has done, ms in the recording).
OnProgress = Callable[[int, int], None]


def transcribe_in_pieces(client: OfflineClient, audio: np.ndarray, on_progress: OnProgress | None = None,
                         sample_rate: int = SAMPLE_RATE, **options) -> dict:
    """asr_offline's result (`{"duration_ms", "segments"}`) for float32 `audio` at `sample_rate`
    (contract.SAMPLE_RATES; samples, or frames [n, channels]), sent to the client's stream model in
    chunks; `options` are stream_request's (language, engine, endpointing, channels, ...)."""
    answers: queue.Queue = queue.Queue()
    sequence_id, token = new_stream_identity()
    chunks = split_chunks(audio, MAX_CHUNK_MS, sample_rate=sample_rate) + [np.zeros(0, np.float32)]  # the last: END
    upload = _Upload(client, answers, len(audio) * 1000 // sample_rate, on_progress)
    client._client.start_stream(callback=lambda result, error: answers.put((result, error)),
                                headers=client.headers)
    drained = False
    try:
        for index, chunk in enumerate(chunks):
            while upload.sent - upload.answered >= WINDOW_CHUNKS:
                upload.take_answer()
            request = stream_request(client.stream_model, sequence_id, chunk, start=index == 0,
                                     end=index == len(chunks) - 1, sample_rate=sample_rate, token=token, **options)
            client._client.async_stream_infer(enable_empty_final_response=True, **request)
            upload.sent += 1
        while upload.answered < upload.sent:
            upload.take_answer()
        drained = True
    except _ServerRefused as refused:
        # The server has closed the stream: the chunks still in flight are answered at once.
        drained = upload.drain(DRAIN_S)
        raise refused.error from None
    finally:
        # Cancelling a stream the server is still finishing can crash Triton 2.51
        # (triton-inference-server/server#7368): cancel only a stream that did not end.
        client._client.stop_stream(cancel_requests=not drained)
    result = upload.result()
    if options.get("separate_channels"):  # in asr_offline's order: by start, then channel
        result["segments"].sort(key=lambda segment: (segment["start_ms"], segment["channel"]))
    return result


class _ServerRefused(Exception):
    def __init__(self, error: Exception):
        self.error = error


class _Upload:
    """The answers of one upload: finals kept, chunks counted, the first error raised."""

    def __init__(self, client: OfflineClient, answers: queue.Queue, total_ms: int, on_progress: OnProgress | None):
        self.client = client
        self.answers = answers
        self.total_ms = total_ms
        self.on_progress = on_progress
        self.sent = self.answered = 0
        self.segments: list[dict] = []
        self.summary: dict | None = None

    def take_answer(self, timeout_s: float | None = None) -> None:
        timeout_s = timeout_s or self.client.timeout_s
        try:
            result, error = self.answers.get(timeout=timeout_s)
        except queue.Empty:
            raise TranscriptionError(f"no answer from the server in {timeout_s:g} s") from None
        if error is not None:
            raise _ServerRefused(self._error(error))
        response = result.get_response()
        if "triton_final_response" in response.parameters and response.parameters["triton_final_response"].bool_param:
            self.answered += 1
            if self.on_progress:
                self.on_progress(min(self.total_ms, self.answered * MAX_CHUNK_MS), self.total_ms)
        data = result.as_numpy("RESULT")
        if data is None:
            return
        payload = json.loads(data.reshape(-1)[0])
        if payload.get("complete"):
            self.summary = payload
        elif payload.get("final"):
            self.segments.append({key: value for key, value in payload.items() if key not in STREAM_ONLY_KEYS})

    def drain(self, timeout_s: float) -> bool:
        """Takes the answers still due, errors included; True once every chunk was answered."""
        while self.answered < self.sent:
            try:
                self.take_answer(timeout_s)
            except _ServerRefused:
                continue
            except TranscriptionError:
                return False
        return True

    def _error(self, error) -> Exception:
        message, code = split_status(error.message())
        if code is None:  # not the pipeline's: the connection, or the model
            self.client.check_ready()
        if code == "UNAVAILABLE" or error.status() == "StatusCode.UNAVAILABLE":
            return busy(self.client.stream_model, message)
        return access_denied(message) or StreamError(message, code)

    def result(self) -> dict:
        if self.summary is None or self.summary["segment_count"] != len(self.segments):
            raise TranscriptionError(f"the server ended the stream without all its segments "
                                     f"({len(self.segments)} received, summary: {self.summary})")
        return {"duration_ms": self.summary["duration_ms"], "segments": self.segments}
