"""Batch jobs (docs/jobs.md) on the real gateway process in front of the session's real tritonserver:
uploads and server-side paths transcribed with the same results as POST /v1/audio/transcriptions in
every format, nothing outside the jobs root reachable, another key's jobs invisible, cancel, delete
(`tritonasr jobs delete` too), passing failures retried then given up, a gateway stopped mid-job and
started again losing nothing, two gateways sharing a real PostgreSQL with one killed (SIGKILL)
mid-job and every file done exactly once, and `tritonasr jobs submit --output-dir` end to end; a
folder larger than the gateway's --max-upload-mb submitted by the CLI as one job in several requests
(an open job, appended to, closed), and a file too large alone refused with a clear message."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from tritonasr.audio import load_audio
from tritonasr.client import jobs as jobs_cli
from tritonasr.client.formats import render
from tritonasr.client.offline import PIECES_ABOVE_S, OfflineClient
from tritonasr.serving.server import free_port

from conftest import DATA
from test_e2e_gateway import Gateway

pytestmark = pytest.mark.e2e

KEY, OTHER_KEY = "jobs-test-key", "jobs-other-key"
# Seconds: a killed gateway's files are taken over soon after. Not less: renewed every third of it,
# a lease of 3 s lapsed once under a loaded CI run (a live gateway's file taken over, claimed twice).
LEASE = "8"
SPEECH = [DATA / "pause_1s.wav", DATA / "one_phrase.wav"]
LONG = DATA / "long_70s.wav"  # long enough for a gateway to be stopped while it works on it
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
NOT_AUDIO = b"this is not audio at all" * 100


def client(gateway: Gateway, key: str | None = KEY) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=120)


def submit(http: httpx.Client, uploads: list[tuple[str, bytes]] = (), **fields) -> httpx.Response:
    return http.post("/v1/jobs", files=[("file", upload) for upload in uploads] or None, data=fields)


def finished(http: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def http_job(gateway: Gateway, job_id: str) -> dict:
    with client(gateway) as http:
        return http.get(f"/v1/jobs/{job_id}").json()


def error(response: httpx.Response) -> dict:
    return response.json()["error"]


def log_events(*logs: Path) -> list[tuple[str, str]]:
    """(event, file id) of the workers' log lines, in each log's order: claimed, done, discarded."""
    pattern = re.compile(r"job \S+ file (\S+)(?: claimed by| done in|: result (discarded))")
    events = []
    for log in logs:
        for line in log.read_text().splitlines():
            if match := pattern.search(line):
                kind = "discarded" if match.group(2) else ("claimed" if "claimed by" in line else "done")
                events.append((kind, match.group(1)))
    return events


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The jobs root: calls/a.wav, calls/b.wav (the two speech files), top.wav, and escape.wav, a
    link to a file outside."""
    base = tmp_path_factory.mktemp("jobs")
    (base / "root" / "calls").mkdir(parents=True)
    for path, name in zip(SPEECH, ("a.wav", "b.wav")):
        shutil.copy(path, base / "root" / "calls" / name)
    shutil.copy(SPEECH[0], base / "root" / "top.wav")
    shutil.copy(SPEECH[0], base / "secret.wav")
    os.symlink(base / "secret.wav", base / "root" / "escape.wav")
    return base / "root"


