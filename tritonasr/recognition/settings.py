"""The pipeline models' settings: each default written once, here, and one rule for where a value
comes from. Light on purpose (standard library only): the CLI shows these defaults in
`serve --help` on every install.

Each setting of a model comes from, first to last:
1. the server's environment, `TRITONASR_<PARAMETER>` (`tritonasr serve`'s flags set it, for
   every model that has the setting: `--max-streams` is TRITONASR_MAX_STREAMS);
2. the model's own config parameter of that name (`parameters { key: "max_streams" ... }`);
3. the default below.
The shipped configs carry only what `repo build` changes per target; the README lists the rest.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import ClassVar, Mapping

from tritonasr.contract import MAX_CHUNK_MS

ENV_PREFIX = "TRITONASR_"


def _parse(text: str, kind: type):
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    return kind(text)


class ModelSettings:
    """Base of the settings dataclasses below: their config parameters, environment variables
    and the precedence in the module docstring."""

    PREFIX: ClassVar[str] = ""  # a field's config parameter is PREFIX + its name

    @classmethod
    def parameter(cls, name: str) -> str:
        return cls.PREFIX + name

    @classmethod
    def variable(cls, name: str) -> str:
        """The environment variable that sets field `name` for the whole server."""
        return ENV_PREFIX + cls.parameter(name).upper()

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], environ: Mapping[str, str] | None = None):
        """The settings of a model with config parameters `params`, in the module's precedence."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            # An empty variable is unset (compose files pass `${VAR:-}` through).
            given = environ.get(cls.variable(f.name)) or params.get(cls.parameter(f.name))
            if given is not None:
                try:
                    values[f.name] = _parse(given, type(f.default))
                except ValueError as exc:
                    raise ValueError(f"{cls.parameter(f.name)}: {exc}") from None
        return cls(**values)

    @classmethod
    def environment(cls, overrides: Mapping[str, object]) -> dict[str, str]:
        """What `tritonasr serve` puts in the environment for these overrides (checked first)."""
        cls(**overrides)
        return {cls.variable(name): str(value).lower() if isinstance(value, bool) else str(value)
                for name, value in overrides.items()}

    def _check(self, condition: bool, name: str, needs: str) -> None:
        if not condition:
            raise ValueError(f"{self.parameter(name)} must be {needs}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class PipelineSettings(ModelSettings):
    """What asr_offline, asr_stream and speaker_registry call, and how."""

    vad_model: str = "vad"
    sensevoice_model: str = "sensevoice"
    parakeet_encoder_model: str = "parakeet_encoder"
    parakeet_decoder_model: str = "parakeet_decoder"
    # The front ends as served models ("": computed in the pipeline's process, on the CPU);
    # `repo build` names them for GPU targets.
    fbank_model: str = ""
    speaker_fbank_model: str = ""
    mel_model: str = ""
    # For requests that name no engine; "" is SenseVoice if exported, else Parakeet.
    default_asr_engine: str = ""
    # Segment features padded to whole multiples of this (0: not padded), so a GPU engine sees
    # a few shapes; `repo build` sets it for GPU targets.
    pad_segments_ms: int = 0

    def __post_init__(self):
        self._check(self.pad_segments_ms >= 0, "pad_segments_ms", "0 (no padding) or more")


@dataclass(frozen=True)
class OfflineSettings(ModelSettings):
    """asr_offline's limits."""

    # One request's longest audio (115 MB of float32), refused before any work is done on it.
    # Triton cannot refuse it sooner: its gRPC frontend takes messages up to 2 GB whole, and dims
    # [ -1 ] has no maximum. A request sits whole in the instance's shared-memory region, which
    # never shrinks: longer recordings go through asr_stream in chunks (the client does so itself).
    max_audio_seconds: float = 1800.0
    # Audio one instance works on at once (each instance is a process: the server's total is
    # instances x this). Past it a request is refused at once (UNAVAILABLE) rather than queued in
    # memory; a lone request is always taken.
    max_inflight_audio_mb: float = 1024.0
    # Requests one instance works on at once, sharing the leaf models (a short one is not held
    # behind long ones). Past it the instance takes no more: the rest wait in Triton's queue,
    # whose policy (max_queue_size, the timeout) refuses what cannot start in time.
    max_inflight_requests: int = 16
    # Segments of those requests in the ASR and speaker models at once: enough to keep the leaf
    # models busy, and no more, since the leaf models' queues are first come, first served (the
    # order below holds only for segments still waiting here) and their inputs sit in shared
    # memory, which never shrinks. On a CPU batching gains nothing; `repo build` sets
    # GPU_MAX_INFLIGHT_SEGMENTS on GPU targets, whose batches need more.
    max_inflight_segments: int = 8
    # Whose segments take a free slot first: the request due first, due = when it came plus this
    # many seconds per second of its audio. 0 is first come, first served; 2 lets a 15 s recording
    # pass a 60 s one that came up to 90 s before it, so short requests are not held behind long
    # ones, and a long one still goes before whatever comes 90 s after it. Measured with 0.5, 2
    # and 8: BENCHMARKS.md, "Offline: shorter requests first".
    short_first: float = 2.0

    def __post_init__(self):
        self._check(self.max_audio_seconds > 0, "max_audio_seconds", "positive")
        self._check(self.max_inflight_audio_mb > 0, "max_inflight_audio_mb", "positive")
        self._check(self.max_inflight_requests > 0, "max_inflight_requests", "positive")
        self._check(self.max_inflight_segments > 0, "max_inflight_segments", "positive")
        self._check(self.short_first >= 0, "short_first", "0 (first come, first served) or more")


@dataclass(frozen=True)
class RegistrySettings(ModelSettings):
    """speaker_registry's limit on one enrollment recording."""

    PREFIX: ClassVar[str] = "enroll_"
    max_audio_seconds: float = 600.0

    def __post_init__(self):
        self._check(self.max_audio_seconds > 0, "max_audio_seconds", "positive")


@dataclass(frozen=True)
class StreamSettings(ModelSettings):
    """asr_stream's limits and rules."""

    max_chunk_ms: int = MAX_CHUNK_MS  # longer chunks are refused
    # The VAD runs on whole steps of this much audio, so streams sending any chunk size batch
    # together in `vad`.
    vad_step_ms: int = 100
    # Open streams on the whole server (all instances) and per caller (API key; without keys every
    # caller is one client); 0: no limit. A START beyond a limit is refused at once (UNAVAILABLE).
    # 16 is what the 2-core CPU machine of BENCHMARKS.md serves in real time; size it for yours
    # with `tritonasr bench stream --overload 3` (README: Admission control).
    max_streams: int = 16
    max_streams_per_client: int = 0
    # A second START on a live sequence id is refused, and so is a chunk whose stream_token differs
    # from its START's (the client library sends a random token); true also refuses streams
    # opened without a token.
    require_stream_token: bool = False
    # A segment's decode starts this long before its end silence completes, from where it will
    # end if the silence lasts, so its final is ready about when the silence is; a pause that
    # turns back into speech within this time costs that decode, thrown away. 0: decode at the end.
    decode_ahead_ms: int = 300

    def __post_init__(self):
        self._check(self.decode_ahead_ms >= 0, "decode_ahead_ms", "0 (off) or more")
        self._check(0 < self.max_chunk_ms <= MAX_CHUNK_MS, "max_chunk_ms", f"between 1 and {MAX_CHUNK_MS}")
        self._check(self.vad_step_ms > 0, "vad_step_ms", "positive")
        for name in ("max_streams", "max_streams_per_client"):
            self._check(getattr(self, name) >= 0, name, "0 (no limit) or more")


@dataclass(frozen=True)
class SpeakerSettings(ModelSettings):
    """The speaker stage's settings, shared by asr_offline, asr_stream and speaker_registry."""

    PREFIX: ClassVar[str] = "speaker_"
    model: str = "speaker"  # "" turns the stage off
    store: str = ""  # "" is <repository>/speaker_registry/speakers.db; sqlite:///PATH elsewhere; postgresql://…
    min_segment_ms: int = 1000  # shorter segments get no embedding: too little voice to tell
    window_ms: int = 3000  # embeddings of longer segments average windows of this length
    # Cosine similarities for trained ERes2NetV2 weights; random-weight models need others.
    threshold: float = 0.5  # a segment is an enrolled speaker at this similarity to its voiceprint
    cluster_threshold: float = 0.5  # an anonymous label's cluster takes a segment at this similarity

    def __post_init__(self):
        for name in ("min_segment_ms", "window_ms"):
            self._check(getattr(self, name) > 0, name, "positive")
        for name in ("threshold", "cluster_threshold"):
            self._check(-1.0 <= getattr(self, name) <= 1.0, name, "a cosine similarity, between -1 and 1")
