"""Where things live: the checkout, its model repository, the user cache."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Downloaded weights, random-init checkpoints, the prepared backend directory."""
    root = Path(os.environ.get("TRITONASR_CACHE") or Path.home() / ".cache" / "tritonasr")
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_model_repository() -> Path:
    """The repository `serve` serves and `export` writes to: the checkout's model_repository/,
    or $TRITONASR_MODEL_REPOSITORY."""
    return Path(os.environ.get("TRITONASR_MODEL_REPOSITORY") or CHECKOUT_ROOT / "model_repository")


def add_repository_argument(parser: argparse.ArgumentParser) -> None:
    """The --model-repository option of every command that reads or writes a repository."""
    parser.add_argument("--model-repository", type=Path, default=None,
                        help="Triton model repository (default: $TRITONASR_MODEL_REPOSITORY, else the "
                             "checkout's model_repository/)")


def sample_audio() -> Path:
    return CHECKOUT_ROOT / "samples" / "sample.wav"