@pytest.fixture(scope="module")
def gateway(server, root, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gateway")
    running = Gateway(server.grpc_url, "--api-key", KEY, "--api-key", OTHER_KEY, "--jobs-db",
                      str(directory / "jobs.db"), "--jobs-root", str(root), "--job-lease", LEASE, log=directory / "log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(gateway):
    with client(gateway) as opened:
        yield opened


def test_uploads_give_what_the_transcriptions_endpoint_gives(http):
    uploads = [(path.name, path.read_bytes()) for path in SPEECH] + [("noise.wav", NOT_AUDIO)]
    created = submit(http, uploads, model="sensevoice")
    assert created.status_code == 201, created.text
    assert [f["name"] for f in created.json()["files"]] == ["pause_1s.wav", "one_phrase.wav", "noise.wav"]
    job = finished(http, created.json()["id"])
    assert job["status"] == "completed" and job["finished_at"] >= job["created_at"]
    assert job["counts"] == {"queued": 0, "running": 0, "done": 2, "failed": 1, "cancelled": 0, "total": 3}
    for path, file in zip(SPEECH, job["files"]):
        duration = load_audio(path).duration_ms
        assert (file["status"], file["attempts"], file["error"]) == ("done", 1, None)
        assert file["done_ms"] == file["total_ms"] == file["duration_ms"] == duration
        for fmt in FORMATS:
            result = http.get(f"/v1/jobs/{job['id']}/files/{file['id']}/result", params={"format": fmt})
            direct = http.post("/v1/audio/transcriptions", files={"file": (path.name, path.read_bytes())},
                               data={"model": "sensevoice", "response_format": fmt})
            assert result.status_code == direct.status_code == 200
            assert (result.headers["content-type"], result.content) == (direct.headers["content-type"], direct.content)
    # Not audio: failed at once (no retry), with the decoder's message, as the endpoint's 415 says it.
    noise = job["files"][2]
    refused = http.post("/v1/audio/transcriptions", files={"file": ("noise.wav", NOT_AUDIO)},
                        data={"model": "sensevoice"})
    assert refused.status_code == 415
    assert (noise["status"], noise["attempts"], noise["error"]) == ("failed", 1, error(refused)["message"])
    not_done = http.get(f"/v1/jobs/{job['id']}/files/{noise['id']}/result")
    assert not_done.status_code == 404 and error(not_done)["code"] == "result_not_ready"
    assert http.get("/v1/jobs", params={"limit": 1}).json()["data"][0]["id"] == job["id"]


def test_progress_of_a_recording_sent_in_pieces(http, tmp_path):
    """Over PIECES_ABOVE_S the client library sends a recording in pieces and reports as it goes:
    the job shows the audio done growing between 0 and the whole."""
    samples = load_audio(LONG).samples
    repeats = int(PIECES_ABOVE_S * 16000 // len(samples)) + 1
    long = tmp_path / "long.flac"
    sf.write(long, np.tile(samples, repeats), 16000)
    job = submit(http, [("long.flac", long.read_bytes())]).json()
    seen = set()
    deadline = time.monotonic() + 120
    while (current := http.get(f"/v1/jobs/{job['id']}").json())["status"] != "completed":
        assert time.monotonic() < deadline
        file = current["files"][0]
        seen.add((file["done_ms"], file["total_ms"]))
        time.sleep(0.1)
    file = current["files"][0]
    assert file["status"] == "done" and file["done_ms"] == file["total_ms"] == load_audio(long).duration_ms
    assert any(0 < done < total for done, total in seen if total), seen


def test_paths_under_the_root_and_nothing_outside(http):
    created = submit(http, path=["calls", "top.wav"])
    assert created.status_code == 201, created.text
    job = finished(http, created.json()["id"])
    assert [(f["name"], f["status"]) for f in job["files"]] == [
        ("calls/a.wav", "done"), ("calls/b.wav", "done"), ("top.wav", "done")]
    first = http.get(f"/v1/jobs/{job['id']}/files/{job['files'][0]['id']}/result", params={"format": "srt"})
    direct = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", SPEECH[0].read_bytes())},
                       data={"model": "whisper-1", "response_format": "srt"})
    assert first.text == direct.text
    for given, status in (("../secret.wav", 400), ("calls/../../secret.wav", 400), ("/etc/passwd", 400),
                          ("escape.wav", 403), ("missing.wav", 400)):
        refused = submit(http, path=[given])
        assert refused.status_code == status, (given, refused.text)
        assert error(refused)["param"] == "path"
    assert submit(http, path=["top.wav", "escape.wav"]).status_code == 403  # one bad path: no job


def test_another_key_sees_nothing(gateway, http):
    job = submit(http, [("a.wav", SPEECH[0].read_bytes())]).json()
    file_id = job["files"][0]["id"]
    with client(gateway, OTHER_KEY) as other:
        for response in (other.get(f"/v1/jobs/{job['id']}"), other.post(f"/v1/jobs/{job['id']}/cancel"),
                         other.get(f"/v1/jobs/{job['id']}/files/{file_id}/result")):
            assert response.status_code == 404
        assert job["id"] not in [j["id"] for j in other.get("/v1/jobs").json()["data"]]
    with client(gateway, None) as nobody:
        assert nobody.get(f"/v1/jobs/{job['id']}").status_code == 401
    with client(gateway, "wrong-key") as wrong:
        assert wrong.get("/v1/jobs").status_code == 401
    assert finished(http, job["id"])["counts"]["done"] == 1


def test_cancel(gateway, http):
    job = submit(http, [(f"{n}.wav", LONG.read_bytes()) for n in range(5)]).json()

    def at_triton() -> list[str]:  # decoded (its length known), so sent
        return [f["id"] for f in http.get(f"/v1/jobs/{job['id']}").json()["files"]
                if f["status"] == "running" and f["total_ms"]]

    sent = wait_for(at_triton, 30, "a file to be sent to Triton")
    cancelled = http.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["counts"]["cancelled"] == 5
    assert cancelled["finished_at"] is not None
    # The files being transcribed finish at Triton, and their results are not kept.
    gateway.wait_for_log(rf"file {sent[0]}: result discarded", timeout_s=60)
    assert http.get(f"/v1/jobs/{job['id']}").json()["counts"]["cancelled"] == 5
    unknown = http.post("/v1/jobs/job_nope/cancel")
    assert unknown.status_code == 404 and error(unknown)["code"] == "job_not_found"


def test_delete(gateway, http, capsys):
    """A finished job deleted with its results; an active one refused until cancelled; nothing of
    another key's. `tritonasr jobs delete` runs in this process: at once, while the job is active."""
    done = finished(http, submit(http, [("a.wav", SPEECH[1].read_bytes())]).json()["id"])
    result = f"/v1/jobs/{done['id']}/files/{done['files'][0]['id']}/result"
    assert http.get(result).status_code == 200
    with client(gateway, OTHER_KEY) as other:
        assert other.delete(f"/v1/jobs/{done['id']}").status_code == 404
    deleted = http.delete(f"/v1/jobs/{done['id']}")
    assert (deleted.status_code, deleted.json()) == (200, {"id": done["id"], "object": "job", "deleted": True})
    gone = http.get(f"/v1/jobs/{done['id']}")
    assert gone.status_code == 404 and error(gone)["code"] == "job_not_found"
    assert http.get(result).status_code == http.delete(f"/v1/jobs/{done['id']}").status_code == 404

    active = submit(http, [(f"{n}.wav", LONG.read_bytes()) for n in range(4)]).json()["id"]
    refused = http.delete(f"/v1/jobs/{active}")
    assert refused.status_code == 409 and error(refused)["code"] == "job_active"
    assert f"cancel it first (POST /v1/jobs/{active}/cancel)" in error(refused)["message"]
    parser = argparse.ArgumentParser()
    jobs_cli.add_arguments(parser)
    command = parser.parse_args(["delete", active, "--gateway-url", gateway.url, "--api-key", KEY])
    assert jobs_cli.main(command) == 1
    assert f"cancel it first (tritonasr jobs cancel {active})" in capsys.readouterr().err
    assert http.get(f"/v1/jobs/{active}").json()["counts"]["total"] == 4
    http.post(f"/v1/jobs/{active}/cancel")
    assert jobs_cli.main(command) == 0 and capsys.readouterr().out == f"deleted {active}\n"
    assert http.get(f"/v1/jobs/{active}").status_code == 404


def test_passing_failures_are_retried_then_given_up(tmp_path):
    # No Triton at this address: unreachable, each time.
    gateway = Gateway(f"127.0.0.1:{free_port()}", "--jobs-db", str(tmp_path / "jobs.db"), "--job-attempts", "2",
                      log=tmp_path / "log")
    try:
        with client(gateway, None) as http:
            job = finished(http, submit(http, [("a.wav", SPEECH[0].read_bytes())]).json()["id"], timeout_s=60)
        file = job["files"][0]
        assert (file["status"], file["attempts"]) == ("failed", 2)
        assert "cannot reach the Triton server" in file["error"] and "gave up after 2 attempts" in file["error"]
        assert "tried again in 2 s" in gateway.log.read_text()
    finally:
        gateway.stop()


def test_a_gateway_stopped_mid_job_resumes_where_it_was(server, tmp_path):
    """SIGTERM: the files being worked on are finished, the rest wait in the database for the next
    process; nothing is lost and nothing done twice."""
    flags = ["--jobs-db", str(tmp_path / "jobs.db"), "--job-lease", LEASE]
    first = Gateway(server.grpc_url, *flags, log=tmp_path / "first.log")
    with client(first, None) as http:
        job_id = submit(http, [(f"{n}.wav", LONG.read_bytes()) for n in range(6)]).json()["id"]
        wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["counts"]["running"], 30, "a file to start")
    first.stop()
    second = Gateway(server.grpc_url, *flags, log=tmp_path / "second.log")
    try:
        with client(second, None) as http:
            job = finished(http, job_id)
    finally:
        second.stop()
    assert job["counts"]["done"] == 6
    assert {f["attempts"] for f in job["files"]} == {1}
    by_first = {file for kind, file in log_events(first.log) if kind == "done"}
    by_second = {file for kind, file in log_events(second.log) if kind == "done"}
    assert by_first and by_second and not by_first & by_second  # both worked, never on the same file
    assert by_first | by_second == {f["id"] for f in job["files"]}


def test_postgres_two_gateways_one_killed_every_file_done_once(server, postgres, tmp_path):
    database = postgres.new_database()
    flags = ["--jobs-db", database, "--job-lease", LEASE, "--api-key", KEY]
    survivor = Gateway(server.grpc_url, *flags, log=tmp_path / "survivor.log")
    victim = Gateway(server.grpc_url, *flags, log=tmp_path / "victim.log")
    try:
        with client(survivor) as http:
            job_id = submit(http, [(f"{n}.wav", LONG.read_bytes()) for n in range(8)]).json()["id"]

            def victim_busy() -> set[str]:
                events = log_events(victim.log)
                return {f for kind, f in events if kind == "claimed"} - {f for kind, f in events if kind == "done"}

            wait_for(victim_busy, 60, "the second gateway to work on a file")
            victim.process.kill()  # SIGKILL: no goodbye, its claims are left to expire
            victim.process.wait(timeout=10)
            job = finished(http, job_id, timeout_s=180)
            # A gateway without --jobs-root refuses paths.
            refused = submit(http, path=["a.wav"])
            assert refused.status_code == 400 and error(refused)["code"] == "paths_not_enabled"
            results = [http.get(f"/v1/jobs/{job_id}/files/{f['id']}/result", params={"format": "tritonasr_json"})
                       for f in job["files"]]
    finally:
        survivor.stop()
    assert job["status"] == "completed" and job["counts"]["done"] == 8
    assert all(r.status_code == 200 and r.json()["segments"] for r in results)
    events = log_events(victim.log, survivor.log)
    assert "discarded" not in {kind for kind, _ in events}
    done = [f for kind, f in events if kind == "done"]
    assert sorted(done) == sorted(f["id"] for f in job["files"])  # each stored once, by one gateway
    # Every claim shows in the attempts, and only the files the victim held when it died were
    # claimed twice: no two workers ever held one file at once.
    held = {f for kind, f in log_events(victim.log) if kind == "claimed"} - \
        {f for kind, f in log_events(victim.log) if kind == "done"}
    assert held
    for file in job["files"]:
        claims = sum(1 for kind, f in events if kind == "claimed" and f == file["id"])
        assert file["attempts"] == claims == (2 if file["id"] in held else 1), file
    survivor_done = {f for kind, f in log_events(survivor.log) if kind == "done"}
    assert held <= survivor_done


def test_cli_submits_a_folder_larger_than_the_upload_limit_as_one_job(server, tmp_path):
    """--max-upload-mb 1 and a folder of about 1.6 MiB: one job, made open with the first batch,
    the rest appended, then closed; each file done once, the results written as `transcribe`'s.
    A request over the limit is sent again in halves; a file over it alone is refused, clearly."""
    small = Gateway(server.grpc_url, "--api-key", KEY, "--max-upload-mb", "1", log=tmp_path / "gateway.log")
    inputs, out = tmp_path / "in", tmp_path / "out"
    (inputs / "sub").mkdir(parents=True)
    names = {"a.wav": "one_phrase", "b.wav": "pause_0.3s", "c.wav": "pause_1s", "sub/d.wav": "pause_3s",
             "sub/e.wav": "lead_trail_silence"}
    for name, speech in names.items():
        shutil.copy(DATA / f"{speech}.wav", inputs / name)
    joined = np.concatenate([sf.read(DATA / f"{speech}.wav", dtype="int16")[0]
                             for speech in ("one_phrase", "pause_1s")])
    sf.write(inputs / "sub" / "f.wav", joined, 16000, subtype="PCM_16")
    relative = [*names, "sub/f.wav"]
    sizes = [(inputs / name).stat().st_size for name in relative]
    assert max(sizes) < 2 ** 20 and sum(sizes) > 1.5 * 2 ** 20
    env = {**os.environ, "TRITONASR_API_KEY": KEY}
    submit_cli = [sys.executable, "-m", "tritonasr.cli", "jobs", "submit", "--gateway-url", small.url]
    try:
        with client(small) as http:
            before = {job["id"] for job in http.get("/v1/jobs", params={"limit": 100}).json()["data"]}
            run = subprocess.run([*submit_cli, str(inputs), "--output-dir", str(out), "--format", "json",
                                  "--batch-mb", "1"], capture_output=True, text=True, timeout=300, env=env)
            assert run.returncode == 0, run.stderr
            job_id = run.stdout.split()[0]
            assert {job["id"] for job in http.get("/v1/jobs", params={"limit": 100}).json()["data"]} - before \
                == {job_id}
            job = http.get(f"/v1/jobs/{job_id}").json()
            assert (job["status"], job["open"], job["counts"]["done"], job["counts"]["total"]) == \
                ("completed", False, 6, 6)
            assert [f["name"] for f in job["files"]] == relative and {f["attempts"] for f in job["files"]} == {1}
            log = small.log.read_text()
            assert "POST /v1/jobs 201" in log and f"job {job_id}: " in log and ", open" in log
            assert len(re.findall(rf"POST /v1/jobs/{job_id}/files 200", log)) >= 1
            assert f"POST /v1/jobs/{job_id}/close 200" in log and " 413 " not in log
            done = [f for kind, f in log_events(small.log) if kind == "done"]
            assert sorted(done) == sorted(f["id"] for f in job["files"])  # each once
            with OfflineClient(server.grpc_url, timeout_s=120) as direct:
                for name in relative:
                    written = (out / name).with_suffix(".json").read_text()
                    assert written == render(direct.transcribe_file(str(inputs / name)), "json"), name

            # Batches larger than the gateway takes: refused (413), sent again in halves, still one job.
            halved = subprocess.run([*submit_cli, str(inputs), "--batch-mb", "4"], capture_output=True, text=True,
                                    timeout=120, env=env)
            assert halved.returncode == 0, halved.stderr
            halved_id = halved.stdout.split()[0]
            job = http.post(f"/v1/jobs/{halved_id}/cancel").json()
            assert [f["name"] for f in job["files"]] == relative and job["open"] is False
            assert " 413 " in small.log.read_text()

            # A file larger than the gateway takes alone: no job, and what to do about it.
            big = tmp_path / "big.wav"
            shutil.copy(LONG, big)
            assert big.stat().st_size > 2 ** 20
            refused = subprocess.run([*submit_cli, str(big), "--batch-mb", "1"], capture_output=True, text=True,
                                     timeout=120, env=env)
            assert refused.returncode == 1 and refused.stdout == ""
            assert f"{big} (2.1 MiB) is more than the gateway" in refused.stderr
            assert "raise the gateway's --max-upload-mb" in refused.stderr and "--jobs-root" in refused.stderr
            # After a first batch went in: the job left open is named, with how to end it.
            mixed = tmp_path / "mixed"
            mixed.mkdir()
            shutil.copy(inputs / "a.wav", mixed / "a.wav")
            shutil.copy(big, mixed / "z.wav")
            stopped = subprocess.run([*submit_cli, str(mixed), "--batch-mb", "1"], capture_output=True, text=True,
                                     timeout=120, env=env)
            assert stopped.returncode == 1
            left_id = stopped.stdout.split()[0]
            assert f"{mixed / 'z.wav'} (2.1 MiB) is more than the gateway" in stopped.stderr
            assert f"job {left_id} was left open with 1 of 2 uploads: `tritonasr jobs cancel {left_id}` ends it" \
                in stopped.stderr
            left = http.get(f"/v1/jobs/{left_id}").json()
            assert left["open"] is True and left["counts"]["total"] == 1
            assert http.delete(f"/v1/jobs/{left_id}").status_code == 409
            assert http.post(f"/v1/jobs/{left_id}/cancel").json()["status"] == "cancelled"
            assert http.delete(f"/v1/jobs/{left_id}").status_code == 200
    finally:
        small.stop()


def test_open_jobs_over_http(http, gateway):
    """POST /v1/jobs open=true, files added, closed: the refusals around it."""
    created = submit(http, open="true")
    assert created.status_code == 201, created.text
    job = created.json()
    assert (job["status"], job["open"], job["counts"]["total"]) == ("receiving", True, 0)
    added = http.post(f"/v1/jobs/{job['id']}/files", files=[("file", ("a.wav", SPEECH[0].read_bytes()))],
                      data={"path": "top.wav"})
    assert added.status_code == 200, added.text
    assert [f["name"] for f in added.json()["files"]] == ["a.wav", "top.wav"]
    for response, status, code in (
            (http.post(f"/v1/jobs/{job['id']}/files"), 400, "missing_file"),
            (http.post(f"/v1/jobs/{job['id']}/files", data={"path": "top.wav", "model": "parakeet"}), 400, None),
            (http.post("/v1/jobs/job_nope/files", data={"path": "top.wav"}), 404, "job_not_found"),
            (http.delete(f"/v1/jobs/{job['id']}"), 409, "job_active")):
        assert (response.status_code, error(response)["code"]) == (status, code), response.text
    with client(gateway, OTHER_KEY) as other:
        assert other.post(f"/v1/jobs/{job['id']}/files", data={"path": "top.wav"}).status_code == 404
        assert other.post(f"/v1/jobs/{job['id']}/close").status_code == 404
    wait_for(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "receiving", 120, "the files to be done")
    assert http.get(f"/v1/jobs/{job['id']}").json()["finished_at"] is None
    closed = http.post(f"/v1/jobs/{job['id']}/close")
    assert closed.status_code == 200 and closed.json()["status"] == "completed" and not closed.json()["open"]
    assert http.post(f"/v1/jobs/{job['id']}/close").json() == closed.json()
    late = http.post(f"/v1/jobs/{job['id']}/files", data={"path": "top.wav"})
    assert late.status_code == 409 and error(late)["code"] == "job_closed"
    assert http.delete(f"/v1/jobs/{job['id']}").status_code == 200


def test_cli_submit_wait_output_dir(gateway, server, tmp_path):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    shutil.copy(SPEECH[0], inputs / "a.wav")
    shutil.copy(SPEECH[1], inputs / "sub" / "b.wav")
    (inputs / "bad.wav").write_bytes(NOT_AUDIO)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tritonasr.cli", "jobs", "submit", str(inputs), "--wait", "--output-dir", str(out),
               "--format", "json", "--gateway-url", gateway.url]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITONASR_API_KEY": KEY})
    assert run.returncode == 1, run.stderr
    job_id = run.stdout.split()[0]
    assert f"{inputs / 'bad.wav'}: failed" in run.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["a.json", "sub", "sub/b.json"]
    with OfflineClient(server.grpc_url, timeout_s=120) as direct:
        expected = {name: direct.transcribe_file(str(inputs / f"{name}.wav")) for name in ("a", "sub/b")}
    for name, result in expected.items():
        assert (out / f"{name}.json").read_text() == render(result, "json")
    # --wait without --output-dir: the results on stdout, after the job's id, as `transcribe` prints them.
    printed = subprocess.run([*command[:5], str(inputs / "a.wav"), "--wait", "--format", "srt", "--gateway-url",
                              gateway.url, "--api-key", KEY], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.split("\n", 1)[1] == render(expected["a"], "srt")
    # Again: what was written is not submitted again; what failed is.
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "TRITONASR_API_KEY": KEY})
    assert rerun.returncode == 1 and "2 of 3 already written" in rerun.stderr
    assert http_job(gateway, rerun.stdout.split()[0])["counts"]["total"] == 1
    shown = subprocess.run([sys.executable, "-m", "tritonasr.cli", "jobs", "show", job_id, "--gateway-url",
                            gateway.url, "--api-key", KEY], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "2/3 done, 1 failed" in shown.stdout and "sub/b.wav" in shown.stdout
    denied = subprocess.run([sys.executable, "-m", "tritonasr.cli", "jobs", "list", "--gateway-url", gateway.url,
                             "--api-key", "wrong-key"], capture_output=True, text=True, timeout=60)
    assert denied.returncode == 3 and "401" in denied.stderr
