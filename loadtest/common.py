"""What the benchmark commands share: the server they measure."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@contextmanager
def server_url(url: str | None, repository: Path, log: Callable[[str], None]) -> Iterator[str]:
    """`url` as given, or the gRPC address of an embedded server on free ports, started from
    `repository` for the duration of the block."""
    if url is not None:
        yield url
        return
    from tritonasr.repository.layout import exported_models  # noqa: PLC0415
    from tritonasr.serving.server import ServerConfig, TritonServer, free_port  # noqa: PLC0415

    log("starting the embedded Triton server…")
    config = ServerConfig(repository, free_port(), free_port(), free_port(), models=exported_models(repository))
    with TritonServer(config) as server:
        yield server.grpc_url


@dataclass(frozen=True)
class ServedTarget:
    """A server being measured: where to call it, its metrics, and its tritonserver pid (None
    when it does not run on this machine)."""

    url: str
    metrics_url: str
    pid: int | None


@contextmanager
def served(url: str | None, repository: Path, log: Callable[[str], None],
           metrics_url: str | None = None, server_args: dict | None = None) -> Iterator[ServedTarget]:
    """Like `server_url`, with the metrics address and the server's pid (found by its gRPC port
    for `url`); `server_args`: more ServerConfig fields for the embedded server."""
    from tritonasr.loadtest.rss import find_server_pid  # noqa: PLC0415

    if url is not None:
        host, _, port = url.rpartition(":")
        yield ServedTarget(url, metrics_url or f"http://{host or 'localhost'}:8002/metrics",
                           find_server_pid(int(port)))
        return
    from tritonasr.repository.layout import exported_models  # noqa: PLC0415
    from tritonasr.serving.server import ServerConfig, TritonServer, free_port  # noqa: PLC0415

    log("starting the embedded Triton server…")
    config = ServerConfig(repository, free_port(), free_port(), free_port(), models=exported_models(repository),
                          **(server_args or {}))
    with TritonServer(config) as server:
        yield ServedTarget(server.grpc_url, server.metrics_url, server.process.pid)
