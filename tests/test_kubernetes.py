"""The Helm chart (deploy/kubernetes/tritonasr), rendered by Helm's own engine (helm-python-sdk
links Helm's Go packages; no cluster, no network) and every object validated offline against the
Kubernetes API's schemas (kubernetes-validate) or, for the ServiceMonitor, Prometheus Operator's
CRD schema (tests/kubernetes/validate.mjs). What the objects say is checked against the parts
they drive: `tritonasr serve`'s and `tritonasr gateway`'s own argument parsers, the supervisor's
health handler, the gateway's application, the export script, promtool evaluating
prometheus-adapter's rules, and nginx checking the balancer's config."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import urlopen

import helm_python
import kubernetes_validate
import pytest
import yaml
from starlette.testclient import TestClient

from tritonasr.cli import build_parser
from tritonasr.gateway.app import create_app
from tritonasr.gateway.cli import UsageError, settings_from
from tritonasr.gateway.drain import Drain
from tritonasr.paths import CHECKOUT_ROOT
from tritonasr.serving import supervisor

CHART = CHECKOUT_ROOT / "deploy" / "kubernetes" / "tritonasr"
ALERTS = CHECKOUT_ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = CHECKOUT_ROOT / "deploy" / "prometheus" / "prometheus.yml"
ADAPTER_VALUES = CHECKOUT_ROOT / "deploy" / "kubernetes" / "prometheus-adapter-values.yaml"
EXPORT_SCRIPT = CHECKOUT_ROOT / "docker" / "export.sh"
SERVE_DOCKERFILE = CHECKOUT_ROOT / "docker" / "serve.Dockerfile"
GATEWAY_DOCKERFILE = CHECKOUT_ROOT / "docker" / "gateway.Dockerfile"
BARE_BALANCER = CHECKOUT_ROOT / "deploy" / "nginx" / "tritonasr-grpc.conf"
SCHEMAS = Path(__file__).parent / "kubernetes"
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest with schemas.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
RELEASE, NAMESPACE = "asr", "speech"
# The values the chart insists on.
POSTGRES = {"url": "postgresql://tritonasr@postgres.db.svc:5432/tritonasr",
            "passwordSecret": {"name": "asr-postgres"}}
REQUIRED = {
    "auth": {"existingSecret": "asr-keys"},
    "tls": {"existingSecret": "asr-tls"},
    "speakerStore": POSTGRES,
    "gateway": {"jobsDb": POSTGRES},
}
# What a kubernetes.io/tls Secret with the CA holds (values.yaml's tls.existingSecret).
TLS_SECRET_KEYS = ("tls.crt", "tls.key", "ca.crt")
NO_GATEWAY = {"gateway": {"enabled": False, "jobsDb": {"url": ""}}}
# Value sets a platform team would use; each must render objects the API server takes.
VARIANTS = {
    "defaults": {},
    "no autoscaling, no monitoring, own claim, no speaker": {
        "autoscaling": {"enabled": False}, "serviceMonitor": {"enabled": False},
        "prometheusRule": {"enabled": False}, "networkPolicy": {"enabled": False},
        "persistence": {"existingClaim": "shared-models"},
        "export": {"speaker": False}, "speakerStore": {"url": ""},
        "gateway": {"autoscaling": {"enabled": False}, "replicas": 3}},
    "gRPC callers only: no gateway": NO_GATEWAY,
    "everything set": {
        "image": {"registry": "registry.example.com/asr/", "tag": "1.2.3", "pullSecrets": ["regcred"]},
        "gpu": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                        "labelSelector": {"matchLabels": {"app": "x"}}}}]}}},
        "export": {"hfTokenSecret": {"name": "hf"}, "target": "gpu-onnxruntime", "forceExport": True},
        "server": {"extraArgs": ["--max-streams-per-client=4"], "podAnnotations": {"a": "b"}},
        "balancer": {"service": {"type": "LoadBalancer", "annotations": {"x": "y"}}},
        "serviceMonitor": {"labels": {"release": "kube-prometheus-stack"}},
        "networkPolicy": {"grpcFrom": [{"namespaceSelector": {"matchLabels": {"team": "voice"}}}]},
        "persistence": {"storageClass": "nfs"},
        "gateway": {"service": {"type": "LoadBalancer", "port": 8443, "annotations": {"x": "y"}},
                    "corsOrigins": ["https://app.example.com"], "extraArgs": ["--max-inflight=32"],
                    "jobWorkers": 0, "podAnnotations": {"a": "b"},
                    "nodeSelector": {"kubernetes.io/arch": "amd64"},
                    "tolerations": [{"key": "cpu-pool", "operator": "Exists", "effect": "NoSchedule"}],
                    "autoscaling": {"maxReplicas": 30, "targetCPUUtilization": 60}}},
}


def merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render(values: dict | None = None) -> list[dict]:
    """The chart's objects for REQUIRED + `values`, as `helm install` would create them."""
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(merged(REQUIRED, values or {}), name=RELEASE, namespace=NAMESPACE,
                                 is_install=True)
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def render_error(values: dict) -> str:
    with helm_python.Chart.load(CHART) as chart, pytest.raises(helm_python.errors.HelmError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return str(caught.value)


def by_kind(objects: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for obj in objects:
        kinds.setdefault(obj["kind"], []).append(obj)
    return kinds


def one(objects: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def container(pod_owner: dict, name: str) -> dict:
    return next(c for c in pod_owner["spec"]["template"]["spec"]["containers"] if c["name"] == name)


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render()


@pytest.fixture(scope="module")
def operator_validator() -> list[str]:
    """`node validate.mjs`, with its npm package installed (scripts/test.sh does it in CI)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: tests/kubernetes/validate.mjs checks Prometheus Operator objects")
    if not (SCHEMAS / "node_modules").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=SCHEMAS, check=True)
    return [node, str(SCHEMAS / "validate.mjs")]


def validate_operator_objects(validator: list[str], objects: list[dict]) -> subprocess.CompletedProcess:
    return subprocess.run(validator, input=json.dumps(objects), capture_output=True, text=True, timeout=60)


# --- the chart as a whole ----------------------------------------------------------------------

def test_chart_lints_clean():
    report = helm_python.lint(CHART, REQUIRED, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_chart_deploys_every_part(objects):
    kinds = {kind: sorted(o["metadata"]["name"] for o in objs) for kind, objs in by_kind(objects).items()}
    assert kinds == {
        "PersistentVolumeClaim": ["asr-tritonasr-models"],
        "Job": ["asr-tritonasr-export"],
        "Deployment": ["asr-tritonasr-balancer", "asr-tritonasr-gateway", "asr-tritonasr-server"],
        "Service": ["asr-tritonasr", "asr-tritonasr-gateway", "asr-tritonasr-gateway-metrics", "asr-tritonasr-servers"],
        "ConfigMap": ["asr-tritonasr-balancer"],
        "HorizontalPodAutoscaler": ["asr-tritonasr-gateway", "asr-tritonasr-server"],
        "PodDisruptionBudget": ["asr-tritonasr-balancer", "asr-tritonasr-gateway", "asr-tritonasr-server"],
        "ServiceMonitor": ["asr-tritonasr-gateway", "asr-tritonasr-servers"],
        "PrometheusRule": ["asr-tritonasr"],
        "NetworkPolicy": ["asr-tritonasr-balancer", "asr-tritonasr-gateway", "asr-tritonasr-server"],
    }


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_api_schemas(variant, kubernetes_version, operator_validator):
    objects = render(VARIANTS[variant])
    operator = [o for o in objects if o["apiVersion"].startswith("monitoring.coreos.com/")]
    for obj in objects:
        if obj not in operator:
            # strict: a field the API does not know is an error, as with kubectl's strict validation.
            kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    if operator:
        result = validate_operator_objects(operator_validator, operator)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_validators_refuse_broken_objects(objects, operator_validator):
    """Neither schema check passes everything: an unknown field, a wrong type and a malformed
    duration are refused."""
    deployment = json.loads(json.dumps(one(objects, "Deployment", "-server")))
    deployment["spec"]["template"]["spec"]["containers"][0]["argz"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    hpa = json.loads(json.dumps(one(objects, "HorizontalPodAutoscaler", "-server")))
    hpa["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, KUBERNETES_VERSIONS[-1], strict=True)
    monitor = json.loads(json.dumps(one(objects, "ServiceMonitor", "-servers")))
    monitor["spec"]["endpoints"][0]["interval"] = "5 seconds"
    result = validate_operator_objects(operator_validator, [monitor])
    assert result.returncode == 1 and "interval" in result.stdout


@pytest.mark.parametrize("values, names", [
    ({}, "auth.existingSecret"),
    ({"auth": {"existingSecret": "k"}}, "tls.existingSecret"),
    ({"auth": {"existingSecret": "k"}, "tls": {"existingSecret": "t"}, "gateway": {"jobsDb": POSTGRES}},
     "speakerStore.url"),
    # The gateway's jobs need the shared database: no SQLite in a pod, which loses them with it.
    ({"auth": {"existingSecret": "k"}, "tls": {"existingSecret": "t"}, "speakerStore": POSTGRES},
     "gateway.jobsDb.url"),
    (merged(REQUIRED, {"gateway": {"jobsDb": {"url": ""}, "replicas": 1, "autoscaling": {"enabled": False}}}),
     "gateway.jobsDb.url"),
    (merged(REQUIRED, {"server": {"maxStreams": 0}}), "server.maxStreams"),
    # values.schema.json: wrong types and values, and a password in the store's URL
    (merged(REQUIRED, {"server": {"maxStreams": "lots"}}), "/server/maxStreams"),
    (merged(REQUIRED, {"export": {"target": "cpu"}}), "/export/target"),
    (merged(REQUIRED, {"speakerStore": {"url": "postgresql://tritonasr:secret@db/asr"}}), "/speakerStore/url"),
    (merged(REQUIRED, {"gateway": {"jobsDb": {"url": "postgresql://tritonasr:secret@db/asr"}}}),
     "/gateway/jobsDb/url"),
    (merged(REQUIRED, {"gateway": {"jobsDb": {"url": "sqlite:////data/jobs.db"}}}), "/gateway/jobsDb/url"),
    (merged(REQUIRED, {"gateway": {"drainSeconds": 0}}), "/gateway/drainSeconds"),
])
def test_missing_settings_are_refused_by_name(values, names):
    assert names in render_error(values)


# --- the export step ---------------------------------------------------------------------------

def test_export_runs_before_the_servers_on_a_volume_kept_across_releases(objects):
    claim, job = one(objects, "PersistentVolumeClaim"), one(objects, "Job")
    hooks = {o["kind"]: o["metadata"]["annotations"] for o in (claim, job)}
    for hook in hooks.values():
        assert hook["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(hooks["PersistentVolumeClaim"]["helm.sh/hook-weight"]) < int(hooks["Job"]["helm.sh/hook-weight"])
    assert hooks["PersistentVolumeClaim"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]

    pod = job["spec"]["template"]["spec"]
    export = container(job, "export")
    assert export["command"] == ["bash", "/opt/tritonasr/export.sh"]
    assert export["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"]: m["subPath"] for m in export["volumeMounts"] if m["name"] == "repository"}
    assert mounts == {"/exports": "exports", "/models": "models"}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_export_job_sets_only_what_the_script_reads(objects):
    script = EXPORT_SCRIPT.read_text()
    read = set(re.findall(r"\$\{([A-Z_]+)", script))
    # The cache locations are read by the tools the script runs (tritonasr, Hugging Face, ModelScope).
    tools = {"TRITONASR_CACHE", "HF_HOME", "MODELSCOPE_CACHE", "HF_TOKEN"}
    env = {e["name"]: e.get("value") for e in container(one(objects, "Job"), "export")["env"]}
    assert set(env) - tools <= read, set(env) - tools - read
    assert env["EXPORTS_DIR"] == "/exports" and env["MODELS_DIR"] == "/models"
    assert env["WITH_SPEAKER"] == "1" and env["GPUS"] == "1"
    no_speaker = render({"export": {"speaker": False}, "speakerStore": {"url": ""}})
    assert {e["name"]: e.get("value") for e in container(one(no_speaker, "Job"), "export")["env"]}["WITH_SPEAKER"] == "0"


def test_servers_wait_for_the_marker_the_export_writes(objects):
    marker = re.search(r"^DONE_MARKER=(\S+)", EXPORT_SCRIPT.read_text(), re.M).group(1)
    wait = one(objects, "Deployment", "-server")["spec"]["template"]["spec"]["initContainers"][0]
    assert f"/models/{marker} ]" in wait["command"][-1]


# --- the server pods ---------------------------------------------------------------------------

def test_server_command_is_one_serve_accepts(objects):
    server = container(one(objects, "Deployment", "-server"), "server")
    assert server["command"][:3] == ["tini", "--", "tritonasr"]
    assert re.search(r"apt-get install [^\n]*\btini\b", SERVE_DOCKERFILE.read_text())
    args = build_parser().parse_args(server["command"][3:] + server["args"])
    assert args.command == "serve"
    assert (args.host, args.metrics_host, args.health_host) == ("0.0.0.0",) * 3
    assert args.http_host == "127.0.0.1"  # Triton's HTTP port (no TLS, no keys) stays in the pod
    assert str(args.tls_cert) == "/tls/tls.crt" and str(args.tls_key) == "/tls/tls.key"
    assert args.max_streams == 16 and args.drain_seconds == 120
    assert args.speaker_store == REQUIRED["speakerStore"]["url"]
    assert str(args.model_repository) == "/models"
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": args.grpc_port, "metrics": args.metrics_port, "health": args.health_port}
    env = {e["name"]: e for e in server["env"]}
    assert env["TRITONASR_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "asr-keys", "key": "api-keys"}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "asr-postgres", "key": "password"}
    assert "password" not in json.dumps(server["args"])

    extra = container(one(render({"server": {"extraArgs": ["--max-streams-per-client=4"]}}), "Deployment", "-server"),
                      "server")
    assert build_parser().parse_args(extra["command"][3:] + extra["args"]).max_streams_per_client == 4


def test_server_pod_outlives_its_drain_and_holds_one_gpu(objects):
    deployment = one(objects, "Deployment", "-server")
    pod = deployment["spec"]["template"]["spec"]
    server = container(deployment, "server")
    drain = build_parser().parse_args(server["command"][3:] + server["args"]).drain_seconds
    assert pod["terminationGracePeriodSeconds"] >= drain + 30
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert mounts["repository"]["readOnly"] is True and mounts["repository"]["subPath"] == "models"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory" and mounts["shm"]["mountPath"] == "/dev/shm"
    assert volumes["tls"]["secret"]["secretName"] == "asr-tls"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False
    assert "replicas" not in deployment["spec"]  # the autoscaler's
    fixed = one(render({"autoscaling": {"enabled": False}, "server": {"replicas": 3}}), "Deployment", "-server")
    assert fixed["spec"]["replicas"] == 3


class _Health:
    """What the supervisor reports of a server with a dead model process, or one given up on."""

    def __init__(self, ready: bool, live: bool):
        self.state = {"ready": ready, "live": live, "state": "restarting", "reason": "", "restarts": 1,
                      "model_processes": 3}

    def health(self) -> dict:
        return self.state


@pytest.mark.parametrize("ready, live", [(False, True), (False, False), (True, True)])
def test_probes_ask_the_supervisor_what_they_mean(objects, ready, live):
    """The probes' paths on the supervisor's real health handler: readiness fails when a model
    process is down (or draining), liveness only when the supervisor gave up."""
    server = container(one(objects, "Deployment", "-server"), "server")
    probes = {kind: server[f"{kind}Probe"]["httpGet"] for kind in ("readiness", "liveness", "startup")}
    assert {p["port"] for p in probes.values()} == {"health"}
    http = ThreadingHTTPServer(("127.0.0.1", 0), supervisor._handler(_Health(ready, live)))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        def status(path: str) -> int:
            try:
                with urlopen(f"http://127.0.0.1:{http.server_address[1]}{path}", timeout=5) as response:
                    return response.status
            except HTTPError as exc:
                return exc.code

        assert status(probes["readiness"]["path"]) == (200 if ready else 503)
        assert status(probes["liveness"]["path"]) == (200 if live else 503)
        assert status(probes["startup"]["path"]) == (200 if live else 503)
    finally:
        http.shutdown()
        http.server_close()
    # Starting may take as long as the chart allows (engine builds), probing then stops.
    assert server["startupProbe"]["periodSeconds"] * server["startupProbe"]["failureThreshold"] >= 1800


# --- the gateway -------------------------------------------------------------------------------

def _pod_labels(owner: dict) -> dict:
    return owner["spec"]["template"]["metadata"]["labels"]


def _selected(selector: dict, objects: list[dict]) -> list[str]:
    """The names of the Deployments and Jobs whose pods `selector` (matchLabels) picks."""
    return sorted(o["metadata"]["name"] for o in objects
                  if o["kind"] in ("Deployment", "Job") and selector.items() <= _pod_labels(o).items())


def _gateway_command(gateway: dict, tls_dir: Path, monkeypatch, api_keys: str | None = "k1,k2"):
    """What `tritonasr gateway` makes of the container's command: its arguments (the real parser)
    and its settings (the real checks), with the files the TLS Secret holds (tls.crt, tls.key,
    ca.crt, and nothing else) at /tls and the auth Secret's keys in $TRITONASR_API_KEY."""
    for name in TLS_SECRET_KEYS:
        (tls_dir / name).write_text("")
    for variable in ("TRITONASR_API_KEY", "TRITONASR_TLS_CA", "TRITONASR_TLS_CERT", "TRITONASR_TLS_KEY"):
        monkeypatch.delenv(variable, raising=False)
    if api_keys is not None:
        monkeypatch.setenv("TRITONASR_API_KEY", api_keys)
    argv = gateway["command"][3:] + gateway["args"]
    mounted = [arg.replace("=/tls/", f"={tls_dir}/") for arg in argv]
    return build_parser().parse_args(argv), settings_from(build_parser().parse_args(mounted))


def test_gateway_command_is_one_gateway_accepts(objects, tmp_path, monkeypatch):
    deployment = one(objects, "Deployment", "-gateway")
    gateway = container(deployment, "gateway")
    assert re.fullmatch(r"tritonasr-gateway:\S+", gateway["image"])
    assert gateway["command"][:3] == ["tini", "--", "tritonasr"]
    assert re.search(r"apt-get install [^\n]*\btini\b", GATEWAY_DOCKERFILE.read_text())
    args, settings = _gateway_command(gateway, tmp_path, monkeypatch)
    assert args.command == "gateway"
    # Triton through the balancer's Service, by its DNS name and port: nginx's TLS listener,
    # checked against the Secret's CA. The gateway sends each caller's key, none of its own.
    balancer = one(objects, "Service", "-tritonasr")
    [service_port] = balancer["spec"]["ports"]
    assert settings.triton_url == f"{balancer['metadata']['name']}.{NAMESPACE}.svc:{service_port['port']}"
    nginx = container(one(objects, "Deployment", "-balancer"), "nginx")
    target = {p["name"]: p["containerPort"] for p in nginx["ports"]}[service_port["targetPort"]]
    assert f"listen {target} ssl" in one(objects, "ConfigMap")["data"]["tritonasr.conf.template"]
    assert settings.triton_tls.tls_ca == tmp_path / "ca.crt" and settings.triton_tls.tls_cert is None
    assert settings.triton_tls.api_key is None and settings.triton_tls.admin_key is None
    # HTTPS for its own callers with the Secret's certificate, on every address: so keys are
    # required, and they come from the auth Secret (without them the gateway would not start).
    assert (str(args.tls_cert), str(args.tls_key)) == ("/tls/tls.crt", "/tls/tls.key")
    mounts = {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/tls"]]["secret"]["secretName"] == "asr-tls"
    assert args.host == "0.0.0.0" and not args.allow_unauthenticated and args.api_key is None
    assert settings.api_keys == ("k1", "k2")
    env = {e["name"]: e for e in gateway["env"]}
    assert env["TRITONASR_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "asr-keys", "key": "api-keys"}
    assert "TRITONASR_ADMIN_KEY" not in env  # speaker changes carry the caller's own admin key
    with pytest.raises(UsageError, match="--api-key"):
        _gateway_command(gateway, tmp_path, monkeypatch, api_keys=None)
    # Jobs in the shared PostgreSQL, the password from its Secret, never in the arguments.
    assert settings.jobs_db == POSTGRES["url"] and settings.job_workers == 2
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "asr-postgres", "key": "password"}
    assert "password" not in json.dumps(gateway["args"])
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]} == {"https": args.port,
                                                                       "metrics": args.metrics_port}
    assert args.metrics_host == "0.0.0.0" and args.metrics_port != args.port  # the pod's address, its own port

    everything = container(one(render(VARIANTS["everything set"]), "Deployment", "-gateway"), "gateway")
    args, settings = _gateway_command(everything, tmp_path, monkeypatch)
    assert settings.cors_origins == ("https://app.example.com",)
    assert settings.max_inflight == 32 and settings.job_workers == 0


def test_gateway_probes_ask_the_gateway_itself(objects, tmp_path, monkeypatch):
    """The probes' port and scheme are the gateway's own; their path, asked of the gateway's real
    application (its routes, without a key, Triton unreachable), answers 200: a Triton away makes
    the gateway answer callers 503, and no pod restarts. Draining, the pod is not ready but alive."""
    gateway = container(one(objects, "Deployment", "-gateway"), "gateway")
    args, settings = _gateway_command(gateway, tmp_path, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    drain = Drain(args.drain_seconds)
    app = TestClient(create_app(settings, drain))  # no lifespan: no database, no workers
    for kind in ("startup", "readiness", "liveness"):
        probe = gateway[f"{kind}Probe"]["httpGet"]
        assert ports[probe["port"]] == args.port
        assert probe["scheme"] == ("HTTPS" if args.tls_cert else "HTTP")
        response = app.get(probe["path"])
        assert response.status_code == 200, (kind, response.text)
    assert app.get("/v1/jobs").status_code == 401  # the API itself asks for a key
    drain.begin()
    for kind, status in (("readiness", 503), ("liveness", 200)):
        assert app.get(gateway[f"{kind}Probe"]["httpGet"]["path"]).status_code == status, kind


def test_gateway_drains_inside_its_grace_period(objects):
    """SIGTERM drains the gateway itself (tests/test_e2e_gateway_drain.py) for gateway.drainSeconds;
    preStop only lets the pod's removal from the Service spread first; the grace period holds both
    and some, and an update adds a pod before it removes one."""
    deployment = one(objects, "Deployment", "-gateway")
    gateway = container(deployment, "gateway")
    sleep, settle = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep" and 5 <= float(settle) <= 30
    drain = build_parser().parse_args(gateway["command"][3:] + gateway["args"]).drain_seconds
    assert drain == 120
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= float(settle) + drain + 30
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_gateway_pod_is_locked_down(objects):
    deployment = one(objects, "Deployment", "-gateway")
    pod = deployment["spec"]["template"]["spec"]
    gateway = container(deployment, "gateway")
    # The image's own user, not root; the TLS Secret readable through the pod's group.
    uid, gid = re.search(r"^USER (\d+):(\d+)$", GATEWAY_DOCKERFILE.read_text(), re.M).groups()
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == int(uid) != 0
    assert context["runAsGroup"] == context["fsGroup"] == int(gid)
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["defaultMode"] == 0o440
    assert gateway["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                          "readOnlyRootFilesystem": True}
    # Writable: /tmp alone (uploads spooled as they arrive).
    writable = {m["mountPath"] for m in gateway["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp"} and "emptyDir" in volumes["tmp"]
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert "cpu" in gateway["resources"]["requests"]  # what the autoscaler's utilisation is of


def test_gateway_service_selects_only_gateway_pods(objects):
    gateway_deployment = "asr-tritonasr-gateway"
    service = one(objects, "Service", "-gateway")
    metrics = one(objects, "Service", "-gateway-metrics")
    assert _selected(service["spec"]["selector"], objects) == [gateway_deployment]
    for other in by_kind(objects)["Service"]:
        if other is not service and other is not metrics:
            assert gateway_deployment not in _selected(other["spec"]["selector"], objects), other["metadata"]["name"]
    gateway = container(one(objects, "Deployment", "-gateway"), "gateway")
    [port] = service["spec"]["ports"]
    assert port["port"] == 443 and port["targetPort"] in {p["name"] for p in gateway["ports"]}
    # Its disruption budget and network policy are its own too; callers may reach its port.
    budget = one(objects, "PodDisruptionBudget", "-gateway")
    assert _selected(budget["spec"]["selector"]["matchLabels"], objects) == [gateway_deployment]
    assert budget["spec"]["maxUnavailable"] == 1
    policy = one(objects, "NetworkPolicy", "-gateway")
    assert _selected(policy["spec"]["podSelector"]["matchLabels"], objects) == [gateway_deployment]
    assert policy["spec"]["ingress"] == [
        {"ports": [{"port": port["targetPort"]}]},
        {"ports": [{"port": "metrics"}],
         "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}]


def test_gateway_metrics_are_scraped_apart_from_the_callers_port(objects):
    """The metrics port is on a headless Service of its own (the callers' may be a LoadBalancer),
    which the gateway's ServiceMonitor scrapes as job `gateway`, compose's name for it; only
    networkPolicy.metricsFrom reaches it."""
    gateway = container(one(objects, "Deployment", "-gateway"), "gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    metrics = one(objects, "Service", "-gateway-metrics")
    assert metrics["spec"]["clusterIP"] == "None"
    assert _selected(metrics["spec"]["selector"], objects) == ["asr-tritonasr-gateway"]
    assert metrics["spec"]["ports"] == [{"name": "metrics", "port": ports["metrics"], "targetPort": "metrics"}]
    assert "metrics" not in {p["name"] for p in one(objects, "Service", "-gateway")["spec"]["ports"]}
    for variant in ({}, VARIANTS["everything set"]):  # LoadBalancer too: the callers' Service has no metrics
        public = one(render(variant), "Service", "-gateway")
        assert [p["targetPort"] for p in public["spec"]["ports"]] == ["https"]
    monitor = one(objects, "ServiceMonitor", "-gateway")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    compose_jobs = [j["job_name"] for j in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]]
    assert endpoint["relabelings"] == [{"targetLabel": "job", "replacement": "gateway", "action": "replace"}]
    assert "gateway" in compose_jobs
    without = render({"serviceMonitor": {"enabled": False}})
    assert "ServiceMonitor" not in by_kind(without)
    closed = render({"networkPolicy": {"metricsFrom": []}})
    assert one(closed, "NetworkPolicy", "-gateway")["spec"]["ingress"] == [{"ports": [{"port": "https"}]}]


def test_gateway_scales_on_its_cpu(objects):
    deployment = one(objects, "Deployment", "-gateway")
    hpa = one(objects, "HorizontalPodAutoscaler", "-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert "replicas" not in deployment["spec"]  # the autoscaler's
    fixed = render({"gateway": {"autoscaling": {"enabled": False}, "replicas": 3}})
    assert one(fixed, "Deployment", "-gateway")["spec"]["replicas"] == 3
    assert [o["metadata"]["name"] for o in by_kind(fixed)["HorizontalPodAutoscaler"]] == ["asr-tritonasr-server"]


def test_gateway_disabled_renders_no_gateway_objects(objects):
    """Without the gateway no object of it, and no jobs database asked for; the rest unchanged."""
    without = render(NO_GATEWAY)

    def gateway_part(obj: dict) -> bool:
        return (obj["metadata"]["labels"].get("app.kubernetes.io/component") == "gateway"
                or "gateway" in obj["metadata"]["name"])

    assert [o["metadata"]["name"] for o in without if gateway_part(o)] == []
    assert sorted((o["kind"], o["metadata"]["name"]) for o in without) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in objects if not gateway_part(o))


# --- autoscaling -------------------------------------------------------------------------------

def test_autoscaler_scales_the_servers_on_the_adapters_metrics(objects):
    hpa = one(objects, "HorizontalPodAutoscaler", "-server")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment", "-server")["metadata"]["name"]
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"] for m in hpa["spec"]["metrics"]}
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert set(targets) == {rule["name"]["as"] for rule in rules}
    assert targets == {"tritonasr_stream_load": "0.7", "tritonasr_offline_load": "0.8"}
    # As `--set autoscaling.targetStreamLoad=0.6` gives it: a number.
    numeric = one(render({"autoscaling": {"targetStreamLoad": 0.6}}), "HorizontalPodAutoscaler", "-server")
    assert numeric["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "0.6"
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 150}]


def _adapter_query(rule: dict, pods: list[str]) -> str:
    """The query prometheus-adapter sends for `pods` of the namespace (its template filled in)."""
    matchers = f'namespace="{NAMESPACE}",pod=~"{"|".join(pods)}"'
    return rule["metricsQuery"].replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod")


def test_adapter_rules_compute_each_pods_load(tmp_path, promtool):
    """promtool evaluates the adapter's queries over series three pods export: a's two asr_stream
    instances hold 3 + 5 of 16 streams, b all 16; a works on 2 + 1 offline requests with 3 queued,
    its two asr_offline instances taking 4 each; c has no stream limit (no load metric) and idles."""
    def series(name, pod, value, **labels):
        extra = "".join(f',{k}="{v}"' for k, v in labels.items())
        return {"series": f'{name}{{namespace="{NAMESPACE}",pod="{pod}"{extra}}}', "values": f"{value}x5"}

    stream = {"model": "asr_stream"}
    offline = {"model": "asr_offline"}
    input_series = [
        series("tritonasr_open_streams", "a", 3, model_instance="asr_stream_0", **stream),
        series("tritonasr_open_streams", "a", 5, model_instance="asr_stream_1", **stream),
        series("tritonasr_max_streams", "a", 16, model_instance="asr_stream_0", **stream),
        series("tritonasr_max_streams", "a", 16, model_instance="asr_stream_1", **stream),
        series("tritonasr_open_streams", "b", 16, model_instance="asr_stream_0", **stream),
        series("tritonasr_max_streams", "b", 16, model_instance="asr_stream_0", **stream),
        series("tritonasr_open_streams", "c", 0, model_instance="asr_stream_0", **stream),
        series("tritonasr_max_streams", "c", 0, model_instance="asr_stream_0", **stream),
        series("tritonasr_inflight_requests", "a", 2, model_instance="asr_offline_0", **offline),
        series("tritonasr_inflight_requests", "a", 1, model_instance="asr_offline_1", **offline),
        series("tritonasr_max_inflight_requests", "a", 4, model_instance="asr_offline_0", **offline),
        series("tritonasr_max_inflight_requests", "a", 4, model_instance="asr_offline_1", **offline),
        series("nv_inference_pending_request_count", "a", 3, version="1", **offline),
        series("nv_inference_pending_request_count", "a", 7, version="1", model="sensevoice"),
        # Another namespace's pod of the same name is not ours.
        {"series": 'tritonasr_open_streams{namespace="other",pod="a",model="asr_stream"}', "values": "99x5"},
    ]
    rules = {rule["name"]["as"]: rule for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]}
    assert {rule["seriesQuery"].split("{")[0] for rule in rules.values()} == {
        "tritonasr_open_streams", "tritonasr_inflight_requests"}
    tests = {"tests": [{"interval": "1m", "input_series": input_series, "promql_expr_test": [
        {"expr": _adapter_query(rules["tritonasr_stream_load"], ["a", "b", "c"]), "eval_time": "2m",
         "exp_samples": [{"labels": '{pod="a"}', "value": 0.5}, {"labels": '{pod="b"}', "value": 1}]},
        {"expr": _adapter_query(rules["tritonasr_offline_load"], ["a"]), "eval_time": "2m",
         "exp_samples": [{"labels": '{pod="a"}', "value": 0.75}]},
    ]}]}
    path = tmp_path / "adapter_test.yml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the balancer, monitoring, access ----------------------------------------------------------

def _nginx_directives(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s*([a-z0-9_]+)\s+([^;{]*);", text, re.M)}


def test_balancer_config_passes_nginx_and_matches_the_bare_one(objects, tmp_path, nginx, make_certs):
    template = one(objects, "ConfigMap")["data"]["tritonasr.conf.template"]
    servers = f"asr-tritonasr-servers.{NAMESPACE}.svc"
    settings = _nginx_directives(template)
    assert settings["set"] == f"$tritonasr_servers {servers}"
    assert settings["grpc_pass"] == "grpcs://$tritonasr_servers:8001"
    assert settings["grpc_ssl_name"] == servers and settings["grpc_ssl_verify"] == "on"
    # What both balancers share, written the same.
    bare = _nginx_directives(BARE_BALANCER.read_text())
    shared = ["http2_max_concurrent_streams", "client_max_body_size", "client_body_timeout", "grpc_read_timeout",
              "grpc_send_timeout", "grpc_next_upstream", "grpc_next_upstream_tries"]
    assert {k: settings[k] for k in shared} == {k: bare[k] for k in shared}

    # nginx itself checks it, as the image's entrypoint writes it (the pod's DNS server filled in).
    tls = make_certs(tmp_path / "tls", servers)
    config = (template.replace("${NGINX_LOCAL_RESOLVERS}", "127.0.0.1")
              .replace("/tls/tls.crt", str(tls / "server.crt")).replace("/tls/tls.key", str(tls / "server.key"))
              .replace("/tls/ca.crt", str(tls / "ca.crt")))
    assert "${" not in config
    (tmp_path / "tritonasr.conf").write_text(config)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid; error_log stderr; events {{}}\n"
        f"http {{ client_body_temp_path {tmp_path}/body; include {tmp_path}/tritonasr.conf; }}\n")
    check = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

    deployment = one(objects, "Deployment", "-balancer")
    nginx_container = container(deployment, "nginx")
    assert {"name": "NGINX_ENTRYPOINT_LOCAL_RESOLVERS", "value": "1"} in nginx_container["env"]
    assert {p["containerPort"] for p in nginx_container["ports"]} == {
        int(re.search(r"listen (\d+) ssl", template).group(1)), int(re.search(r"listen (\d+);", template).group(1))}
    assert nginx_container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert nginx_container["securityContext"]["readOnlyRootFilesystem"] is True


def test_servers_service_is_headless_and_monitored(objects):
    service = one(objects, "Service", "-servers")
    assert service["spec"]["clusterIP"] == "None"
    deployment = one(objects, "Deployment", "-server")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = one(objects, "ServiceMonitor", "-servers")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert {p["name"] for p in service["spec"]["ports"]} >= {"grpc", "metrics"}
    budget = one(objects, "PodDisruptionBudget", "-server")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


def test_alert_rules_are_the_compose_deployments_for_the_same_job(objects):
    rules = one(objects, "PrometheusRule")
    assert rules["spec"] == yaml.safe_load(ALERTS.read_text())
    compose_job = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"][0]["job_name"]
    relabel = one(objects, "ServiceMonitor", "-servers")["spec"]["endpoints"][0]["relabelings"]
    assert relabel == [{"targetLabel": "job", "replacement": compose_job, "action": "replace"}]
    assert f'up{{job="{compose_job}"}}' in ALERTS.read_text()


def test_only_the_balancer_reaches_the_servers_grpc_port(objects):
    policy = one(objects, "NetworkPolicy", "-server")
    rules = {rule["ports"][0]["port"]: rule.get("from") for rule in policy["spec"]["ingress"]}
    balancer_labels = one(objects, "Deployment", "-balancer")["spec"]["template"]["metadata"]["labels"]
    assert [peer["podSelector"]["matchLabels"] for peer in rules["grpc"]] == [balancer_labels]
    assert rules["metrics"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert rules["health"] is None  # the kubelet's probes
    assert set(rules) == {"grpc", "metrics", "health"}
