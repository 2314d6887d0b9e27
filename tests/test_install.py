"""Installed by role, as a platform team would have it: the built wheel in fresh virtualenvs, run
outside the checkout. The base install (the client) transcribes against the session's real
tritonserver like the full install; the `server` install serves the session's exported repository
with its own tritonserver; neither has torch, FunASR or NeMo."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import venv
from pathlib import Path

import pytest

from tritonasr.contract import EXIT_UNREACHABLE, EXIT_USAGE
from tritonasr.serving.server import free_port

from conftest import DATA

CHECKOUT = Path(__file__).resolve().parent.parent
# What only the export and load-test roles bring; the base install has none of the server's either.
EXPORT_MODULES = ("torch", "funasr", "nemo", "locust", "matplotlib", "starlette", "uvicorn")
SERVER_MODULES = ("onnxruntime", "pytriton", "kaldi_native_fbank")
# Heavy libraries the served models do without (the VAD's endpointing and Parakeet's mel matrix
# are the package's own).
NOT_SERVED = ("librosa", "scipy", "sklearn", "numba", "funasr_onnx")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist),
                    str(CHECKOUT)], check=True, cwd=dist)
    return next(dist.glob("tritonasr-*.whl"))


def _install(root: Path, requirement: str) -> Path:
    """A fresh virtualenv under `root` with `requirement` installed; its bin/ directory."""
    venv.create(root / "venv", with_pip=True)
    bin_dir = root / "venv" / "bin"
    subprocess.run([str(bin_dir / "pip"), "install", "--quiet", "--disable-pip-version-check", requirement],
                   check=True, cwd=root)
    return bin_dir


@pytest.fixture(scope="module")
def base_install(wheel, tmp_path_factory) -> Path:
    return _install(tmp_path_factory.mktemp("base-install"), str(wheel))


@pytest.fixture(scope="module")
def server_install(wheel, tmp_path_factory) -> Path:
    return _install(tmp_path_factory.mktemp("server-install"), f"tritonasr[server] @ {wheel.as_uri()}")


def _importable(bin_dir: Path, modules: tuple[str, ...]) -> list[str]:
    found = subprocess.run([str(bin_dir / "python"), "-c", "import importlib.util, json; "
                            f"print(json.dumps([m for m in {modules!r} if importlib.util.find_spec(m)]))"],
                           capture_output=True, text=True, check=True, cwd=bin_dir)
    return json.loads(found.stdout)


def _outside_env(**changes: str) -> dict[str, str]:
    """This environment without the checkout's virtualenv in it."""
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, **changes}


def _tritonasr(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / "tritonasr"), *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=_outside_env())


def test_the_base_install_has_none_of_the_roles_dependencies(base_install):
    assert _importable(base_install, EXPORT_MODULES + SERVER_MODULES) == []


def test_the_installed_package_finds_its_files_outside_the_checkout(base_install, tmp_path):
    script = """if True:
        import json
        from tritonasr import paths
        from tritonasr.loadtest import workload
        from tritonasr.serving import dashboard
        print(json.dumps({
            "in_checkout": paths.in_checkout(),
            "templates": sorted(p.name for p in paths.model_templates().iterdir()),
            "sample": paths.sample_audio().is_file(),
            "speech": sorted(str(p.relative_to(paths.speech_dir())) for p in paths.speech_dir().rglob("*.wav")),
            "workload": [round(workload.seconds(s), 2) for s in workload.speech()],
            "dashboard_metrics": len(dashboard.metric_names(dashboard.DASHBOARD)),
            "prometheus": (paths.deploy_files() / "prometheus" / "prometheus.yml").is_file(),
            "repository": str(paths.default_model_repository()),
        }))"""
    found = json.loads(subprocess.run(
        [str(base_install / "python"), "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path,
        env=_outside_env(XDG_DATA_HOME=str(tmp_path / "data"), TRITONASR_MODEL_REPOSITORY="")).stdout)
    assert found["in_checkout"] is False and found["sample"] and found["prometheus"]
    assert {"asr_offline", "asr_stream", "sensevoice", "vad", "speaker", "speaker_registry"} <= set(found["templates"])
    assert found["speech"] == sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*.wav"))
    assert len(found["workload"]) == len(list((DATA / "speakers").glob("*.wav"))) + 3 and min(found["workload"]) > 2
    assert found["dashboard_metrics"] > 10
    assert found["repository"] == str(tmp_path / "data" / "tritonasr" / "model_repository")
    help_text = _tritonasr(base_install, "serve", "--help", cwd=tmp_path).stdout
    assert "model_repository" in help_text and str(CHECKOUT) not in help_text


def test_the_server_install_serves_an_exported_repository(server_install, model_repository, client, tmp_path):
    """`tritonasr serve` of the server install, on the repository the session exported with the
    full install: the same segments as the session server."""
    assert _importable(server_install, EXPORT_MODULES + NOT_SERVED) == []
    grpc_port, http_port = free_port(), free_port()
    serve = subprocess.Popen([str(server_install / "tritonasr"), "serve", "--model-repository", str(model_repository),
                              "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                              "--metrics-port", str(free_port()), "--health-port", str(free_port()), "--quiet"],
                             cwd=tmp_path, env=_outside_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 300
        while not _ready(http_port):
            assert serve.poll() is None and time.monotonic() < deadline, serve.stderr.read() if serve.poll() else "not ready"
            time.sleep(1)
        from tritonasr.client.offline import OfflineClient

        path = DATA / "pause_1s.wav"
        with OfflineClient(f"localhost:{grpc_port}", timeout_s=120) as installed:
            assert installed.transcribe_file(path) == client.transcribe_file(path)
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=60)
    assert serve.returncode == 0


def _ready(http_port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2).status == 200
    except OSError:
        return False


def test_the_base_install_transcribes_like_the_full_install(base_install, server, client, tmp_path):
    path = DATA / "pause_1s.wav"
    result = _tritonasr(base_install, "transcribe", "--format", "json", "--url", server.grpc_url, str(path),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["segments"] == client.transcribe_file(path)["segments"]


@pytest.mark.parametrize("command, extra", [(["serve"], "server"), (["export", "vad"], "server"),
                                            (["bench", "offline", "--concurrency", "1"], "server"),
                                            (["loadtest", "report", "run"], "loadtest"),
                                            (["gateway"], "gateway")])
def test_a_role_command_says_which_extra_to_install(base_install, tmp_path, command, extra):
    result = _tritonasr(base_install, *command, cwd=tmp_path)
    assert result.returncode == EXIT_USAGE
    assert f"needs the {extra} extra: pip install 'tritonasr[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_and_an_unreachable_server_exit_differently(base_install, tmp_path):
    version = _tritonasr(base_install, "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("tritonasr ")
    usage = _tritonasr(base_install, "transcribe", "--language", "fr", str(DATA / "pause_1s.wav"), cwd=tmp_path)
    assert usage.returncode == EXIT_USAGE and "invalid choice: 'fr'" in usage.stderr
    unreachable = _tritonasr(base_install, "transcribe", "--url", "127.0.0.1:1", str(DATA / "pause_1s.wav"),
                             cwd=tmp_path)
    assert unreachable.returncode == EXIT_UNREACHABLE and "cannot reach the Triton server" in unreachable.stderr
