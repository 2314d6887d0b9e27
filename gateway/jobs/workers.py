"""The workers of one gateway process: `job_workers` asyncio tasks, each claiming one file at a
time from the shared database and transcribing it through the gateway's OfflineRunner (the same
decoding, client and bound on requests in flight as POST /v1/audio/transcriptions), with the key
of the caller who made the job.

While a file is worked on, its lease is renewed every third of `job_lease_s`; a process that dies
stops renewing, and after the lease any worker of any replica takes the file over. Passing failures
(Triton unreachable, at capacity, too slow) go back to the queue with a growing wait, up to
`job_attempts` tries; a file that cannot be transcribed (not audio, refused by Triton) fails at once.

On shutdown (SIGTERM) workers take no new file and finish the ones they hold, as in-flight HTTP
requests are answered; files still queued wait for the next process.

Beside the workers (even with none), a sweeper deletes the jobs finished longer ago than
`job_retention_days`, at start and then every SWEEP_EVERY_S.
"""
from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable

import anyio.to_thread

from tritonasr.audio import Audio
from tritonasr.client.connection import AccessDeniedError
from tritonasr.client.offline import ServerBusyError, ServerUnavailableError, TranscriptionError
from tritonasr.errors import AudioError
from tritonasr.gateway.errors import ApiError
from tritonasr.gateway.jobs.paths import JobsRoot
from tritonasr.gateway.jobs.store import Claim, JobStore
from tritonasr.gateway.offline import OfflineRunner
from tritonasr.gateway.settings import GatewaySettings

log = logging.getLogger("tritonasr.gateway.jobs")

# An idle worker looks for work this often (at once when this process makes a job).
POLL_S = 1.0
# A retry of a passing failure waits this long, doubling up to RETRY_MAX_S.
RETRY_FIRST_S, RETRY_MAX_S = 2.0, 60.0
# Progress of a long recording is written at most this often.
PROGRESS_EVERY_S = 1.0
# gRPC statuses that say "not now" rather than "never" (the client library's busy and unreachable
# errors are their own classes).
PASSING_STATUSES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
# Expired jobs are looked for this often: retention is counted in days, so an hour late is on time,
# and a sweep with nothing to delete reads an index. Every replica sweeps: each job is deleted once.
SWEEP_EVERY_S = 3600.0
DAY_S = 86400.0


