"""The GPU deployment files: docker-compose.yml (checked with Debian's docker-compose 1.29, the
oldest Compose it must work with), docker/Dockerfile, docker/export.sh, Prometheus and Grafana
provisioning, and the dashboard's PromQL. No Docker engine or GPU is needed: `docker-compose
config` validates and resolves the file without one."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tritonasr.dashboard import DASHBOARD, expression_metrics, expressions, metric_names
from tritonasr.paths import CHECKOUT_ROOT

ROOT = CHECKOUT_ROOT
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
EXPORT_SCRIPT = ROOT / "docker" / "export.sh"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
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
    "nv_inference_request_success", "nv_inference_request_failure",
    "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_count", "nv_inference_exec_count",
    "nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes",
    "tritonasr_open_streams", "tritonasr_segments_total", "tritonasr_audio_seconds_total",
    "tritonasr_final_latency_seconds_bucket", "tritonasr_errors_total", "tritonasr_rejected_total",
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


def test_services(services):
    assert set(services) == {"export", "triton", "prometheus", "grafana", "locust-master", "locust-worker"}


def test_dockerfile_pins_a_recent_ngc_tritonserver():
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))
    image = args["TRITON_IMAGE"]
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", image)
    assert match, f"not a pinned NGC tritonserver release: {image}"
    # Older servers crash on cancelled decoupled streams (triton-inference-server/server#7368).
    assert (int(match[1]), int(match[2])) >= (24, 12), image
    assert re.search(r"^FROM\s+\$\{TRITON_IMAGE\}\s*$", text, re.MULTILINE)
    # The package goes into the image's Python, the GPU ONNX Runtime replaces the CPU one.
    assert re.search(r"pip install -e \"/opt/tritonasr\[all\]\"", text)
    assert re.search(r"pip uninstall -y onnxruntime\b", text) and "onnxruntime-gpu" in text
    assert re.search(r"^COPY \. /opt/tritonasr$", text, re.MULTILINE)


def test_image_is_built_from_the_dockerfile(services):
    build = services["export"]["build"]
    assert Path(build["context"]) == ROOT
    assert Path(build["context"], build["dockerfile"]) == DOCKERFILE
    default = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), re.MULTILINE))["TRITON_IMAGE"]
    assert build["args"]["TRITON_IMAGE"] == default
    images = {name: service["image"] for name, service in services.items() if name not in ("prometheus", "grafana")}
    assert len(set(images.values())) == 1, f"one image for triton, export and locust: {images}"


def test_dockerignore_leaves_out_exports_and_environments():
    lines = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git/", ".venv/", "model_repository/"):
        assert entry in lines


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
    # The image runs its own tritonserver (native backends), named once, in the Dockerfile.
    dockerfile = DOCKERFILE.read_text()
    assert "TRITONASR_TRITONSERVER=/opt/tritonserver/bin/tritonserver" in dockerfile
    assert "TRITONASR_BACKEND_DIRECTORY=/opt/tritonserver/backends" in dockerfile
    assert triton["environment"]["TRITONASR_API_KEY"] == REQUIRED["TRITONASR_API_KEY"]
    assert triton["init"] is True
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
    assert export["command"] == ["bash", "/opt/tritonasr/docker/export.sh"]
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
        "TARGET": "gpu-onnxruntime", "INSTANCES": "4", "TRITON_GRPC_PORT": "9001"}))["services"]
    assert services["export"]["environment"]["TARGET"] == "gpu-onnxruntime"
    assert services["export"]["environment"]["INSTANCES"] == "4"
    assert {(published, target) for _, published, target in _ports(services["triton"])} >= {(9001, 8001)}


def test_prometheus_scrapes_triton(services):
    prometheus = services["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    assert Path(_mounts(prometheus)["/etc/prometheus/prometheus.yml"]) == PROMETHEUS
    config = yaml.safe_load(PROMETHEUS.read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "triton"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == ["triton:8002"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"


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
        # The Dockerfile copies the checkout to /opt/tritonasr.
        assert "locust -f /opt/tritonasr/loadtest/locustfile.py" in service["command"]
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


def test_dashboard_panels_query_the_provisioned_datasource(dashboard):
    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    assert len(panels) >= 10
    assert len({p["id"] for p in _panels(dashboard)}) == len(list(_panels(dashboard)))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_dashboard_metric_names(dashboard):
    assert metric_names() == EXPECTED_METRICS
    assert metric_names(DASHBOARD) == EXPECTED_METRICS
    exprs = list(expressions(dashboard))
    assert "sum(tritonasr_open_streams)" in exprs
    for q in ("0.5", "0.95", "0.99"):
        assert (f"histogram_quantile({q}, sum by (le) (rate(tritonasr_final_latency_seconds_bucket[1m])))"
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
                    "docker-compose up -d triton prometheus grafana",
                    "docker-compose --profile loadtest up --scale locust-worker=4"):
        assert command in section
    undocumented = [v for v in COMPOSE_VARIABLES if f"`{v}`" not in section]
    assert not undocumented, f"variables of docker-compose.yml the README does not list: {undocumented}"
    export_variables = set(re.findall(r"^([A-Z_]+)=\$\{\1:-", EXPORT_SCRIPT.read_text(), re.MULTILINE))
    assert export_variables <= set(COMPOSE_VARIABLES), export_variables - set(COMPOSE_VARIABLES)
