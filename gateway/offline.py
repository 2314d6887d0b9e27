"""Whole recordings to asr_offline: decoded and sent by the client library (the same code as
`tritonasr transcribe`, so the results are the same) in worker threads, at most
`max_inflight` at once. A request that finds no free turn within `queue_timeout_s` is refused
with 503 and Retry-After: never a request that hangs."""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

import anyio
import anyio.to_thread

from tritonasr.audio import Audio, load_audio
from tritonasr.client.connection import Retry
from tritonasr.client.offline import OfflineClient
from tritonasr.contract import SAMPLE_RATES
from tritonasr.gateway.errors import busy
from tritonasr.gateway.settings import GatewaySettings

# A request no server took is tried again briefly here; beyond that the caller is told to come
# back (Retry-After), rather than held.
GATEWAY_RETRY = Retry(attempts=3, first_s=0.25, max_s=1.0)


class OfflineRunner:
    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self._turns = anyio.Semaphore(settings.max_inflight)
        self._threads = anyio.CapacityLimiter(settings.max_inflight)
        # Idle clients (each its own gRPC channel, not thread-safe) by the caller's API key.
        self._idle: dict[str | None, list[OfflineClient]] = {}
        self._lock = threading.Lock()
        self._waiting = 0  # (the gateway's metrics read it)

    @property
    def waiting(self) -> int:
        """Transcriptions (requests and job files) waiting for a turn now."""
        return self._waiting

    @property
    def working(self) -> int:
        """Transcriptions holding a turn now: being decoded, or at Triton."""
        return self.settings.max_inflight - self._turns.value

    async def transcribe(self, upload: BinaryIO, filename: str, api_key: str | None, *,
                         separate_channels: bool = False, queue_timeout_s: float | None = None,
                         on_audio: Callable[[Audio], None] | None = None, timings: dict[str, float] | None = None,
                         **options) -> tuple[Audio, dict]:
        """The decoded audio (for its duration) and asr_offline's result. queue_timeout_s: how long to
        wait for a turn (None: the settings'; math.inf: until one is free, as job workers wait);
        on_audio: told the decoded audio before it is sent (jobs show its length); timings: given
        the ms spent waiting for a turn ("queue"), decoding ("decode") and in Triton ("triton")."""
        began = time.perf_counter()
        self._waiting += 1
        try:
            with anyio.fail_after(self.settings.queue_timeout_s if queue_timeout_s is None else queue_timeout_s):
                await self._turns.acquire()
        except TimeoutError:
            raise busy(f"the gateway is working on {self.settings.max_inflight} requests already; "
                       "retry later", self.settings.retry_after_s) from None
        finally:
            self._waiting -= 1
        timings = {} if timings is None else timings
        timings["queue"] = _ms_since(began)
        try:
            return await anyio.to_thread.run_sync(
                lambda: self._work(upload, filename, api_key, separate_channels, options, on_audio, timings),
                limiter=self._threads)
        finally:
            self._turns.release()

    def _work(self, upload: BinaryIO, filename: str, api_key: str | None, separate_channels: bool,
              options: dict, on_audio: Callable[[Audio], None] | None, timings: dict[str, float]) -> tuple[Audio, dict]:
        began = time.perf_counter()
        audio = load_audio(upload, name=filename, keep_rates=SAMPLE_RATES, keep_channels=separate_channels,
                           max_seconds=self.settings.max_audio_seconds)
        timings["decode"] = _ms_since(began)
        if on_audio:
            on_audio(audio)
        began = time.perf_counter()
        result = self._with_client(api_key, lambda client: client.transcribe(
            audio.samples, audio.sample_rate, separate_channels=separate_channels, **options))
        timings["triton"] = _ms_since(began)
        return audio, result

    def _with_client(self, api_key: str | None, call: Callable[[OfflineClient], dict]) -> dict:
        with self._lock:
            idle = self._idle.setdefault(api_key, [])
            client = idle.pop() if idle else None
        if client is None:
            client = OfflineClient(self.settings.triton_url, timeout_s=self.settings.request_timeout_s,
                                   credentials=dataclasses.replace(self.settings.triton_tls, api_key=api_key),
                                   retry=GATEWAY_RETRY)
        try:
            return call(client)
        finally:
            with self._lock:
                self._idle[api_key].append(client)

    def close(self) -> None:
        with self._lock:
            clients = [client for idle in self._idle.values() for client in idle]
            self._idle.clear()
        for client in clients:
            client.close()


def _ms_since(began: float) -> float:
    return (time.perf_counter() - began) * 1000
