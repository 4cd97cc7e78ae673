"""``POST /predict`` and ``POST /predict/batch``: uploads in, Top-K classes out.

Both routes are gated the same way, before anything is read or decoded: the service must be
ready and the model's pipeline must have a free slot; a refused upload is drained so the client
reads a clean 503 rather than a reset connection. Each further image of a batch takes its own
slot as its part arrives, so a batch of 32 counts as 32 requests, not one.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from resnet_serve.errors import ServeError
from resnet_serve.http.auth import require_api_key
from resnet_serve.http.dependencies import PredictQuery, PredictQueryDep, ServiceDep
from resnet_serve.http.schemas import BatchItem, BatchResponse, ErrorDetail, ErrorResponse, PredictResponse
from resnet_serve.http.uploads import (
    BATCH_FIELD,
    FILE_FIELD,
    MAX_BATCH_FILES,
    admitted_upload,
    client_gone,
    read_within,
)
from resnet_serve.pipeline import Pipeline
from resnet_serve.results import ImageResult

router = APIRouter(dependencies=[Depends(require_api_key)])


def multipart_body(field: str, schema: dict[str, Any], *, raw: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"multipart/form-data": {"schema": {
        "type": "object", "required": [field], "properties": {field: schema}}}}
    if raw:
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


BINARY = {"type": "string", "format": "binary"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "empty, truncated or corrupt image; malformed body",
        401: "API key missing or wrong (only when RESNET_SERVE_API_KEY is set)",
        404: "no such model (the message lists the models served)",
        408: "the upload did not arrive in time",
        413: "the upload exceeds the byte limit, the image the pixel limit, or a batch the images the model admits at once",
        415: "not an image in a supported format, or a body type we do not accept",
        422: "no file, several files, or a bad query parameter",
        500: "the model failed on this request's batch",
        503: "overloaded (see Retry-After), warming up, the model unavailable, or shutting down",
        504: "no result within the request deadline",
    }.items()
}


def _answer(result: ImageResult, filename: str | None, pipeline: Pipeline, start: float,
            query: PredictQuery) -> PredictResponse:
    info = pipeline.engine.info
    return PredictResponse.build(result, pipeline.spec.labels, model=info.name, version=info.version,
                                 weights=info.weights.source, filename=filename, start=start,
                                 top_k=query.top_k, lang=query.lang)


ONE_IMAGE: dict[str, Any] = {
    "summary": "Classify one image",
    "description": f"Send the image as multipart/form-data field `{FILE_FIELD}` (or as the raw body). "
                   "The format is detected from the bytes.",
    "openapi_extra": multipart_body(FILE_FIELD, BINARY, raw=True),
}
SEVERAL_IMAGES: dict[str, Any] = {
    "summary": "Classify several images in one request",
    "description": f"Send up to {MAX_BATCH_FILES} images as repeated multipart fields `{BATCH_FIELD}`. Each "
                   "image is answered on its own: a bad one gets its error, the others their predictions.",
    "openapi_extra": multipart_body(BATCH_FIELD, {"type": "array", "items": BINARY}, raw=False),
}


@router.post("/predict", response_model=PredictResponse, responses=ERROR_RESPONSES, **ONE_IMAGE)
async def predict(request: Request, response: Response, query: PredictQueryDep,
                  service: ServiceDep) -> PredictResponse:
    start = time.monotonic()
    settings = service.settings
    pipeline = service.ready_pipeline(query.model)
    async with admitted_upload(request, pipeline, max_bytes=settings.max_upload_bytes):
        (upload,) = await read_within(request, settings.request_timeout_s, max_bytes=settings.max_upload_bytes)
        result = await pipeline.predict_bytes(upload.data, start + settings.request_timeout_s,
                                              functools.partial(client_gone, request))
    response.headers["X-Model-Weights"] = pipeline.engine.info.weights.source
    request.state.batch_size = result.batch_size
    return _answer(result, upload.filename, pipeline, start, query)


@router.post("/predict/batch", response_model=BatchResponse, responses=ERROR_RESPONSES, **SEVERAL_IMAGES)
async def predict_batch(request: Request, response: Response, query: PredictQueryDep,
                        service: ServiceDep) -> BatchResponse:
    start = time.monotonic()
    settings = service.settings
    deadline = start + settings.request_timeout_s
    pipeline = service.ready_pipeline(query.model)
    async with admitted_upload(request, pipeline, max_bytes=settings.max_upload_bytes) as slots:
        uploads = await read_within(request, settings.request_timeout_s, max_bytes=settings.max_upload_bytes,
                                    max_files=MAX_BATCH_FILES, field=BATCH_FIELD, on_next_file=slots.take)
        gone = functools.partial(client_gone, request)
        outcomes = await asyncio.gather(*(pipeline.predict_bytes(u.data, deadline, gone) for u in uploads),
                                        return_exceptions=True)
    items = []
    for index, (upload, outcome) in enumerate(zip(uploads, outcomes)):
        if isinstance(outcome, ServeError):
            error = ErrorDetail(code=outcome.code, message=outcome.message)
            items.append(BatchItem(index=index, filename=upload.filename, status=outcome.status_code, error=error))
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            answer = _answer(outcome, upload.filename, pipeline, start, query)
            items.append(BatchItem(index=index, filename=upload.filename, status=200, result=answer))
    response.headers["X-Model-Weights"] = pipeline.engine.info.weights.source
    return BatchResponse(results=items, total_time_ms=round((time.monotonic() - start) * 1000.0, 3))
