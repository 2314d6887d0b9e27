"""The GPU deployment files: docker-compose.yml (checked with Debian's docker-compose 1.29, the
oldest Compose it must work with), the images of docker/ (one per role: serving, export, gateway,
load test), .dockerignore, docker/export.sh, Prometheus and Grafana provisioning, and the
dashboard's PromQL. No Docker engine or GPU is needed: `docker-compose config` validates and
resolves the file without one, and the Dockerfiles are read, not built."""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tritonasr.paths import CHECKOUT_ROOT
from tritonasr.repository.plans import TRTEXEC_LOCATIONS
from tritonasr.serving.dashboard import DASHBOARD, expression_metrics, expressions, metric_names

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's own copy
    from pip._vendor import tomli as tomllib

ROOT = CHECKOUT_ROOT
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER = ROOT / "docker"
SERVE_DOCKERFILE = DOCKER / "serve.Dockerfile"
EXPORT_DOCKERFILE = DOCKER / "export.Dockerfile"
LOADTEST_DOCKERFILE = DOCKER / "loadtest.Dockerfile"
GATEWAY_DOCKERFILE = DOCKER / "gateway.Dockerfile"
# The services that run our code: the Dockerfile of each one's image, and the extra it installs.
ROLES = {
    "triton": (SERVE_DOCKERFILE, "server"),
    "export": (EXPORT_DOCKERFILE, "export"),
    "gateway": (GATEWAY_DOCKERFILE, "gateway"),
    "locust-master": (LOADTEST_DOCKERFILE, "loadtest"),
    "locust-worker": (LOADTEST_DOCKERFILE, "loadtest"),
}
# What the other roles bring and the serving image must not: modules, and their distributions.
NOT_SERVED_MODULES = ("torch", "nemo", "funasr", "locust")
NOT_SERVED_DISTRIBUTIONS = {"torch", "nemo-toolkit", "funasr", "locust"}
# The gateway image neither: nor Triton (the server extra's nvidia-pytriton, a Triton base image's
# tritonserver on PATH).
NOT_GATEWAY_MODULES = (*NOT_SERVED_MODULES, "pytriton")
NOT_GATEWAY_PROGRAMS = ("tritonserver",)
NOT_GATEWAY_DISTRIBUTIONS = NOT_SERVED_DISTRIBUTIONS | {"nvidia-pytriton", "onnxruntime", "onnxruntime-gpu"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXPORT_SCRIPT = ROOT / "docker" / "export.sh"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "tritonasr.yml"
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"

# The variables docker-compose.yml reads; cleared so that the tests see the defaults.
_VARIABLE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)")
COMPOSE_VARIABLES = sorted(set(_VARIABLE.findall(COMPOSE_FILE.read_text())))
# The secrets the file insists on (no defaults): given to every `config` unless a test says otherwise.
REQUIRED = {"TRITONASR_API_KEY": "test-api-key", "GRAFANA_ADMIN_PASSWORD": "test-grafana-password"}
MAKE_CERTS = ROOT / "deploy" / "tls" / "make-certs.sh"

EXPECTED_METRICS = {
    "nv_inference_request_success", "nv_inference_pending_request_count",
    "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_count", "nv_inference_exec_count",
    "nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes",
    "tritonasr_open_streams", "tritonasr_segments_total", "tritonasr_audio_seconds_total",
    "tritonasr_final_latency_seconds_bucket", "tritonasr_errors_total", "tritonasr_rejected_total",
    "tritonasr_requests_total", "tritonasr_max_streams", "tritonasr_inflight_requests",
    "tritonasr_max_inflight_requests",
}


# --- docker-compose --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose_bin() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail("docker-compose is not on PATH: these tests validate docker-compose.yml with it. "
                    "Install Debian's package (1.29; the Docker engine is not needed): "
                    "`apt-get install -y --no-install-recommends docker-compose` "
                    "(scripts/test.sh does this when run as root)")
    return path


