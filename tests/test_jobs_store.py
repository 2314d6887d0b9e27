"""The jobs database (tritonasr.gateway.jobs.store) against SQLite and a real PostgreSQL (the
session's, tests/conftest.py): migrations that match the tables and that replicas may run at once,
claims that never give one file to two workers (threads with connections of their own, as replicas
have), leases that a dead worker's file is taken over after, results kept only from the claim's
holder, cancel, retries, who sees which job, deleting a job, expiring old ones (and the gateway's
sweeper that does it, its --job-retention flag), open jobs (files added until closed, never completed
meanwhile, appends racing a close or cancel losing nothing, abandoned ones expired); and the jobs root
(tritonasr.gateway.jobs.paths): nothing outside it reachable."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tritonasr.gateway.errors import ApiError
from tritonasr.gateway import cli as gateway_cli
from tritonasr.gateway.jobs.paths import JobsRoot
from tritonasr.gateway.jobs.store import (EVERYONE, MIGRATIONS, VERSION_TABLE, Appending, Deletion, JobStore,
                                          JobStoreError, NewFile, engine_url, files, jobs, key_fingerprint, metadata)
from tritonasr.gateway.jobs.workers import JobWorkers
from tritonasr.gateway.settings import GatewaySettings

LEASE_S = 30.0
ATTEMPTS = 3


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path) -> str:
    """A new, empty database of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.db")
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def store(location):
    opened = JobStore(location)
    opened.migrate()
    yield opened
    opened.close()


def uploads(count: int) -> list[NewFile]:
    return [NewFile(f"f{n}.wav", read=lambda n=n: f"audio {n}".encode()) for n in range(count)]


def test_migrations_give_the_tables_the_code_uses(store):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with store.engine.connect() as db:
        context = MigrationContext.configure(db, opts={"version_table": VERSION_TABLE})
        assert context.get_current_revision() == "0003"
        assert compare_metadata(context, metadata) == []
    store.migrate()  # again: nothing to do


def test_replicas_starting_together_migrate_once(location):
    stores = [JobStore(location) for _ in range(4)]
    errors = []

    def migrate(store):
        try:
            store.migrate()
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert stores[0].job(stores[0].create_job(None, {}, uploads(1)), None)["counts"]["queued"] == 1
    for store in stores:
        store.close()


