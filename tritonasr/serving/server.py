"""The embedded Triton server: the real `tritonserver` binary shipped in the nvidia-pytriton wheel.

The wheel carries the server, libtritonserver, the Python backend and one backend stub per
Python version. Running it directly needs three things pytriton normally does for you:
a backend directory with the stub for *this* Python beside libtriton_python.so, the wheel's
bundled libraries on LD_LIBRARY_PATH, and this interpreter's bin/ first on PATH (the stub
resolves `python3` there, which is how model.py files see our virtualenv).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import secrets
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tritonasr.paths import cache_dir
from tritonasr.recognition import admission
from tritonasr.recognition.settings import PipelineSettings, SpeakerSettings, StreamSettings
from tritonasr.runtime import access

LOG_TAIL_LINES = 400
# glibc gives threads that allocate arenas of their own (up to 8 per core) and keeps what is freed
# in them: tritonserver's gRPC threads held up to 176 MB more after six refused 154 MB requests
# (tests/test_e2e_memory.py), where with two arenas its heap came back to where it started.
MALLOC_ARENAS = 2


class ServerError(RuntimeError):
    """The server could not start or died; the message says why."""


def _pytriton_dist() -> Path:
    try:
        import pytriton  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ServerError("nvidia-pytriton is not installed: pip install nvidia-pytriton==0.7.0") from exc
    return Path(pytriton.__file__).parent / "tritonserver"


def _libs_dir() -> Path:
    import pytriton  # noqa: PLC0415

    return Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"


_BACKEND_LOCK = threading.Lock()  # servers started from several threads build it once


def prepare_backend_directory() -> Path:
    """A backend directory holding the Python backend and the stub for the running Python."""
    with _BACKEND_LOCK:
        return _prepare_backend_directory()


def _prepare_backend_directory() -> Path:
    dist = _pytriton_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    target = cache_dir() / "backends" / f"py{version}"
    python_dir = target / "python"
    marker = python_dir / ".source"
    if not (marker.exists() and marker.read_text() == str(dist)):
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(dist / "backends" / "python", tmp / "python")
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        (tmp / "python" / ".source").write_text(str(dist))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


MODEL_CONTROL_MODES = ("none", "explicit")


@dataclass
class TlsFiles:
    """gRPC TLS: the server's certificate chain and key; with `client_ca`, mutual TLS (callers
    must present a certificate signed by it)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def check(self) -> None:
        for what, path in (("certificate", self.cert), ("key", self.key), ("client CA", self.client_ca)):
            if path is not None and not Path(path).is_file():
                raise ServerError(f"TLS {what} file {path} does not exist")


