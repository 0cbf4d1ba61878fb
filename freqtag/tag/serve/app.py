"""The ASGI application of ``freqtag serve``: the page, ``POST /api/tag`` and ``GET /api/model``.

Starlette routes the requests; the upload is streamed to the private folder
(:mod:`freqtag.tag.serve.uploads`), tagged in the service's thread pool (the event
loop never waits on the network, so other requests go on), and deleted,
whatever the outcome. Every answer carries a Content-Security-Policy that
allows only this server as a source: the page cannot load anything from
elsewhere, which is what "works offline" means here.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path
from typing import Any

from freqtag.tag.serve.service import TaggingService, log
from freqtag.tag.serve.uploads import UploadError, UploadFolder, receive_upload

__all__ = ["create_app", "STATIC_DIR", "SECURITY_HEADERS"]

STATIC_DIR = Path(str(resources.files("freqtag.tag.serve") / "static"))
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; media-src 'self' blob:; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
_TRUE = {"1", "true", "yes", "on"}


class _Headers:
    """ASGI middleware: the security headers on every HTTP response (page, static files, API, errors)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(service: TaggingService, folder: UploadFolder) -> Any:
    """The Starlette app for ``service``; uploads go to ``folder`` and are deleted after tagging."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def api_json(body: Any, status: int = 200) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers={"cache-control": "no-store"})

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    async def model(request: Request) -> Response:
        return api_json(service.describe())

    async def tag(request: Request) -> Response:
        flags = {k: request.query_params.get(k, "").lower() in _TRUE for k in ("windows", "taggram")}
        try:
            upload = await receive_upload(request.headers, request.stream(), folder, service.max_upload_bytes)
        except UploadError as e:
            log(f"refused an upload: {e}")
            return api_json({"error": str(e)}, e.status)
        except ClientDisconnect:  # the browser went away mid-upload: nothing to answer, nothing left on disk
            return Response(status_code=400)
        try:
            loop = asyncio.get_running_loop()
            status, body = await loop.run_in_executor(service.pool, lambda: service.tag(upload, **flags))
        finally:
            folder.remove(upload.path)
        return api_json(body, status)

    routes = [
        Route("/", page),
        Route("/api/model", model),
        Route("/api/tag", tag, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    return _Headers(Starlette(routes=routes))
