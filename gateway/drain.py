"""Draining: what the gateway does on SIGTERM (a pod being replaced, `docker stop`, Ctrl-C) so that
a caller loses nothing it was already promised.

At the signal `GET /readyz` answers 503 "draining" (the balancer stops sending), new work is
refused with code `draining` (a transcription or a job: 503 with Retry-After; a WebSocket: close
1013 "try again later"), and the job workers take no new file. What is open runs to its end:
streams, requests in flight, job files being transcribed. Once nothing is, or after
`drain_seconds`, uvicorn stops as it always does (a socket still open then is closed with 1012).
A second signal stops at once. `/healthz` (liveness) stays 200 throughout: a draining process is
not a dead one.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

log = logging.getLogger("tritonasr.gateway")


class Drain:
    """The process's drain: whether it has begun, and what is still open."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.began: float | None = None
        self.open = 0  # HTTP requests and WebSockets being served (not the probes)
        # Coroutines run once the drain begins; it lasts until they have returned, too.
        self.on_begin: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task] | None = None  # the on_begin work, once started

    @property
    def draining(self) -> bool:
        return self.began is not None

    def begin(self) -> None:
        """Called from the signal handler: only notes the time (the event loop does the rest)."""
        if self.began is None:
            self.began = time.monotonic()

    def finished(self) -> bool:
        """Starts the on_begin work on the first call after `begin`; True once nothing is open and
        that work is done, or the time is up."""
        if self._tasks is None:
            self._tasks = [asyncio.ensure_future(work()) for work in self.on_begin]
            log.info("draining: %d open, up to %g s", self.open, self.seconds)
        if self.open == 0 and all(task.done() for task in self._tasks):
            log.info("drained in %.1f s", time.monotonic() - self.began)
            return True
        if time.monotonic() - self.began >= self.seconds:
            log.warning("drain time (%g s) is up with %d open: closing them", self.seconds, self.open)
            return True
        return False


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM or SIGINT drains (`drain.seconds` > 0) instead of
    stopping; it stops once `drain.finished()`, and at once on a second signal."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.seconds > 0 and not self.drain.draining:
            # (Not one of uvicorn's captured signals: it would raise it again once stopped, and a
            # drained gateway exits 0.)
            log.info("%s: draining (again to stop at once)", signal.Signals(sig).name)
            self.drain.begin()
            return
        if self.drain.draining:
            self.force_exit = True  # what is still open is cut, not waited for
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        return self.drain.draining and self.drain.finished()
