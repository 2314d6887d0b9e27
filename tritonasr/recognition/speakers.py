"""Who spoke a segment: enrolled voiceprints in a store, identification by cosine similarity,
and anonymous labels for everyone else.

The store is an interface (`SpeakerStore`): the embedded default is an SQLite file; a fleet of
servers shares one PostgreSQL database. Every identification asks the store for its version (one
tiny query) and reloads the voiceprints only when it changed, so an enrollment through any
server instance is seen by all of them at their next segment.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Awaitable, Callable, Protocol

import numpy as np

from tritonasr.errors import SpeakerError, shown
from tritonasr.models.fbank import Extract
from tritonasr.models.meta import META_FILE
from tritonasr.models.speaker import Embedder, RunSpeaker, SpeakerSpec, unit
from tritonasr.recognition.clustering import OnlineClusters
from tritonasr.recognition.settings import SpeakerSettings

log = logging.getLogger("tritonasr")

MAX_NAME_CHARS = 100
# Recordings one enroll call may combine (the client sends one embedding per file).
MAX_ENROLL_RECORDINGS = 100


@dataclass(frozen=True)
class EnrolledSpeaker:
    name: str
    embedding_dim: int
    enrolled_at: str  # UTC, ISO 8601
    speech_ms: int  # speech the voiceprint was computed from


class SpeakerStore(Protocol):
    def enroll(self, name: str, embedding: np.ndarray, speech_ms: int, replace: bool = False) -> None: ...

    def remove(self, name: str) -> None: ...

    def speakers(self) -> list[EnrolledSpeaker]: ...

    def version(self) -> int:
        """Changes whenever a speaker is enrolled, replaced or removed."""

    def voiceprints(self, dim: int) -> tuple[list[str], np.ndarray]:
        """Names and unit embeddings [N, dim] of the speakers enrolled with `dim`-sized ones."""


def check_name(name: str) -> str:
    """The name as stored: stripped and NFC-normalised (every action goes through here, so
    "é" typed either way is one speaker)."""
    name = unicodedata.normalize("NFC", name.strip())
    if not name:
        raise SpeakerError("a speaker name must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise SpeakerError(f"a speaker name has at most {MAX_NAME_CHARS} characters")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise SpeakerError("a speaker name must not contain control characters")
    return name


class SqliteSpeakerStore:
    """Voiceprints in one SQLite file. Safe for the several processes of one server (Triton
    runs each model instance in its own process); WAL lets readers go on while one writes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        self._use_wal()
        with self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS speakers (name TEXT PRIMARY KEY, dim INTEGER NOT NULL, "
                            "embedding BLOB NOT NULL, enrolled_at TEXT NOT NULL, speech_ms INTEGER NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS state (version INTEGER NOT NULL)")
            self.db.execute("INSERT INTO state SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM state)")

    def _use_wal(self, timeout_s: float = 30.0) -> None:
        """WAL mode is a property of the file, set once. Switching to it needs the file to itself,
        and SQLite answers "database is locked" at once, without waiting for the busy timeout,
        when the server's other instances open the new file at the same moment: retry."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def enroll(self, name: str, embedding: np.ndarray, speech_ms: int, replace: bool = False) -> None:
        name = check_name(name)
        vector = _voiceprint(embedding)
        row = (name, vector.size, vector.astype("<f4").tobytes(),
               time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), int(speech_ms))
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            exists = self.db.execute("SELECT 1 FROM speakers WHERE name = ?", (name,)).fetchone()
            if exists and not replace:
                raise SpeakerError(f"speaker {name!r} is already enrolled; remove it first or replace it",
                                   code="ALREADY_EXISTS")
            self.db.execute("INSERT OR REPLACE INTO speakers VALUES (?, ?, ?, ?, ?)", row)
            self.db.execute("UPDATE state SET version = version + 1")

    def remove(self, name: str) -> None:
        name = check_name(name)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if self.db.execute("DELETE FROM speakers WHERE name = ?", (name,)).rowcount == 0:
                raise SpeakerError(f"no speaker named {name!r} is enrolled", code="NOT_FOUND")
            self.db.execute("UPDATE state SET version = version + 1")

    def speakers(self) -> list[EnrolledSpeaker]:
        rows = self.db.execute("SELECT name, dim, enrolled_at, speech_ms FROM speakers ORDER BY name")
        return [EnrolledSpeaker(*row) for row in rows]

    def version(self) -> int:
        return int(self.db.execute("SELECT version FROM state").fetchone()[0])

    def voiceprints(self, dim: int) -> tuple[list[str], np.ndarray]:
        rows = self.db.execute("SELECT name, embedding FROM speakers WHERE dim = ? ORDER BY name", (dim,)).fetchall()
        matrix = np.stack([np.frombuffer(blob, dtype="<f4") for _, blob in rows]) if rows else np.zeros((0, dim))
        return [name for name, _ in rows], matrix.astype(np.float32)


class PostgresSpeakerStore:
    """Voiceprints in a PostgreSQL database that every server of a fleet shares. The password
    comes from libpq's environment ($PGPASSWORD, a PGPASSFILE, a secret mounted as one), never
    from the URL, which ends up in configs and logs. Connections come from a small pool that
    replaces broken ones (a database restart costs the calls in flight, not the server)."""

    # An advisory lock's key: servers starting together create the tables one at a time.
    SCHEMA_LOCK = 0x7472_6173_7231

    def __init__(self, url: str):
        from psycopg_pool import ConnectionPool  # the server role's; only this store needs it

        if _url_password(url):
            raise SpeakerError("the speaker store's URL must not hold a password: give it in $PGPASSWORD "
                               "or a password file ($PGPASSFILE)")
        self.pool = ConnectionPool(url, min_size=1, max_size=4, kwargs={"autocommit": True},
                                   check=ConnectionPool.check_connection, open=True, timeout=30)
        with self.pool.connection() as db, db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (self.SCHEMA_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS tritonasr_speakers (name text PRIMARY KEY, dim integer NOT NULL, "
                       "embedding bytea NOT NULL, enrolled_at timestamptz NOT NULL, speech_ms integer NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS tritonasr_speaker_state "
                       "(id integer PRIMARY KEY CHECK (id = 1), version bigint NOT NULL)")
            db.execute("INSERT INTO tritonasr_speaker_state VALUES (1, 0) ON CONFLICT DO NOTHING")

    def enroll(self, name: str, embedding: np.ndarray, speech_ms: int, replace: bool = False) -> None:
        name = check_name(name)
        vector = _voiceprint(embedding)
        upsert = "UPDATE SET dim = excluded.dim, embedding = excluded.embedding, enrolled_at = excluded.enrolled_at, " \
                 "speech_ms = excluded.speech_ms" if replace else "NOTHING"
        with self.pool.connection() as db, db.transaction():
            added = db.execute(f"INSERT INTO tritonasr_speakers VALUES (%s, %s, %s, now(), %s) "
                               f"ON CONFLICT (name) DO {upsert} RETURNING name",
                               (name, vector.size, vector.astype("<f4").tobytes(), int(speech_ms))).fetchone()
            if added is None:  # (two servers enrolling one new name at once: the second is told)
                raise SpeakerError(f"speaker {name!r} is already enrolled; remove it first or replace it",
                                   code="ALREADY_EXISTS")
            db.execute("UPDATE tritonasr_speaker_state SET version = version + 1")

    def remove(self, name: str) -> None:
        name = check_name(name)
        with self.pool.connection() as db, db.transaction():
            if db.execute("DELETE FROM tritonasr_speakers WHERE name = %s RETURNING name", (name,)).fetchone() is None:
                raise SpeakerError(f"no speaker named {name!r} is enrolled", code="NOT_FOUND")
            db.execute("UPDATE tritonasr_speaker_state SET version = version + 1")

    def speakers(self) -> list[EnrolledSpeaker]:
        with self.pool.connection() as db:
            rows = db.execute("SELECT name, dim, to_char(enrolled_at AT TIME ZONE 'UTC', "
                              "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), speech_ms FROM tritonasr_speakers ORDER BY name")
            return [EnrolledSpeaker(*row) for row in rows]

    def version(self) -> int:
        with self.pool.connection() as db:
            return int(db.execute("SELECT version FROM tritonasr_speaker_state").fetchone()[0])

    def close(self) -> None:
        self.pool.close()

    def voiceprints(self, dim: int) -> tuple[list[str], np.ndarray]:
        with self.pool.connection() as db:
            rows = db.execute("SELECT name, embedding FROM tritonasr_speakers WHERE dim = %s ORDER BY name",
                              (dim,)).fetchall()
        matrix = np.stack([np.frombuffer(blob, dtype="<f4") for _, blob in rows]) if rows else np.zeros((0, dim))
        return [name for name, _ in rows], matrix.astype(np.float32)


def _voiceprint(embedding: np.ndarray) -> np.ndarray:
    vector = unit(embedding)
    if vector.size == 0 or not np.all(np.isfinite(vector)) or not np.any(vector):
        raise SpeakerError("the embedding must be a non-zero vector of finite numbers")
    return vector


def _url_password(url: str) -> str | None:
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    return parts.password or (parse_qs(parts.query).get("password") or [None])[0]


def open_store(location: str | Path) -> SpeakerStore:
    """`sqlite:///abs/path.db` or a plain file path (one server), or `postgresql://USER@HOST:PORT/DB`
    (a fleet sharing one database; the password from libpq's environment)."""
    location = str(location)
    if "://" not in location:
        return SqliteSpeakerStore(Path(location))
    scheme, _, rest = location.partition("://")
    if scheme == "sqlite":
        return SqliteSpeakerStore(Path(rest))
    if scheme in ("postgresql", "postgres"):
        return PostgresSpeakerStore(location)
    raise SpeakerError(f"unknown speaker store {shown(location)}: use sqlite:///PATH, a file path or "
                       "postgresql://USER@HOST:PORT/DATABASE")


class SpeakerIdentifier:
    """The enrolled speaker most similar to an embedding, if similar enough."""

    def __init__(self, store: SpeakerStore, dim: int, threshold: float):
        self.store = store
        self.dim = dim
        self.threshold = threshold
        self._version = -1
        self._names: list[str] = []
        self._matrix = np.zeros((0, dim), dtype=np.float32)

    def identify(self, embedding: np.ndarray) -> tuple[str | None, float | None]:
        """(name or None, best cosine similarity or None when nobody is enrolled)."""
        self._refresh()
        if not self._names:
            return None, None
        scores = self._matrix @ embedding
        best = int(np.argmax(scores))
        score = float(scores[best])
        return (self._names[best] if score >= self.threshold else None), score

    def _refresh(self) -> None:
        version = self.store.version()
        if version != self._version:
            self._names, self._matrix = self.store.voiceprints(self.dim)
            self._version = version


def build_speaker_stage(repository: Path, settings: SpeakerSettings, run_speaker: RunSpeaker,
                        fbank: Extract | None = None) -> "SpeakerStage | None":
    """The stage, or None when it is turned off or the speaker model was not exported.
    fbank: a served speaker front end (default: in-process)."""
    model_dir = Path(repository) / settings.model / "1"
    if not settings.model or not (model_dir / META_FILE).is_file():
        return None
    spec = SpeakerSpec.load(model_dir)
    store = open_store(settings.store or Path(repository) / "speaker_registry" / "speakers.db")
    return SpeakerStage(Embedder(spec, run_speaker, settings.min_segment_ms, settings.window_ms, fbank),
                        SpeakerIdentifier(store, spec.embedding_dim, settings.threshold), settings.cluster_threshold)


def combine(embeddings: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One voiceprint from several: the weighted mean of their unit vectors."""
    vectors = np.stack([unit(e) for e in embeddings])
    return unit(np.asarray(weights, dtype=np.float64) @ vectors)


class SpeakerStage:
    """The pipeline's speaker step: embeddings of segments, identified and labelled."""

    def __init__(self, embedder: Embedder, identifier: SpeakerIdentifier, cluster_threshold: float):
        self.embedder = embedder
        self.identifier = identifier
        self.cluster_threshold = cluster_threshold

    async def embed(self, samples: np.ndarray) -> np.ndarray | None:
        return await self.embedder.embed(samples)

    def session(self, return_embedding: bool = False) -> "SpeakerSession":
        return SpeakerSession(self, return_embedding)


class SpeakerSession:
    """Labels for the segments of one file or stream, given in segment order."""

    def __init__(self, stage: SpeakerStage, return_embedding: bool):
        self.stage = stage
        self.clusters = OnlineClusters(stage.cluster_threshold)
        self.return_embedding = return_embedding

    def describe(self, embedding: np.ndarray | None) -> dict | None:
        """The segment JSON's "speaker" field; None for a segment too short to embed."""
        if embedding is None:
            return None
        name, score = self.stage.identifier.identify(embedding)
        label, _ = self.clusters.assign(embedding)
        result = {"id": name, "score": None if score is None else round(score, 4), "label": label}
        if self.return_embedding:
            result["embedding"] = [round(float(x), 6) for x in embedding]
        return result


# (whole recording) -> its speech segments in ms
DetectSpeech = Callable[[np.ndarray], Awaitable[list[tuple[int, int]]]]


class SpeakerRegistry:
    """The speaker_registry model's actions: voiceprints of recordings, enroll, remove, list."""

    def __init__(self, stage: SpeakerStage, detect_speech: DetectSpeech, sample_rate: int = 16000):
        self.stage = stage
        self.store = stage.identifier.store
        self.detect_speech = detect_speech
        self.sample_rate = sample_rate

    async def embed(self, samples: np.ndarray) -> dict:
        """The voiceprint of a recording's speech: each long enough segment's embedding, weighted
        by its length."""
        speech = await self.detect_speech(samples)
        per_ms = self.sample_rate // 1000
        vectors = await asyncio.gather(*(self.stage.embed(samples[s * per_ms: e * per_ms]) for s, e in speech))
        kept = [(v, e - s) for v, (s, e) in zip(vectors, speech) if v is not None]
        if not kept:
            raise SpeakerError(f"no speech segment of at least {self.stage.embedder.min_segment_ms} ms found "
                               "in this audio: enroll from a recording with more speech")
        weights = np.array([ms for _, ms in kept], dtype=np.float64)
        return {"embedding": combine(np.stack([v for v, _ in kept]), weights).tolist(),
                "speech_ms": int(weights.sum()), "segments": len(kept)}

    def enroll(self, name: str, embeddings: np.ndarray, speech_ms: np.ndarray, replace: bool = False) -> dict:
        """Enrolls `name` with the speech-weighted mean of `embeddings` [N, D] (one per recording)."""
        name = check_name(name)
        dim = self.stage.identifier.dim
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim == 1:
            embeddings = embeddings[None]  # one recording
        speech_ms = np.asarray(speech_ms, dtype=np.float64).reshape(-1)
        # Another model's (or a truncated) embedding would be stored and never match anyone.
        if embeddings.ndim != 2 or embeddings.shape[1] != dim or len(speech_ms) != len(embeddings) \
                or len(embeddings) == 0:
            raise SpeakerError(f"enroll needs N embeddings of this server's {dim} values and N speech "
                               f"durations; got {list(embeddings.shape)} and {len(speech_ms)}")
        if len(embeddings) > MAX_ENROLL_RECORDINGS:
            raise SpeakerError(f"enroll combines at most {MAX_ENROLL_RECORDINGS} recordings; got {len(embeddings)}")
        if not np.all(speech_ms > 0):
            raise SpeakerError("speech durations must be positive")
        self.store.enroll(name, combine(embeddings, speech_ms), int(speech_ms.sum()), replace)
        return {"enrolled": name, "speech_ms": int(speech_ms.sum()), "recordings": len(embeddings)}

    def remove(self, name: str) -> dict:
        name = check_name(name)
        self.store.remove(name)
        return {"removed": name}

    def list(self) -> dict:
        return {"speakers": [asdict(s) for s in self.store.speakers()]}
