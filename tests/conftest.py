"""A real tritonserver, started once per test session on free ports, serving the real FSMN-VAD,
a tiny random-init SenseVoice, a tiny random-init Parakeet TDT and a tiny random-init ERes2NetV2
exported into a temporary model repository. SenseVoice is the default engine."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tritonasr.paths import deploy_files, speech_dir

DATA = speech_dir()
# Random speaker weights tell recordings apart, not voices: different utterances of the test
# speech score 0.93-0.98 cosine similarity with the tiny model, the same recording 1.0. So the
# test repository identifies and clusters only (near-)identical audio.
TEST_SPEAKER_THRESHOLD = "0.995"
# The session server's admin key: speaker changes and Triton's statistics need it. Clients read
# it from $TRITONASR_ADMIN_KEY (set for the whole session below).
TEST_ADMIN_KEY = "test-admin-key"


@pytest.fixture(scope="session", autouse=True)
def admin_key_in_environment():
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITONASR_ADMIN_KEY", TEST_ADMIN_KEY)
    yield TEST_ADMIN_KEY
    patch.undo()


def set_parameter(config: Path, key: str, value: str) -> None:
    """Sets one `parameters { key: KEY value: { string_value: "…" } }` of a config.pbtxt (added
    when the config does not have it)."""
    text = config.read_text()
    prefix = f'parameters {{ key: "{key}" value: {{ string_value: "'
    if prefix not in text:
        config.write_text(f'{text}{prefix}{value}" }} }}\n')
        return
    start = text.index(prefix) + len(prefix)
    config.write_text(text[:start] + value + text[text.index('"', start):])


async def raw_stream(url: str, requests, results: list | None = None) -> tuple[list[dict], list[str]]:
    """Sends `requests` (stream_infer request dicts: a list, or an async iterable that may also
    wait) on one gRPC stream; returns (results, error messages) once the server has closed the
    call. `results` fills as they arrive."""
    import tritonclient.grpc.aio as grpcaio

    async def each():
        if isinstance(requests, list):
            for request in requests:
                yield request
        else:
            async for request in requests:
                yield request

    client = grpcaio.InferenceServerClient(url)
    results, errors = [] if results is None else results, []
    try:
        async for result, error in client.stream_infer(each()):
            if error is not None:
                errors.append(error.message())
            else:
                results.append(json.loads(result.as_numpy("RESULT").reshape(-1)[0]))
    finally:
        await client.close()
    return results, errors


def conversation(order: list[int], utterances: list[np.ndarray], gap_s: float) -> np.ndarray:
    """The utterances in `order`, with `gap_s` of silence before, between and after."""
    gap = np.zeros(int(gap_s * 16000), dtype=np.float32)
    parts = [gap]
    for i in order:
        parts += [utterances[i], gap]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """TRITONASR_CACHE on an empty directory for one test module: random models are built, not
    found in the cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITONASR_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def layout() -> dict:
    return json.loads((DATA / "layout.json").read_text())


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory) -> Path:
    from tritonasr.export.parakeet import export_parakeet
    from tritonasr.export.sensevoice import export_sensevoice
    from tritonasr.export.speaker import export_speaker
    from tritonasr.export.vad import export_vad
    from tritonasr.repository.layout import ALL_MODELS, install_model_files

    repo = tmp_path_factory.mktemp("model_repository")
    install_model_files(repo, ALL_MODELS)
    # Streams without audio for 4 s are closed (15 s as shipped), so the idle test waits less.
    config = repo / "asr_stream" / "config.pbtxt"
    shipped = "max_sequence_idle_microseconds: 15000000"
    assert shipped in config.read_text()
    config.write_text(config.read_text().replace(shipped, "max_sequence_idle_microseconds: 4000000"))
    for model in ("asr_offline", "asr_stream"):
        for key in ("speaker_threshold", "speaker_cluster_threshold"):
            set_parameter(repo / model / "config.pbtxt", key, TEST_SPEAKER_THRESHOLD)
    export_vad(None, repo, None)
    export_sensevoice(None, "tiny", repo, None)
    export_parakeet(None, "tiny", repo, None)
    export_speaker(None, "tiny", repo, None)
    return repo


