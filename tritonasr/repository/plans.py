"""`tritonasr repo plans DIR`: build the TensorRT plans a `gpu-tensorrt` repository lists in its
plans.json, on the GPU that will serve them (a plan only runs on the GPU model and TensorRT
version that built it), with NVIDIA's `trtexec` from the Triton image.

Each plan gets a stamp (model.plan.json: GPU, trtexec version, profile): a plan whose stamp still
matches is kept, so a restarted deployment does not rebuild its plans.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tritonasr.repository.build import PLANS_FILE

# Where the NGC images put trtexec when it is not on PATH.
TRTEXEC_LOCATIONS = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")


class PlanError(RuntimeError):
    pass


def find_trtexec(explicit: str | None = None) -> str:
    for candidate in ([explicit] if explicit else [shutil.which("trtexec"), *TRTEXEC_LOCATIONS]):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise PlanError("trtexec not found: run this in NVIDIA's Triton or TensorRT image on the serving GPU, "
                    "or pass --trtexec PATH")


def shapes_argument(shapes: dict[str, list[int]]) -> str:
    """trtexec's form: name:1x100x560,name2:1"""
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


def trtexec_command(trtexec: str, repository: Path, plan: dict, timing_cache: Path | None = None) -> list[str]:
    command = [
        trtexec, f"--onnx={repository / plan['onnx']}", f"--saveEngine={repository / plan['plan']}",
        f"--minShapes={shapes_argument(plan['min'])}", f"--optShapes={shapes_argument(plan['opt'])}",
        f"--maxShapes={shapes_argument(plan['max'])}", "--skipInference",
    ]
    if plan.get("fp16"):
        command.append("--fp16")
    if timing_cache is not None:
        command.append(f"--timingCacheFile={timing_cache}")
    return command


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise PlanError(f"no GPU visible (nvidia-smi: {exc}); plans are built on the serving GPU") from exc
    return out.strip()


def _trtexec_version(trtexec: str) -> str:
    out = subprocess.run([trtexec, "--help"], capture_output=True, text=True, timeout=60).stdout
    return next((line.strip() for line in out.splitlines() if "TensorRT" in line), "unknown")


def build_plans(repository: Path, trtexec: str | None = None, force: bool = False,
                timing_cache: Path | None = None, log=print) -> list[str]:
    """Builds every missing or stale plan; returns the models built."""
    repository = Path(repository).resolve()
    listing = repository / PLANS_FILE
    if not listing.exists():
        raise PlanError(f"{listing} does not exist: build the repository with "
                        f"`tritonasr repo build --target gpu-tensorrt` first")
    plans = json.loads(listing.read_text())["plans"]
    trtexec = find_trtexec(trtexec)
    stamp_base = {"gpu": _gpu_name(), "tensorrt": _trtexec_version(trtexec)}
    built = []
    for plan in plans:
        target = repository / plan["plan"]
        stamp_file = target.with_name(target.name + ".json")
        stamp = {**stamp_base, "profile": {k: plan[k] for k in ("min", "opt", "max", "fp16")}}
        if not force and target.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
            log(f"{plan['model']}: plan is current ({stamp['gpu']}, {stamp['tensorrt']})")
            continue
        command = trtexec_command(trtexec, repository, plan, timing_cache)
        log(f"{plan['model']}: building {target} on {stamp['gpu']}…\n  {' '.join(command)}")
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not target.exists():
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise PlanError(f"{plan['model']}: trtexec failed ({result.returncode}):\n{tail}")
        stamp_file.write_text(json.dumps(stamp, indent=2) + "\n")
        built.append(plan["model"])
    return built


def main(args) -> int:
    try:
        built = build_plans(args.repository, args.trtexec, args.force, args.timing_cache)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"plans built: {', '.join(built) or 'none needed'}")
    return 0