def compose(compose_bin: str, *args: str, env: dict[str, str] | None = None, required: dict = REQUIRED,
            ok: bool = True) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES}
    environment.update({**required, **(env or {})})
    result = subprocess.run(
        [compose_bin, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
    assert (result.returncode == 0) == ok, f"docker-compose {' '.join(args)}: {result.returncode}\n{result.stderr}"
    return result.stdout if ok else result.stderr


@pytest.fixture(scope="module")
def resolved(compose_bin) -> dict:
    """`docker-compose config`: the file validated, variables replaced by their defaults."""
    return yaml.safe_load(compose(compose_bin, "config"))


@pytest.fixture(scope="module")
def services(resolved) -> dict:
    return resolved["services"]


def _bytes(size) -> int:
    if isinstance(size, int):
        return size
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", str(size).strip().lower()).groups()
    return int(float(number) * 1024 ** " kmg".index(unit or " "))


def _gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def _ports(service: dict) -> list[tuple[str | None, int, int]]:
    """(host address, published, target) of each port; `config` prints "IP:PUB:TARGET/tcp" for
    ports bound to an address, a mapping otherwise."""
    ports = []
    for port in service["ports"]:
        if isinstance(port, str):
            host, published, target = port.split("/")[0].rsplit(":", 2)
            ports.append((host, int(published), int(target)))
        else:
            ports.append((port.get("host_ip"), int(port["published"]), int(port["target"])))
    return ports


def _mounts(service: dict) -> dict[str, str]:
    """{container path: source} of the service's volumes (short syntax, as `config` prints them)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


def _seconds(duration: str) -> int:
    """A Compose duration ("2m30s") in seconds."""
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in re.findall(r"(\d+)([hms])", duration))


def test_services(services):
    assert set(services) == {"export", "triton", "gateway", "prometheus", "grafana", "locust-master",
                             "locust-worker"}


# --- the images: one Dockerfile per role -----------------------------------------------------

def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile as Docker reads it: continuation lines joined,
    comment lines dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not pending and not line.strip()):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path}: a continuation line ends the file"
    return instructions


def _stages(path: Path) -> tuple[dict[str, str], list[dict]]:
    """The ARG defaults given before the first FROM, and the stages: each one's base (its ARGs
    resolved), name, ARG defaults and instructions."""
    global_args, stages = {}, []
    for keyword, rest in _instructions(path):
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, f"{path}: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], match[1])
            stages.append({"from": match[1], "base": base, "name": match[2], "args": {}, "instructions": []})
        elif keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            if keyword == "ARG":
                name, _, default = rest.partition("=")
                stages[-1]["args"][name] = default
            stages[-1]["instructions"].append((keyword, rest))
    return global_args, stages


def _final(path: Path) -> dict:
    return _stages(path)[1][-1]


def _all(stage: dict, keyword: str) -> list[str]:
    return [rest for kw, rest in stage["instructions"] if kw == keyword]


def _env(stage: dict) -> dict[str, str]:
    return dict(token.split("=", 1) for rest in _all(stage, "ENV") for token in shlex.split(rest))


def _commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at unquoted &&, ||, ; and |), each as its words."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def _pip_installs(stage: dict) -> list[str]:
    """What the stage's `pip install` commands install, its ARGs resolved."""
    wanted = []
    for run in _all(stage, "RUN"):
        for words in _commands(run):
            if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                start = words.index("install") + 1
                wanted += [re.sub(r"\$\{(\w+)\}", lambda m: stage["args"][m[1]], word)
                           for word in words[start:] if not word.startswith("-")]
    return wanted


# The role's extra of the wheel the builder stage made: `pip install "$(ls WHEEL)[extra]"`.
_WHEEL_INSTALL = re.compile(r"\$\(ls /tmp/wheels/tritonasr-\*\.whl\)\[([\w,]+)\]")


def _extras(extra: str) -> set[str]:
    """The distributions an extra of pyproject.toml names, its `tritonasr[...]` extras expanded."""
    names = set()
    for requirement in PYPROJECT["project"]["optional-dependencies"][extra]:
        name, rest = re.match(r"([A-Za-z0-9_.-]+)(.*)", requirement).groups()
        if name == "tritonasr":
            for inner in re.match(r"\[([^\]]+)\]", rest)[1].split(","):
                names |= _extras(inner.strip())
        else:
            names.add(re.sub(r"[-_.]+", "-", name).lower())
    return names


def test_each_service_runs_its_roles_image(services):
    images = {name: services[name]["image"] for name in ROLES}
    # One image per role, named for it; the workers run the master's.
    assert re.fullmatch(r"tritonasr-serve:\S+", images["triton"]), images
    assert re.fullmatch(r"tritonasr-export:\S+", images["export"]), images
    assert re.fullmatch(r"tritonasr-gateway:\S+", images["gateway"]), images
    assert re.fullmatch(r"tritonasr-loadtest:\S+", images["locust-master"]), images
    assert images["locust-worker"] == images["locust-master"]
    assert len({images["triton"], images["export"], images["gateway"], images["locust-master"]}) == 4, images
    built = {}
    for name, (dockerfile, _) in ROLES.items():
        if name == "locust-worker":
            assert "build" not in services[name], "the workers run the image the master builds"
            continue
        build = services[name]["build"]
        assert Path(build["context"]) == ROOT
        assert Path(build["context"], build["dockerfile"]) == dockerfile, name
        built[dockerfile] = name
    # Every Dockerfile in docker/ is an image some service builds: no stale one left behind.
    assert set(DOCKER.glob("*Dockerfile*")) == set(built), sorted(DOCKER.glob("*Dockerfile*"))


def test_triton_images_share_the_pinned_base(services):
    # The server and the export job: the same Triton container, so that the TensorRT plans the
    # export job builds run on the TensorRT that serves them.
    defaults = set()
    for name in ("triton", "export"):
        dockerfile, _ = ROLES[name]
        global_args, stages = _stages(dockerfile)
        assert stages[-1]["from"] == "${TRITON_IMAGE}", dockerfile
        assert services[name]["build"]["args"]["TRITON_IMAGE"] == global_args["TRITON_IMAGE"], name
        defaults.add(global_args["TRITON_IMAGE"])
    [image] = defaults
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", image)
    assert match, f"not a pinned NGC tritonserver release: {image}"
    # Older servers crash on cancelled decoupled streams (triton-inference-server/server#7368).
    assert (int(match[1]), int(match[2])) >= (24, 12), image


@pytest.mark.parametrize("dockerfile, extra", sorted(set(ROLES.values())), ids=lambda v: getattr(v, "name", v))
def test_image_installs_the_built_wheel(dockerfile, extra):
    _, stages = _stages(dockerfile)
    builder, final = stages[0], stages[-1]
    assert len(stages) == 2 and builder["name"], f"{dockerfile}: a named wheel-building stage, then the image"
    # The builder: the project's wheel from the build context, without its dependencies.
    assert _all(builder, "COPY") == [". /src"]
    assert _all(builder, "RUN") == ["pip wheel --no-deps --wheel-dir /wheels /src"]
    assert re.fullmatch(r"python:3\.1[0-3]-slim", builder["base"]), builder["base"]
    # The image: that wheel with the role's extra; no checkout, nothing editable.
    assert f"--from={builder['name']} /wheels /tmp/wheels" in _all(final, "COPY")
    assert not any(re.match(r"\.\s", rest) for rest in _all(final, "COPY")), "the checkout is copied in"
    installs = _pip_installs(final)
    assert [m[1] for m in map(_WHEEL_INSTALL.fullmatch, installs) if m] == [extra], installs
    assert extra in PYPROJECT["project"]["optional-dependencies"]
    for run in _all(final, "RUN"):
        for words in _commands(run):
            assert not {"-e", "--editable"} & set(words), run
    assert not any(i in (".", "/src") or i.startswith("/opt/tritonasr") for i in installs), installs


def test_builder_stage_is_the_same_everywhere():
    builders = {path.name: _stages(path)[1][0] for path, _ in set(ROLES.values())}
    assert len({json.dumps(b, sort_keys=True) for b in builders.values()}) == 1, builders


@pytest.mark.parametrize("dockerfile", [SERVE_DOCKERFILE, EXPORT_DOCKERFILE], ids=lambda p: p.name)
def test_gpu_onnxruntime_replaces_the_cpu_build(dockerfile):
    final = _final(dockerfile)
    installs = _pip_installs(final)
    assert any(re.fullmatch(r"onnxruntime-gpu==\d+\.\d+\.\d+", i) for i in installs), installs
    runs = " && ".join(_all(final, "RUN"))
    assert re.search(r"pip uninstall -y onnxruntime\b", runs)
    # The CPU build goes first: both install the same module.
    assert runs.index("pip uninstall -y onnxruntime") < runs.index('pip install "${ONNXRUNTIME_GPU}"')


def _import_check(dockerfile: Path = SERVE_DOCKERFILE, modules: tuple[str, ...] = NOT_SERVED_MODULES) -> str:
    """The Python code of an image's build-time check that the other roles' packages (`modules`)
    are not there."""
    checks = []
    for run in _all(_final(dockerfile), "RUN"):
        for words in _commands(run):
            if words[:2] == ["python3", "-c"] and all(m in words[2] for m in modules):
                checks.append(words[2])
    assert len(checks) == 1, checks
    return checks[0]


def test_serving_image_has_no_other_roles_packages():
    final = _final(SERVE_DOCKERFILE)
    installs = _pip_installs(final)
    [extra] = [m[1] for m in map(_WHEEL_INSTALL.fullmatch, installs) if m]
    assert set(extra.split(",")) == {"server"}
    # Neither the extra nor anything else the image installs brings them.
    assert not _extras("server") & NOT_SERVED_DISTRIBUTIONS, _extras("server") & NOT_SERVED_DISTRIBUTIONS
    named = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]*", i)[0]).lower() for i in installs}
    assert not named & NOT_SERVED_DISTRIBUTIONS, installs
    # The import check runs after the last install, so nothing slips in behind it.
    runs = _all(final, "RUN")
    check = next(i for i, run in enumerate(runs) if all(m in run for m in NOT_SERVED_MODULES))
    last_install = max(i for i, run in enumerate(runs) if "pip install" in run)
    assert check > last_install


