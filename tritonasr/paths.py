"""Where things live: the files the package ships, the model repository, the user's cache.

The package carries its model templates (each model's config.pbtxt and model.py), the sample,
the speech corpus and the deployment's configuration as package data, so an installed wheel works from any directory. In a checkout the default model
repository is its model_repository/; anywhere else, a per-user data directory.
"""
from __future__ import annotations

import argparse
import os
from importlib import resources
from pathlib import Path

# The checkout holding this package, when it is one (an editable install); site-packages otherwise.
CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


def _shipped(*parts: str) -> Path:
    """A file or directory of the package's data (wheels install unzipped: a real path)."""
    return Path(str(resources.files("tritonasr").joinpath(*parts)))


def model_templates() -> Path:
    """The hand-written part of each model: <model>/config.pbtxt and <model>/1/model.py."""
    return _shipped("model_templates")


def sample_audio() -> Path:
    return _shipped("data", "sample.wav")


def deploy_files() -> Path:
    """The deployment's configuration (deploy/ in a checkout): Prometheus's scrape config, Grafana's
    provisioning and dashboard, the TLS script, the gRPC balancer's nginx config."""
    return Path(str(resources.files("tritonasr.deploy")))


def speech_dir() -> Path:
    """The speech corpus (espeak-ng speech with a known layout: its README.md, layout.json) that
    the load tests, benchmarks, export checks and tests send."""
    return _shipped("data", "speech")


def in_checkout() -> bool:
    return (CHECKOUT_ROOT / "pyproject.toml").is_file() and (CHECKOUT_ROOT / "tritonasr" / "cli.py").is_file()


def data_dir() -> Path:
    """Per-user data: $XDG_DATA_HOME/tritonasr (default ~/.local/share/tritonasr)."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "tritonasr"


def cache_dir() -> Path:
    """Downloaded weights, random-init checkpoints, the prepared backend directory."""
    root = Path(os.environ.get("TRITONASR_CACHE") or Path.home() / ".cache" / "tritonasr")
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_model_repository() -> Path:
    """The repository `serve` serves and `export` writes to: $TRITONASR_MODEL_REPOSITORY, else the
    checkout's model_repository/, else <data_dir>/model_repository."""
    if os.environ.get("TRITONASR_MODEL_REPOSITORY"):
        return Path(os.environ["TRITONASR_MODEL_REPOSITORY"])
    return (CHECKOUT_ROOT if in_checkout() else data_dir()) / "model_repository"


def add_repository_argument(parser: argparse.ArgumentParser) -> None:
    """The --model-repository option of every command that reads or writes a repository."""
    parser.add_argument("--model-repository", type=Path, default=None,
                        help=f"Triton model repository (default: $TRITONASR_MODEL_REPOSITORY, else "
                             f"{default_model_repository()})")
