"""The jobs database: jobs, their files (the uploaded audio until a result replaces it) and results,
through SQLAlchemy Core, so that one code path serves SQLite (one gateway, the default) and
PostgreSQL (replicas sharing one queue). The schema is Alembic's to change (migrations/), applied
by `migrate()` when a gateway starts.

A worker takes a file by *claiming* it: one UPDATE picks the first queued file (or a running one
whose lease ran out: its worker died) and marks it running with a new claim token and a lease.
PostgreSQL picks with `FOR UPDATE SKIP LOCKED`, so replicas claiming at once take different files;
SQLite runs every transaction as `BEGIN IMMEDIATE`, one writer at a time. Whatever a worker writes
afterwards (progress, its lease, the result) is written only while the claim is still its own, so
a file taken over or cancelled meanwhile never gets a second result.

A job may be made *open*: it then takes more files (`append`) until its caller closes or cancels
it, so that a folder larger than one request's upload limit becomes one job. An append, a close, a
cancel and a delete each lock the job's row first (PostgreSQL: `SELECT … FOR UPDATE`; SQLite: the
write lock every transaction takes), so a close, cancel or delete never comes between an append's
check that the job is open and its files: they are all in before it, or the append is refused.

A job is deleted whole (its files, their uploads and results): by its caller once none of its files
is queued or running and it is closed, or by `expire()` once its last file finished longer ago than
the gateway's retention, or, open, once nothing was added to it for that long (a client that died
mid-upload).

Time is the database's (`epoch_now()`), not each replica's clock: leases compare across machines.
"""
from __future__ import annotations

import enum
import hashlib
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from tritonasr.errors import shown
from tritonasr.paths import data_dir

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FILE_STATUSES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)
# A job's status while it is open and none of its files is queued or running: waiting for more files.
RECEIVING = "receiving"
# Jobs `expire()` deletes per transaction: a short hold on SQLite's write lock (workers wait
# meanwhile), and id lists well inside the databases' limits on parameters.
EXPIRE_BATCH = 500
# An advisory lock's key: replicas starting together against one PostgreSQL migrate one at a time.
MIGRATION_LOCK = 0x7472_6173_726A  # "trasrj"
MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "tritonasr_jobs_alembic_version"

metadata = sa.MetaData()

