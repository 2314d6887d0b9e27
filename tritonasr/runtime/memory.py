"""Memory the pipelines hold on to: a budget for the audio in flight, and giving freed heap back.

glibc keeps memory freed by a process in its arenas (the heap of each thread that allocated it),
so RSS stays at its peak after a large request or many streams; `release_memory` hands the free
pages back to the system.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
from contextlib import contextmanager
from typing import Iterator

from tritonasr.contract import MiB
from tritonasr.errors import OverloadError

BUDGET = "max_inflight_audio_mb"  # the setting, and the reason label of tritonasr_rejected_total

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _malloc_trim = _libc.malloc_trim
except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
    _malloc_trim = None


def release_memory() -> bool:
    """Returns the free pages of every malloc arena to the system (glibc's malloc_trim(0));
    True if any were returned."""
    return bool(_malloc_trim and _malloc_trim(0))


class AudioBudget:
    """Bytes of audio this process works on at once. A request that would go past it is refused
    (OverloadError: retry later or elsewhere) instead of growing the process; one request larger
    than the whole budget is still taken when nothing else is in flight, since the per-request
    limit (max_audio_seconds) is what bounds a single request."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.in_flight = 0
        self._lock = threading.Lock()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        with self._lock:
            if self.in_flight and self.in_flight + nbytes > self.limit:
                raise OverloadError(f"this server is busy with {self.in_flight / MiB:.0f} MB of audio "
                                    f"(limit {self.limit / MiB:.0f} MB); retry later or elsewhere", reason=BUDGET)
            self.in_flight += nbytes
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= nbytes
