"""`tritonasr gateway`: the HTTP/WebSocket gateway in front of a Triton server (or a balancer)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from tritonasr.client.connection import Credentials
from tritonasr.contract import DRAIN_SECONDS, MiB
from tritonasr.gateway.jobs.store import default_url, engine_url
from tritonasr.gateway.settings import GatewaySettings
from tritonasr.runtime.access import is_loopback, split_keys

DEFAULTS = GatewaySettings()
METRICS_PORT = 8082


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULTS.triton_url, help="Triton's gRPC HOST:PORT (a server or a balancer)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; any other needs "
                             "--api-key, or --allow-unauthenticated)")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port")
    parser.add_argument("--metrics-port", type=int, default=METRICS_PORT,
                        help="port of the gateway's Prometheus metrics (GET /metrics; README: HTTP gateway), apart "
                             "from the API's: callers never see them (0: off)")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address of the metrics port (default 127.0.0.1: this machine only; 0.0.0.0 for "
                             "a Prometheus elsewhere, e.g. in a pod)")
    access = parser.add_argument_group("callers (README: HTTP gateway)")
    access.add_argument("--api-key", action="append", default=None,
                        help="a key callers must send as `Authorization: Bearer KEY`, passed on to Triton with "
                             "their calls: the server's API keys; repeat for several (default: $TRITONASR_API_KEY, "
                             "comma-separated)")
    access.add_argument("--allow-unauthenticated", action="store_true",
                        help="let a non-loopback --host serve callers without an API key")
    access.add_argument("--tls-cert", type=Path, help="HTTPS/WSS: the gateway's certificate chain (PEM)")
    access.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    access.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="a web origin whose pages may call the gateway (e.g. https://app.example.com); repeat")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-upload-mb", type=float, default=DEFAULTS.max_upload_bytes / MiB,
                        help="largest upload, in MiB (413 beyond)")
    limits.add_argument("--max-audio-seconds", type=float, default=DEFAULTS.max_audio_seconds,
                        help="longest decoded audio (413 beyond)")
    limits.add_argument("--max-inflight", type=int, default=DEFAULTS.max_inflight,
                        help="offline requests this process works on at once; more wait for a turn")
    limits.add_argument("--queue-timeout", type=float, default=DEFAULTS.queue_timeout_s, metavar="SECONDS",
                        help="how long a request waits for a turn before 503 with Retry-After")
    jobs = parser.add_argument_group("batch jobs (docs/jobs.md)")
    jobs.add_argument("--jobs-db", metavar="URL", default=None,
                      help="the jobs database: sqlite:///PATH or a file path (one gateway), or "
                           "postgresql://USER@HOST:PORT/DB shared by replicas (the password from $PGPASSWORD or "
                           f"$PGPASSFILE) (default: {default_url()})")
    jobs.add_argument("--jobs-root", type=Path, default=None, metavar="DIR",
                      help="jobs may name server-side files and directories under DIR, nothing outside it "
                           "(default: none, jobs are uploads only)")
    jobs.add_argument("--job-workers", type=int, default=DEFAULTS.job_workers, metavar="N",
                      help="files this process transcribes at once for jobs (0: none, it serves the API only)")
    jobs.add_argument("--job-lease", type=float, default=DEFAULTS.job_lease_s, metavar="SECONDS",
                      help="a file whose worker has not renewed its claim for this long is taken over by another")
    jobs.add_argument("--job-attempts", type=int, default=DEFAULTS.job_attempts, metavar="N",
                      help="tries of a file failing for a passing reason (Triton unreachable or busy) or whose "
                           "gateway died")
    jobs.add_argument("--job-retention", type=float, default=DEFAULTS.job_retention_days, metavar="DAYS",
                      help="a finished job and its results are deleted this many days after its last file finished "
                           "(0: kept until deleted by its caller)")
    parser.add_argument("--drain-seconds", type=float, default=DRAIN_SECONDS, metavar="SECONDS",
                        help="on SIGTERM or Ctrl-C: not ready (GET /readyz 503), new streams, transcriptions and "
                             "jobs refused (draining), and up to this long for open streams, requests in flight "
                             "and job files being transcribed to end, before the gateway stops (0: at once; a "
                             "second signal stops it at once)")
    triton = parser.add_argument_group("the connection to Triton (each defaults to its $TRITONASR_* variable)")
    triton.add_argument("--triton-tls-ca", type=Path, default=None,
                        help="speak TLS to Triton, trusting this CA ($TRITONASR_TLS_CA)")
    triton.add_argument("--triton-tls-cert", type=Path, default=None,
                        help="client certificate for mutual TLS ($TRITONASR_TLS_CERT)")
    triton.add_argument("--triton-tls-key", type=Path, default=None, help="its private key ($TRITONASR_TLS_KEY)")


class UsageError(ValueError):
    pass


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    keys = tuple(key for value in (args.api_key or [os.environ.get("TRITONASR_API_KEY", "")])
                 for key in split_keys(value))
    if not is_loopback(args.host) and not keys and not args.allow_unauthenticated:
        raise UsageError(f"--host {args.host} lets other machines call the gateway: give it --api-key "
                         "(or $TRITONASR_API_KEY), or --allow-unauthenticated on a network you trust")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("HTTPS needs both --tls-cert and --tls-key")
    if args.jobs_root is not None and not args.jobs_root.is_dir():
        raise UsageError(f"--jobs-root {args.jobs_root} is not a directory")
    if args.jobs_db is not None:
        engine_url(args.jobs_db)  # (refuses a password in the URL, an unknown scheme)
    # TLS towards Triton from the flags or the environment; the keys are the callers'.
    tls = dataclasses.replace(Credentials.from_environment(tls_ca=args.triton_tls_ca, tls_cert=args.triton_tls_cert,
                                                           tls_key=args.triton_tls_key), api_key=None, admin_key=None)
    return GatewaySettings(
        triton_url=args.url, triton_tls=tls,
        api_keys=keys, max_upload_bytes=int(args.max_upload_mb * MiB), max_audio_seconds=args.max_audio_seconds,
        max_inflight=args.max_inflight, queue_timeout_s=args.queue_timeout, cors_origins=tuple(args.cors_origin),
        jobs_db=args.jobs_db, jobs_root=args.jobs_root, job_workers=args.job_workers, job_lease_s=args.job_lease,
        job_attempts=args.job_attempts, job_retention_days=args.job_retention)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from tritonasr.gateway.app import create_app
    from tritonasr.gateway.drain import Drain, DrainingServer

    try:
        settings = settings_from(args)
        if not args.drain_seconds >= 0:
            raise UsageError(f"--drain-seconds must be 0 or more, got {args.drain_seconds:g}")
        if not 0 <= args.metrics_port <= 65535:
            raise UsageError(f"--metrics-port must be a port (0: off), got {args.metrics_port}")
        if args.metrics_port and args.metrics_port == args.port:
            raise UsageError(f"--metrics-port {args.metrics_port} is the API's --port: the metrics need one of "
                             "their own")
    except (UsageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.tls_cert is None and not is_loopback(args.host):
        print(f"WARNING: HTTP on {args.host} without TLS: keys and audio cross the network in plain text "
              "(--tls-cert/--tls-key)", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    scheme = "https" if args.tls_cert else "http"
    print(f"tritonasr gateway on {scheme}://{args.host}:{args.port} -> Triton {settings.triton_url} (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    drain = Drain(args.drain_seconds)
    app = create_app(settings, drain)
    # No per-message compression: audio does not compress, and it would cost CPU on every frame.
    # Once drained, what uvicorn still waits for is a socket's close or a response on its way.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            ws_per_message_deflate=False, timeout_graceful_shutdown=10,
                            ssl_certfile=str(args.tls_cert) if args.tls_cert else None,
                            ssl_keyfile=str(args.tls_key) if args.tls_key else None)
    metrics = None
    if args.metrics_port:
        try:  # (served from a thread of its own, through the drain too: a scrape sees it)
            metrics = app.state.metrics.serve(args.metrics_host, args.metrics_port)
        except OSError as exc:
            print(f"error: the metrics port {args.metrics_host}:{args.metrics_port} cannot be served "
                  f"(--metrics-port, 0: off): {exc}", file=sys.stderr)
            return 1
        print(f"metrics on http://{args.metrics_host}:{args.metrics_port}/metrics", file=sys.stderr, flush=True)
    try:
        DrainingServer(config, drain).run()
    finally:
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
    return 0