jobs = sa.Table(
    "tritonasr_jobs", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    # key_fingerprint() of the API key the job was made with (who may see it, whose key its calls to
    # Triton carry); NULL: made when the gateway asked for no key.
    sa.Column("key_hash", sa.String(64), nullable=True),
    sa.Column("options", sa.JSON, nullable=False),  # asr_offline's options (OfflineClient.transcribe's)
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("cancelled_at", sa.Double, nullable=True),
    # Still taking files (POST /v1/jobs/{id}/files) until closed or cancelled; never completed meanwhile.
    sa.Column("open", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_tritonasr_jobs_key_created", "key_hash", "created_at"),
)

files = sa.Table(
    "tritonasr_job_files", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("job_id", sa.String(40), sa.ForeignKey("tritonasr_jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=True),  # under the jobs root; NULL: uploaded, in `audio`
    sa.Column("audio", sa.LargeBinary, nullable=True),  # the upload, dropped once the file is finished
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),  # claims: times a worker has taken the file
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("done_ms", sa.BigInteger, nullable=False),
    sa.Column("total_ms", sa.BigInteger, nullable=True),
    sa.Column("duration_ms", sa.BigInteger, nullable=True),
    sa.Column("result", sa.Text, nullable=True),  # asr_offline's JSON
    sa.Column("queued_at", sa.Double, nullable=False),  # claim order: first queued, first taken
    sa.Column("not_before", sa.Double, nullable=True),  # a retry waits until then
    sa.Column("claim_token", sa.String(40), nullable=True),
    sa.Column("claimed_by", sa.Text, nullable=True),
    sa.Column("lease_until", sa.Double, nullable=True),
    sa.Column("finished_at", sa.Double, nullable=True),
    sa.Index("ix_tritonasr_job_files_job", "job_id", "position"),
    sa.Index("ix_tritonasr_job_files_claim", "status", "queued_at"),
    sa.Index("ix_tritonasr_job_files_finished", "finished_at"),  # expire(): the files finished before a cutoff
)


class epoch_now(FunctionElement):
    """The database's clock, in Unix seconds (fractional)."""

    type = sa.Double()
    inherit_cache = True


@compiles(epoch_now, "postgresql")
def _epoch_now_postgresql(element, compiler, **kw) -> str:
    # clock_timestamp(), not now(): now() stands still for a whole transaction.
    return "CAST(extract(epoch FROM clock_timestamp()) AS double precision)"


@compiles(epoch_now, "sqlite")
def _epoch_now_sqlite(element, compiler, **kw) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


class JobStoreError(ValueError):
    """A jobs database that cannot be used as given (its URL)."""


def default_url() -> str:
    """The jobs database of a gateway given none: jobs.db in the per-user data directory."""
    return f"sqlite:///{data_dir() / 'jobs.db'}"


def engine_url(location: str) -> sa.URL:
    """SQLAlchemy's URL for `sqlite:///PATH`, a plain file path, or `postgresql://USER@HOST:PORT/DB`
    (the speaker store's scheme: psycopg 3, the password from libpq's environment, never the URL,
    which ends up in configs and logs)."""
    if "://" not in location:
        return sa.URL.create("sqlite", database=str(Path(location).expanduser().resolve()))
    try:
        url = make_url(location)
    except sa.exc.ArgumentError:
        raise JobStoreError(f"the jobs database URL {shown(location)} cannot be read") from None
    scheme = url.drivername.partition("+")[0]
    if scheme == "sqlite":
        if not url.database or url.database == ":memory:":
            raise JobStoreError("the jobs database must be a file (sqlite:///PATH), to outlive the gateway")
        return url.set(drivername="sqlite")
    if scheme in ("postgresql", "postgres"):
        if url.password or "password" in url.query:
            raise JobStoreError("the jobs database URL must not hold a password: give it in $PGPASSWORD "
                                "or a password file ($PGPASSFILE)")
        return url.set(drivername="postgresql+psycopg")
    raise JobStoreError(f"unknown jobs database {shown(location)}: use sqlite:///PATH, a file path or "
                        "postgresql://USER@HOST:PORT/DATABASE")


def key_fingerprint(api_key: str) -> str:
    """What the database keeps of a caller's key: a slow hash (PBKDF2), so that a copy of the
    database neither holds keys nor lets weak ones be guessed quickly. Workers find the key again
    among the gateway's own keys (hashed once at start)."""
    return hashlib.pbkdf2_hmac("sha256", api_key.encode(), b"tritonasr-jobs", 100_000).hex()


# A viewer that sees every job: the gateway asks for no key.
EVERYONE = object()


class Deletion(enum.Enum):
    """What `JobStore.delete` did."""

    DELETED = "deleted"
    NOT_FOUND = "not found"  # no such job, or not one the viewer may see
    ACTIVE = "active"  # a file is queued or running: nothing deleted
    OPEN = "open"  # the job still takes files (close or cancel it first): nothing deleted


class Appending(enum.Enum):
    """Why `JobStore.append` added nothing."""

    NOT_FOUND = "not found"  # no such job, or not one the viewer may see
    CLOSED = "closed"  # closed or cancelled: it takes no more files
    TOO_MANY = "too many"  # the job would hold more than `max_files`


@dataclass(frozen=True)
class NewFile:
    name: str
    path: str | None = None  # under the jobs root
    read: Callable[[], bytes] | None = None  # an upload's bytes, read when stored


@dataclass(frozen=True)
class Claim:
    """A file a worker has taken: only the holder of `token` may finish it."""

    file_id: str
    job_id: str
    token: str
    name: str
    path: str | None
    attempts: int
    options: dict
    key_hash: str | None


class JobStore:
    def __init__(self, location: str | None = None, pool_size: int = 5):
        self.url = engine_url(location or default_url())
        self.postgres = self.url.drivername.startswith("postgresql")
        if self.postgres:
            self.engine: Engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=pool_size,
                                                   max_overflow=pool_size)
        else:
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False},
                                           pool_size=pool_size, max_overflow=pool_size)
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            # Every transaction takes the write lock when it begins (SQLAlchemy's recipe): nothing
            # comes between its reads and writes, and a transaction that reads, then writes, waits
            # its turn instead of failing at once with "database is locked" (a deferred one's upgrade).
            sa.event.listen(self.engine, "begin", lambda db: db.exec_driver_sql("BEGIN IMMEDIATE"))

    def close(self) -> None:
        self.engine.dispose()

    # --- schema -------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Brings the schema to the newest revision (`alembic upgrade head`), one process at a time:
        under PostgreSQL's advisory lock, or SQLite's write lock, the whole upgrade in one transaction."""
        from alembic import command
        from alembic.config import Config

        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # (a line per plugin at start)
        if not self.postgres:
            _use_wal(self.engine)
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as db:
            if self.postgres:
                db.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
            config.attributes["connection"] = db
            command.upgrade(config, "head")

    # --- jobs as callers see them --------------------------------------------------------------

    def create_job(self, key_hash: str | None, options: dict, new_files: Iterable[NewFile],
                   open_: bool = False) -> str:
        """A job of `new_files` (each upload read and stored one at a time), all queued; its id.
        `open_`: it takes more files (`append`) until closed or cancelled."""
        job_id = "job_" + secrets.token_hex(12)
        with self.engine.begin() as db:
            now = db.execute(sa.select(epoch_now())).scalar_one()
            db.execute(sa.insert(jobs).values(id=job_id, key_hash=key_hash, options=options, created_at=now,
                                              open=open_))
            _insert_files(db, job_id, 0, now, new_files)
        return job_id

    def append(self, job_id: str, viewer, new_files: list[NewFile], max_files: int) -> Appending | None:
        """Adds `new_files` after the job's own (positions go on), queued, if the job is open and would
        hold at most `max_files`; None when added, else why not (nothing added)."""
        with self.engine.begin() as db:
            # The job's row locked while the files go in (as cancel, close and delete lock it): none of
            # them comes between the check that it is open and the files, whose uploads are read meanwhile.
            row = db.execute(sa.select(jobs.c.open).where(jobs.c.id == job_id, _visible(viewer))
                             .with_for_update()).first()
            if row is None:
                return Appending.NOT_FOUND
            if not row.open:
                return Appending.CLOSED
            held, last = db.execute(sa.select(sa.func.count(), sa.func.max(files.c.position))
                                    .where(files.c.job_id == job_id)).one()
            if held + len(new_files) > max_files:
                return Appending.TOO_MANY
            now = db.execute(sa.select(epoch_now())).scalar_one()
            _insert_files(db, job_id, 0 if last is None else last + 1, now, new_files)
        return None

    def close_job(self, job_id: str, viewer) -> dict | None:
        """Ends the job's taking of files (again: nothing changes); the job, or None as for `job`."""
        with self.engine.begin() as db:
            if db.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id, _visible(viewer))
                          .with_for_update()).first() is None:
                return None
            db.execute(sa.update(jobs).where(jobs.c.id == job_id, jobs.c.open).values(open=False))
            return self._job(db, job_id, viewer)

    def job(self, job_id: str, viewer) -> dict | None:
        """The job as the API shows it, or None when there is none that `viewer` (a key_hash, None,
        or EVERYONE) may see."""
        with self.engine.begin() as db:
            return self._job(db, job_id, viewer)

    def list_jobs(self, viewer, limit: int) -> list[dict]:
        """`viewer`'s newest jobs first, without their files."""
        with self.engine.begin() as db:
            rows = db.execute(sa.select(jobs).where(_visible(viewer)).order_by(jobs.c.created_at.desc(),
                                                                              jobs.c.id).limit(limit)).all()
            tallies = _tallies(db, [row.id for row in rows])
        return [_job_json(row, *tallies.get(row.id, ({}, None))) for row in rows]

    def cancel(self, job_id: str, viewer) -> dict | None:
        """Cancels the job's queued and running files at once (a running file's result, if its worker
        still sends one, is not kept) and closes it; the job, or None as for `job`."""
        with self.engine.begin() as db:
            # The job locked before its files, as `delete` locks them: a cancel and a delete of one job
            # at once wait for each other instead of deadlocking; an append in progress is all in first.
            found = db.execute(sa.select(jobs.c.open).where(jobs.c.id == job_id, _visible(viewer))
                               .with_for_update()).first()
            if found is None:
                return None
            now = epoch_now()
            cancelled = db.execute(sa.update(files).where(files.c.job_id == job_id, files.c.status.in_(ACTIVE))
                                   .values(status=CANCELLED, audio=None, claim_token=None, lease_until=None,
                                           finished_at=now)).rowcount
            if cancelled or found.open:  # (an open job cancelled stopped its upload: cancelled, not completed)
                db.execute(sa.update(jobs).where(jobs.c.id == job_id, jobs.c.cancelled_at.is_(None))
                           .values(cancelled_at=now))
            if found.open:
                db.execute(sa.update(jobs).where(jobs.c.id == job_id).values(open=False))
            return self._job(db, job_id, viewer)

    def delete(self, job_id: str, viewer) -> Deletion:
        """Deletes the job with its files and results, unless a file of it is queued or running or it
        is open (a caller cancels, or closes, first); who may see it as for `job`."""
        with self.engine.begin() as db:
            # The job, then its files, locked (PostgreSQL; SQLite's transaction holds the write lock
            # already): no claim, append, cancel or worker's write comes between the check and the delete.
            found = db.execute(sa.select(jobs.c.open).where(jobs.c.id == job_id, _visible(viewer))
                               .with_for_update()).first()
            if found is None:
                return Deletion.NOT_FOUND
            statuses = db.execute(sa.select(files.c.status).where(files.c.job_id == job_id)
                                  .with_for_update()).scalars().all()
            if any(status in ACTIVE for status in statuses):
                return Deletion.ACTIVE
            if found.open:
                return Deletion.OPEN
            _delete_jobs(db, [job_id])
            return Deletion.DELETED

    def expire(self, older_than_s: float) -> int:
        """Deletes every closed job whose files are all finished, the last more than `older_than_s`
        ago by the database's clock, and every open job left with no file active and nothing added
        for that long (its caller died mid-upload), with their files and results; how many jobs.
        Replicas may sweep at once: each skips the jobs another has locked, and a finished file
        never becomes active again."""
        with self.engine.begin() as db:
            cutoff = db.execute(sa.select(epoch_now())).scalar_one() - older_than_s
        # Closed jobs among those of the files finished before the cutoff (an index) with no file
        # active or newer.
        old = sa.select(files.c.job_id).where(files.c.finished_at < cutoff)
        unfinished = sa.exists().where(files.c.job_id == jobs.c.id,
                                       sa.or_(files.c.status.in_(ACTIVE), files.c.finished_at >= cutoff))
        finished = sa.and_(jobs.c.id.in_(old), ~jobs.c.open, ~unfinished)
        # Open jobs made before the cutoff with no file active or added since (few: no index needed).
        touched = sa.exists().where(files.c.job_id == jobs.c.id,
                                    sa.or_(files.c.status.in_(ACTIVE), files.c.queued_at >= cutoff))
        abandoned = sa.and_(jobs.c.open, jobs.c.created_at < cutoff, ~touched)
        expired = (sa.select(jobs.c.id).where(sa.or_(finished, abandoned)).limit(EXPIRE_BATCH)
                   .with_for_update(skip_locked=True))
        deleted = 0
        while True:
            with self.engine.begin() as db:
                job_ids = db.execute(expired).scalars().all()
                # Asked again, the rows locked now: an append that committed between the statement's
                # snapshot and its lock (PostgreSQL) is seen, and its job kept. (Each statement reads
                # what was committed before it began.)
                kept = db.execute(sa.select(jobs.c.id).where(jobs.c.id.in_(job_ids), sa.or_(finished, abandoned))
                                  ).scalars().all() if job_ids else []
                deleted += _delete_jobs(db, list(kept))
            if len(job_ids) < EXPIRE_BATCH:
                return deleted

    def result(self, job_id: str, file_id: str, viewer) -> tuple[dict, dict | None, dict] | None:
        """(the file as the API shows it, its result or None until it is done, the job's options),
        None as for `job`."""
        with self.engine.begin() as db:
            row = db.execute(sa.select(*_FILE_COLUMNS, files.c.result, jobs.c.options)
                             .join(jobs, jobs.c.id == files.c.job_id)
                             .where(files.c.id == file_id, files.c.job_id == job_id, _visible(viewer))).first()
        if row is None:
            return None
        return _file_json(row), (json.loads(row.result) if row.result is not None else None), row.options

    def _job(self, db: Connection, job_id: str, viewer) -> dict | None:
        row = db.execute(sa.select(jobs).where(jobs.c.id == job_id, _visible(viewer))).first()
        if row is None:
            return None
        listed = db.execute(sa.select(*_FILE_COLUMNS).where(files.c.job_id == job_id)
                            .order_by(files.c.position)).all()
        counts, finished = _tallies(db, [job_id]).get(job_id, ({}, None))
        return {**_job_json(row, counts, finished), "files": [_file_json(f) for f in listed]}

    # --- workers ---------------------------------------------------------------------------------

    def claim(self, worker: str, lease_s: float, max_attempts: int) -> Claim | None:
        """Takes the first file that is queued (and not waiting for a retry) or whose lease has run
        out, for `lease_s`; None when there is none. A file already taken `max_attempts` times whose
        worker stopped again is failed instead (a file that kills its gateway must not take every
        replica down in turn)."""
        while True:
            with self.engine.begin() as db:
                now = epoch_now()
                takeable = sa.or_(
                    sa.and_(files.c.status == QUEUED, sa.or_(files.c.not_before.is_(None), files.c.not_before <= now)),
                    sa.and_(files.c.status == RUNNING, files.c.lease_until < now))
                first = (sa.select(files.c.id).where(takeable).order_by(files.c.queued_at, files.c.position)
                         .limit(1).with_for_update(skip_locked=True).scalar_subquery())
                token = secrets.token_hex(16)
                row = db.execute(
                    sa.update(files).where(files.c.id == first)
                    .values(status=RUNNING, claim_token=token, claimed_by=worker, lease_until=now + lease_s,
                            attempts=files.c.attempts + 1, not_before=None, done_ms=0)
                    .returning(files.c.id, files.c.job_id, files.c.name, files.c.path, files.c.attempts,
                               files.c.error)).first()
                if row is None:
                    return None
                if row.attempts > max_attempts:
                    db.execute(sa.update(files).where(files.c.id == row.id).values(
                        status=FAILED, audio=None, claim_token=None, lease_until=None, finished_at=now,
                        error=f"gave up after {max_attempts} attempts: "
                              f"{row.error or 'its worker stopped before finishing (the gateway died?)'}"))
                    continue
                job = db.execute(sa.select(jobs.c.options, jobs.c.key_hash).where(jobs.c.id == row.job_id)).one()
                return Claim(row.id, row.job_id, token, row.name, row.path, row.attempts, job.options, job.key_hash)

    def audio(self, claim: Claim) -> bytes | None:
        """The uploaded bytes of a claimed file (None: it is a path, or no longer this claim's)."""
        with self.engine.begin() as db:
            return db.execute(sa.select(files.c.audio).where(*_held(claim))).scalar()

    def renew(self, claim: Claim, lease_s: float) -> bool:
        """Extends the lease; False when the claim is no longer this worker's (cancelled, taken over)."""
        return self._update_held(claim, lease_until=epoch_now() + lease_s)

    def progress(self, claim: Claim, done_ms: int, total_ms: int) -> bool:
        return self._update_held(claim, done_ms=done_ms, total_ms=total_ms)

    def complete(self, claim: Claim, result: dict, duration_ms: int) -> bool:
        """Stores the result (`{"duration_ms", "segments"}`; the upload is dropped); False, and nothing
        stored, when the claim is no longer this worker's."""
        return self._update_held(claim, status=DONE, result=json.dumps(result, ensure_ascii=False), error=None,
                                 audio=None, done_ms=duration_ms, total_ms=duration_ms, duration_ms=duration_ms,
                                 claim_token=None, lease_until=None, finished_at=epoch_now())

    def fail(self, claim: Claim, error: str) -> bool:
        return self._update_held(claim, status=FAILED, error=error, audio=None, claim_token=None, lease_until=None,
                                 finished_at=epoch_now())

    def retry_later(self, claim: Claim, error: str, delay_s: float) -> bool:
        """Back to the queue, for any worker to take again after `delay_s`; `error` says why meanwhile."""
        return self._update_held(claim, status=QUEUED, error=error, not_before=epoch_now() + delay_s,
                                 claim_token=None, lease_until=None, done_ms=0)

    def _update_held(self, claim: Claim, **values) -> bool:
        with self.engine.begin() as db:
            return db.execute(sa.update(files).where(*_held(claim)).values(**values)).rowcount == 1