@pytest.fixture(scope="session")
def server(model_repository):
    from tritonasr.serving.server import ServerConfig, TritonServer, free_port

    # Triton 2.51 keeps a model loaded until its exit timeout once it has rejected a chunk sent
    # without START (the bad-input tests do): 5 s instead of 30 s keeps the teardown short.
    # Leaf models open: tests compare them with in-process runs (tests/test_e2e_access.py checks
    # the closed default). Room for the 32 concurrent streams of test_e2e_stream (the shipped
    # limit, 16, is tested in test_e2e_admission on servers of its own).
    config = ServerConfig(model_repository, free_port(), free_port(), free_port(), admin_key=TEST_ADMIN_KEY,
                          open_leaf_models=True, max_streams=64, extra_args=["--exit-timeout-secs=5"])
    # TRITONASR_ECHO_SERVER_LOG=1 pytest -s … shows the server's log while the tests run.
    with TritonServer(config, echo_log=bool(os.environ.get("TRITONASR_ECHO_SERVER_LOG"))) as running:
        yield running


@pytest.fixture()
def client(server):
    from tritonasr.client.offline import OfflineClient

    with OfflineClient(server.grpc_url, timeout_s=900) as offline:
        yield offline


class Postgres:
    """A real PostgreSQL server of the test session's own (Debian's `postgresql`, which
    scripts/test.sh installs): on a free port of 127.0.0.1, one user with a password (given to
    clients through $PGPASSWORD, as a deployment gives it), data in a temporary directory."""

    USER, PASSWORD = "tritonasr", "test-pg-password"

    def __init__(self):
        import glob
        import shutil
        import subprocess
        import tempfile

        from tritonasr.serving.server import free_port

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
        if not found:
            pytest.fail("PostgreSQL is not installed: scripts/test.sh installs Debian's postgresql")
        bin_dir = Path(found[-1]).parent
        # PostgreSQL refuses to run as root: as root, its files and process go to the postgres user.
        as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.directory = Path(tempfile.mkdtemp(prefix="tritonasr-pg-"))
        (self.directory / "password").write_text(self.PASSWORD)
        if as_owner:
            shutil.chown(self.directory, "postgres", "postgres")
            shutil.chown(self.directory / "password", "postgres", "postgres")
        self.port = free_port()
        subprocess.run([*as_owner, str(bin_dir / "initdb"), "-D", str(self.directory / "data"), "-U", self.USER,
                        f"--pwfile={self.directory / 'password'}", "--auth-host=scram-sha-256", "--auth-local=trust"],
                       check=True, capture_output=True)
        self.process = subprocess.Popen(
            [*as_owner, str(bin_dir / "postgres"), "-D", str(self.directory / "data"), "-p", str(self.port),
             "-k", str(self.directory), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
            stdout=subprocess.DEVNULL, stderr=(self.directory / "log").open("w"))
        self._wait_ready()
        self._count = 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{database}"

    def _connect(self):
        import psycopg

        return psycopg.connect(self.url(), password=self.PASSWORD, autocommit=True)

    def _wait_ready(self) -> None:
        import time

        deadline = time.monotonic() + 60
        while True:
            try:
                self._connect().close()
                return
            except Exception:  # noqa: BLE001 - still starting
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("postgres did not start: " + (self.directory / "log").read_text())
                time.sleep(0.2)

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        self._count += 1
        name = f"test_{self._count}"
        with self._connect() as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        import shutil

        self.process.terminate()
        self.process.wait(timeout=60)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL, its password in $PGPASSWORD for every client (and every server
    the tests start, which inherit it)."""
    server = Postgres()
    patch = pytest.MonkeyPatch()
    patch.setenv("PGPASSWORD", server.PASSWORD)
    yield server
    patch.undo()
    server.stop()


# --- Debian's tools the deployment tests run (scripts/test.sh installs them) -------------------

def _debian_tool(name: str, package: str, *also: str) -> str:
    path = shutil.which(name) or next((p for p in also if os.path.exists(p)), None)
    if path is None:
        pytest.fail(f"{name} is not installed: scripts/test.sh installs Debian's {package}")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _debian_tool("promtool", "prometheus")


@pytest.fixture(scope="session")
def nginx() -> str:
    return _debian_tool("nginx", "nginx", "/usr/sbin/nginx")


@pytest.fixture(scope="session")
def make_certs():
    """deploy/tls/make-certs.sh into a directory: ca.crt, server.crt (naming `names` too), keys."""
    def make(directory: Path, *names: str) -> Path:
        subprocess.run(["bash", str(deploy_files() / "tls" / "make-certs.sh"), *names], check=True,
                       env={**os.environ, "TLS_DIR": str(directory)}, capture_output=True, timeout=60)
        return directory
    return make
