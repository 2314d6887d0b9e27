"""One live stream through `asr_stream` with tritonclient's synchronous gRPC client, for Locust.

Locust runs its users as gevent greenlets. tritonclient's asyncio client cannot run there
(gRPC's asyncio layer and gevent's patched threads do not mix), while the synchronous client
works once `grpc.experimental.gevent.init_gevent()` has run: its blocking calls then yield to the
other greenlets. This module drives one stream that way, with the same requests, pacing and
response parsing as the asyncio `StreamingClient` (`stream_request`, `parse_response`,
`ChunkClock`), so both time segments identically.
"""
from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient

from tritonasr.audio import SAMPLE_RATE
from tritonasr.client.stream import (
    ChunkClock,
    StreamError,
    StreamSegment,
    StreamSummary,
    new_stream_identity,
    parse_response,
    split_chunks,
    stream_request,
)


@dataclass(frozen=True)
class StreamResult:
    """What one stream gave: its finals, the summary, and when the first response came."""

    finals: list[StreamSegment]
    summary: StreamSummary
    first_response_ms: float | None  # first response of any kind, after the first chunk left


def run_stream(client: grpcclient.InferenceServerClient, samples: np.ndarray, *, chunk_ms: int = 100,
               realtime: bool = True, on_segment: Callable[[StreamSegment], None] | None = None,
               finish_timeout_s: float = 120.0, model: str = "asr_stream", headers: dict | None = None,
               **options) -> StreamResult:
    """Streams `samples` (16 kHz float32) through `model` on `client` (one stream at a time per
    client), calling `on_segment` for each final as it arrives. `options` are those of
    `stream_request` (language, use_itn, partial_interval_ms, engine, with_speaker, endpointing, ...);
    `headers`: the caller's keys (`Credentials.headers()`).
    Raises StreamError when the server refuses or aborts the stream, or stays silent for
    `finish_timeout_s` after the last chunk."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error, time.monotonic())),
                        headers=headers)
    sequence_id, token = new_stream_identity()
    clock = ChunkClock(time.monotonic())
    finals: list[StreamSegment] = []
    first_response: list[float] = []
    summary: StreamSummary | None = None

    def take(wait_s: float) -> None:
        """Handles the responses that have arrived, first waiting up to `wait_s` for one.
        Arrival times come from the callback, so handling them later does not skew them."""
        nonlocal summary, refused
        while summary is None:
            try:
                result, error, received_at = responses.get(timeout=wait_s) if wait_s > 0 else responses.get_nowait()
            except queue.Empty:
                return
            wait_s = 0
            if not first_response:
                first_response.append(received_at)
            if error is not None:
                refused = True
                raise StreamError(error.message())
            item = parse_response(result, clock, received_at)
            if isinstance(item, StreamSummary):
                summary = item
            elif isinstance(item, StreamSegment) and item.final:
                finals.append(item)
                if on_segment is not None:
                    on_segment(item)

    chunks = split_chunks(samples, chunk_ms)
    refused = False
    try:
        for i, chunk in enumerate(chunks):
            take(0)
            if realtime:
                # A chunk covering audio [a, b) leaves at start + b, as if recorded live.
                time.sleep(max(0.0, clock.start + (clock.samples + chunk.size) / SAMPLE_RATE - time.monotonic()))
            clock.record(chunk.size, time.monotonic())
            client.async_stream_infer(**stream_request(model, sequence_id, chunk, i == 0, False, token=token,
                                                       **options))
        # The END flag travels on an empty chunk after the last one.
        clock.record(0, time.monotonic())
        client.async_stream_infer(**stream_request(model, sequence_id, np.zeros(0, np.float32),
                                                   not chunks, True, token=token, **options))
        deadline = time.monotonic() + finish_timeout_s
        while summary is None:
            if time.monotonic() >= deadline:
                raise StreamError(f"no end-of-stream response {finish_timeout_s:g} s after the end of the audio")
            take(deadline - time.monotonic())
    finally:
        # After the summary, or the server's refusal, the server closes the call once it has
        # answered what was sent: waiting for that (no cancel) avoids Triton 2.51's crash on
        # streams cancelled while it finishes them (server#7368). A stream stopped by the load
        # generator (its users stopping) or a silent server's is cancelled.
        client.stop_stream(cancel_requests=summary is None and not refused)
    # From the first chunk's send, as the documented field says and the WebSocket clients time it
    # (not from the stream's start, which would add the first chunk's real-time wait).
    first_sent = clock.sent_at(0)
    first_ms = (first_response[0] - first_sent) * 1000 if first_response and first_sent is not None else None
    return StreamResult(finals, summary, first_ms)