def _insert_files(db: Connection, job_id: str, first: int, now: float, new_files: Iterable[NewFile]) -> None:
    for position, new in enumerate(new_files, first):
        db.execute(sa.insert(files).values(
            id="file_" + secrets.token_hex(12), job_id=job_id, position=position, name=new.name, path=new.path,
            audio=new.read() if new.read else None, status=QUEUED, attempts=0, done_ms=0, queued_at=now))


def _delete_jobs(db: Connection, job_ids: list[str]) -> int:
    """Deletes the jobs and their files (themselves, not left to the foreign key's cascade: SQLite
    cascades only on connections that turned foreign keys on); how many jobs there were."""
    if not job_ids:
        return 0
    db.execute(sa.delete(files).where(files.c.job_id.in_(job_ids)))
    return db.execute(sa.delete(jobs).where(jobs.c.id.in_(job_ids))).rowcount


def _held(claim: Claim) -> tuple:
    return files.c.id == claim.file_id, files.c.claim_token == claim.token, files.c.status == RUNNING


def _visible(viewer):
    if viewer is EVERYONE:
        return sa.true()
    return jobs.c.key_hash.is_(None) if viewer is None else jobs.c.key_hash == viewer


_FILE_COLUMNS = (files.c.id, files.c.name, files.c.status, files.c.attempts, files.c.error, files.c.done_ms,
                 files.c.total_ms, files.c.duration_ms)


