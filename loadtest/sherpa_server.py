"""The peer server of the load tests: sherpa-onnx's `sherpa-onnx-offline-websocket-server` (from
the PyPI wheel sherpa-onnx-bin) serving a SenseVoice export (tritonasr.export.sherpa_onnx).

How it works (offline-websocket-server-impl.cc): io threads receive whole files; each complete
file is queued and a decode job posted to the work-thread pool; a job takes up to
max_batch_size queued files and runs them as one zero-padded ONNX Runtime batch, with
num_threads intra-op threads.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from tritonasr.loadtest.processes import ServerProcess, ServerProcessError
from tritonasr.serving.server import free_port, port_is_free

BINARY = "sherpa-onnx-offline-websocket-server"
# 60 s clips plus margin; sherpa closes the connection of a longer file with code 1009.
DEFAULT_MAX_UTTERANCE_S = 90.0


class SherpaServerError(ServerProcessError):
    """The server binary is missing, or could not start or died."""


def find_binary() -> Path:
    """The server binary next to this interpreter (the virtualenv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(BINARY)
    if found:
        return Path(found)
    raise SherpaServerError(f"{BINARY} not found next to {sys.executable} or on PATH: "
                            f"pip install sherpa-onnx-bin==2.0.1")


class SherpaOnnxServer(ServerProcess):
    """Start, wait for and stop one sherpa-onnx offline websocket server.

    >>> with SherpaOnnxServer(sherpa_model_for(repository)) as server:
    ...     transcribe(server.url, samples)

    model_dir: a directory holding model.onnx and tokens.txt (sherpa-onnx's SenseVoice format).
    num_threads: ONNX Runtime threads per decode (default: all cores); num_work_threads decodes
    run at once; max_batch_size files per decode. Defaults otherwise are sherpa's own.
    """

    name = BINARY

    def __init__(self, model_dir: Path, port: int | None = None, *, num_threads: int | None = None,
                 max_batch_size: int = 5, num_work_threads: int = 3, num_io_threads: int = 1,
                 max_utterance_length: float = DEFAULT_MAX_UTTERANCE_S, language: str = "auto",
                 use_itn: bool = False, log_path: Path | None = None, extra_args: Sequence[str] = ()):
        self.model_dir = Path(model_dir)
        for name in ("model.onnx", "tokens.txt"):
            if not (self.model_dir / name).is_file():
                raise FileNotFoundError(f"{self.model_dir / name} not found: export it with "
                                        f"`tritonasr export sherpa-onnx`")
        self.port = port or free_port()
        self.num_threads = num_threads or os.cpu_count() or 1
        self.max_batch_size = max_batch_size
        self.num_work_threads = num_work_threads
        self.num_io_threads = num_io_threads
        self.max_utterance_length = max_utterance_length
        self.language = language
        self.use_itn = use_itn
        self.extra_args = list(extra_args)
        super().__init__(log_path)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(find_binary()),
            f"--port={self.port}",
            f"--sense-voice-model={self.model_dir / 'model.onnx'}",
            f"--tokens={self.model_dir / 'tokens.txt'}",
            f"--sense-voice-language={self.language}",
            f"--sense-voice-use-itn={'true' if self.use_itn else 'false'}",
            f"--num-threads={self.num_threads}",
            f"--max-batch-size={self.max_batch_size}",
            f"--num-work-threads={self.num_work_threads}",
            f"--num-io-threads={self.num_io_threads}",
            f"--max-utterance-length={self.max_utterance_length:g}",
            # Its websocket access log (the default is ./log.txt in the working directory);
            # it also goes to stdout, which is this same file.
            f"--log-file={os.devnull}",
            *self.extra_args,
        ]

    def start(self, timeout_s: float = 120.0) -> "SherpaOnnxServer":
        # A server already on the port would answer the readiness probe in our server's stead.
        if not port_is_free(self.port):
            raise SherpaServerError(f"port {self.port} is already in use")
        return super().start(timeout_s)

    def ready(self) -> bool:
        """It accepts a websocket connection."""
        from websockets.sync.client import connect

        try:
            with connect(self.url, open_timeout=2, close_timeout=2):
                return True
        except Exception:  # noqa: BLE001 - refused, reset, handshake not ready yet: try again
            return False
