"""Baseline servers as subprocesses: started with their output in a log file, waited for until
they serve, stopped with SIGTERM (then SIGKILL)."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path


class ServerProcessError(RuntimeError):
    """The server could not start or died; the message says why, with its log."""


class ServerProcess:
    """One server process; subclasses give its `command()` and say when it is `ready()`."""

    name = "server"

    def __init__(self, log_path: Path | None = None):
        if log_path is None:
            handle, path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
            os.close(handle)
            log_path = Path(path)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def start(self, timeout_s: float = 120.0):
        command = self.command()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.log_path.parent, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process.poll() is not None:
                raise ServerProcessError(f"{self.name} exited ({self.process.returncode}) before it served; "
                                         f"log {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerProcessError(f"{self.name} was not serving within {timeout_s:g} s; "
                                         f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited in `timeout_s`."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
