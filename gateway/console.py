"""The web console (docs/console.md): a page at `GET /` and its static files under `/console/`
(plain HTML, ES modules and CSS shipped in the package: nothing to build), plus
`GET /console/config.json`, the choices the page offers, taken from tritonasr.contract so that
they are written once.

Every answer carries a strict Content-Security-Policy: scripts and styles from this origin only
(no inline code), connections to this origin only (the gateway's own API and WebSocket), no
frames. The page itself needs no key: it holds nothing; the API calls it makes do."""
from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tritonasr.contract import CHANNEL_MODES, ENDPOINTING_PRESETS, ENGINES, LANGUAGES
from tritonasr.gateway.settings import GatewaySettings
from tritonasr.gateway.transcriptions import OPENAI_MODELS

CONSOLE_DIR = Path(__file__).with_name("console")
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' data: blob:",
    "media-src 'self' blob:", "connect-src 'self'", "worker-src 'self'", "manifest-src 'self'",
    "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'"))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # The microphone for this page alone (the Live page, recording a speaker), nothing else.
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
}


def console_routes(settings: GatewaySettings) -> list[BaseRoute]:
    """`GET /` (an HTTP route: the FunASR WebSocket at `/` is matched by scope type, apart),
    `/console/config.json` and the static files."""
    config = {
        "engines": list(ENGINES),
        # The model a request names for the server's own default engine (one of OpenAI's names).
        "default_model": OPENAI_MODELS[0],
        "languages": list(LANGUAGES),
        "channel_modes": list(CHANNEL_MODES),
        "endpointing_presets": {name: {k: v for k, v in vars(preset).items() if v is not None}
                                for name, preset in ENDPOINTING_PRESETS.items()},
        "max_upload_bytes": settings.max_upload_bytes,
    }

    async def index(request: Request) -> Response:
        return FileResponse(CONSOLE_DIR / "index.html", headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    async def console_config(request: Request) -> Response:
        return JSONResponse(config, headers=SECURITY_HEADERS)

    return [Route("/", index, methods=["GET", "HEAD"]),
            Route("/console/config.json", console_config, methods=["GET"]),
            Mount("/console", app=_Secured(StaticFiles(directory=CONSOLE_DIR)))]


class _Secured:
    """SECURITY_HEADERS on every answer of `app` (the static files: Starlette's StaticFiles, which
    keeps paths inside its directory and answers ETags and ranges)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      *((k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()),
                                      (b"cache-control", b"no-cache")]
            await send(message)

        await self.app(scope, receive, send_secured)