@dataclass
class ServerConfig:
    model_repository: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    log_verbose: int = 0
    # Selects <repository>/<model>/configs/<name>.pbtxt where present (e.g. "gpu").
    model_config_name: str | None = None
    # Models to load; None loads every model in the repository.
    models: list[str] | None = None
    # The pipelines' default ASR engine ("": their configs' default_asr_engine, else the first exported).
    asr_engine: str = ""
    # Where each port listens. Only gRPC is for callers (it alone has TLS); HTTP (health, and
    # inference in plain text) and metrics stay on loopback unless the operator opens them.
    grpc_host: str = "127.0.0.1"
    http_host: str = "127.0.0.1"
    metrics_host: str = "127.0.0.1"
    tls: TlsFiles | None = None
    # Keys callers must show on every inference call; none: anyone who reaches the port.
    api_keys: list[str] = field(default_factory=list)
    # Needed for speaker changes and Triton's admin APIs; none: those stay closed to everyone
    # (on a server without any key, speaker changes are open to its local callers).
    admin_key: str | None = None
    # "none": the models are fixed at start; "explicit": load/unload over the (admin-only)
    # repository API.
    model_control: str = "none"
    # Leaf models (vad, sensevoice, …) callable by outside callers, not only by the pipelines.
    open_leaf_models: bool = False
    # Open streams on this server and per caller (0: no limit); None: asr_stream's config decides.
    max_streams: int | None = None
    max_streams_per_client: int | None = None
    # The speaker stage's settings for all three models that use it (SpeakerSettings field ->
    # value); like the others here, they win over the models' config parameters.
    speaker_settings: dict[str, object] = field(default_factory=dict)
    # Another Triton build than the wheel's (NVIDIA's container, with its native ONNX Runtime and
    # TensorRT backends): its tritonserver binary and backends directory.
    tritonserver: Path | None = None
    backend_directory: Path | None = None
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ServerError(f"model control must be one of {', '.join(MODEL_CONTROL_MODES)}, "
                              f"got {self.model_control!r}")
        try:
            self._settings_environment()
        except (TypeError, ValueError) as exc:
            raise ServerError(str(exc)) from None

    def environment(self) -> dict[str, str]:
        """What the model processes learn of the access settings, the stream limits, the speaker
        settings and the default engine."""
        env = access.server_environment(self.api_keys, self.admin_key, self.open_leaf_models)
        env.update(self._settings_environment())
        return env

    def _settings_environment(self) -> dict[str, str]:
        """The model settings `serve` was given (see tritonasr.recognition.settings)."""
        limits = {name: getattr(self, name) for name in ("max_streams", "max_streams_per_client")
                  if getattr(self, name) is not None}
        return {**PipelineSettings.environment({"default_asr_engine": self.asr_engine} if self.asr_engine else {}),
                **StreamSettings.environment(limits), **SpeakerSettings.environment(self.speaker_settings)}

    def command(self, backend_directory: Path, model_repository: Path | None = None) -> list[str]:
        """tritonserver's command line; `model_repository` replaces the configured one (the
        view of the loaded models that `TritonServer` serves under model control "none")."""
        # Without an admin key the admin APIs get a key nobody knows: closed, not open.
        admin_key = self.admin_key or secrets.token_hex(32)
        admin_apis = ",".join(access.ADMIN_APIS)
        args = [
            str(self.tritonserver or _pytriton_dist() / "bin" / "tritonserver"),
            f"--model-repository={model_repository or self.model_repository}",
            f"--backend-directory={backend_directory}",
            f"--grpc-address={self.grpc_host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.http_host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.metrics_host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            # Our configs are complete: without this Triton starts a second process per Python
            # model just to ask it (a cold start, which the supervisor's restarts pay, takes
            # a third longer).
            "--disable-auto-complete-config",
            f"--grpc-restricted-protocol={admin_apis}:{access.ADMIN_KEY}={admin_key}",
            f"--http-restricted-api={admin_apis}:{access.ADMIN_KEY}={admin_key}",
            f"--grpc-header-forward-pattern={access.HEADER_FORWARD_PATTERN}",
            f"--http-header-forward-pattern={access.HEADER_FORWARD_PATTERN}",
            *(["--model-control-mode=none"] if self.model_control == "none" else
              ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models or ["*"])]),
            # By default Triton keeps up to 8 finished requests' gRPC state for reuse, and with it
            # the buffers of the largest requests it has seen: its heap kept ~0.7 GB more after each
            # 3-hour request (bench memory); without the pool, ~0.1 GB, for an allocation per request.
            "--grpc-infer-allocation-pool-size=0",
            # Large offline requests travel through the Python backend's shared memory:
            # grow it in big steps instead of 1 MB at a time.
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=67108864",
        ]
        if self.tls:
            args += [f"--grpc-server-cert={self.tls.cert}", f"--grpc-server-key={self.tls.key}"]
            if self.tls.client_ca:
                args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.tls.client_ca}"]
            else:
                args.append("--grpc-use-ssl=true")
        if self.model_config_name:
            args.append(f"--model-config-name={self.model_config_name}")
        return args + list(self.extra_args)


def repository_view(repository: Path, models: list[str], into: Path) -> Path:
    """A directory of links to `models` of `repository`: what Triton loads under model control
    "none", which loads every model it finds (the checkout's repository holds every model's
    config, exported or not)."""
    into.mkdir(parents=True, exist_ok=True)
    for model in models:
        source = Path(repository).resolve() / model
        if not source.is_dir():
            raise ServerError(f"model {model!r} is not in the repository {repository}")
        (into / model).symlink_to(source, target_is_directory=True)
    return into