def _run_check(code: str, tmp_path: Path, *modules: str, programs: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The check in a Python that sees no site-packages, only stand-ins for `modules`, and a PATH
    with only stand-ins for `programs`."""
    path = tmp_path / "-".join((*modules, *programs) or ("none",))
    path.mkdir()
    for module in modules:
        (path / module).mkdir()
        (path / module / "__init__.py").write_text("")
    (path / "bin").mkdir()
    for program in programs:
        (path / "bin" / program).write_text("#!/bin/sh\n")
        (path / "bin" / program).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([sys.executable, "-S", "-c", code],
                          env={**env, "PYTHONPATH": str(path), "PATH": str(path / "bin")},
                          capture_output=True, text=True, timeout=60)


def test_serving_import_check_fails_the_build_on_each_package(tmp_path):
    code = _import_check()
    clean = _run_check(code, tmp_path)
    assert clean.returncode == 0, clean.stderr
    for module in NOT_SERVED_MODULES:
        found = _run_check(code, tmp_path, module)
        assert found.returncode != 0 and module in found.stderr, (module, found.returncode, found.stderr)


def test_gateway_image_is_slim_python_without_other_roles(services, monkeypatch):
    from tritonasr.cli import build_parser
    from tritonasr.gateway.cli import UsageError, settings_from

    global_args, stages = _stages(GATEWAY_DOCKERFILE)
    final = stages[-1]
    assert re.fullmatch(r"python:3\.1[0-3]-slim", final["base"]), final["base"]
    installs = _pip_installs(final)
    [extra] = [m[1] for m in map(_WHEEL_INSTALL.fullmatch, installs) if m]
    assert extra == "gateway"
    base = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", r)[0]).lower()
            for r in PYPROJECT["project"]["dependencies"]}
    assert not (_extras("gateway") | base) & NOT_GATEWAY_DISTRIBUTIONS
    # The audio decoder: PyAV, whose wheels carry FFmpeg's libraries; no Debian ffmpeg (apt brings
    # tini alone), and the build checks the gateway imports and PyAV decodes AAC and Opus.
    audio = (ROOT / "tritonasr" / "audio.py").read_text()
    assert "av" in base and "import av" in audio and "subprocess" not in audio
    apt = [words for run in _all(final, "RUN") for words in _commands(run) if words[:2] == ["apt-get", "install"]]
    assert [[w for w in words[2:] if not w.startswith("-")] for words in apt] == [["tini"]]
    runs = _all(final, "RUN")
    [decoders] = [run for run in runs if "av.codec.Codec" in run]
    assert "import tritonasr.gateway.app" in decoders and "'aac'" in decoders and "'opus'" in decoders
    # The check that other roles' packages are absent runs after the last install.
    check = next(i for i, run in enumerate(runs) if all(m in run for m in NOT_GATEWAY_MODULES))
    assert check > max(i for i, run in enumerate(runs) if "pip install" in run)
    # Not root, tini as PID 1; its command is one the gateway takes, on every address, and so
    # it refuses to start without the callers' keys ($TRITONASR_API_KEY).
    [user] = _all(final, "USER")
    assert re.fullmatch(r"\d+:\d+", user) and not user.startswith("0:"), user
    assert json.loads(_all(final, "ENTRYPOINT")[-1]) == ["tini", "--"]
    command = json.loads(_all(final, "CMD")[-1])
    assert command[:2] == ["tritonasr", "gateway"]
    args = build_parser().parse_args(command[1:])
    assert args.host == "0.0.0.0" and str(args.port) in " ".join(_all(final, "EXPOSE")).split()
    monkeypatch.delenv("TRITONASR_API_KEY", raising=False)
    with pytest.raises(UsageError, match="--api-key"):
        settings_from(args)
    monkeypatch.setenv("TRITONASR_API_KEY", "k")
    assert settings_from(args).api_keys == ("k",)
    # The SQLite jobs database's directory is the image user's (compose mounts its volume there).
    jobs_dir = str(Path(args.jobs_db).parent)
    assert any(jobs_dir in run and "chown tritonasr:tritonasr" in run for run in runs)
    assert f"--uid {user.split(':')[0]} " in " ".join(runs)


def test_gateway_image_check_fails_the_build_on_each_package(tmp_path):
    code = _import_check(GATEWAY_DOCKERFILE, NOT_GATEWAY_MODULES)
    clean = _run_check(code, tmp_path)
    assert clean.returncode == 0, clean.stderr
    for module in NOT_GATEWAY_MODULES:
        found = _run_check(code, tmp_path, module)
        assert found.returncode != 0 and module in found.stderr, (module, found.returncode, found.stderr)
    for program in NOT_GATEWAY_PROGRAMS:
        found = _run_check(code, tmp_path, programs=(program,))
        assert found.returncode != 0 and program in found.stderr, (program, found.returncode, found.stderr)


def test_export_image_has_trtexec_and_cuda_torch(services):
    final = _final(EXPORT_DOCKERFILE)
    # trtexec (`tritonasr repo plans`) on PATH, where the NGC images keep it; checked at build time.
    path = _env(final)["PATH"].split(":")
    assert path[0] == "${PATH}"
    assert any(str(Path(location).parent) in path for location in TRTEXEC_LOCATIONS), path
    runs = _all(final, "RUN")
    assert "command -v trtexec" in runs
    # torch's CUDA build, pinned by the export extra; the build fails on a CPU-only torch.
    export_requirements = PYPROJECT["project"]["optional-dependencies"]["export"]
    assert any(re.fullmatch(r"torch==\d+\.\d+\.\d+", r) for r in export_requirements), export_requirements
    assert {"torch", "nemo-toolkit", "funasr"} <= _extras("export")
    assert any("torch.version.cuda is None" in run for run in runs)
    # The job's script is in the image where the compose file runs it, and is its default command.
    command = services["export"]["command"]
    assert f"docker/export.sh {command[-1]}" in _all(final, "COPY")
    assert json.loads(_all(final, "CMD")[0]) == command
    assert {"/exports", "/models"} <= set(" ".join(r for r in runs if r.startswith("mkdir")).split())


def test_loadtest_image_is_slim_python(services):
    global_args, stages = _stages(LOADTEST_DOCKERFILE)
    final = stages[-1]
    assert "tritonserver" not in final["base"] and "nvcr.io" not in final["base"], final["base"]
    assert re.fullmatch(r"python:3\.1[0-3]-slim", final["base"]), final["base"]
    assert {"locust"} <= _extras("loadtest") and not {"torch", "nemo-toolkit"} & _extras("loadtest")
    # The locustfile the services run is the package's own, linked at a fixed path; the build
    # lists its users, so an image that cannot import it is not built.
    [locustfile] = {re.search(r"locust -f (\S+)", services[name]["command"])[1]
                    for name in ("locust-master", "locust-worker")}
    [link] = [run for run in _all(final, "RUN") if "ln -s" in run]
    assert f" {locustfile} " in f"{link} " and f"locust -f {locustfile} --list" in link
    [finder] = re.findall(r"\$\(python -c '([^']+)'\)", link)
    found = subprocess.run([sys.executable, "-c", finder], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0 and Path(found.stdout.strip()) == LOCUSTFILE, found.stdout + found.stderr


# --- the build context (.dockerignore) -------------------------------------------------------

def _docker_py() -> str:
    """The Python that runs docker-compose 1.29, with its docker-py (which applies .dockerignore
    when Compose builds)."""
    compose_path = shutil.which("docker-compose")
    if compose_path is None:
        pytest.fail("docker-compose is not on PATH (see compose_bin)")
    first = Path(compose_path).read_bytes()[:200].split(b"\n")[0].decode(errors="replace")
    if not (first.startswith("#!") and "python" in first):
        pytest.skip(f"{compose_path} is not the Python docker-compose 1.29 (no docker-py to ask)")
    return first[2:].strip().split()[0]


_CONTEXT = """
import json, os, sys
from docker.utils.build import exclude_paths
root, dockerfile = sys.argv[1:]
with open(os.path.join(root, ".dockerignore")) as f:
    patterns = [line.strip() for line in f.read().splitlines() if line.strip() and line.strip()[0] != "#"]
print(json.dumps(sorted(exclude_paths(root, patterns, dockerfile=dockerfile))))
"""


def _context(root: Path, dockerfile: str = "docker/serve.Dockerfile") -> set[str]:
    """The paths under `root` that `docker-compose build` sends as the build context."""
    result = subprocess.run([_docker_py(), "-c", _CONTEXT, str(root), dockerfile],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout))


def _package_dirs() -> list[str]:
    return sorted(set(PYPROJECT["tool"]["setuptools"]["package-dir"].values()))


def test_build_context_is_the_wheels_sources(tmp_path):
    wanted = ["pyproject.toml", PYPROJECT["project"]["readme"], "docker/export.sh"]
    for directory in _package_dirs():
        wanted += [f"{directory}/__init__.py", f"{directory}/sub/data.json"]
    unwanted = [".git/HEAD", ".venv/bin/python", "model_repository/vad/1/model.onnx", ".cache/x.bin",
                "loadtest-results/run_stats.csv", "tests/test_x.py", "build/lib/x.py", "samples/a.wav",
                "tritonasr.egg-info/PKG-INFO", "tritonasr/__pycache__/cli.cpython-312.pyc",
                "deploy/tls/ca.key", "deploy/tls/server.key", "deploy/tls/server.crt", "deploy/tls/ca.crt"]
    for name in wanted + unwanted:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    shutil.copy(ROOT / ".dockerignore", tmp_path / ".dockerignore")
    context = _context(tmp_path)
    assert not [name for name in wanted if name not in context]
    assert not [name for name in unwanted if name in context]


def test_build_context_of_the_checkout():
    context = _context(ROOT)
    for directory in _package_dirs():
        tracked = subprocess.run(["git", "ls-files", "--", directory], cwd=ROOT, capture_output=True,
                                 text=True).stdout.split()
        missing = [name for name in tracked if (ROOT / name).exists() and name not in context]
        assert not missing, missing
    copied = {rest.split()[0] for path, _ in set(ROLES.values()) for rest in _all(_final(path), "COPY")
              if not rest.startswith("--from")}
    assert copied and copied <= context, copied - context
    assert not [name for name in context if name.endswith((".key", ".crt")) or name.startswith(".venv/")]


# --- the services -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["triton", "export"])
def test_gpu_reserved(services, name):
    devices = _gpu_devices(services[name])
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert services[name]["ulimits"] == {"memlock": -1, "stack": 67108864}


def test_triton_service(services):
    from tritonasr.cli import build_parser

    triton = services["triton"]
    command = triton["command"]
    assert command[:2] == ["tritonasr", "serve"]
    # The command parses as `tritonasr serve` takes it, and says what a secure server needs.
    args = build_parser().parse_args(command[1:])
    assert args.model_repository == Path("/models") and args.model_control == "none"
    assert args.host == "0.0.0.0" and args.http_host == "127.0.0.1" and args.metrics_host == "0.0.0.0"
    assert (args.tls_cert, args.tls_key) == (Path("/tls/server.crt"), Path("/tls/server.key"))
    assert not args.allow_unauthenticated and not args.open_leaf_models
    assert args.health_port == 8003
    assert {"--allow-gpu-metrics=true", "--metrics-interval-ms=1000"} <= set(args.triton_arg)
    # The image runs its own tritonserver (native backends), named once, in its Dockerfile, and
    # serves /models by default; it publishes gRPC and the supervisor's health.
    image = _final(SERVE_DOCKERFILE)
    env = _env(image)
    assert env["TRITONASR_TRITONSERVER"] == "/opt/tritonserver/bin/tritonserver"
    assert env["TRITONASR_BACKEND_DIRECTORY"] == "/opt/tritonserver/backends"
    assert env["TRITONASR_MODEL_REPOSITORY"] == "/models"
    assert {"8001", str(args.health_port)} <= set(" ".join(_all(image, "EXPOSE")).split())
    assert json.loads(_all(image, "CMD")[-1]) == ["tritonasr", "serve"]
    made = " ".join(run for run in _all(image, "RUN") if run.startswith("mkdir")).split()
    assert {"/models", "/cache/trt"} <= set(made)
    assert triton["environment"]["TRITONASR_API_KEY"] == REQUIRED["TRITONASR_API_KEY"]
    assert triton["init"] is True
    # `stop` gives serve time to drain its open streams (SIGTERM reaches it through the init).
    grace = _seconds(triton["stop_grace_period"])
    assert grace > args.drain_seconds, triton["stop_grace_period"]
    assert _bytes(triton["shm_size"]) >= 1024 ** 3, triton["shm_size"]
    # Only gRPC leaves the host: HTTP (plain text) stays in the container, metrics on the network.
    assert {target for _, _, target in _ports(triton)} == {8001}
    health = triton["healthcheck"]
    assert health["test"][0] == "CMD" and "http://localhost:8003/health/ready" in health["test"]
    assert "start_period" in health
    assert triton["depends_on"] == {"export": {"condition": "service_completed_successfully"}}
    mounts = _mounts(triton)
    assert mounts["/models"] == "models" and mounts["/cache/trt"] == "trt-cache"
    assert Path(mounts["/tls"]) == MAKE_CERTS.parent


def test_gateway_service(services, resolved, make_certs, tmp_path, monkeypatch):
    from tritonasr.cli import build_parser
    from tritonasr.gateway.cli import settings_from
    from tritonasr.gateway.jobs.store import engine_url

    gateway = services["gateway"]
    command = gateway["command"]
    assert command[:2] == ["tritonasr", "gateway"]
    args = build_parser().parse_args(command[1:])
    mounts = _mounts(gateway)
    assert Path(mounts["/tls"]) == MAKE_CERTS.parent
    # triton over TLS, by the name make-certs.sh's certificate gives it, checked against its CA.
    assert args.url == "triton:8001" and "DNS:triton" in MAKE_CERTS.read_text()
    assert str(args.triton_tls_ca) == "/tls/ca.crt"
    # HTTPS with the server's certificate, on every address: the callers' keys are required.
    assert (str(args.tls_cert), str(args.tls_key)) == ("/tls/server.crt", "/tls/server.key")
    assert args.host == "0.0.0.0" and not args.allow_unauthenticated and args.api_key is None
    assert gateway["environment"]["TRITONASR_API_KEY"] == REQUIRED["TRITONASR_API_KEY"]
    # What the gateway makes of it, make-certs.sh's files where the volume puts them.
    tls = make_certs(tmp_path / "tls")
    for variable in ("TRITONASR_TLS_CA", "TRITONASR_TLS_CERT", "TRITONASR_TLS_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("TRITONASR_API_KEY", gateway["environment"]["TRITONASR_API_KEY"])
    settings = settings_from(build_parser().parse_args([a.replace("=/tls/", f"={tls}/") for a in command[1:]]))
    assert settings.triton_tls.tls_ca == tls / "ca.crt" and settings.triton_tls.api_key is None
    assert settings.api_keys == (REQUIRED["TRITONASR_API_KEY"],)
    # One gateway: its jobs in SQLite on a named volume.
    assert engine_url(args.jobs_db).drivername == "sqlite"
    assert mounts[str(Path(args.jobs_db).parent)] == "gateway-jobs" and "gateway-jobs" in resolved["volumes"]
    # Published beyond this host (TLS and keys), on its own port; the root filesystem read-only.
    assert {(host, target) for host, _, target in _ports(gateway)} == {(None, args.port)}
    # Its metrics on every address of the container, for prometheus in the compose network, and
    # not published: a port apart from the callers'.
    assert args.metrics_host == "0.0.0.0" and args.metrics_port not in (0, args.port)
    assert gateway["read_only"] is True and gateway["tmpfs"] == ["/tmp"]
    assert gateway["cap_drop"] == ["ALL"] and "no-new-privileges:true" in gateway["security_opt"]
    assert gateway["depends_on"] == {"triton": {"condition": "service_healthy"}}
    assert "init" not in gateway  # the image's tini
    assert _seconds(gateway["stop_grace_period"]) > args.drain_seconds  # the drain, then stop

    # The healthcheck: the gateway's own port and scheme, a path the real application answers
    # without a key. Its command runs here against that application served with make-certs.sh's
    # certificate: healthy while it serves, not once it stopped.
    health = gateway["healthcheck"]
    assert health["test"][:3] == ["CMD", "python3", "-c"]
    scheme, port, path = re.search(r"(https?)://localhost:(\d+)(/[^'\"]*)", health["test"][3]).groups()
    assert int(port) == args.port and scheme == ("https" if args.tls_cert else "http")
    import uvicorn

    from tritonasr.gateway.app import create_app

    app = create_app(dataclasses.replace(settings, jobs_db=str(tmp_path / "jobs.db")))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free, lifespan="off", log_level="warning",
                                           ssl_certfile=str(tls / "server.crt"), ssl_keyfile=str(tls / "server.key")))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    check = [sys.executable, "-c", health["test"][3].replace(f"localhost:{port}", f"localhost:{free}")]
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        healthy = subprocess.run(check, capture_output=True, text=True, timeout=30)
        assert healthy.returncode == 0, healthy.stderr
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert subprocess.run(check, capture_output=True, text=True, timeout=30).returncode != 0


def test_secrets_have_no_defaults(compose_bin):
    for missing in REQUIRED:
        given = {name: value for name, value in REQUIRED.items() if name != missing}
        assert missing in compose(compose_bin, "config", required=given, ok=False)


def test_make_certs_names_the_service_and_verifies(tmp_path):
    result = subprocess.run(["bash", str(MAKE_CERTS), "asr.example.com", "10.1.2.3"], env={**os.environ,
                            "TLS_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.crt")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    names = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "server.crt"), "-noout", "-ext",
                            "subjectAltName"], capture_output=True, text=True).stdout
    for name in ("DNS:triton", "DNS:localhost", "IP Address:127.0.0.1", "DNS:asr.example.com",
                 "IP Address:10.1.2.3"):
        assert name in names
    for key in ("ca.key", "server.key"):
        assert (tmp_path / key).stat().st_mode & 0o077 == 0, f"{key} is readable by others"
    # It never overwrites a server's certificate.
    again = subprocess.run(["bash", str(MAKE_CERTS)], env={**os.environ, "TLS_DIR": str(tmp_path)},
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "delete them" in again.stderr


def test_export_service(services, resolved):
    export = services["export"]
    assert export["command"] == ["bash", "/opt/tritonasr/export.sh"]  # in the image: test_export_image_*
    assert EXPORT_SCRIPT.exists() and os.access(EXPORT_SCRIPT, os.X_OK)
    mounts = _mounts(export)
    assert mounts["/exports"] == "exports" and mounts["/models"] == "models"
    assert export["environment"]["TARGET"] == "gpu-tensorrt"
    assert export["environment"]["ASR_ENGINES"] == "sensevoice,parakeet"
    assert {"exports", "models", "trt-cache"} <= set(resolved["volumes"])
    # The script's own defaults are the compose file's.
    defaults = dict(re.findall(r"^([A-Z_]+)=\$\{\1:-([^}]*)\}", EXPORT_SCRIPT.read_text(), re.MULTILINE))
    assert len(defaults) >= 10
    for name, default in defaults.items():
        assert export["environment"][name] == default, name


def test_environment_overrides(compose_bin):
    services = yaml.safe_load(compose(compose_bin, "config", env={
        "TARGET": "gpu-onnxruntime", "INSTANCES": "4", "TRITON_GRPC_PORT": "9001",
        "GATEWAY_PORT": "9443"}))["services"]
    assert {(published, target) for _, published, target in _ports(services["gateway"])} == {(9443, 8443)}
    assert services["export"]["environment"]["TARGET"] == "gpu-onnxruntime"
    assert services["export"]["environment"]["INSTANCES"] == "4"
    assert {(published, target) for _, published, target in _ports(services["triton"])} >= {(9001, 8001)}


def test_prometheus_scrapes_triton(services):
    prometheus = services["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    assert Path(_mounts(prometheus)["/etc/prometheus/prometheus.yml"]) == PROMETHEUS
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == [ALERTS.name]  # relative to the config: mounted beside it
    assert Path(_mounts(prometheus)[f"/etc/prometheus/{ALERTS.name}"]) == ALERTS
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "triton"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == ["triton:8002"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"


def test_prometheus_scrapes_the_gateway(services):
    """The gateway's own metrics (tritonasr_gateway_*), from its metrics port in the compose network."""
    from tritonasr.cli import build_parser

    args = build_parser().parse_args(services["gateway"]["command"][1:])
    config = yaml.safe_load(PROMETHEUS.read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "gateway"]
    assert [t for group in job["static_configs"] for t in group["targets"]] == [f"gateway:{args.metrics_port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [triton] = [j for j in config["scrape_configs"] if j["job_name"] == "triton"]
    assert job["relabel_configs"] == triton["relabel_configs"]  # `pod`, as on Kubernetes


def test_grafana_provisioning(services):
    grafana = services["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["environment"]["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == REQUIRED["GRAFANA_ADMIN_PASSWORD"]
    assert {target for _, _, target in _ports(grafana)} == {3000}
    mounts = {target: Path(source) for target, source in _mounts(grafana).items() if source.startswith("/")}
    assert mounts["/etc/grafana/provisioning/datasources"] == DATASOURCES.parent
    assert mounts["/etc/grafana/provisioning/dashboards"] == DASHBOARD_PROVIDERS.parent
    # The provider loads the directory the dashboards are mounted at.
    [provider] = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    dashboards_at = provider["options"]["path"]
    assert mounts[dashboards_at] == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_at}/{DASHBOARD.name}"
    # The datasource points at the prometheus service.
    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"


def _user_classes() -> set[str]:
    """The locustfile's concrete users, read without importing it (it patches gevent)."""
    tree = ast.parse(LOCUSTFILE.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.ClassDef) and node.name.endswith("User")}


def test_loadtest_services(services):
    master, worker = services["locust-master"], services["locust-worker"]
    for service in (master, worker):
        assert service["profiles"] == ["loadtest"]
        # The load-test image links the package's locustfile there (test_loadtest_image_*).
        assert "locust -f /opt/tritonasr/locustfile.py" in service["command"]
    assert "--master" in master["command"].split()
    assert "--host triton:8001" in master["command"]
    assert "--metrics-url http://triton:8002/metrics" in master["command"]
    assert {target for _, _, target in _ports(master)} == {8089}
    # Services without authentication of their own listen on this host only.
    for service in (master, services["prometheus"]):
        assert {host for host, _, _ in _ports(service)} == {"127.0.0.1"}, service["ports"]
    for service in (master, worker):
        assert service["environment"]["TRITONASR_TLS_CA"] == "/tls/ca.crt"
        assert service["environment"]["TRITONASR_API_KEY"] == REQUIRED["TRITONASR_API_KEY"]
    assert "--worker --master-host locust-master" in worker["command"]
    assert master["depends_on"]["triton"]["condition"] == "service_healthy"
    users = master["environment"]["LOCUST_USER_CLASSES"].split()
    assert users and set(users) <= _user_classes() & {"TritonOfflineUser", "TritonStreamUser"}


def test_loadtest_profile(compose_bin, services):
    with_profile = compose(compose_bin, "--profile", "loadtest", "config", "--services").split()
    assert {"locust-master", "locust-worker"} <= set(with_profile)
    assert compose(compose_bin, "config", "--profiles").split() == ["loadtest"]
    # Compose 1.29's `config --services` lists every service whatever the profiles (v2 filters);
    # `up` starts the services with no profile, and those of the profiles it is given.
    in_profiles = {name for name, service in services.items() if service.get("profiles")}
    assert in_profiles == {"locust-master", "locust-worker"}


# --- docker/export.sh, with a stand-in `tritonasr` ------------------------------------------

STUB = """#!/usr/bin/env bash
# Records its arguments; `export MODEL` writes the meta.json files a real export writes.
echo "$*" >> "$STUB_LOG"
if [ "$1 $2" = "repo check" ] && [ -n "${STUB_CHECK_FAILS:-}" ]; then exit 1; fi
if [ "$1" = export ]; then
    repo="${@: -1}"
    case "$2" in
        parakeet) dirs="parakeet_encoder parakeet_decoder" ;;
        *) dirs="$2" ;;
    esac
    for d in $dirs; do mkdir -p "$repo/$d/1" && echo '{}' > "$repo/$d/1/meta.json"; done
fi
"""


@pytest.fixture()
def export_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "tritonasr"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(tmp_path / "calls.log"),
               EXPORTS_DIR=str(tmp_path / "exports"), MODELS_DIR=str(tmp_path / "models"))
    return tmp_path, env


