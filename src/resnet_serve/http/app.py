"""The FastAPI app: it only assembles the service, the routers, the error handlers, the
middleware and the lifespan (start-up and shutdown live in ``service``)."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from resnet_serve import __version__
from resnet_serve.http import explain, health, info, oip, predict, triton
from resnet_serve.http.errors import install_error_handlers
from resnet_serve.http.middleware import HeadAsGet, RequestLog, StartupErrors
from resnet_serve.http.page import mount_page
from resnet_serve.logs import configure_logging
from resnet_serve.pipeline import Predictor
from resnet_serve.service import Service
from resnet_serve.settings import Settings

DOCS_ASSETS = "/docs-assets"  # Swagger UI's and ReDoc's scripts and styles


def _flip_readiness_on_sigterm(service: Service) -> Callable[[], None]:
    """Turn readiness false the moment SIGTERM arrives, then let uvicorn's own handler drain.

    uvicorn installs its handler before the lifespan starts; this one runs first and chains to
    it, whatever happens. Only the main thread may set signal handlers (tests may run the app
    elsewhere). The handler may run in the middle of any write of the main thread, so it does
    no I/O: the log line is left to the event loop."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    loop = asyncio.get_running_loop()

    def handler(signum: int, frame: object) -> None:
        try:
            service.begin_shutdown()
            loop.call_soon_threadsafe(service.say_shutdown)
        finally:
            if callable(previous):
                previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def routers() -> tuple[APIRouter, ...]:
    """The API's routers, in the order the app includes them (the ``/v2`` fallback last)."""
    return (predict.router, explain.router, info.router, health.router, triton.router, oip.router,
            oip.fallback_for(triton.router, oip.router))


def create_app(settings: Settings | None = None, *, engine: Predictor | None = None) -> FastAPI:
    """Build the app. Pass a warmed ``engine`` to share one model between apps (tests)."""
    settings = settings or Settings()
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        restore_signal = _flip_readiness_on_sigterm(service)
        try:
            await service.start(engine)
            yield
        finally:
            await service.stop()
            restore_signal()

    # FastAPI's /docs and /redoc load Swagger UI and ReDoc from a CDN: offline they are blank
    # pages. fastapi-offline serves the same pages with those files from its package.
    app = FastAPIOffline(title="resnet-serve", version=__version__, lifespan=lifespan, static_url=DOCS_ASSETS,
                         summary="Image classification with torchvision models (a model repository), dynamically batched.")
    app.state.service = service
    install_error_handlers(app)
    configure_logging(settings.log_format, settings.log_level)
    for router in routers():
        app.include_router(router)
    mount_page(app)
    app.add_middleware(HeadAsGet)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Model-Weights", "Retry-After"],
        )
    app.add_middleware(RequestLog)
    app.add_middleware(StartupErrors)
    return app
