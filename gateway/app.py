"""The gateway's ASGI application: its routes, and what every request passes through on its way
in: a request id, the body-size limit, CORS, the API key, the drain (gateway/drain.py), and the
metrics (gateway/metrics.py: `app.state.metrics`, served on a port of their own by the CLI)."""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from tritonasr.gateway.access import bearer_key, checked_key
from tritonasr.gateway.console import console_routes
from tritonasr.gateway.drain import Drain
from tritonasr.gateway.errors import ApiError, from_failure
from tritonasr.gateway.funasr import FunasrEndpoint
from tritonasr.gateway.jobs.routes import JobsApi
from tritonasr.gateway.metrics import OTHER_ROUTE, GatewayMetrics, route_template
from tritonasr.gateway.offline import OfflineRunner
from tritonasr.gateway.request_ids import REQUEST_ID_HEADER
from tritonasr.gateway.request_ids import request_id as new_request_id
from tritonasr.gateway.settings import GatewaySettings
from tritonasr.gateway.speakers import ADMIN_KEY_HEADER, SpeakerEndpoints
from tritonasr.gateway.streams import TRY_AGAIN_LATER, StreamEndpoint, close_reason
from tritonasr.gateway.transcriptions import create_transcription

log = logging.getLogger("tritonasr.gateway")

# Liveness (the process serves) and readiness (it takes new work: not while draining). Neither asks
# Triton: a Triton away is a 503 for the callers, no reason to restart or drop this gateway.
LIVENESS_PATH, READINESS_PATH = "/healthz", "/readyz"
STREAM_PATH = "/v1/stream"
# What a draining gateway refuses: new work. Everything else is answered: it is quick (a job's
# status, the console, a speaker's enrollment), or finishes work already taken (the files of an
# open job, which any replica takes: a job lives in the shared database).
NEW_WORK = (("POST", "/v1/audio/transcriptions"), ("POST", "/v1/jobs"))
DRAINING = "this gateway is shutting down; retry, and another replica will take it"
# The methods counted by name in the metrics; another (a client may send any token) is "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def create_app(settings: GatewaySettings, drain: Drain | None = None) -> Starlette:
    metrics = GatewayMetrics()
    runner = OfflineRunner(settings)
    streams = StreamEndpoint(settings)
    funasr = FunasrEndpoint(settings, runner, streams)
    jobs = JobsApi(settings, runner, on_file=metrics.job_file)
    drain = drain or Drain(0)
    metrics.read_at_scrape(open_work=lambda: drain.open, draining=lambda: drain.draining,
                           offline_waiting=lambda: runner.waiting, offline_inflight=lambda: runner.working,
                           max_inflight=settings.max_inflight)
    drain.on_begin.append(jobs.workers.stop)  # no new file; the ones held are finished

    async def transcriptions(request: Request) -> Response:
        return await create_transcription(request, runner, checked_key(bearer_key(request), settings))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @asynccontextmanager
    async def lifespan(app):
        async with jobs.running():  # the jobs database migrated, its workers started (stopped first)
            yield
        runner.close()
        await streams.close()

    routes = [Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
              WebSocketRoute(STREAM_PATH, streams.serve),
              WebSocketRoute("/", funasr.serve),
              Route(LIVENESS_PATH, healthz, methods=["GET"]),
              Route(READINESS_PATH, readyz, methods=["GET"]),
              *SpeakerEndpoints(settings).routes(),
              *console_routes(settings),
              *jobs.routes()]
    for route in routes:  # (the sockets' series exist from the start, at 0)
        if isinstance(route, WebSocketRoute):
            metrics.open_sockets.labels(route.path)
    middleware = [Middleware(RequestContext, settings=settings, drain=drain, metrics=metrics, routes=routes)]
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST", "DELETE"],
                                     allow_headers=["Authorization", "Content-Type", ADMIN_KEY_HEADER],
                                     expose_headers=[REQUEST_ID_HEADER, "Retry-After", "Server-Timing"], max_age=600))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, 404: _not_found, 405: _not_allowed})
    app.state.metrics = metrics
    return app


def error_response(error: ApiError, request_id: str | None = None) -> JSONResponse:
    headers = dict(error.headers)
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _api_error(request: Request, error: ApiError) -> Response:
    return error_response(error)


