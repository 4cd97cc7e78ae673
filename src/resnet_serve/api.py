"""The HTTP API: our routes, the one error handler, and the service's start-up and shutdown.

The request path every endpoint shares (cache → decode → batcher → inference thread) lives in
``service``; the Open Inference Protocol's routes in ``v2``; the page at ``/`` in ``web``.

Start-up: the weights are resolved before the server accepts requests, so
``RESNET_SERVE_WEIGHTS_MODE=official`` without the official file stops the process; compiling
and warming the model then runs in the background while ``/health/live`` answers and
``/health/ready`` says 503. Shutdown (SIGTERM): readiness turns false at once, new requests get
503, admitted ones finish within the grace period, then the inference thread stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
import torchvision
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from resnet_serve import metrics
from resnet_serve.engine import Engine
from resnet_serve.errors import (
    ServeError,
    Unauthorized,
    UploadTimeout,
)
from resnet_serve.labels import Language, load_labels
from resnet_serve.middleware import RequestLog, configure_logging
from resnet_serve.schemas import (
    BatchItem,
    BatchResponse,
    ErrorDetail,
    ErrorResponse,
    HealthResponse,
    LabelEntry,
    LabelsResponse,
    ModelResponse,
    PredictResponse,
)
from resnet_serve.service import Classified, Service
from resnet_serve.settings import DEFAULT_TOP_K, MAX_TOP_K, Settings
from resnet_serve.uploads import (
    BATCH_FIELD,
    FILE_FIELD,
    MAX_BATCH_FILES,
    Upload,
    discard_body,
    read_uploads,
)
from resnet_serve.v2 import v2_router
from resnet_serve.web import mount_page
from resnet_serve.weights import (
    RESNET18,
    resolve,
)

logger = logging.getLogger(__name__)

BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [BATCH_FIELD],
                    "properties": {BATCH_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            }
        },
    }
}
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "empty, truncated or corrupt image; malformed body",
        401: "API key missing or wrong (only when RESNET_SERVE_API_KEY is set)",
        408: "the upload did not arrive in time",
        413: "the upload exceeds the byte limit or the image the pixel limit",
        415: "not an image in a supported format, or a body type we do not accept",
        422: "no file, several files, or a bad query parameter",
        500: "the model failed on this request's batch",
        503: "overloaded (see Retry-After), warming up, or shutting down",
        504: "no result within the request deadline",
    }.items()
}


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The one place where errors become HTTP status codes and JSON."""
    if isinstance(exc, ServeError):
        if exc.status_code >= 500:
            logger.warning("%s %s -> %d %s", request.method, request.url.path, exc.status_code, exc.message)
        if request.url.path.startswith("/v2/"):  # the Open Inference Protocol's error shape
            return JSONResponse({"error": exc.message}, exc.status_code, headers=exc.headers)
        return _error_response(exc.status_code, exc.code, exc.message, exc.headers)
    if isinstance(exc, RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return _error_response(422, "invalid_parameter", problems)
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error_response(500, "internal_error", "an internal error occurred")


def _api_key_dependency(settings: Settings) -> Callable[[Request], Awaitable[None]]:
    """A dependency that checks ``Authorization: Bearer`` or ``X-API-Key`` in constant time.

    It is ``async`` only so that FastAPI runs it on the event loop: a plain function dependency
    is sent to a worker thread, a thread hop on every request for a few microseconds of work."""
    expected = settings.api_key.get_secret_value().encode() if settings.api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("x-api-key", "")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token:
            given = token.strip()
        if not hmac.compare_digest(given.encode(), expected):
            raise Unauthorized("missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})

    return check


def _flip_readiness_on_sigterm(service: Service) -> Callable[[], None]:
    """Turn readiness false the moment SIGTERM arrives, then let uvicorn's own handler drain.

    uvicorn installs its handler before the lifespan starts; this one runs first and chains to
    it. Only the main thread may set signal handlers (tests may run the app elsewhere).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: object) -> None:
        service.begin_shutdown()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """Build the app. Pass a warmed ``engine`` to share one model between apps (tests)."""
    settings = settings or Settings()
    spec = RESNET18
    service = Service(settings, spec, load_labels(spec))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader: asyncio.Task[None] | None = None
        restore_signal = _flip_readiness_on_sigterm(service)
        if engine is not None:
            service.start(engine)
        else:
            loader = service.begin_loading(await asyncio.to_thread(resolve, spec, settings))
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                service.status = "shutting_down"
                await loader
            await service.stop()
            restore_signal()

    app = FastAPI(
        title="resnet-serve",
        version=_version(),
        summary="ImageNet classification with ResNet-18, dynamically batched.",
        lifespan=lifespan,
    )
    app.state.service = service
    for exc_type in (ServeError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle_error)
    configure_logging(settings.log_format, settings.log_level)
    check_api_key = _api_key_dependency(settings)

    def weights_source() -> str:
        return service.weights.source if service.weights else "unknown"

    def answer(classified: Classified, filename: str | None, start: float, top_k: int, lang: Language) -> PredictResponse:
        return classified.response(service.labels, spec.name, weights_source(), filename, start, top_k, lang)

    async def read_within_deadline(request: Request, max_files: int, field: str = FILE_FIELD) -> list[Upload]:
        try:
            async with asyncio.timeout(settings.request_timeout_s):
                return await read_uploads(request, max_bytes=settings.max_upload_bytes, max_files=max_files,
                                          field=field)
        except TimeoutError:
            raise UploadTimeout("the upload did not complete within the request deadline") from None

    @contextlib.asynccontextmanager
    async def admitted_upload(request: Request) -> AsyncIterator[None]:
        """The gate of an upload endpoint: ready, and a free slot, decided before anything is
        read or decoded; a refused upload is drained so the client reads a clean 503."""
        service.ready_batcher()
        if not service.has_room():
            await discard_body(request, max_bytes=settings.max_upload_bytes)
            raise service.overloaded()
        with service.admitted():
            yield

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=UPLOAD_BODY,
        dependencies=[Depends(check_api_key)],
        summary="Classify one image",
        description=(
            f"Send the image as multipart/form-data field `{FILE_FIELD}` (or as the raw body). "
            "The format is detected from the bytes."
        ),
    )
    async def predict(
        request: Request,
        response: Response,
        top_k: int = Query(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K, description="how many classes"),
        lang: Language = Query("en", description="language of `label`: en or zh"),
    ) -> PredictResponse:
        start = time.monotonic()
        async with admitted_upload(request):
            (upload,) = await read_within_deadline(request, max_files=1)
            classified = await service.classify(upload.data, start + settings.request_timeout_s, request)
        response.headers["X-Model-Weights"] = weights_source()
        request.state.batch_size = classified.batch_size
        return answer(classified, upload.filename, start, top_k, lang)

    @app.post(
        "/predict/batch",
        response_model=BatchResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=BATCH_BODY,
        dependencies=[Depends(check_api_key)],
        summary="Classify several images in one request",
        description=(
            f"Send up to {MAX_BATCH_FILES} images as repeated multipart fields `{BATCH_FIELD}`. Each "
            "image is answered on its own: a bad one gets its error, the others their predictions."
        ),
    )
    async def predict_batch(
        request: Request,
        response: Response,
        top_k: int = Query(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K, description="how many classes"),
        lang: Language = Query("en", description="language of `label`: en or zh"),
    ) -> BatchResponse:
        start = time.monotonic()
        async with admitted_upload(request):
            uploads = await read_within_deadline(request, MAX_BATCH_FILES, BATCH_FIELD)
            deadline = start + settings.request_timeout_s
            outcomes = await asyncio.gather(
                *(service.classify(u.data, deadline, request) for u in uploads), return_exceptions=True
            )
        items = []
        for index, (upload, outcome) in enumerate(zip(uploads, outcomes)):
            if isinstance(outcome, ServeError):
                error = ErrorDetail(code=outcome.code, message=outcome.message)
                items.append(BatchItem(index=index, filename=upload.filename, status=outcome.status_code, error=error))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                items.append(BatchItem(index=index, filename=upload.filename, status=200,
                                       result=answer(outcome, upload.filename, start, top_k, lang)))
        response.headers["X-Model-Weights"] = weights_source()
        return BatchResponse(results=items, total_time_ms=round((time.monotonic() - start) * 1000.0, 3))

    @app.get("/health/live", response_model=HealthResponse, summary="The process is up")
    async def live() -> HealthResponse:
        return HealthResponse(status="alive")

    @app.get(
        "/health/ready",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse, "description": "loading, failed or shutting down"}},
        summary="The model is loaded and warmed",
    )
    async def ready() -> JSONResponse:
        source = service.weights.source if service.weights else None
        status = service.status
        if status == "ready" and not service.check_alive():
            status = "restarting"
        body = HealthResponse(status=status, weights=source, detail=service.failure)
        return JSONResponse(body.model_dump(), 200 if status == "ready" else 503)

    @app.get("/model", response_model=ModelResponse, responses={503: {"model": ErrorResponse}})
    async def model_info() -> ModelResponse:
        service.ready_batcher()
        assert service.engine is not None
        info, weights = service.engine.info, service.engine.info.weights
        return ModelResponse(
            name=info.name,
            weights=weights.source,
            weights_sha256=weights.sha256,
            weights_path=str(weights.path) if weights.path else None,
            device=info.device,
            precision=info.precision,
            channels_last=info.channels_last,
            compiled_from=info.compiled_from,
            start_s=info.start_s,
            cache_size=settings.cache_size,
            torch_threads=info.torch_threads,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            dispatch=settings.dispatch,
            max_queue=service.queue_limit,
            request_timeout_s=settings.request_timeout_s,
            max_upload_mb=settings.max_upload_mb,
            num_classes=spec.num_classes,
            input_size=spec.crop_size,
            warmup_batch_ms=info.warmup_batch_ms,
            torch_version=torch.__version__,
            torchvision_version=torchvision.__version__,
        )

    labels_response = LabelsResponse(
        count=len(service.labels),
        labels=[
            LabelEntry(class_id=i, en=en, zh=zh)
            for i, (en, zh) in enumerate(zip(service.labels.en, service.labels.zh))
        ],
    )

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/labels", response_model=LabelsResponse, summary="All class names, English and Chinese")
    async def labels() -> LabelsResponse:
        return labels_response

    app.include_router(v2_router(service, check_api_key))
    mount_page(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Model-Weights", "Retry-After"],
        )
    app.add_middleware(RequestLog)
    return app


def _version() -> str:
    from resnet_serve import __version__

    return __version__