def _run_export(tmp_path: Path, env: dict, **overrides) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    result = subprocess.run(["bash", str(EXPORT_SCRIPT)], env={**env, **overrides},
                            capture_output=True, text=True, timeout=60)
    return result, (log.read_text().splitlines() if log.exists() else [])


def test_export_script_runs_the_steps_and_caches_exports(export_env):
    tmp_path, env = export_env
    exports, models = env["EXPORTS_DIR"], env["MODELS_DIR"]
    result, calls = _run_export(tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert calls == [
        f"export vad --model-repository {exports}",
        f"export sensevoice --model iic/SenseVoiceSmall --model-repository {exports}",
        f"export parakeet --model nvidia/parakeet-tdt-0.6b-v2 --model-repository {exports}",
        f"export speaker --model iic/speech_eres2netv2w24s4ep4_sv_zh-cn_16k-common --model-repository {exports}",
        f"repo build --target gpu-tensorrt --source {exports} --output {models} --gpus 1 --instances 2 --max-batch 64",
        f"repo plans {models}",
        f"repo check {models}",
    ]
    assert "$ tritonasr repo build" in result.stdout  # it says what it runs

    # Second run: every export is cached on the volume; the repository is written again.
    result, calls = _run_export(tmp_path, env, TARGET="gpu-onnxruntime", GPUS="2", INSTANCES="3", MAX_BATCH="32")
    assert result.returncode == 0, result.stderr
    assert calls == [
        f"repo build --target gpu-onnxruntime --source {exports} --output {models}"
        " --gpus 2 --instances 3 --max-batch 32",
        f"repo check {models}",
    ]
    assert "cached" in result.stdout

    # A half-done parakeet export (decoder missing) is exported again; FORCE_EXPORT redoes all.
    os.remove(Path(exports, "parakeet_decoder", "1", "meta.json"))
    _, calls = _run_export(tmp_path, env)
    assert [c for c in calls if c.startswith("export")] == [
        f"export parakeet --model nvidia/parakeet-tdt-0.6b-v2 --model-repository {exports}"]
    _, calls = _run_export(tmp_path, env, FORCE_EXPORT="1", SENSEVOICE_MODEL="/models/sv")
    assert len([c for c in calls if c.startswith("export")]) == 4
    assert f"export sensevoice --model /models/sv --model-repository {exports}" in calls


def test_export_script_marks_the_repository_complete_only_when_checked(export_env):
    """The Kubernetes server pods start on the repository once the marker is there."""
    tmp_path, env = export_env
    marker = Path(env["MODELS_DIR"], re.search(r"^DONE_MARKER=(\S+)", EXPORT_SCRIPT.read_text(), re.M).group(1))
    result, _ = _run_export(tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert marker.is_file()
    result, calls = _run_export(tmp_path, env, STUB_CHECK_FAILS="1")
    assert result.returncode != 0 and calls[-1].startswith("repo check")
    assert not marker.exists()  # removed before the repository was rewritten


def test_export_script_options(export_env):
    tmp_path, env = export_env
    result, calls = _run_export(tmp_path, env, ASR_ENGINES="sensevoice", WITH_SPEAKER="0")
    assert result.returncode == 0, result.stderr
    assert [c.split()[1] for c in calls if c.startswith("export")] == ["vad", "sensevoice"]

    # Parakeet alone; the speaker export left from before is reported, not served silently.
    Path(env["EXPORTS_DIR"], "speaker").mkdir()
    result, calls = _run_export(tmp_path, env, ASR_ENGINES="parakeet", WITH_SPEAKER="0")
    assert result.returncode == 0, result.stderr
    assert [c.split()[1] for c in calls if c.startswith("export")] == ["parakeet"]
    assert "speaker" in result.stderr and "rm -rf" in result.stderr

    for bad in ({"TARGET": "cpu"}, {"ASR_ENGINES": "whisper"}):
        result, calls = _run_export(tmp_path, env, **bad)
        assert result.returncode == 2 and calls == [], bad
        assert "error" in result.stderr


# --- the dashboard -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_panels_query_the_chosen_datasource_and_pods(dashboard):
    """Template variables: the datasource (the provisioned one by default), the pods, the models;
    every selector of every panel keeps to the chosen pods, the per-model panels to the models."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "pod", "model"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name, label_of in (("pod", "label_values(tritonasr_open_streams, pod)"),
                           ("model", "label_values(nv_inference_count, model)")):
        assert variables[name]["definition"] == label_of and variables[name]["includeAll"]
        assert variables[name]["multi"] and variables[name]["allValue"] == ".*"
    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["isDefault"]  # what ${datasource} starts on
    chosen = {"type": "prometheus", "uid": "${datasource}"}
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    assert len(panels) >= 10
    assert len({p["id"] for p in _panels(dashboard)}) == len(list(_panels(dashboard)))
    for panel in panels:
        assert panel["datasource"] == chosen, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.strip() and target["datasource"] == chosen, panel["title"]
            assert expr.count("(") == expr.count(")"), expr
            for name in expression_metrics(expr):
                assert re.search(rf'{name}\{{[^}}]*pod=~"\$pod"', expr), (panel["title"], name, expr)
            if expression_metrics(expr) & {"nv_inference_count", "nv_inference_queue_duration_us"}:
                assert 'model=~"$model"' in expr, expr


def test_dashboard_counts_client_calls_and_shows_capacity_per_pod(dashboard):
    by_title = {p["title"]: [t["expr"] for t in p["targets"]] for p in _panels(dashboard) if p["type"] != "row"}
    # Client calls only: not Triton's per-model counts, which include the pipelines' inner calls.
    for title in ("Client calls / s", "Client calls per second by model"):
        assert all("nv_inference" not in expr for expr in by_title[title]), by_title[title]
        assert any("tritonasr_requests_total" in expr for expr in by_title[title])
    streams = by_title["Open streams per pod against capacity"]
    assert any(expr.startswith("sum by (pod) (tritonasr_open_streams") for expr in streams)
    assert any("tritonasr_max_streams" in expr for expr in streams)
    offline = " ".join(by_title["Offline requests per pod against capacity"])
    for name in ("tritonasr_inflight_requests", "nv_inference_pending_request_count", "tritonasr_max_inflight_requests"):
        assert name in offline


def test_prometheus_config_and_alert_rules_pass_promtool(promtool):
    for check, path in (("config", PROMETHEUS), ("rules", ALERTS)):
        result = subprocess.run([promtool, "check", check, str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    rules = [rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    assert set(rules) >= {"TritonasrDown", "TritonasrErrorRateHigh", "TritonasrFinalLatencyHigh",
                          "TritonasrOfflineQueueTimeHigh", "TritonasrStreamsAtCapacity"}


def test_alert_rules_fire_on_the_series_they_watch(tmp_path, promtool):
    """promtool's rule unit tests: synthetic series for two pods, one in trouble, one not."""
    def pods(name, series_a, series_b, **labels):
        extra = "".join(f', {k}="{v}"' for k, v in labels.items())
        return [{"series": f'{name}{{pod="a"{extra}}}', "values": series_a},
                {"series": f'{name}{{pod="b"{extra}}}', "values": series_b}]

    series = [
        {"series": 'up{job="triton", pod="a"}', "values": "0x20"},
        {"series": 'up{job="triton", pod="b"}', "values": "1x20"},
        # a: 15 of 16 stream slots; b: 8 of 16
        *pods("tritonasr_open_streams", "15x20", "8x20", model="asr_stream"),
        *pods("tritonasr_max_streams", "16x20", "16x20", model="asr_stream"),
        # a: 1 call in 10 fails; b: none
        *pods("tritonasr_requests_total", "0+60x20", "0+60x20", model="asr_offline"),
        *pods("tritonasr_errors_total", "0+6x20", "0x20", model="asr_offline", kind="internal"),
        # a: every final 1-2 s after its speech ended; b: all under 0.5 s
        *pods("tritonasr_final_latency_seconds_bucket", "0x20", "0+10x20", le="0.5"),
        *pods("tritonasr_final_latency_seconds_bucket", "0+10x20", "0+10x20", le="2"),
        *pods("tritonasr_final_latency_seconds_bucket", "0+10x20", "0+10x20", le="+Inf"),
        # a: 3 s in the queue per offline request; b: 0.1 s
        *pods("nv_inference_queue_duration_us", "0+180000000x20", "0+6000000x20", model="asr_offline"),
        *pods("nv_inference_request_success", "0+60x20", "0+60x20", model="asr_offline"),
        # The gateways. a: down; 1 request in 10 answered 502, 1 in 10 refused 503 (not a failure);
        # 15 of 16 offline turns held. b: all 200, 3 of 16 turns.
        {"series": 'up{job="gateway", pod="a"}', "values": "0x20"},
        {"series": 'up{job="gateway", pod="b"}', "values": "1x20"},
        *pods("tritonasr_gateway_requests_total", "0+48x20", "0+60x20", route="/v1/audio/transcriptions",
              method="POST", status="200"),
        *pods("tritonasr_gateway_requests_total", "0+6x20", "0x20", route="/v1/audio/transcriptions",
              method="POST", status="502"),
        *pods("tritonasr_gateway_requests_total", "0+6x20", "0x20", route="/v1/audio/transcriptions",
              method="POST", status="503"),
        *pods("tritonasr_gateway_offline_inflight", "15x20", "3x20"),
        *pods("tritonasr_gateway_max_inflight", "16x20", "16x20"),
    ]

    descriptions = {rule["alert"]: rule["annotations"]["description"]
                    for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}

    def firing(alert, summary, **labels):
        """Only pod a's alert fires, its summary saying how bad it is."""
        return {"alertname": alert, "eval_time": "15m",
                "exp_alerts": [{"exp_labels": {"pod": "a", "severity": "warning", **labels},
                                "exp_annotations": {"summary": summary, "description": descriptions[alert]}}]}

    tests = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [
            firing("TritonasrDown", "a: Triton's metrics do not answer", severity="page", job="triton"),
            firing("TritonasrStreamsAtCapacity", "a: 93.75% of its stream slots taken"),
            firing("TritonasrErrorRateHigh", "a: 10% of calls fail"),
            firing("TritonasrFinalLatencyHigh", "a: streams' finals take 1.925s at p95"),
            firing("TritonasrOfflineQueueTimeHigh", "a: offline requests wait 3s in the queue"),
            firing("TritonasrGatewayDown", "a: the gateway's metrics do not answer", severity="page", job="gateway"),
            firing("TritonasrGatewayFailing", "a: 10% of the gateway's requests fail"),
            firing("TritonasrGatewayOfflineSaturated", "a: 93.75% of the gateway's offline turns taken"),
        ]}]}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_metric_names(dashboard):
    assert metric_names() == EXPECTED_METRICS
    assert metric_names(DASHBOARD) == EXPECTED_METRICS
    exprs = list(expressions(dashboard))
    assert 'sum(tritonasr_open_streams{pod=~"$pod"})' in exprs
    for q in ("0.5", "0.95", "0.99"):
        assert (f'histogram_quantile({q}, sum by (le) (rate(tritonasr_final_latency_seconds_bucket{{pod=~"$pod"}}[1m])))'
                in exprs)


