"""The speaker stage's settings: one set of defaults, and where each value comes from. Light on
purpose (no numpy): the CLI shows the defaults in `serve --help` on every install."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class SpeakerSettings:
    """The speaker stage's settings, shared by asr_offline, asr_stream and speaker_registry; the
    defaults here are the only ones. Each setting comes from, first to last:
    1. the model's own config parameter (`speaker_threshold`, ...: that model only),
    2. `tritonasr serve --speaker-threshold ...` (all three models, through the environment),
    3. the default below."""

    model: str = "speaker"  # "" turns the stage off
    store: str = ""  # "" is <repository>/speaker_registry/speakers.db; sqlite:///PATH elsewhere
    min_segment_ms: int = 1000  # shorter segments get no embedding: too little voice to tell
    window_ms: int = 3000  # embeddings of longer segments average windows of this length
    # Cosine similarities for trained ERes2NetV2 weights; random-weight models need others.
    threshold: float = 0.5  # a segment is an enrolled speaker at this similarity to its voiceprint
    cluster_threshold: float = 0.5  # an anonymous label's cluster takes a segment at this similarity

    def __post_init__(self):
        for name in ("min_segment_ms", "window_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"speaker {name} must be positive, got {getattr(self, name)}")
        for name in ("threshold", "cluster_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"speaker {name} is a cosine similarity, between -1 and 1; got {getattr(self, name)}")

    @staticmethod
    def parameter(name: str) -> str:
        """The config parameter of setting `name` (speaker_threshold, ...)."""
        return "speaker_model" if name == "model" else f"speaker_{name}"

    @staticmethod
    def variable(name: str) -> str:
        """The environment variable `tritonasr serve` sets for setting `name`."""
        return f"TRITONASR_SPEAKER_{name.upper()}"

    @classmethod
    def from_parameters(cls, params: dict[str, str], environ: dict[str, str] | None = None) -> "SpeakerSettings":
        """The settings of a model with config `params`, in the order the class docstring says."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            given = params.get(cls.parameter(f.name), environ.get(cls.variable(f.name)))
            if given is not None:
                values[f.name] = type(getattr(cls, f.name))(given)
        return cls(**values)

    @classmethod
    def environment(cls, overrides: dict[str, object]) -> dict[str, str]:
        """What `tritonasr serve` puts in the environment for these overrides (checked first)."""
        cls(**overrides)
        return {cls.variable(name): str(value) for name, value in overrides.items()}
