"""The client install, as an application would have it: the built wheel in a fresh virtualenv with
its base dependencies only, run outside the checkout, against the session's real tritonserver."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tritonasr.contract import EXIT_UNREACHABLE, EXIT_USAGE

from conftest import DATA

CHECKOUT = Path(__file__).resolve().parent.parent
# What only the server, export and load-test roles bring.
ROLE_MODULES = ("torch", "funasr", "nemo", "onnxruntime", "pytriton", "kaldi_native_fbank", "locust", "matplotlib")


@pytest.fixture(scope="module")
def base_install(tmp_path_factory) -> Path:
    """The bin/ directory of a virtualenv holding the wheel and its base dependencies."""
    root = tmp_path_factory.mktemp("base-install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(root / "dist"),
                    str(CHECKOUT)], check=True, cwd=root)
    venv.create(root / "venv", with_pip=True)
    bin_dir = root / "venv" / "bin"
    wheel = next((root / "dist").glob("tritonasr-*.whl"))
    subprocess.run([str(bin_dir / "pip"), "install", "--quiet", "--disable-pip-version-check", str(wheel)],
                   check=True, cwd=root)
    return bin_dir


def _tritonasr(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return subprocess.run([str(bin_dir / "tritonasr"), *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def test_the_base_install_has_none_of_the_roles_dependencies(base_install):
    found = subprocess.run([str(base_install / "python"), "-c", "import importlib.util, sys; "
                            f"print([m for m in {ROLE_MODULES!r} if importlib.util.find_spec(m)])"],
                           capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def test_the_base_install_transcribes_like_the_full_install(base_install, server, client, tmp_path):
    path = DATA / "pause_1s.wav"
    result = _tritonasr(base_install, "transcribe", "--format", "json", "--url", server.grpc_url, str(path),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["segments"] == client.transcribe_file(path)["segments"]


@pytest.mark.parametrize("command, extra", [(["serve"], "server"), (["export", "vad"], "server"),
                                            (["bench", "offline", "--concurrency", "1"], "server"),
                                            (["loadtest", "report", "run"], "loadtest")])
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
