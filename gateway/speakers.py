"""Enrolled speakers over HTTP, through the server's `speaker_registry` model (the client library's
SpeakerRegistryClient, as `tritonasr speakers` uses it):

  GET    /v1/speakers          {"object": "list", "data": [{"object": "speaker", "name", "speech_ms", "enrolled_at"}]}
  POST   /v1/speakers          multipart: `name`, one or more `file` (recordings of that speaker
                               alone, any format tritonasr.audio decodes), `replace` (true/false)
                               -> 201 {"object": "speaker", "name", "recordings", "speech_ms"}
  DELETE /v1/speakers/{name}   -> {"object": "speaker", "name", "deleted": true}

Every call shows the caller's API key (`Authorization: Bearer KEY`) as every endpoint does.
Changes also need the server's admin key, sent as `X-Admin-Key` and passed on to Triton with that
one call: the gateway holds no admin key of its own and does not judge it, the server does (a
refusal is 403 with the server's reason). Duplicates are 409, unknown names 404."""
from __future__ import annotations

import dataclasses

import anyio
import anyio.to_thread
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tritonasr.audio import load_audio
from tritonasr.client.offline import TranscriptionError
from tritonasr.client.speakers import SpeakerRegistryClient
from tritonasr.contract import SAMPLE_RATES
from tritonasr.gateway.access import bearer_key, checked_key
from tritonasr.gateway.errors import ApiError
from tritonasr.gateway.offline import GATEWAY_RETRY
from tritonasr.gateway.settings import GatewaySettings
from tritonasr.gateway.transcriptions import form_boolean

ADMIN_KEY_HEADER = "X-Admin-Key"
MAX_RECORDINGS = 16  # per enrollment: each is decoded and embedded in turn
# What the registry's refusals mean here (other statuses as for transcriptions: errors.from_failure).
_STATUS = {"NOT_FOUND": 404, "ALREADY_EXISTS": 409}


class SpeakerEndpoints:
    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        # Registry calls are short but blocking: worker threads, as many as offline requests.
        self._threads = anyio.CapacityLimiter(settings.max_inflight)

    def routes(self) -> list[Route]:
        return [Route("/v1/speakers", self.list, methods=["GET"]),
                Route("/v1/speakers", self.enroll, methods=["POST"]),
                Route("/v1/speakers/{name:path}", self.remove, methods=["DELETE"])]

    async def list(self, request: Request) -> Response:
        speakers = await self._call(request, self._key(request), lambda client: client.list(), admin=False)
        return JSONResponse({"object": "list", "data": [{"object": "speaker", **s} for s in speakers]})

    async def enroll(self, request: Request) -> Response:
        api_key = self._key(request)  # before the upload is read
        try:
            form = await request.form(max_files=MAX_RECORDINGS, max_fields=8)
        except HTTPException as exc:  # the form's own limits: too many files or fields, a broken body
            if "files" in exc.detail.lower():
                raise ApiError(400, f"an enrollment takes at most {MAX_RECORDINGS} recordings ({exc.detail})",
                               param="file", code="too_many_files") from None
            raise ApiError(exc.status_code, exc.detail) from None
        try:
            name = form.get("name")
            if not isinstance(name, str) or not name.strip():
                raise ApiError(400, "`name` is required: the speaker's name, as a text field", param="name",
                               code="missing_name")
            replace = form_boolean(form, "replace", False)
            uploads = form.getlist("file")
            if not uploads or not all(isinstance(u, UploadFile) for u in uploads):
                raise ApiError(400, "`file` is required: one or more recordings of the speaker alone, as file "
                                    "parts of a multipart/form-data body", param="file", code="missing_file")
            name = name.strip()
            result = await self._call(request, api_key, lambda client: self._enroll(client, name, uploads, replace))
        finally:
            await form.close()
        return JSONResponse({"object": "speaker", "name": result["enrolled"], "recordings": result["recordings"],
                             "speech_ms": result["speech_ms"]}, status_code=201)

    async def remove(self, request: Request) -> Response:
        name = request.path_params["name"]
        result = await self._call(request, self._key(request), lambda client: client.remove(name))
        return JSONResponse({"object": "speaker", "name": result["removed"], "deleted": True})

    def _enroll(self, client: SpeakerRegistryClient, name: str, uploads: list[UploadFile], replace: bool) -> dict:
        prints = []
        for upload in uploads:
            label = upload.filename or "file"
            # Decoded as transcriptions are (415 for what is no audio, 413 past the gateway's limit).
            audio = load_audio(upload.file, name=label, keep_rates=SAMPLE_RATES,
                               max_seconds=self.settings.max_audio_seconds)
            try:
                prints.append(client.voiceprint(audio.samples, audio.sample_rate))
            except TranscriptionError as exc:
                if exc.status != "INVALID_ARGUMENT":
                    raise
                # Too little speech, too long: say which recording.
                raise TranscriptionError(f"{label}: {exc}", exc.status) from None
        return client.enroll_voiceprints(name, prints, replace)

    def _key(self, request: Request) -> str | None:
        return checked_key(bearer_key(request), self.settings)

    async def _call(self, request: Request, api_key: str | None, call, admin: bool = True):
        """`call(client)` in a worker thread, with a client of the caller's keys (the admin key
        only for changes) made for this request alone: no admin key outlives its request."""
        admin_key = request.headers.get(ADMIN_KEY_HEADER) or None if admin else None
        credentials = dataclasses.replace(self.settings.triton_tls, api_key=api_key, admin_key=admin_key)

        def work():
            with SpeakerRegistryClient(self.settings.triton_url, timeout_s=self.settings.request_timeout_s,
                                       credentials=credentials) as client:
                client.retry = GATEWAY_RETRY
                try:
                    return call(client)
                except TranscriptionError as exc:
                    if exc.status in _STATUS:
                        raise ApiError(_STATUS[exc.status], str(exc), code=exc.status.lower()) from None
                    raise

        return await anyio.to_thread.run_sync(work, limiter=self._threads)