def test_concurrent_workers_never_claim_one_file_twice(store, location):
    job_id = store.create_job(None, {}, uploads(40))
    workers = [JobStore(location) for _ in range(6)]
    claimed: list[str] = []
    lock = threading.Lock()

    def work(worker: JobStore, name: str):
        while (claim := worker.claim(name, LEASE_S, ATTEMPTS)) is not None:
            with lock:
                claimed.append(claim.file_id)
            assert worker.complete(claim, {"duration_ms": 1, "segments": []}, 1)

    threads = [threading.Thread(target=work, args=(w, f"w{n}")) for n, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    job = store.job(job_id, None)
    assert sorted(claimed) == sorted(f["id"] for f in job["files"])  # each once
    assert job["status"] == "completed" and job["counts"]["done"] == 40
    assert {f["attempts"] for f in job["files"]} == {1}
    for worker in workers:
        worker.close()


def test_claims_go_in_queue_order_with_the_job_and_its_audio(store):
    first = store.create_job("k", {"language": "en"}, uploads(2))
    store.create_job(None, {}, [NewFile("x/y.wav", path="x/y.wav")])
    claims = [store.claim("w", LEASE_S, ATTEMPTS) for _ in range(3)]
    assert [c.name for c in claims] == ["f0.wav", "f1.wav", "x/y.wav"]
    assert (claims[0].job_id, claims[0].options, claims[0].key_hash) == (first, {"language": "en"}, "k")
    assert store.audio(claims[1]) == b"audio 1" and store.audio(claims[2]) is None
    assert claims[2].path == "x/y.wav"
    assert store.claim("w", LEASE_S, ATTEMPTS) is None


def test_an_expired_lease_is_taken_over_and_the_old_claim_keeps_nothing(store):
    job_id = store.create_job(None, {}, uploads(1))
    old = store.claim("dead", 0.2, ATTEMPTS)
    assert store.claim("other", LEASE_S, ATTEMPTS) is None  # leased
    time.sleep(0.4)
    new = store.claim("other", LEASE_S, ATTEMPTS)
    assert new.file_id == old.file_id and new.attempts == 2 and new.token != old.token
    assert not store.renew(old, LEASE_S) and not store.progress(old, 5, 10)
    assert not store.complete(old, {"duration_ms": 1, "segments": [{"text": "old"}]}, 1)
    assert store.audio(old) is None and store.audio(new) == b"audio 0"
    assert store.progress(new, 500, 1000)
    assert store.job(job_id, None)["files"][0] | {"status": "running", "done_ms": 500, "total_ms": 1000} \
        == store.job(job_id, None)["files"][0]
    assert store.complete(new, {"duration_ms": 1000, "segments": [{"text": "new"}]}, 1000)
    assert not store.complete(new, {"duration_ms": 1, "segments": []}, 1)  # once
    file, result, _ = store.result(job_id, new.file_id, None)
    assert result["segments"] == [{"text": "new"}] and file["done_ms"] == file["duration_ms"] == 1000
    with store.engine.connect() as db:  # the upload is dropped once the result is kept
        assert db.execute(sa.select(files.c.audio).where(files.c.id == new.file_id)).scalar() is None


def test_a_renewed_lease_is_not_taken_over(store):
    store.create_job(None, {}, uploads(1))
    claim = store.claim("alive", 0.5, ATTEMPTS)
    for _ in range(4):
        time.sleep(0.2)
        assert store.renew(claim, 0.5)
    assert store.claim("other", LEASE_S, ATTEMPTS) is None


def test_a_file_whose_workers_keep_dying_is_failed(store):
    job_id = store.create_job(None, {}, uploads(1))
    for attempt in range(1, ATTEMPTS + 1):
        claim = store.claim(f"w{attempt}", 0.05, ATTEMPTS)
        assert claim.attempts == attempt
        time.sleep(0.1)
    assert store.claim("w", LEASE_S, ATTEMPTS) is None
    file = store.job(job_id, None)["files"][0]
    assert file["status"] == "failed" and file["error"].startswith(f"gave up after {ATTEMPTS} attempts")


def test_a_retry_waits_its_turn(store):
    job_id = store.create_job(None, {}, uploads(1))
    claim = store.claim("w", LEASE_S, ATTEMPTS)
    assert store.retry_later(claim, "Triton unavailable", 0.5)
    assert store.job(job_id, None)["files"][0]["error"] == "Triton unavailable"
    assert store.claim("w", LEASE_S, ATTEMPTS) is None
    time.sleep(0.7)
    again = store.claim("w", LEASE_S, ATTEMPTS)
    assert again.attempts == 2
    assert store.fail(again, "not audio")
    job = store.job(job_id, None)
    assert job["status"] == "completed" and job["counts"]["failed"] == 1 and job["finished_at"] is not None


def test_cancel_stops_queued_and_running_files(store):
    job_id = store.create_job(None, {}, uploads(3))
    running = store.claim("w", LEASE_S, ATTEMPTS)
    assert store.job(job_id, None)["status"] == "running"
    job = store.cancel(job_id, None)
    assert job["status"] == "cancelled" and job["counts"]["cancelled"] == 3 and job["finished_at"] is not None
    assert not store.complete(running, {"duration_ms": 1, "segments": []}, 1)
    assert store.claim("w", LEASE_S, ATTEMPTS) is None
    # A job already finished stays as it ended.
    done_id = store.create_job(None, {}, uploads(1))
    claim = store.claim("w", LEASE_S, ATTEMPTS)
    store.complete(claim, {"duration_ms": 1, "segments": []}, 1)
    assert store.cancel(done_id, None)["status"] == "completed"


def test_a_job_is_seen_only_with_its_key(store):
    alice, bob = key_fingerprint("alice-key"), key_fingerprint("bob-key")
    assert alice != bob and "alice-key" not in alice
    job_id = store.create_job(alice, {}, uploads(1))
    open_id = store.create_job(None, {}, uploads(1))
    assert store.job(job_id, alice)["id"] == job_id
    assert store.job(job_id, bob) is None and store.job(job_id, None) is None
    assert store.cancel(job_id, bob) is None and store.job(job_id, alice)["status"] == "queued"
    file_id = store.job(job_id, alice)["files"][0]["id"]
    assert store.result(job_id, file_id, bob) is None
    assert [j["id"] for j in store.list_jobs(alice, 10)] == [job_id]
    assert store.list_jobs(bob, 10) == []
    assert [j["id"] for j in store.list_jobs(EVERYONE, 10)] == [open_id, job_id]  # newest first
    assert "files" not in store.list_jobs(EVERYONE, 10)[0]


def finish(store: JobStore) -> None:
    """Every queued file done."""
    while (claim := store.claim("w", LEASE_S, ATTEMPTS)) is not None:
        assert store.complete(claim, {"duration_ms": 1, "segments": [{"text": "x"}]}, 1)


def rows(store: JobStore, job_id: str) -> tuple[int, int]:
    """(the job's rows, its files' rows) in the database."""
    with store.engine.connect() as db:
        return (db.execute(sa.select(sa.func.count()).where(jobs.c.id == job_id)).scalar_one(),
                db.execute(sa.select(sa.func.count()).where(files.c.job_id == job_id)).scalar_one())


def test_delete_a_finished_job_with_its_files_and_results(store):
    alice, bob = key_fingerprint("alice-key"), key_fingerprint("bob-key")
    job_id, kept = store.create_job(alice, {}, uploads(2)), store.create_job(alice, {}, uploads(1))
    finish(store)
    file_id = store.job(job_id, alice)["files"][0]["id"]
    assert store.result(job_id, file_id, alice)[1] is not None
    # Not found for another key (or no key), as for a job that does not exist.
    assert store.delete(job_id, bob) is Deletion.NOT_FOUND and store.delete(job_id, None) is Deletion.NOT_FOUND
    assert store.delete("job_nope", alice) is Deletion.NOT_FOUND
    assert rows(store, job_id) == (1, 2)
    assert store.delete(job_id, alice) is Deletion.DELETED
    assert rows(store, job_id) == (0, 0)
    assert store.job(job_id, alice) is None and store.result(job_id, file_id, alice) is None
    assert store.delete(job_id, alice) is Deletion.NOT_FOUND  # once
    assert [j["id"] for j in store.list_jobs(alice, 10)] == [kept]


def test_delete_of_an_active_job_is_refused_and_changes_nothing(store):
    job_id = store.create_job(None, {}, uploads(2))
    assert store.delete(job_id, EVERYONE) is Deletion.ACTIVE  # queued
    claim = store.claim("w", LEASE_S, ATTEMPTS)
    assert store.complete(claim, {"duration_ms": 1, "segments": []}, 1)
    running = store.claim("w", LEASE_S, ATTEMPTS)
    before = store.job(job_id, None)
    assert store.delete(job_id, None) is Deletion.ACTIVE  # one done, one running
    assert store.job(job_id, None) == before and rows(store, job_id) == (1, 2)
    assert store.complete(running, {"duration_ms": 1, "segments": []}, 1)  # the worker's claim is untouched
    # Cancelled, then deleted.
    cancelled = store.create_job(None, {}, uploads(1))
    store.cancel(cancelled, None)
    assert store.delete(cancelled, None) is Deletion.DELETED and rows(store, cancelled) == (0, 0)


def age(store: JobStore, job_id: str, seconds: float) -> None:
    """The job's files finished `seconds` earlier than they did."""
    with store.engine.begin() as db:
        db.execute(sa.update(files).where(files.c.job_id == job_id, files.c.finished_at.is_not(None))
                   .values(finished_at=files.c.finished_at - seconds))


def test_expire_deletes_only_jobs_finished_before_the_cutoff(store):
    day = 86400
    old, recent = store.create_job(None, {}, uploads(2)), store.create_job(None, {}, uploads(1))
    finish(store)
    old_failed = store.create_job(None, {}, uploads(1))
    store.fail(store.claim("w", LEASE_S, ATTEMPTS), "not audio")
    old_cancelled = store.create_job(None, {}, uploads(1))
    store.cancel(old_cancelled, None)
    # One file finished long ago, one still queued: not expired.
    half = store.create_job(None, {}, uploads(2))
    assert store.complete(store.claim("w", LEASE_S, ATTEMPTS), {"duration_ms": 1, "segments": []}, 1)
    # One file finished long ago, the other a moment ago: the last one counts.
    mixed = store.create_job(None, {}, uploads(2))
    store.cancel(mixed, None)
    with store.engine.begin() as db:
        first = db.execute(sa.select(files.c.id).where(files.c.job_id == mixed, files.c.position == 0)).scalar_one()
        db.execute(sa.update(files).where(files.c.id == first).values(finished_at=files.c.finished_at - 10 * day))
    for job_id in (old, old_failed, old_cancelled, half):
        age(store, job_id, 10 * day)
    assert store.expire(30 * day) == 0  # all younger than 30 days
    assert store.expire(9 * day) == 3
    assert [store.job(j, None) is None for j in (old, old_failed, old_cancelled, half, mixed, recent)] == \
        [True, True, True, False, False, False]
    assert rows(store, old) == (0, 0) and rows(store, half) == (1, 2)
    assert store.expire(0) == 2  # the recent and mixed ones; never the one with a queued file
    assert [j["id"] for j in store.list_jobs(None, 10)] == [half]
    assert store.expire(0) == 0


def test_expire_goes_through_batches(store, monkeypatch):
    monkeypatch.setattr("tritonasr.gateway.jobs.store.EXPIRE_BATCH", 2)
    job_ids = [store.create_job(None, {}, uploads(1)) for _ in range(5)]
    for job_id in job_ids:
        store.cancel(job_id, None)
    assert store.expire(0) == 5 and store.list_jobs(None, 10) == []


def test_the_sweeper_expires_at_start_and_stops_with_the_gateway(store, caplog, monkeypatch):
    finished = store.create_job(None, {}, uploads(1))
    store.cancel(finished, None)
    queued = store.create_job(None, {}, uploads(1))
    caplog.set_level(logging.INFO, "tritonasr.gateway.jobs")

    async def gateway(until) -> float:
        """Seconds the workers took to stop, once `until()` (no workers, --job-workers 0: the
        sweeper runs all the same)."""
        workers = JobWorkers(store, None, GatewaySettings(job_workers=0, job_retention_days=1e-9), {}, None)
        workers.start()
        for _ in range(100):
            await asyncio.sleep(0.05)
            if until():
                break
        began = time.monotonic()
        await workers.stop()
        return time.monotonic() - began

    assert asyncio.run(gateway(lambda: store.job(finished, None) is None)) < 5  # not the hour to the next sweep
    assert store.job(finished, None) is None and store.job(queued, None) is not None
    assert "1 job deleted: finished more than 1e-09 days ago" in caplog.text
    monkeypatch.setattr(store, "expire", lambda older_than_s: 1 / 0)  # (the database away, say)
    warning = "expired jobs not deleted, tried again in 3600 s: division by zero"
    assert asyncio.run(gateway(lambda: warning in caplog.text)) < 5
    assert warning in caplog.text


# --- open jobs -------------------------------------------------------------------------------------

def named(prefix: str, count: int) -> list[NewFile]:
    return [NewFile(f"{prefix}{n}.wav", read=lambda n=n: f"{prefix} {n}".encode()) for n in range(count)]


def positions(store: JobStore, job_id: str) -> list[tuple[int, str]]:
    with store.engine.connect() as db:
        return [tuple(row) for row in db.execute(sa.select(files.c.position, files.c.name)
                                                 .where(files.c.job_id == job_id).order_by(files.c.position))]


def test_an_open_job_takes_files_until_closed_and_is_never_completed_meanwhile(store):
    alice, bob = key_fingerprint("alice-key"), key_fingerprint("bob-key")
    job_id = store.create_job(alice, {"language": "en"}, named("a", 2), open_=True)
    job = store.job(job_id, alice)
    assert (job["status"], job["open"], job["counts"]["total"]) == ("queued", True, 2)
    finish(store)
    job = store.job(job_id, alice)
    assert (job["status"], job["open"], job["finished_at"], job["counts"]["done"]) == ("receiving", True, None, 2)
    assert store.list_jobs(alice, 10)[0] | {"status": "receiving", "open": True} == store.list_jobs(alice, 10)[0]
    assert store.append(job_id, alice, named("b", 3), max_files=10) is None
    job = store.job(job_id, alice)
    assert (job["status"], job["counts"]["queued"]) == ("running", 3)  # (2 done, 3 queued)
    # Positions go on after the job's own; the workers take the new files with the job's options.
    assert positions(store, job_id) == [(0, "a0.wav"), (1, "a1.wav"), (2, "b0.wav"), (3, "b1.wav"), (4, "b2.wav")]
    claim = store.claim("w", LEASE_S, ATTEMPTS)
    assert (claim.name, claim.options, claim.key_hash, store.audio(claim)) == ("b0.wav", {"language": "en"}, alice,
                                                                             b"b 0")
    assert store.complete(claim, {"duration_ms": 1, "segments": []}, 1)
    finish(store)
    assert store.job(job_id, alice)["status"] == "receiving"
    # Not another key's; not past the job's limit on files (nothing added).
    assert store.append(job_id, bob, named("c", 1), max_files=10) is Appending.NOT_FOUND
    assert store.append("job_nope", alice, named("c", 1), max_files=10) is Appending.NOT_FOUND
    assert store.close_job(job_id, bob) is None
    assert store.append(job_id, alice, named("c", 6), max_files=10) is Appending.TOO_MANY
    assert store.append(job_id, alice, named("c", 5), max_files=10) is None
    assert store.job(job_id, alice)["counts"]["total"] == 10
    finish(store)
    closed = store.close_job(job_id, alice)
    assert (closed["status"], closed["open"], closed["counts"]["done"]) == ("completed", False, 10)
    assert closed["finished_at"] is not None and [f["name"] for f in closed["files"]][-1] == "c4.wav"
    assert store.close_job(job_id, alice) == closed  # again: nothing changes
    assert store.append(job_id, alice, named("d", 1), max_files=10) is Appending.CLOSED
    assert store.job(job_id, alice)["counts"]["total"] == 10
    # Open with no file yet; closed with files still queued: queued, then completed once they are done.
    empty = store.create_job(None, {}, [], open_=True)
    assert store.job(empty, None)["status"] == "receiving" and store.job(empty, None)["counts"]["total"] == 0
    assert store.append(empty, None, named("e", 1), max_files=10) is None
    assert store.close_job(empty, None)["status"] == "queued"
    finish(store)
    assert store.job(empty, None)["status"] == "completed"
    # A job made closed takes nothing.
    closed_id = store.create_job(None, {}, uploads(1))
    assert store.job(closed_id, None)["open"] is False
    assert store.append(closed_id, None, named("x", 1), max_files=10) is Appending.CLOSED


def test_cancel_closes_an_open_job(store):
    job_id = store.create_job(None, {}, named("a", 2), open_=True)
    running = store.claim("w", LEASE_S, ATTEMPTS)
    job = store.cancel(job_id, None)
    assert (job["status"], job["open"], job["counts"]["cancelled"]) == ("cancelled", False, 2)
    assert not store.complete(running, {"duration_ms": 1, "segments": []}, 1)
    assert store.append(job_id, None, named("b", 1), max_files=10) is Appending.CLOSED
    # Open with every file done: cancelled all the same (its upload was stopped), and closed.
    done = store.create_job(None, {}, named("c", 1), open_=True)
    finish(store)
    job = store.cancel(done, None)
    assert (job["status"], job["open"], job["counts"]["done"]) == ("cancelled", False, 1)
    assert job["finished_at"] is not None
    assert store.append(done, None, named("d", 1), max_files=10) is Appending.CLOSED


def test_delete_of_an_open_job_is_refused_until_it_is_closed(store):
    job_id = store.create_job(None, {}, named("a", 1), open_=True)
    assert store.delete(job_id, None) is Deletion.ACTIVE  # a file queued
    finish(store)
    before = store.job(job_id, None)
    assert store.delete(job_id, None) is Deletion.OPEN and store.job(job_id, None) == before
    empty = store.create_job(None, {}, [], open_=True)
    assert store.delete(empty, None) is Deletion.OPEN
    store.close_job(job_id, None)
    assert store.delete(job_id, None) is Deletion.DELETED and rows(store, job_id) == (0, 0)
    store.cancel(empty, None)
    assert store.delete(empty, None) is Deletion.DELETED


def test_appends_racing_a_close_or_a_cancel_lose_nothing(store, location):
    """Two clients appending to one job while a third closes (or cancels) it: each append is in
    whole (before the close, its files claimable; before the cancel, cancelled) or refused whole,
    and the positions stay one each, in order."""
    for end in ("close", "cancel"):
        job_id = store.create_job(None, {}, [], open_=True)
        clients = [JobStore(location) for _ in range(3)]
        added: list[int] = []
        lock = threading.Lock()

        def append(client: JobStore, name: str):
            for n in range(8):
                result = client.append(job_id, None, named(f"{name}{n}-", 3), max_files=1000)
                if result is Appending.CLOSED:
                    return
                assert result is None
                with lock:
                    added.append(3)

        threads = [threading.Thread(target=append, args=(clients[n], f"t{n}")) for n in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(0.05)
        job = getattr(clients[2], "close_job" if end == "close" else "cancel")(job_id, None)
        for thread in threads:
            thread.join()
        final = store.job(job_id, None)
        assert final["counts"]["total"] == sum(added) == job["counts"]["total"]  # nothing after the close
        assert [p for p, _ in positions(store, job_id)] == list(range(sum(added)))
        assert final["open"] is False
        if end == "cancel":
            assert final["counts"]["cancelled"] == sum(added) and store.claim("w", LEASE_S, ATTEMPTS) is None
        else:
            finish(store)
            assert store.job(job_id, None)["counts"]["done"] == sum(added)
        for client in clients:
            client.close()


def added_ago(store: JobStore, job_id: str, seconds: float) -> None:
    """The job made, and its files queued (and finished), `seconds` earlier than they were."""
    with store.engine.begin() as db:
        db.execute(sa.update(jobs).where(jobs.c.id == job_id).values(created_at=jobs.c.created_at - seconds))
        db.execute(sa.update(files).where(files.c.job_id == job_id).values(
            queued_at=files.c.queued_at - seconds,
            finished_at=sa.case((files.c.finished_at.is_(None), None), else_=files.c.finished_at - seconds)))


def test_expire_deletes_open_jobs_left_with_nothing_added(store):
    day = 86400
    abandoned = store.create_job(None, {}, named("a", 2), open_=True)
    finish(store)
    empty = store.create_job(None, {}, [], open_=True)
    recent = store.create_job(None, {}, named("r", 1), open_=True)
    finish(store)
    waiting = store.create_job(None, {}, named("w", 1), open_=True)  # a file still queued
    for job_id in (abandoned, empty, recent, waiting):
        added_ago(store, job_id, 10 * day)
    assert store.append(recent, None, named("r2-", 1), max_files=10) is None  # added to a moment ago
    finish(store)
    assert store.claim("w", LEASE_S, ATTEMPTS) is None
    with store.engine.begin() as db:  # (the waiting job's file queued again, its queued_at kept)
        db.execute(sa.update(files).where(files.c.job_id == waiting).values(status="queued", finished_at=None))
    assert store.expire(30 * day) == 0
    assert store.expire(9 * day) == 2
    assert [store.job(j, None) is None for j in (abandoned, empty, recent, waiting)] == [True, True, False, False]
    assert rows(store, abandoned) == (0, 0)
    # The one added to a moment ago: its last file counts, not the job's age.
    assert store.expire(0) == 1 and store.job(recent, None) is None and store.job(waiting, None) is not None


def test_jobs_made_before_open_jobs_are_closed(location):
    """A database at revision 0002 with a job in it, upgraded: the job is closed, and still works."""
    from alembic import command
    from alembic.config import Config

    store = JobStore(location)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as db:
        config.attributes["connection"] = db
        command.upgrade(config, "0002")
        db.execute(sa.text("INSERT INTO tritonasr_jobs (id, key_hash, options, created_at) "
                           "VALUES ('job_old', NULL, '{}', 0)"))
    store.migrate()
    job = store.job("job_old", None)
    assert (job["open"], job["status"]) == (False, "completed")
    assert store.append("job_old", None, named("a", 1), max_files=10) is Appending.CLOSED
    store.close()


def test_the_retention_flag(monkeypatch):
    monkeypatch.delenv("TRITONASR_API_KEY", raising=False)
    parser = argparse.ArgumentParser()
    gateway_cli.add_arguments(parser)
    assert gateway_cli.settings_from(parser.parse_args([])).job_retention_days == 30
    assert gateway_cli.settings_from(parser.parse_args(["--job-retention", "0"])).job_retention_days == 0
    assert gateway_cli.settings_from(parser.parse_args(["--job-retention", "0.5"])).job_retention_days == 0.5
    with pytest.raises(ValueError, match="job_retention_days must be 0 or more, got -1.0"):
        gateway_cli.settings_from(parser.parse_args(["--job-retention", "-1"]))


def test_database_urls():
    assert engine_url("postgresql://app@db.example:5433/jobs").drivername == "postgresql+psycopg"
    assert engine_url("relative.db").database == str(Path("relative.db").resolve())
    for refused in ("postgresql://app:secret@db/jobs", "postgresql://app@db/jobs?password=secret",
                    "sqlite://", "sqlite:///:memory:", "mysql://db/jobs"):
        with pytest.raises(JobStoreError):
            engine_url(refused)


# --- the jobs root ---------------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path) -> Path:
    """root/ with a.wav, notes.txt, .hidden.wav, calls/b.flac, calls/deep/c.mp3, a link to a.wav
    inside, and, outside, secret.wav, reached by links: a file link and a directory link."""
    root = tmp_path / "root"
    (root / "calls" / "deep").mkdir(parents=True)
    for name in ("a.wav", "notes.txt", ".hidden.wav", "calls/b.flac", "calls/deep/c.mp3"):
        (root / name).write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.wav").write_bytes(b"secret")
    os.symlink(root / "a.wav", root / "calls" / "same.wav")
    os.symlink(tmp_path / "outside" / "secret.wav", root / "escape.wav")
    os.symlink(tmp_path / "outside", root / "escape_dir")
    return root


def refusal(call) -> ApiError:
    with pytest.raises(ApiError) as refused:
        call()
    return refused.value


def test_the_jobs_root_gives_its_audio_files(tree):
    root = JobsRoot(tree)
    assert root.expand("a.wav", 10) == ["a.wav"]
    assert root.expand("notes.txt", 10) == ["notes.txt"]  # named: taken whatever its name
    assert root.expand("calls", 10) == ["calls/b.flac", "calls/same.wav", "calls/deep/c.mp3"]
    assert root.expand("calls/deep/", 10) == ["calls/deep/c.mp3"]
    assert refusal(lambda: root.expand("calls", 2)).status == 400
    with root.open("calls/same.wav") as f:
        assert f.read() == b"x"


@pytest.mark.parametrize("given, status", [
    ("../outside/secret.wav", 400), ("calls/../../outside/secret.wav", 400), ("/etc/passwd", 400),
    ("escape.wav", 403), ("escape_dir/secret.wav", 403), ("escape_dir", 403), (".", 403),  # (holds escape.wav)
    ("missing.wav", 400), ("", 400), ("a.wav\0", 400)])
def test_nothing_outside_the_jobs_root_is_reachable(tree, given, status):
    error = refusal(lambda: JobsRoot(tree).expand(given, 10))
    assert error.status == status and error.param == "path"


def test_the_root_is_checked_again_when_a_file_is_read(tree, tmp_path):
    root = JobsRoot(tree)
    assert root.expand("calls/b.flac", 10) == ["calls/b.flac"]
    (tree / "calls" / "b.flac").unlink()  # swapped for a link out after the job was made
    os.symlink(tmp_path / "outside" / "secret.wav", tree / "calls" / "b.flac")
    assert refusal(lambda: root.open("calls/b.flac")).status == 403
    (tree / "calls" / "b.flac").unlink()
    assert refusal(lambda: root.open("calls/b.flac")).status == 400
