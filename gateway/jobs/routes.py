"""The jobs API (docs/jobs.md):

- `POST /v1/jobs`: a multipart form of `file` parts and/or `path` fields (under `--jobs-root`), with
  the options of POST /v1/audio/transcriptions (`model`, `language`, `speaker`, `channels`, `itn`;
  `model` may be left out: the server's default engine) → 201 and the job; with `open=true` (files
  optional then) the job takes more files until it is closed:
- `POST /v1/jobs/{id}/files`: more `file` parts and/or `path` fields for an open job (the same
  per-request upload limit; at most MAX_FILES over the whole job) → the job; 409 `job_closed` once it
  is closed or cancelled. `POST /v1/jobs/{id}/close` → the job, taking no more files (idempotent)
- `GET /v1/jobs?limit=N` → the caller's newest jobs, without their files
- `GET /v1/jobs/{id}` → the job; `POST /v1/jobs/{id}/cancel` → the job, its unfinished files cancelled
- `DELETE /v1/jobs/{id}` → `{"id", "object": "job", "deleted": true}` (OpenAI's shape for deletions): the
  job, its files and results gone; 409 while a file is queued or running, or the job is open (cancel
  or close it first)
- `GET /v1/jobs/{id}/files/{file_id}/result?format=…` → the result as the transcriptions endpoint
  renders that response_format (404 until the file is done)

A job is visible to callers presenting the key it was made with (404 for others), to everyone when
the gateway asks for no key. Finished jobs are deleted `--job-retention` days after their last file
finished, open ones left with nothing added for as long (the workers' sweeper)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

import anyio.to_thread
import sqlalchemy as sa
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tritonasr.errors import bounded, shown
from tritonasr.gateway.access import bearer_key, checked_key
from tritonasr.gateway.errors import ApiError
from tritonasr.gateway.jobs.paths import JobsRoot
from tritonasr.gateway.jobs.store import EVERYONE, Appending, Deletion, JobStore, NewFile, key_fingerprint
from tritonasr.gateway.jobs.workers import JobWorkers
from tritonasr.gateway.offline import OfflineRunner
from tritonasr.gateway.settings import GatewaySettings
from tritonasr.gateway.transcriptions import RESPONSE_FORMATS, form_boolean, form_options, render_response

log = logging.getLogger("tritonasr.gateway.jobs")

# Files one job may hold (uploads and those its paths name together).
MAX_FILES = 1000
LIST_LIMIT, MAX_LIST_LIMIT = 20, 100
# Ours beside OpenAI's formats: the result as `tritonasr transcribe --format json` writes it
# ({"file", "duration_ms", "segments"}), which `tritonasr jobs` renders like `transcribe` does.
TRITONASR_JSON = "tritonasr_json"
RESULT_FORMATS = (*RESPONSE_FORMATS, TRITONASR_JSON)
MAX_NAME_CHARS = 500


class JobsApi:
    def __init__(self, settings: GatewaySettings, runner: OfflineRunner,
                 on_file: Callable[[str], None] | None = None):
        self.settings = settings
        self.store = JobStore(settings.jobs_db, pool_size=settings.job_workers + 4)
        self.fingerprints = {key: key_fingerprint(key) for key in settings.api_keys}
        self.root = JobsRoot(settings.jobs_root) if settings.jobs_root else None
        self.workers = JobWorkers(self.store, runner, settings,
                                  {fingerprint: key for key, fingerprint in self.fingerprints.items()}, self.root,
                                  on_file)

    def routes(self) -> list[Route]:
        return [Route("/v1/jobs", self.create, methods=["POST"]),
                Route("/v1/jobs", self.listing, methods=["GET"]),
                Route("/v1/jobs/{job_id}", self.show, methods=["GET"]),
                Route("/v1/jobs/{job_id}", self.delete, methods=["DELETE"]),
                Route("/v1/jobs/{job_id}/files", self.append, methods=["POST"]),
                Route("/v1/jobs/{job_id}/close", self.close, methods=["POST"]),
                Route("/v1/jobs/{job_id}/cancel", self.cancel, methods=["POST"]),
                Route("/v1/jobs/{job_id}/files/{file_id}/result", self.result, methods=["GET"])]

    @asynccontextmanager
    async def running(self):
        """The schema migrated, then the workers, for the gateway's lifetime."""
        try:
            await anyio.to_thread.run_sync(self.store.migrate)
        except Exception as exc:
            raise RuntimeError(f"the jobs database {self.store.url} cannot be used (--jobs-db): {exc}") from exc
        self.workers.start()
        try:
            yield
        finally:
            await self.workers.stop()
            self.store.close()

    def _caller(self, request: Request) -> tuple[str | None, object]:
        """(the key_hash a job made by this caller gets, the viewer it sees jobs as)."""
        key = checked_key(bearer_key(request), self.settings)
        if key is None:
            return None, EVERYONE
        return self.fingerprints[key], self.fingerprints[key]

    async def _db(self, call, *args):
        try:
            return await anyio.to_thread.run_sync(call, *args)
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            log.warning("the jobs database failed: %s", exc)
            raise ApiError(503, "the jobs database cannot be reached; retry later", code="jobs_database_unavailable",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None

    async def create(self, request: Request) -> Response:
        key_hash, viewer = self._caller(request)
        form = await _form(request)
        try:
            options, _, _ = form_options(form, model_required=False)
            open_ = form_boolean(form, "open", False)
            new = await self._new_files(form, required=not open_)
            job_id = await self._db(self.store.create_job, key_hash, options, new, open_)
        finally:
            await form.close()
        if new:
            self.workers.wake()
        log.info("job %s: %d files%s", job_id, len(new), ", open" if open_ else "")
        return JSONResponse(await self._db(self.store.job, job_id, viewer), status_code=201)

    async def append(self, request: Request) -> Response:
        """More files for an open job, after its own; the workers start on them at once."""
        _, viewer = self._caller(request)
        job_id = request.path_params["job_id"]
        form = await _form(request)
        try:
            others = sorted({name for name in form.keys() if name not in ("file", "path")})
            if others:
                raise ApiError(400, f"a job's options are set when it is made: only `file` parts and `path` fields "
                                    f"may be added, not {', '.join(map(shown, others))}", param=others[0])
            new = await self._new_files(form, required=True)
            refused = await self._db(self.store.append, job_id, viewer, new, MAX_FILES)
        finally:
            await form.close()
        if refused is Appending.NOT_FOUND:
            raise _no_job(request)
        if refused is Appending.CLOSED:
            raise ApiError(409, f"job {job_id} is closed (or cancelled): it takes no more files; submit a new job",
                           code="job_closed")
        if refused is Appending.TOO_MANY:
            raise ApiError(400, f"a job holds at most {MAX_FILES} files: these {len(new)} would take job {job_id} "
                                "past it", param="file", code="too_many_files")
        self.workers.wake()
        log.info("job %s: %d files added", job_id, len(new))
        return JSONResponse(self._found(await self._db(self.store.job, job_id, viewer), request))

    async def close(self, request: Request) -> Response:
        _, viewer = self._caller(request)
        job = self._found(await self._db(self.store.close_job, request.path_params["job_id"], viewer), request)
        log.info("job %s closed: %d files", job["id"], job["counts"]["total"])
        return JSONResponse(job)

    async def _new_files(self, form, required: bool) -> list[NewFile]:
        """The form's uploads (read when stored), then the files its paths name."""
        uploads, paths = form.getlist("file"), form.getlist("path")
        if any(not isinstance(upload, UploadFile) for upload in uploads):
            raise ApiError(400, "`file` must be a file part of the multipart form", param="file")
        if any(isinstance(path, UploadFile) for path in paths):
            raise ApiError(400, "`path` must be a text field", param="path")
        if required and not uploads and not paths:
            raise ApiError(400, "a job needs audio: `file` parts (uploads) and/or `path` fields (files under "
                                "the gateway's jobs root)", param="file", code="missing_file")
        new = [NewFile(bounded(upload.filename or f"file {n + 1}", MAX_NAME_CHARS), read=upload.file.read)
               for n, upload in enumerate(uploads)]
        if paths:
            new += [NewFile(name, path=name) for name in
                    await anyio.to_thread.run_sync(self._expand, paths, MAX_FILES - len(new))]
        return new

    def _expand(self, paths: list[str], limit: int) -> list[str]:
        if self.root is None:
            raise ApiError(400, "this gateway takes no server-side paths (it was started without --jobs-root): "
                                "upload the files", param="path", code="paths_not_enabled")
        names: dict[str, None] = {}  # (in order, each once)
        for path in paths:
            for name in self.root.expand(path.strip(), limit - len(names)):
                names.setdefault(name)
        return list(names)

    async def listing(self, request: Request) -> Response:
        _, viewer = self._caller(request)
        given = request.query_params.get("limit", str(LIST_LIMIT))
        try:
            limit = int(given)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ApiError(400, f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}, got {shown(given)}",
                           param="limit")
        return JSONResponse({"object": "list", "data": await self._db(self.store.list_jobs, viewer, limit)})

    async def show(self, request: Request) -> Response:
        _, viewer = self._caller(request)
        return JSONResponse(self._found(await self._db(self.store.job, request.path_params["job_id"], viewer),
                                        request))

    async def cancel(self, request: Request) -> Response:
        _, viewer = self._caller(request)
        job = self._found(await self._db(self.store.cancel, request.path_params["job_id"], viewer), request)
        log.info("job %s cancelled: %s", job["id"], job["status"])
        return JSONResponse(job)

    async def delete(self, request: Request) -> Response:
        _, viewer = self._caller(request)
        job_id = request.path_params["job_id"]
        deletion = await self._db(self.store.delete, job_id, viewer)
        if deletion is Deletion.NOT_FOUND:
            raise _no_job(request)
        if deletion is Deletion.ACTIVE:
            raise ApiError(409, f"job {job_id} still has files queued or running: cancel it first "
                                f"(POST /v1/jobs/{job_id}/cancel), then delete it", code="job_active")
        if deletion is Deletion.OPEN:  # (the same code: a client that cancels, then deletes, gets it done)
            raise ApiError(409, f"job {job_id} is open (it still takes files): close it (POST /v1/jobs/{job_id}/close) "
                                f"or cancel it (POST /v1/jobs/{job_id}/cancel) first, then delete it",
                           code="job_active")
        log.info("job %s deleted", job_id)
        return JSONResponse({"id": job_id, "object": "job", "deleted": True})

    async def result(self, request: Request) -> Response:
        _, viewer = self._caller(request)
        fmt = request.query_params.get("format", "json")
        if fmt not in RESULT_FORMATS:
            raise ApiError(400, f"unknown format {shown(fmt)}: use one of {', '.join(RESULT_FORMATS)}", param="format",
                           code="unsupported_response_format")
        job_id, file_id = request.path_params["job_id"], request.path_params["file_id"]
        found = await self._db(self.store.result, job_id, file_id, viewer)
        if found is None:
            raise ApiError(404, f"no job {shown(job_id)} with a file {shown(file_id)}", code="not_found")
        file, result, options = found
        if result is None:
            why = f": {file['error']}" if file["error"] else ""
            raise ApiError(404, f"{file['name']} has no result: it is {file['status']}{why}", code="result_not_ready")
        if fmt == TRITONASR_JSON:
            return JSONResponse({"file": file["name"], **result})
        return render_response(fmt, result, options["language"], False)

    @staticmethod
    def _found(job: dict | None, request: Request) -> dict:
        if job is None:
            raise _no_job(request)
        return job


async def _form(request: Request):
    try:
        return await request.form(max_files=MAX_FILES, max_fields=MAX_FILES + 32)
    except HTTPException as exc:  # the form parser's refusal, in our error body
        raise ApiError(400, str(exc.detail), code="invalid_form") from None


def _no_job(request: Request) -> ApiError:
    return ApiError(404, f"no job {shown(request.path_params['job_id'])}", code="job_not_found")
