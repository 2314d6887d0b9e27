"""What the benchmark commands share: the server they measure."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def server_url(url: str | None, repository: Path, log: Callable[[str], None]) -> Iterator[str]:
    """`url` as given, or the gRPC address of an embedded server on free ports, started from
    `repository` for the duration of the block."""
    if url is not None:
        yield url
        return
    from tritonasr.repository import exported_models  # noqa: PLC0415
    from tritonasr.server import ServerConfig, TritonServer, free_port  # noqa: PLC0415

    log("starting the embedded Triton server…")
    config = ServerConfig(repository, free_port(), free_port(), free_port(), models=exported_models(repository))
    with TritonServer(config) as server:
        yield server.grpc_url
