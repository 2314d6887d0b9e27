"""A real tritonserver, started once per test session on free ports, serving the real FSMN-VAD
and a tiny random-init SenseVoice exported into a temporary model repository."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def layout() -> dict:
    return json.loads((DATA / "layout.json").read_text())


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory) -> Path:
    from tritonasr.export.sensevoice import export_sensevoice
    from tritonasr.export.vad import export_vad
    from tritonasr.repository import ALL_MODELS, install_model_files

    repo = tmp_path_factory.mktemp("model_repository")
    install_model_files(repo, ALL_MODELS)
    # Streams without audio for 4 s are closed (15 s as shipped), so the idle test waits less.
    config = repo / "asr_stream" / "config.pbtxt"
    shipped = "max_sequence_idle_microseconds: 15000000"
    assert shipped in config.read_text()
    config.write_text(config.read_text().replace(shipped, "max_sequence_idle_microseconds: 4000000"))
    export_vad(None, repo, None)
    export_sensevoice(None, "tiny", repo, None)
    return repo


@pytest.fixture(scope="session")
def server(model_repository):
    from tritonasr.server import ServerConfig, TritonServer, free_port

    # Triton 2.51 keeps a model loaded until its exit timeout once it has rejected a chunk sent
    # without START (the bad-input tests do): 5 s instead of 30 s keeps the teardown short.
    config = ServerConfig(model_repository, free_port(), free_port(), free_port(),
                          extra_args=["--exit-timeout-secs=5"])
    # TRITONASR_ECHO_SERVER_LOG=1 pytest -s … shows the server's log while the tests run.
    with TritonServer(config, echo_log=bool(os.environ.get("TRITONASR_ECHO_SERVER_LOG"))) as running:
        yield running


@pytest.fixture()
def client(server):
    from tritonasr.client.offline import OfflineClient

    with OfflineClient(server.grpc_url, timeout_s=900) as offline:
        yield offline
