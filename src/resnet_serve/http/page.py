"""The web page at ``GET /``: files shipped in the package, served with a public page's headers.

The page is plain HTML/CSS/JS with no CDN and no build step, so it works offline. Its
Content-Security-Policy allows only the page's own resources (plus ``blob:`` images for the
previews of the user's own files); ``/docs`` and ``/redoc`` keep FastAPI's pages (their scripts
served from the package too, see ``app``) and no such policy: Swagger UI runs an inline script.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from resnet_serve.http.middleware import HttpMiddleware

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def _is_page(path: str) -> bool:
    return path == "/" or path.startswith("/static/")


class SecurityHeaders(HttpMiddleware):
    """Adds ``nosniff`` to every response and the page CSP to the page's own files."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        page = _is_page(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if page:
                    headers["Content-Security-Policy"] = PAGE_CSP
                    headers["Referrer-Policy"] = "no-referrer"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def mount_page(app: FastAPI) -> None:
    """Serve ``index.html`` at ``/`` and the other page files under ``/static``."""
    static = StaticFiles(packages=[("resnet_serve.http", "static")])
    app.mount("/static", static, name="static")
    index = static.lookup_path("index.html")[0]

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(index, media_type="text/html")

    app.add_middleware(SecurityHeaders)
