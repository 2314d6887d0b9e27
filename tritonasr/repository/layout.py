"""The served model repository: our hand-written parts (configs, model.py) ship with the package
(paths.model_templates); exports add the generated parts (graphs, tokenizer, meta.json)."""
from __future__ import annotations

import shutil
from pathlib import Path

from tritonasr.models.meta import META_FILE
from tritonasr.paths import model_templates

# Each export's leaf models: their meta.json (an export writes it with the graphs) shows it ran.
LEAF_MODELS = {"vad": ["vad"], "sensevoice": ["sensevoice"], "parakeet": ["parakeet_encoder", "parakeet_decoder"],
               "speaker": ["speaker"]}
# The Python BLS models an export brings to life beside its leaf models.
PIPELINES = ["asr_offline", "asr_stream"]
BLS_OF_EXPORT = {"sensevoice": PIPELINES, "parakeet": PIPELINES, "speaker": ["speaker_registry"]}
ALL_MODELS = [m for models in LEAF_MODELS.values() for m in models] + PIPELINES + ["speaker_registry"]
# Front ends served as models (`tritonasr repo build`, GPU targets), written by the build, not
# by an export: waveforms in, features out, batched across requests. What each computes, and
# the pipelines' parameter that names it.
SERVED_FRONTENDS = {
    "fbank": ("kaldi fbank of the VAD and SenseVoice", "fbank_model"),
    "speaker_fbank": ("kaldi fbank of the speaker model", "speaker_fbank_model"),
    "parakeet_mel": ("NeMo log-mel of Parakeet", "mel_model"),
}


def models_of_export(export: str) -> list[str]:
    return LEAF_MODELS[export] + BLS_OF_EXPORT.get(export, [])


def exported_models(repository: Path) -> list[str]:
    """The served models whose export has been run, and the front ends a build added: those a
    server of `repository` can load (a repository may hold configs of models never exported)."""
    repository = Path(repository)
    done = [export for export, leaves in LEAF_MODELS.items()
            if all((repository / model / "1" / META_FILE).exists() for model in leaves)]
    frontends = [model for model in SERVED_FRONTENDS if (repository / model / "1" / META_FILE).exists()]
    return sorted({model for export in done for model in models_of_export(export)} | set(frontends))


def install_model_files(repository: Path, models: list[str]) -> None:
    """Copy the shipped config.pbtxt, configs/ and 1/model.py of `models` into `repository`.
    Configs already there are left alone (they may be tuned); a model.py is code of this package
    version (it imports its modules), so a different one is replaced."""
    repository = Path(repository)
    templates = model_templates()
    for model in models:
        source = templates / model
        if not source.is_dir():  # a front end `repo build` wrote whole
            continue
        for path in [source / "config.pbtxt", source / "1" / "model.py", *sorted((source / "configs").glob("*.pbtxt"))]:
            target = repository / model / path.relative_to(source)
            stale = path.name == "model.py" and target.exists() and target.read_bytes() != path.read_bytes()
            if stale or not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