@pytest.mark.parametrize("expr, names", [
    ("histogram_quantile(0.95, sum by (le) (rate(tritonasr_final_latency_seconds_bucket[1m])))",
     {"tritonasr_final_latency_seconds_bucket"}),
    ('sum by (model, engine) (rate(tritonasr_segments_total{model="asr_stream", engine=~"sense.*"}[5m:30s]))',
     {"tritonasr_segments_total"}),
    ("sum(rate(a_total[1m])) by (model) / on (model) group_left (kind) b_count offset 5m",
     {"a_total", "b_count"}),
    ("rate(foo[$__rate_interval]) > bool 0.5 and bar{job=~'t.*'} or vector(1e3)", {"foo", "bar"}),
    ("topk(5, max without (instance) (nv_gpu_utilization)) * 100", {"nv_gpu_utilization"}),
    ("nv_gpu_memory_used_bytes{gpu_uuid=\"${gpu}\"} / ignoring(x) nv_gpu_memory_total_bytes",
     {"nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"}),
    ("count(up == 1) unless absent(tritonasr_open_streams)", {"up", "tritonasr_open_streams"}),
])
def test_expression_metrics(expr, names):
    assert expression_metrics(expr) == names


def test_metric_names_leave_out_functions_and_labels():
    names = metric_names()
    for word in ("rate", "sum", "histogram_quantile", "by", "le", "model", "kind", "engine", "instance",
                 "gpu_uuid"):
        assert word not in names


# --- the README ----------------------------------------------------------------------------

def test_readme_documents_the_deployment():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## GPU deployment (docker compose)")
    assert start < readme.index("## Benchmarks")
    section = readme[start:readme.index("\n## ", start + 1)]
    for command in ("docker-compose build", "docker-compose run --rm export",
                    "docker-compose up -d triton gateway prometheus grafana",
                    "docker-compose --profile loadtest up --scale locust-worker=4"):
        assert command in section
    for dockerfile in (SERVE_DOCKERFILE, EXPORT_DOCKERFILE, GATEWAY_DOCKERFILE, LOADTEST_DOCKERFILE):
        assert f"`docker/{dockerfile.name}`" in section
    assert "docker/Dockerfile" not in readme
    undocumented = [v for v in COMPOSE_VARIABLES if f"`{v}`" not in section]
    assert not undocumented, f"variables of docker-compose.yml the README does not list: {undocumented}"
    export_variables = set(re.findall(r"^([A-Z_]+)=\$\{\1:-", EXPORT_SCRIPT.read_text(), re.MULTILINE))
    assert export_variables <= set(COMPOSE_VARIABLES), export_variables - set(COMPOSE_VARIABLES)
