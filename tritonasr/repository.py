"""The served model repository: our hand-written parts (configs, model.py) travel with the
checkout; exports add the generated parts (graphs, tokenizer, meta.json)."""
from __future__ import annotations

import shutil
from pathlib import Path

from tritonasr.paths import CHECKOUT_ROOT

TEMPLATES = CHECKOUT_ROOT / "model_repository"
# Which served models each export brings to life.
MODELS_OF_EXPORT = {"vad": ["vad"], "sensevoice": ["sensevoice", "asr_offline", "asr_stream"],
                    "speaker": ["speaker", "speaker_registry"]}
ALL_MODELS = [model for models in MODELS_OF_EXPORT.values() for model in models]


def install_model_files(repository: Path, models: list[str]) -> None:
    """Copy config.pbtxt, configs/ and 1/model.py of `models` into `repository` when it is not the
    checkout's own model_repository/. Files already there are left alone (they may be tuned)."""
    repository = Path(repository)
    if repository.resolve() == TEMPLATES.resolve():
        return
    for model in models:
        source = TEMPLATES / model
        for path in [source / "config.pbtxt", source / "1" / "model.py", *sorted((source / "configs").glob("*.pbtxt"))]:
            target = repository / model / path.relative_to(source)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


def exported_models(repository: Path) -> list[str]:
    """The served models whose export has been run: those a server of `repository` can load.
    (The checkout's repository holds every model's config, exported or not.)"""
    repository = Path(repository)
    return [model for export, models in MODELS_OF_EXPORT.items()
            if (repository / export / "1" / "model.onnx").exists() for model in models]