def work_left(metrics_text: str) -> dict[str, int]:
    """Open streams and offline requests in a server's Prometheus metrics (the nonzero ones)."""
    from prometheus_client.parser import text_string_to_metric_families  # the server role's; the CLI imports this module

    counts = {"streams": 0.0, "offline requests": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "tritonasr_open_streams":
                counts["streams"] += sample.value
            elif sample.name == "tritonasr_inflight_requests" or (
                    sample.name == "nv_inference_pending_request_count" and sample.labels.get("model") == "asr_offline"):
                counts["offline requests"] += sample.value
    return {name: int(count) for name, count in counts.items() if count}


STUB_EXECUTABLE = "triton_python_backend_stub"


def stub_processes(server_pid: int) -> dict[int, list[str]]:
    """The live Python-backend model processes (stubs) of the tritonserver `server_pid`: pid ->
    command line. The Python backend runs each stub as `STUB MODEL_PY SHM_REGION DEFAULT GROWTH
    SERVER_PID LIB IPC_HANDLE INSTANCE_NAME MODEL_DIR`, so a stub is known by the server pid on its
    command line, even orphaned. A dead stub not yet reaped (a zombie) has an empty command line
    and is not listed."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = [arg.decode(errors="replace") for arg in f.read().split(b"\0")]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if len(argv) > 8 and argv[0].endswith(STUB_EXECUTABLE) and argv[5] == str(server_pid):
            found[int(entry.name)] = argv
    return found


def _prepend(env: dict[str, str], variable: str, directory: str | Path) -> None:
    """Puts `directory` first in the search path `variable` of `env`."""
    env[variable] = os.pathsep.join(p for p in (str(directory), env.get(variable, "")) if p)


def _reach(host: str) -> str:
    """The address a local client uses for a server bound to `host`."""
    if host in ("0.0.0.0", "::", ""):
        return "localhost"
    return f"[{host}]" if ":" in host else host


_FAILED_MODEL = re.compile(r"failed to load '([^']+)'[^:]*:\s*(.*)")
_FAILED_TABLE_ROW = re.compile(r"^\|\s*(\S+)\s*\|\s*\d+\s*\|\s*UNAVAILABLE: (.*?)\s*\|?$")


class TritonServer:
    """Start, watch and stop one tritonserver process.

    >>> with TritonServer(ServerConfig(Path("model_repository"))) as server:
    ...     print(server.grpc_url)
    """

    def __init__(self, config: ServerConfig, echo_log: bool = False):
        self.config = config
        self.echo_log = echo_log
        self.process: subprocess.Popen | None = None
        self._view_dir: Path | None = None
        self._log: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._reader: threading.Thread | None = None
        self._shm_regions: set[str] = set()  # the model processes' regions in /dev/shm

    @property
    def grpc_url(self) -> str:
        return f"{_reach(self.config.grpc_host)}:{self.config.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{_reach(self.config.http_host)}:{self.config.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_reach(self.config.metrics_host)}:{self.config.metrics_port}/metrics"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(list(self._log)[-lines:])

    def start(self, timeout_s: float = 600.0) -> "TritonServer":
        repo = Path(self.config.model_repository)
        if not repo.is_dir():
            raise ServerError(f"model repository {repo} does not exist; run `tritonasr export` first")
        for name, port in (
            ("gRPC", self.config.grpc_port),
            ("HTTP", self.config.http_port),
            ("metrics", self.config.metrics_port),
        ):
            if not port_is_free(port):
                raise ServerError(f"{name} port {port} is already in use; pick another with --{name.lower()}-port")
        if self.config.tls:
            self.config.tls.check()
        backend_dir = self.config.backend_directory or prepare_backend_directory()
        view = None
        if self.config.model_control == "none" and self.config.models is not None:
            self._view_dir = Path(tempfile.mkdtemp(prefix="tritonasr-models-"))
            view = repository_view(repo, self.config.models, self._view_dir / "models")
        # The keys themselves stay here: the model processes get digests (config.environment()).
        env = {k: v for k, v in os.environ.items() if k not in ("TRITONASR_API_KEY", "TRITONASR_ADMIN_KEY")}
        if self.config.tritonserver is None:  # the wheel's server needs the wheel's libraries
            _prepend(env, "LD_LIBRARY_PATH", _libs_dir())
        if sysconfig.get_config_var("Py_ENABLE_SHARED"):
            # The stub links whichever libpython3.X the loader finds first (the system's): this
            # interpreter's own goes first, or stdlib extensions of another patch release fail to
            # load in the model processes (checked: _ssl of a pyenv 3.11.7 under Debian's 3.11.2
            # lacks _PyModule_Add, so nothing there could import ssl).
            _prepend(env, "LD_LIBRARY_PATH", sysconfig.get_config_var("LIBDIR"))
        _prepend(env, "PATH", Path(sys.executable).parent)
        env.setdefault("MALLOC_ARENA_MAX", str(MALLOC_ARENAS))  # an operator's own setting wins
        env.update(self.config.environment())
        self.process = subprocess.Popen(
            self.config.command(backend_dir, view),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # Ctrl-C in a terminal reaches us; we stop the server in order
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self._wait_ready(timeout_s)
        return self

    def _read_log(self) -> None:
        assert self.process and self.process.stdout
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self._log.append(line)
            if self.echo_log:
                print(line, file=sys.stderr, flush=True)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if self._reader:
                    self._reader.join(timeout=5)
                self._remove_view()
                raise ServerError(self._explain_exit())
            if self.is_ready():
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s\n{self.log_tail()}")

    def _explain_exit(self) -> str:
        log = list(self._log)
        failures = {}
        for line in log:
            match = _FAILED_MODEL.search(line) or _FAILED_TABLE_ROW.search(line)
            if match:
                failures.setdefault(match.group(1), match.group(2).strip())
        code = self.process.returncode if self.process else None
        if failures:
            detail = "\n".join(f"  {name}: {why}" for name, why in failures.items())
            return f"tritonserver exited ({code}): models failed to load:\n{detail}"
        if any("address already in use" in line.lower() for line in log):
            return f"tritonserver exited ({code}): a port is already in use\n{self.log_tail(15)}"
        return f"tritonserver exited ({code}) before it was ready:\n{self.log_tail()}"

    def work_left(self) -> dict[str, int] | None:
        """What a drain waits for, read from the server's own metrics: open streams, offline
        requests being worked on or queued ({} when none; None when the metrics cannot be read)."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        return work_left(text)

    def stub_processes(self) -> dict[int, list[str]]:
        """This server's live model processes: pid -> command line (see `stub_processes`)."""
        stubs = stub_processes(self.process.pid) if self.process else {}
        # Remembered while they live: a killed stub's region, or a killed server's, is freed at stop().
        self._shm_regions.update(argv[2].lstrip("/") for argv in stubs.values())
        return stubs

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL if the server has not drained in `timeout_s`. Model processes
        left behind (a killed or crashed server cannot stop them) are killed and their shared
        memory freed."""
        if self.process is None:
            self._remove_view()
            return None
        if self.process.poll() is None:
            self.stub_processes()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for pid in self.stub_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Unlinking a region the server already removed is a no-op.
        for region in self._shm_regions:
            with contextlib.suppress(OSError):
                os.unlink(Path("/dev/shm") / region)
        self._shm_regions.clear()
        shutil.rmtree(admission.slot_directory(self.process.pid), ignore_errors=True)
        if self._reader:
            self._reader.join(timeout=5)
        self._remove_view()
        return self.process.returncode

    def _remove_view(self) -> None:
        if self._view_dir is not None:
            shutil.rmtree(self._view_dir, ignore_errors=True)
            self._view_dir = None

    def restart(self, drain_s: float = 1.0, timeout_s: float = 600.0) -> "TritonServer":
        """Stop (in-flight requests get `drain_s`) and start again with the same config."""
        self.stop(timeout_s=drain_s)
        return self.start(timeout_s)

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