def _file_json(row) -> dict:
    return {"id": row.id, "name": row.name, "status": row.status, "attempts": row.attempts, "error": row.error,
            "done_ms": row.done_ms, "total_ms": row.total_ms, "duration_ms": row.duration_ms}


def _tallies(db: Connection, job_ids: list[str]) -> dict[str, tuple[dict[str, int], float | None]]:
    """Per job: its files counted by status, and when the last one finished."""
    tallies: dict[str, tuple[dict[str, int], float | None]] = {}
    if not job_ids:
        return tallies
    rows = db.execute(sa.select(files.c.job_id, files.c.status, sa.func.count(), sa.func.max(files.c.finished_at))
                      .where(files.c.job_id.in_(job_ids)).group_by(files.c.job_id, files.c.status))
    for job_id, status, count, finished in rows:
        counts, last = tallies.get(job_id, ({}, None))
        counts[status] = count
        tallies[job_id] = counts, max(filter(None, (last, finished)), default=None)
    return tallies


def _job_json(row, counts: dict[str, int], finished: float | None) -> dict:
    """A job's status: queued until a file is taken, running while any is queued or running, then,
    open, receiving (waiting for more files), or cancelled (when a cancel stopped files or an open
    job) or completed, whatever the files' outcome."""
    counts = {status: counts.get(status, 0) for status in FILE_STATUSES}
    counts["total"] = sum(counts.values())
    active = counts[QUEUED] + counts[RUNNING]
    if active:
        status = QUEUED if counts[QUEUED] == counts["total"] else RUNNING
    elif row.open:
        status = RECEIVING
    else:
        status = CANCELLED if row.cancelled_at is not None else "completed"
    return {"id": row.id, "object": "job", "status": status, "open": bool(row.open), "created_at": int(row.created_at),
            "finished_at": None if active or row.open or finished is None else int(finished), "counts": counts}


def _sqlite_connect(connection, record) -> None:
    # The driver's own transaction handling off: the "begin" listener says BEGIN IMMEDIATE instead.
    connection.isolation_level = None
    connection.execute("PRAGMA foreign_keys = ON")


def _use_wal(engine: Engine, timeout_s: float = 30.0) -> None:
    """WAL (readers go on while one process writes), a property of the file set once. Switching
    needs the file to itself, and SQLite answers "locked" at once, without its busy timeout, when
    another gateway opens the new file at that moment: retry."""
    deadline = time.monotonic() + timeout_s
    while True:
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            raw.close()
