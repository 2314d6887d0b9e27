"""Enrolled speakers through the `speaker_registry` model: enroll from recordings, list, remove."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from tritonasr.audio import SAMPLE_RATE, AudioError, load_audio
from tritonasr.client.connection import AccessDeniedError, Credentials
from tritonasr.client.offline import (
    ModelClient,
    ServerUnavailableError,
    TranscriptionError,
    exit_code,
    server_audio,
    tensor_input,
)
from tritonasr.contract import EXIT_OK


class SpeakerRegistryClient(ModelClient):
    sends_admin_key = True  # enroll, replace and remove

    def __init__(self, url: str = "localhost:8001", model: str = "speaker_registry",
                 timeout_s: float | None = 600, credentials: Credentials | None = None):
        """credentials: enroll, replace and remove need its admin key."""
        super().__init__(url, model, timeout_s, credentials)

    def voiceprint(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> dict:
        """{"embedding", "speech_ms", "segments"} of a recording's speech."""
        audio = server_audio(samples, sample_rate)
        return self.infer([_action("embed"), tensor_input("AUDIO", audio, "FP32"),
                           tensor_input("SAMPLE_RATE", np.array([SAMPLE_RATE], dtype=np.int32), "INT32")])

    def enroll(self, name: str, files: list[str | os.PathLike], replace: bool = False) -> dict:
        """Enrolls `name` from one or more recordings of that speaker alone. A file that cannot
        be read or holds too little speech fails the whole enrollment, naming the file."""
        if not files:
            raise ValueError("enroll needs at least one audio file")
        prints = []
        for path in files:
            try:
                audio = load_audio(path)
                prints.append(self.voiceprint(audio.samples, audio.sample_rate))
            except ServerUnavailableError:
                raise
            except (AudioError, TranscriptionError, OSError) as exc:
                raise TranscriptionError(f"{path}: {exc}") from None
        return self.enroll_voiceprints(name, prints, replace)

    def enroll_voiceprints(self, name: str, prints: list[dict], replace: bool = False) -> dict:
        """Enrolls `name` from voiceprint() results of recordings of that speaker alone."""
        embeddings = np.array([p["embedding"] for p in prints], dtype=np.float32)
        speech_ms = np.array([p["speech_ms"] for p in prints], dtype=np.int32)
        return self.infer([_action("enroll"), _text("NAME", name), tensor_input("EMBEDDINGS", embeddings, "FP32"),
                           tensor_input("SPEECH_MS", speech_ms, "INT32"),
                           tensor_input("REPLACE", np.array([replace], dtype=np.bool_), "BOOL")])

    def remove(self, name: str) -> dict:
        return self.infer([_action("remove"), _text("NAME", name)])

    def list(self) -> list[dict]:
        return self.infer([_action("list")])["speakers"]


def _text(name: str, value: str):
    return tensor_input(name, np.array([value.encode()], dtype=np.object_), "BYTES")


def _action(action: str):
    return _text("ACTION", action)


def run_speakers(action: str, url: str, name: str | None = None, files: list[str] = (),
                 replace: bool = False, fmt: str = "text", credentials: Credentials | None = None) -> int:
    """`tritonasr speakers enroll|list|remove`; returns the exit code (0 ok, 1 refused,
    2 server unreachable or registry not loaded, 3 access denied)."""
    try:
        with SpeakerRegistryClient(url, credentials=credentials) as client:
            client.check_ready()
            if action == "enroll":
                result = client.enroll(name, files, replace)
                print(f"enrolled {result['enrolled']!r} from {result['recordings']} recording(s), "
                      f"{result['speech_ms'] / 1000:.1f} s of speech")
            elif action == "remove":
                print(f"removed {client.remove(name)['removed']!r}")
            elif fmt == "json":
                print(json.dumps(client.list(), ensure_ascii=False))
            else:
                speakers = client.list()
                for s in speakers:
                    print(f"{s['name']}\t{s['speech_ms'] / 1000:.1f} s of speech\tenrolled {s['enrolled_at']}")
                print(f"{len(speakers)} speaker(s) enrolled", file=sys.stderr)
    except (AccessDeniedError, TranscriptionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)
    return EXIT_OK