async def _not_found(request: Request, error: Exception) -> Response:
    return error_response(ApiError(404, f"no such endpoint: {request.url.path}", code="not_found"))


async def _not_allowed(request: Request, error: Exception) -> Response:
    return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                   code="method_not_allowed"))


class BodyTooLarge(Exception):
    pass


class RequestContext:
    """Per HTTP request: its id (the caller's X-Request-ID when it is a plain token, else a new
    one) on the response and in the log line; the upload limit, checked on the declared length
    and on the bytes as they arrive (a chunked upload declares none); and the failures of the
    client library and the decoder turned into answers that say whose fault they were. Per
    request and socket: counted open for the drain, or, new work while draining, refused. And
    counted in the metrics: each request (the probes too) by route, method and status, with its
    duration; each socket open, by route."""

    def __init__(self, app: ASGIApp, settings: GatewaySettings, drain: Drain, metrics: GatewayMetrics,
                 routes: list[BaseRoute]):
        self.app = app
        self.settings = settings
        self.drain = drain
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["path"] in (LIVENESS_PATH, READINESS_PATH):
            await (self._probe(scope, receive, send) if scope["type"] == "http" else self.app(scope, receive, send))
            return
        if scope["type"] == "websocket" and self.drain.draining:
            await _refuse_socket(scope, receive, send)
            return
        self.drain.open += 1
        try:
            if scope["type"] == "websocket":
                await self._socket(scope, receive, send)
            else:
                await self._http(scope, receive, send)
        finally:
            self.drain.open -= 1

    def _count(self, scope: Scope, status: int, started: float) -> None:
        route = route_template(scope, self.routes)
        method = scope["method"] if scope["method"] in METHODS else OTHER_ROUTE
        self.metrics.requests.labels(route, method, str(status)).inc()
        self.metrics.request_seconds.labels(route).observe(time.monotonic() - started)

    async def _probe(self, scope: Scope, receive: Receive, send: Send) -> None:
        """/healthz, /readyz: counted, nothing else (not work the drain waits for)."""
        started, status = time.monotonic(), [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._count(scope, status[0], started)

    async def _socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        sockets = self.metrics.open_sockets.labels(route_template(scope, self.routes))
        sockets.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            sockets.dec()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = new_request_id(headers.get(REQUEST_ID_HEADER.lower()))
        scope.setdefault("state", {})["request_id"] = request_id
        started, status, limit = time.monotonic(), [500], self.settings.max_upload_bytes
        answered = [False]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                answered[0] = True
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        try:
            if self.drain.draining and (scope["method"], scope["path"]) in NEW_WORK:
                raise ApiError(503, DRAINING, code="draining", headers={"Retry-After": str(self.settings.retry_after_s)})
            if declared > limit:
                raise BodyTooLarge
            await self.app(scope, limited_receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer, unless one was sent
            if answered[0]:
                raise
            error = _as_api_error(exc, self.settings)
            status[0] = error.status
            await error_response(error, request_id)(scope, receive, send)
            if error.status >= 500 and not isinstance(exc, ApiError):
                log.error("request %s failed: %s", request_id, exc, exc_info=exc)
        finally:
            self._count(scope, status[0], started)
            log.info("%s %s %s %d %.0f ms", request_id, scope["method"], scope["path"], status[0],
                     (time.monotonic() - started) * 1000)


async def _refuse_socket(scope: Scope, receive: Receive, send: Send) -> None:
    """A socket opened while draining: accepted to say why (`WS /v1/stream`'s error message, the
    close's reason), then closed 1013 "try again later"."""
    socket = WebSocket(scope, receive, send)
    await socket.accept()
    if scope["path"] == STREAM_PATH:
        await socket.send_json({"type": "error", "code": "draining", "message": DRAINING})
    await socket.close(TRY_AGAIN_LATER, close_reason(f"draining: {DRAINING}"))


def _as_api_error(exc: Exception, settings: GatewaySettings) -> ApiError:
    if isinstance(exc, BodyTooLarge):
        return ApiError(413, f"the upload is larger than this gateway takes ({settings.max_upload_bytes} bytes)",
                        code="upload_too_large", param="file")
    try:
        return from_failure(exc, settings.retry_after_s)
    except Exception:  # noqa: BLE001 - not one of ours: the gateway's own fault
        return ApiError(500, "the gateway failed to answer; the request id is in X-Request-ID", code="internal_error")