class JobWorkers:
    def __init__(self, store: JobStore, runner: OfflineRunner, settings: GatewaySettings,
                 keys_by_hash: dict[str, str], root: JobsRoot | None,
                 on_file: Callable[[str], None] | None = None):
        self.store = store
        self.runner = runner
        self.settings = settings
        self.keys_by_hash = keys_by_hash  # the gateway's own keys, by key_fingerprint
        self.root = root
        # Told what became of each file a worker held: "done", "failed", "retried" (queued again
        # after a passing failure) or "discarded" (the claim was lost); the gateway's metrics count them.
        self.on_file = on_file or (lambda result: None)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._work_waiting = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()  # (wakes the sweeper)
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(n), name=f"job-worker-{n}")
                       for n in range(self.settings.job_workers)]
        if self.settings.job_retention_days:
            self._tasks.append(asyncio.create_task(self._sweep(), name="job-sweeper"))

    def wake(self) -> None:
        """New work is queued: idle workers look at once."""
        self._work_waiting.set()

    async def stop(self) -> None:
        """Claims no more; returns once the files held are finished (and a sweep under way)."""
        self._stopping = True
        self._work_waiting.set()
        self._stopped.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _sweep(self) -> None:
        # Not cancelled on stop but told to end: a task's cancel does not stop its thread, which would
        # go on using the store while it is closed. (A process killed mid-sweep loses nothing: each
        # batch of deletes is a transaction.)
        older_than_s = self.settings.job_retention_days * DAY_S
        while not self._stopping:
            try:
                deleted = await anyio.to_thread.run_sync(self.store.expire, older_than_s)
            except Exception as exc:  # noqa: BLE001 - the database is away: next time
                log.warning("expired jobs not deleted, tried again in %.0f s: %s", SWEEP_EVERY_S, exc)
            else:
                if deleted:
                    log.info("%d job%s deleted: finished more than %g days ago", deleted, "s" if deleted > 1 else "",
                             self.settings.job_retention_days)
            try:
                await asyncio.wait_for(self._stopped.wait(), SWEEP_EVERY_S)
            except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11)
                pass

    async def _run(self, number: int) -> None:
        worker, failures = f"{self.name}/{number}", 0
        while not self._stopping:
            try:
                claim = await anyio.to_thread.run_sync(self.store.claim, worker, self.settings.job_lease_s,
                                                       self.settings.job_attempts)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the database is away: try again, less often
                failures += 1
                log.warning("%s cannot claim work from the jobs database: %s", worker, exc)
                await self._idle(min(POLL_S * 2 ** failures, 30.0))
                continue
            if claim is None:
                await self._idle(POLL_S)
                continue
            log.info("job %s file %s claimed by %s (attempt %d)", claim.job_id, claim.file_id, worker, claim.attempts)
            try:
                await self._work(claim)
            except Exception:  # noqa: BLE001 - e.g. the database went away: the lease runs out, another takes it
                log.exception("job %s file %s: the worker failed; the file is taken again after its lease",
                              claim.job_id, claim.file_id)

    async def _idle(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._work_waiting.wait(), seconds * random.uniform(0.8, 1.2))
        except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11)
            pass
        if not self._stopping:
            self._work_waiting.clear()

    async def _work(self, claim: Claim) -> None:
        keeper = asyncio.create_task(self._keep_lease(claim))
        started = time.monotonic()
        try:
            audio, result = await self._transcribe(claim)
        except ClaimLost:
            self._discarded(claim)
            return
        except Exception as exc:  # noqa: BLE001 - each failure is the file's outcome
            await self._failed(claim, exc)
            return
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        stored = await anyio.to_thread.run_sync(self.store.complete, claim, {
            "duration_ms": audio.duration_ms, "segments": result["segments"]}, audio.duration_ms)
        if stored:
            self.on_file("done")
            log.info("job %s file %s done in %.1f s (attempt %d)", claim.job_id, claim.file_id,
                     time.monotonic() - started, claim.attempts)
        else:
            self._discarded(claim)

    async def _transcribe(self, claim: Claim) -> tuple[Audio, dict]:
        options = dict(claim.options)
        if claim.key_hash is not None and claim.key_hash not in self.keys_by_hash:
            raise AccessDeniedError("the API key this job was made with is not one of this gateway's keys "
                                    "any more")
        api_key = self.keys_by_hash.get(claim.key_hash) if claim.key_hash else None
        if claim.path is not None:
            if self.root is None:
                raise ApiError(400, "this gateway has no --jobs-root: the job's paths cannot be read")
            source = await anyio.to_thread.run_sync(self.root.open, claim.path)
        else:
            upload = await anyio.to_thread.run_sync(self.store.audio, claim)
            if upload is None:  # (only the claim's holder reads it)
                raise ClaimLost
            source = io.BytesIO(upload)
        last = [0.0]

        def on_audio(audio: Audio) -> None:
            self._progress(claim, 0, audio.duration_ms)

        def on_progress(done_ms: int, total_ms: int) -> None:
            if time.monotonic() - last[0] >= PROGRESS_EVERY_S:
                last[0] = time.monotonic()
                self._progress(claim, done_ms, total_ms)

        with source:
            return await self.runner.transcribe(source, claim.name, api_key, queue_timeout_s=math.inf,
                                                on_audio=on_audio, on_progress=on_progress, **options)

    def _progress(self, claim: Claim, done_ms: int, total_ms: int) -> None:
        try:
            self.store.progress(claim, done_ms, total_ms)
        except Exception as exc:  # noqa: BLE001 - progress is worth less than the work
            log.warning("job %s file %s: progress not stored: %s", claim.job_id, claim.file_id, exc)

    async def _keep_lease(self, claim: Claim) -> None:
        """Renews the claim until the work ends, or the claim is lost: then the work goes on (a
        request to Triton cannot be called back) and its result is not kept."""
        while True:
            await asyncio.sleep(self.settings.job_lease_s / 3)
            try:
                if not await anyio.to_thread.run_sync(self.store.renew, claim, self.settings.job_lease_s):
                    return
            except Exception as exc:  # noqa: BLE001 - try again; past the lease another worker may take it
                log.warning("job %s file %s: lease not renewed: %s", claim.job_id, claim.file_id, exc)

    async def _failed(self, claim: Claim, exc: Exception) -> None:
        reason = _reason(exc)
        if _passing(exc) and claim.attempts < self.settings.job_attempts:
            delay = min(RETRY_FIRST_S * 2 ** (claim.attempts - 1), RETRY_MAX_S)
            if await anyio.to_thread.run_sync(self.store.retry_later, claim, reason, delay):
                self.on_file("retried")
                log.info("job %s file %s: %s; tried again in %.0f s", claim.job_id, claim.file_id, reason, delay)
            else:
                self._discarded(claim)
            return
        if _passing(exc):
            reason = f"{reason} (gave up after {claim.attempts} attempt{'s' if claim.attempts > 1 else ''})"
        if not isinstance(exc, (AudioError, TranscriptionError, AccessDeniedError, ApiError)):
            log.error("job %s file %s failed", claim.job_id, claim.file_id, exc_info=exc)
        if await anyio.to_thread.run_sync(self.store.fail, claim, reason):
            self.on_file("failed")
            log.info("job %s file %s failed: %s", claim.job_id, claim.file_id, reason)
        else:
            self._discarded(claim)

    def _discarded(self, claim: Claim) -> None:
        self.on_file("discarded")
        log.info("job %s file %s: result discarded, the claim was lost (cancelled, or taken over after its lease "
                 "ran out)", claim.job_id, claim.file_id)


class ClaimLost(Exception):
    """The file is no longer this worker's: cancelled, or taken over after its lease ran out."""


def _passing(exc: Exception) -> bool:
    """A failure that the same request may not meet later."""
    if isinstance(exc, (ServerBusyError, ServerUnavailableError)):
        return True
    return isinstance(exc, TranscriptionError) and exc.status in PASSING_STATUSES


def _reason(exc: Exception) -> str:
    if isinstance(exc, ApiError):
        return exc.message
    if isinstance(exc, (AudioError, TranscriptionError, AccessDeniedError)):
        return str(exc)  # (the decoder's messages start with the file's name)
    return f"the gateway failed on this file ({type(exc).__name__}); its log says more"
