"""A real tritonserver, started once per test session on free ports, serving the real FSMN-VAD
and a tiny random-init SenseVoice exported into a temporary model repository."""
from __future__ import annotations

import json
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
    export_vad(None, repo, None)
    export_sensevoice(None, "tiny", repo, None)
    return repo


@pytest.fixture(scope="session")
def server(model_repository):
    from tritonasr.server import ServerConfig, TritonServer, free_port

    config = ServerConfig(model_repository, free_port(), free_port(), free_port())
    with TritonServer(config) as running:
        yield running


@pytest.fixture()
def client(server):
    from tritonasr.client.offline import OfflineClient

    with OfflineClient(server.grpc_url, timeout_s=900) as offline:
        yield offline
