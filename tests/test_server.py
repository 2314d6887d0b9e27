"""The embedded server launcher: ready, clear failures, clean stop on SIGTERM."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tritonasr.repository.layout import install_model_files
from tritonasr.serving.server import ServerConfig, ServerError, TritonServer, free_port


def _ports() -> list[str]:
    return ["--grpc-port", str(free_port()), "--http-port", str(free_port()), "--metrics-port", str(free_port())]


@pytest.fixture()
def vad_only_repository(model_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(model_repository / "vad", repo / "vad")
    return repo


def test_port_in_use_is_a_clear_error(vad_only_repository):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = ServerConfig(vad_only_repository, grpc_port=port, http_port=free_port(), metrics_port=free_port())
        with pytest.raises(ServerError, match=f"gRPC port {port} is already in use"):
            TritonServer(config).start()


def test_model_that_fails_to_load_is_named(tmp_path):
    install_model_files(tmp_path, ["vad"])  # config and model.py, but no exported graph
    config = ServerConfig(tmp_path, free_port(), free_port(), free_port())
    with pytest.raises(ServerError, match=r"models failed to load:\n  vad: .*model.onnx"):
        TritonServer(config).start(timeout_s=120)


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(ServerError, match="does not exist"):
        TritonServer(ServerConfig(tmp_path / "nowhere", free_port(), free_port(), free_port())).start()


def test_serve_cli_reports_ready_and_stops_on_sigterm(vad_only_repository):
    health_port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tritonasr.cli", "serve", "--quiet", "--model-repository", str(vad_only_repository),
         *_ports(), "--health-port", str(health_port)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "ready" in line or time.monotonic() > deadline:
                break
        assert "ready; gRPC 127.0.0.1:" in "".join(lines), lines
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/health/ready", timeout=5) as health:
            assert json.load(health)["ready"] is True
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(timeout=90) == 0
        assert "stopped (0)" in rest
    finally:
        if process.poll() is None:
            process.kill()
