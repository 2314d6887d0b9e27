"""Client of the per-session baseline's `/stream` endpoint (loadtest/per_session.py), for Locust.

One stream per connection: binary float32 LE 16 kHz mono chunks, paced in real time, then the
text "Done"; the server answers with {"final": true, ...} per segment as the VAD closes it, then
{"complete": true, "duration_ms", "segment_count"}, and closes.

Synchronous on purpose (websockets' sync client, threads, time.sleep): it runs unchanged in
threads and in Locust's gevent workers, once gevent has monkey-patched sockets, threads and
time.sleep, which then yield to the other greenlets. Segments are timed as the gRPC clients time
them (tritonasr.client.stream.ChunkClock): a second thread (a greenlet under gevent) takes each
message as it arrives and stamps it, and the sending loop handles the stamped messages between
chunks, so `on_segment` runs in the caller's thread.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from tritonasr.audio import SAMPLE_RATE, validate_samples
from tritonasr.client.stream import ChunkClock, StreamError, StreamSegment, split_chunks


class WebsocketStreamError(StreamError):
    """The server refused or dropped the stream, or did not finish it in time; the message says which."""


def stream(url: str, samples: np.ndarray, chunk_ms: float = 100, realtime: bool = True,
           on_segment: Callable[[StreamSegment], None] | None = None, timeout_s: float = 120.0,
           open_timeout_s: float = 10.0) -> dict:
    """Streams `samples` (16 kHz mono float) to `url` (ws://host:port/stream) in chunks of `chunk_ms`
    and calls `on_segment` with a StreamSegment per final as it arrives: `latency_ms` from the
    chunk holding its end_ms being sent to its arrival, `after_endpoint_ms` the same for
    endpoint_ms. realtime: a chunk covering audio [a, b) leaves at start + b, as if recorded live.

    Returns the summary: "duration_ms", "segment_count" (the server's), "received_ms" (the
    summary's arrival, since the start), "first_response_ms" (the first message of any kind
    arrived -> after the first chunk was sent; None when no chunk was sent), "finals" (the
    StreamSegments, in order) and "chunks" (how many were sent).
    Raises WebsocketStreamError when the server sends an error, closes early, cannot be reached
    or sends no summary within `timeout_s` after the last chunk.
    """
    from websockets.exceptions import InvalidHandshake, InvalidURI
    from websockets.sync.client import connect

    samples = validate_samples(np.asarray(samples), allow_empty=True)
    chunks = split_chunks(samples, chunk_ms)
    try:
        with connect(url, open_timeout=open_timeout_s, close_timeout=5, compression=None, max_size=None) as conn:
            state = _run(conn, url, chunks, realtime, on_segment, timeout_s)
    except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
        raise WebsocketStreamError(f"cannot talk to {url}: {type(exc).__name__}: {exc}") from None
    clock = state.clock
    summary = dict(state.summary)
    first = clock.sent_at(0)
    summary["first_response_ms"] = None if state.first_at is None or first is None else (state.first_at - first) * 1000
    summary["finals"] = state.finals
    summary["chunks"] = clock.chunks
    return summary


def _run(conn, url: str, chunks: list[np.ndarray], realtime: bool, on_segment, timeout_s: float) -> _Stream:
    from websockets.exceptions import ConnectionClosed

    events: queue.Queue = queue.Queue()

    def receive() -> None:
        while True:
            try:
                message = conn.recv()
            except Exception as exc:  # noqa: BLE001 - ConnectionClosed and the rest: handed to the caller
                events.put((exc, time.monotonic()))
                return
            events.put((message, time.monotonic()))

    state = _Stream(url, on_segment)
    receiver = threading.Thread(target=receive, name="ws-stream-receive", daemon=True)
    receiver.start()
    state.clock = clock = ChunkClock(time.monotonic())
    try:
        try:
            for chunk in chunks:
                state.take(events, 0)
                if realtime:
                    time.sleep(max(0.0, clock.start + (clock.samples + chunk.size) / SAMPLE_RATE - time.monotonic()))
                clock.record(chunk.size, time.monotonic())
                conn.send(np.ascontiguousarray(chunk, dtype="<f4").tobytes())
            conn.send("Done")
        except ConnectionClosed:
            # Closed while we were sending: the reason (an error message, a close frame) is in
            # the receiver's queue.
            state.take(events, 5.0, until_closed=True)
            raise WebsocketStreamError(f"{url} closed the stream after {clock.samples / SAMPLE_RATE:.1f} s "
                                       f"of audio was sent") from None
        deadline = time.monotonic() + timeout_s
        while state.summary is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WebsocketStreamError(f"{url} sent no end-of-stream summary within {timeout_s:g} s "
                                           f"after the last chunk ({len(state.finals)} segment(s) so far)")
            state.take(events, remaining)
    finally:
        conn.close()
        receiver.join(timeout=5)
    return state


class _Stream:
    """What one stream has received so far, and how to handle the next messages."""

    def __init__(self, url: str, on_segment):
        self.url = url
        self.on_segment = on_segment
        self.clock: ChunkClock | None = None
        self.finals: list[StreamSegment] = []
        self.summary: dict | None = None
        self.first_at: float | None = None

    def take(self, events: queue.Queue, wait_s: float, until_closed: bool = False) -> None:
        """Handles the messages that have arrived, first waiting up to `wait_s` for one; raises
        WebsocketStreamError on an error message or a close before the summary."""
        from websockets.exceptions import ConnectionClosed

        while self.summary is None:
            try:
                item, received_at = events.get(timeout=wait_s) if wait_s > 0 else events.get_nowait()
            except queue.Empty:
                return
            if not until_closed:
                wait_s = 0
            if isinstance(item, ConnectionClosed):
                close = item.rcvd or item.sent
                how = "without a close frame" if close is None else \
                    f"with code {close.code}" + (f" ({close.reason})" if close.reason else "")
                raise WebsocketStreamError(f"{self.url} closed the stream {how} before its end")
            if isinstance(item, BaseException):
                raise WebsocketStreamError(f"{self.url}: {type(item).__name__}: {item}")
            if self.first_at is None:
                self.first_at = received_at
            self.handle(item, received_at)

    def handle(self, message: str | bytes, received_at: float) -> None:
        try:
            payload = json.loads(message)
        except (TypeError, ValueError):
            raise WebsocketStreamError(f"{self.url} sent a message that is not JSON: {message[:200]!r}") from None
        if not isinstance(payload, dict):
            raise WebsocketStreamError(f"{self.url} sent JSON that is not an object: {message[:200]!r}")
        if "error" in payload:
            raise WebsocketStreamError(f"{self.url} refused the stream: {payload['error']}")
        clock = self.clock
        try:
            if payload.get("complete"):
                self.summary = {"duration_ms": int(payload["duration_ms"]),
                                "segment_count": int(payload["segment_count"]),
                                "received_ms": (received_at - clock.start) * 1000}
                return
            end_ms, endpoint_ms = int(payload["end_ms"]), int(payload["endpoint_ms"])
            segment = StreamSegment(
                start_ms=int(payload["start_ms"]), end_ms=end_ms, text=payload["text"],
                language=payload.get("language"), emotion=payload.get("emotion"), event=payload.get("event"),
                final=bool(payload["final"]), segment_index=int(payload["segment_index"]), endpoint_ms=endpoint_ms,
                latency_ms=clock.delay_ms(end_ms, received_at),
                after_endpoint_ms=clock.delay_ms(endpoint_ms, received_at),
                received_ms=(received_at - clock.start) * 1000)
        except (KeyError, TypeError, ValueError) as exc:
            raise WebsocketStreamError(f"{self.url} sent an unexpected message ({exc!r}): {message[:200]!r}") from None
        if segment.final:
            self.finals.append(segment)
            if self.on_segment is not None:
                self.on_segment(segment)
