"""Client of the per-session baseline's `/stream` endpoint (loadtest/per_session.py), for Locust;
and `PacedStream`, what every WebSocket stream client of the load tests shares (ws_gateway.py
speaks the gateway's `/v1/stream` with it).

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
    samples = validate_samples(np.asarray(samples), allow_empty=True)
    frames = [(chunk.size, np.ascontiguousarray(chunk, dtype="<f4").tobytes())
              for chunk in split_chunks(samples, chunk_ms)]
    return _PerSessionStream(url, on_segment).run(frames, realtime=realtime, timeout_s=timeout_s,
                                                  open_timeout_s=open_timeout_s)


class PacedStream:
    """One stream over one WebSocket: connected, opened (`begin`), its audio frames sent paced and
    timed on a ChunkClock while a receiver thread stamps each message as it arrives, closed
    (`end`), then waited on until the protocol's summary. A subclass speaks one protocol: how a
    stream begins and ends, and what each message means (`handle`, which calls `add_final` and
    `complete`)."""

    def __init__(self, url: str, on_segment: Callable[[StreamSegment], None] | None = None):
        self.url = url
        self.on_segment = on_segment
        self.clock: ChunkClock | None = None
        self.finals: list[StreamSegment] = []
        self.summary: dict | None = None
        self.first_at: float | None = None

    # -- the protocol ------------------------------------------------------------------------

    def begin(self, conn, timeout_s: float) -> None:
        """What comes before the audio (the clock starts after it); nothing by default."""

    def end(self, conn) -> None:
        """Says that no more audio follows."""
        raise NotImplementedError

    def handle(self, message: str | bytes, received_at: float) -> None:
        """One message of the server's, arrived at `received_at`; raises WebsocketStreamError on a
        refusal or a message that makes no sense."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------

    def run(self, frames: list[tuple[int, bytes]], *, realtime: bool = True, timeout_s: float = 120.0,
            open_timeout_s: float = 10.0, headers: dict[str, str] | None = None) -> dict:
        """Sends `frames` ((samples at 16 kHz, the bytes that carry them), in order) and returns
        the summary (see `stream`)."""
        from websockets.exceptions import InvalidHandshake, InvalidURI
        from websockets.sync.client import connect

        try:
            with connect(self.url, additional_headers=headers, open_timeout=open_timeout_s, close_timeout=5,
                         compression=None, max_size=None) as conn:
                self._run(conn, frames, realtime, timeout_s, open_timeout_s)
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise WebsocketStreamError(f"cannot talk to {self.url}: {type(exc).__name__}: {exc}") from None
        clock = self.clock
        summary = dict(self.summary)
        first = clock.sent_at(0)
        summary["first_response_ms"] = (None if self.first_at is None or first is None
                                        else (self.first_at - first) * 1000)
        summary["finals"] = self.finals
        summary["chunks"] = clock.chunks
        return summary

    def _run(self, conn, frames: list[tuple[int, bytes]], realtime: bool, timeout_s: float,
             open_timeout_s: float) -> None:
        from websockets.exceptions import ConnectionClosed

        self.begin(conn, open_timeout_s)
        events: queue.Queue = queue.Queue()

        def receive() -> None:
            while True:
                try:
                    message = conn.recv()
                except Exception as exc:  # noqa: BLE001 - ConnectionClosed and the rest: handed to the caller
                    events.put((exc, time.monotonic()))
                    return
                events.put((message, time.monotonic()))

        receiver = threading.Thread(target=receive, name="ws-stream-receive", daemon=True)
        receiver.start()
        self.clock = clock = ChunkClock(time.monotonic())
        try:
            try:
                for samples, data in frames:
                    self.take(events, 0)
                    if realtime:
                        # A chunk covering audio [a, b) leaves at start + b, as if recorded live.
                        time.sleep(max(0.0, clock.start + (clock.samples + samples) / SAMPLE_RATE - time.monotonic()))
                    clock.record(samples, time.monotonic())
                    conn.send(data)
                self.end(conn)
            except ConnectionClosed:
                # Closed while we were sending: the reason (an error message, a close frame) is in
                # the receiver's queue.
                self.take(events, 5.0, until_closed=True)
                raise WebsocketStreamError(f"{self.url} closed the stream after {clock.samples / SAMPLE_RATE:.1f} s "
                                           f"of audio was sent") from None
            deadline = time.monotonic() + timeout_s
            while self.summary is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WebsocketStreamError(f"{self.url} sent no end-of-stream summary within {timeout_s:g} s "
                                               f"after the last chunk ({len(self.finals)} segment(s) so far)")
                self.take(events, remaining)
        finally:
            conn.close()
            receiver.join(timeout=5)

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
                raise WebsocketStreamError(f"{self.url} closed the stream {closed_how(item)} before its end")
            if isinstance(item, BaseException):
                raise WebsocketStreamError(f"{self.url}: {type(item).__name__}: {item}")
            if self.first_at is None:
                self.first_at = received_at
            self.handle(item, received_at)

    def parsed(self, message: str | bytes) -> dict:
        """A message as the JSON object it must be."""
        try:
            payload = json.loads(message)
        except (TypeError, ValueError):
            raise WebsocketStreamError(f"{self.url} sent a message that is not JSON: {message[:200]!r}") from None
        if not isinstance(payload, dict):
            raise WebsocketStreamError(f"{self.url} sent JSON that is not an object: {message[:200]!r}")
        return payload

    def unexpected(self, message: str | bytes, why: str) -> WebsocketStreamError:
        return WebsocketStreamError(f"{self.url} sent an unexpected message ({why}): {message[:200]!r}")

    def timed_segment(self, payload: dict, index: int, final: bool, received_at: float) -> StreamSegment:
        """A segment message's StreamSegment, timed on the clock (raises KeyError, TypeError or
        ValueError on a message without the fields)."""
        clock = self.clock
        end_ms, endpoint_ms = int(payload["end_ms"]), int(payload["endpoint_ms"])
        return StreamSegment(
            start_ms=int(payload["start_ms"]), end_ms=end_ms, text=payload["text"],
            language=payload.get("language"), emotion=payload.get("emotion"), event=payload.get("event"),
            final=final, segment_index=index, endpoint_ms=endpoint_ms,
            latency_ms=clock.delay_ms(end_ms, received_at),
            after_endpoint_ms=clock.delay_ms(endpoint_ms, received_at),
            received_ms=(received_at - clock.start) * 1000, speaker=payload.get("speaker"))

    def add_final(self, segment: StreamSegment) -> None:
        self.finals.append(segment)
        if self.on_segment is not None:
            self.on_segment(segment)

    def complete(self, duration_ms: int, segment_count: int, received_at: float, **more) -> None:
        self.summary = {"duration_ms": duration_ms, "segment_count": segment_count,
                        "received_ms": (received_at - self.clock.start) * 1000, **more}


def closed_how(closed) -> str:
    """How a connection closed (a websockets ConnectionClosed), in words."""
    close = closed.rcvd or closed.sent
    if close is None:
        return "without a close frame"
    return f"with code {close.code}" + (f" ({close.reason})" if close.reason else "")


class _PerSessionStream(PacedStream):
    """The per-session baseline's protocol: "Done" ends the audio; finals and a "complete"
    summary, errors as {"error": ...}."""

    def end(self, conn) -> None:
        conn.send("Done")

    def handle(self, message: str | bytes, received_at: float) -> None:
        payload = self.parsed(message)
        if "error" in payload:
            raise WebsocketStreamError(f"{self.url} refused the stream: {payload['error']}")
        try:
            if payload.get("complete"):
                self.complete(int(payload["duration_ms"]), int(payload["segment_count"]), received_at)
                return
            segment = self.timed_segment(payload, int(payload["segment_index"]), bool(payload["final"]), received_at)
        except (KeyError, TypeError, ValueError) as exc:
            raise self.unexpected(message, repr(exc)) from None
        if segment.final:
            self.add_final(segment)
