"""What one gateway process is configured with (`tritonasr gateway`'s flags)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tritonasr.client.connection import Credentials
from tritonasr.contract import MiB


@dataclass(frozen=True)
class GatewaySettings:
    # Triton's gRPC address, and TLS towards it (the API key comes from each caller).
    triton_url: str = "localhost:8001"
    triton_tls: Credentials = field(default_factory=Credentials)
    # Keys callers must send as `Authorization: Bearer KEY` (the server's API keys, which the
    # gateway passes on with each call); empty: no key is asked for (loopback, or an operator's choice).
    api_keys: tuple[str, ...] = ()
    # An upload larger than this is refused (413) as soon as it is seen to be.
    max_upload_bytes: int = 100 * MiB
    # Decoded audio longer than this is refused (413): a small compressed file can hold hours.
    max_audio_seconds: float = 4 * 3600
    # Offline requests worked on at once by this process; more wait up to queue_timeout_s for a
    # turn, then get 503 with Retry-After.
    max_inflight: int = 16
    queue_timeout_s: float = 10.0
    # One request's time at Triton (per try), then 504.
    request_timeout_s: float = 900.0
    retry_after_s: int = 2
    # Origins a browser page may call the gateway from (CORS); empty: none but the gateway's own.
    cors_origins: tuple[str, ...] = ()
    # Batch jobs (docs/jobs.md). Their database: sqlite:///PATH, a file path, or postgresql://USER@HOST/DB
    # shared by replicas (the password from $PGPASSWORD); None: jobs.db in the per-user data directory.
    jobs_db: str | None = None
    # The directory server-side paths of jobs are under; None: jobs of paths are refused.
    jobs_root: Path | None = None
    # Files this process transcribes at once for jobs (0: it serves the jobs API but works on none).
    job_workers: int = 2
    # A claimed file whose worker has not renewed its claim for this long is taken over (its gateway died).
    job_lease_s: float = 30.0
    # Tries of a file that fails for a passing reason (Triton unreachable, busy, too slow) or whose worker died.
    job_attempts: int = 5
    # A job whose files are all finished is deleted, with its results, this long after the last one
    # finished; 0: jobs are kept until their callers delete them.
    job_retention_days: float = 30.0

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_audio_seconds", "max_inflight", "queue_timeout_s",
                     "request_timeout_s", "retry_after_s", "job_lease_s", "job_attempts"):
            if not getattr(self, name) > 0:  # (so written, NaN is refused too)
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("job_workers", "job_retention_days"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
