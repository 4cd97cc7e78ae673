"""The Open Inference Protocol v2 (KServe, Triton) beside our own API, through the same pipelines.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, and per model (``{name}``,
or ``{name}/versions/{version}`` for the version served): metadata, ``/ready`` and ``POST /infer``;
and our extension ``POST .../explain`` (Grad-CAM, as ``POST /explain``, in the protocol's tensors).
Triton's own extensions (model configuration, statistics, repository index) are in
``http.triton``. The tensors are described in ``http.oip_codec``.

Readiness answers 200, or 503 when not ready (as KServe does; the protocol asks for a 4xx and
Triton uses 400; clients read any status but 200 as not ready). Every error under ``/v2``,
unknown paths included, is the protocol's ``{"error": "..."}``: the routes run under
``OipRoute``, and ``fallback_for`` (included last) answers what no route does.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.routing import Match

from resnet_serve import __version__
from resnet_serve.errors import MalformedRequest, MethodNotAllowed, ModelNotFound, NotFound, UnsupportedMediaType
from resnet_serve.http.auth import require_api_key
from resnet_serve.http.dependencies import ServiceDep
from resnet_serve.http.errors import OipRoute, allowed_methods
from resnet_serve.http.oip_codec import (
    BINARY_HEADER,
    BYTES_INPUT,
    InferRequest,
    InferResponse,
    Readiness,
    ResponseOutput,
    V2Error,
    inlined_schema,
    model_metadata,
    outputs,
    parse_body,
    request_inputs,
    requested_outputs,
)
from resnet_serve.http.uploads import admitted_upload, client_gone, read_body, refused_upload
from resnet_serve.service import ServedModel, Service

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"], route_class=OipRoute)

NOT_READY: dict[int | str, dict[str, Any]] = {503: {"model": Readiness, "description": "not ready"}}
MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": V2Error, "description": "a version that is not a number"},
    404: {"model": V2Error, "description": "no such model, or a version not served"},
    503: {"model": V2Error, "description": "the model is loading or unavailable"}}
INFER_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error, "description": text}
    for code, text in {400: "malformed request, bad tensor, or an image that cannot be decoded",
                       401: "API key missing or wrong", 404: "no such model or version",
                       413: "body or image too large, or more images than the model admits at once",
                       415: "not JSON, or not an image format we decode",
                       422: "no image in a BYTES element", 500: "the model failed on this batch",
                       503: "overloaded or not ready", 504: "no result within the deadline"}.items()
}
INFER_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": inlined_schema(InferRequest)}}}
}


def served(service: Service, name: str, version: str | None) -> ServedModel:
    """Model ``name``, and ``version`` if one is named: only the version served answers."""
    slot = service.model(name)
    if version is not None and version != str(slot.version):
        raise ModelNotFound(f"version {version} of {name} is not served; the version served is {slot.version}")
    return slot


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "resnet-serve", "version": __version__,
            "extensions": ["classification", "binary_tensor_data", "model_repository", "statistics"]}


@router.get("/health/live", summary="Server liveness")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness", response_model=Readiness, responses=NOT_READY)
async def server_ready(service: ServiceDep) -> JSONResponse:
    ready = service.readiness() == "ready"
    return JSONResponse({"ready": ready}, 200 if ready else 503)


@router.get("/models/{name}", summary="Model metadata", responses=MODEL_ERRORS)
@router.get("/models/{name}/versions/{version}", summary="Model metadata (one version)", responses=MODEL_ERRORS)
async def metadata(name: str, service: ServiceDep, version: str | None = None) -> dict[str, Any]:
    slot = served(service, name, version)
    return model_metadata(service.ready_pipeline(slot.name), [str(slot.version)])


@router.get("/models/{name}/ready", summary="Model readiness", response_model=Readiness,
            responses={**NOT_READY, **MODEL_ERRORS})
@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness (one version)",
            response_model=Readiness, responses={**NOT_READY, **MODEL_ERRORS})
async def model_ready(name: str, service: ServiceDep, version: str | None = None) -> JSONResponse:
    ready = service.model_ready(served(service, name, version))
    return JSONResponse({"name": name, "ready": ready}, 200 if ready else 503)


@router.post("/models/{name}/infer", summary="Inference", dependencies=[Depends(require_api_key)],
             response_model=InferResponse, responses=INFER_ERRORS, openapi_extra=INFER_BODY)
@router.post("/models/{name}/versions/{version}/infer", summary="Inference (one version)",
             dependencies=[Depends(require_api_key)], response_model=InferResponse, responses=INFER_ERRORS,
             openapi_extra=INFER_BODY)
async def infer(name: str, request: Request, service: ServiceDep, version: str | None = None) -> InferResponse:
    start = time.monotonic()
    slot = served(service, name, version)
    pipeline = service.ready_pipeline(slot.name)
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", "application/octet-stream", ""):
        raise UnsupportedMediaType("the v2 protocol takes application/json (or the binary extension)")
    max_bytes = 4 * service.settings.max_upload_bytes
    async with admitted_upload(request, pipeline, max_bytes=max_bytes) as slots:
        body = await read_body(request, max_bytes=max_bytes)
        parsed, binary = parse_body(body, request.headers.get(BINARY_HEADER))
        wanted = requested_outputs(parsed, pipeline.spec.num_classes)
        encoded, items = request_inputs(parsed, binary, pipeline)
        if len(items) > 1:
            slots.take(len(items) - 1)  # the gate took the first
        run = pipeline.predict_bytes if encoded else pipeline.predict_pixels
        deadline = start + service.settings.request_timeout_s
        gone = functools.partial(client_gone, request)
        results = await asyncio.gather(*(run(item, deadline, gone) for item in items), return_exceptions=True)
    for outcome in results:
        if isinstance(outcome, BaseException):
            raise outcome
    return InferResponse(model_name=name, model_version=str(slot.version), id=parsed.id,
                         outputs=outputs(wanted, results, pipeline))  # type: ignore[arg-type]


EXPLAIN_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": inlined_schema(InferRequest),
    "example": {"parameters": {"top_k": 1}, "inputs": [
        {"name": BYTES_INPUT, "shape": [1], "datatype": "BYTES", "data": ["<base64 JPEG>"]}]}}}}}


def _int_parameter(request: InferRequest, name: str, default: int | None) -> int | None:
    value = request.parameters.get(name, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise MalformedRequest(f"parameter {name!r} must be an integer")
    return value  # type: ignore[no-any-return]


@router.post("/models/{name}/explain", summary="Explanation (Grad-CAM; our extension)",
             dependencies=[Depends(require_api_key)], response_model=InferResponse,
             responses={**INFER_ERRORS, 501: {"model": V2Error, "description": "this install cannot explain"}},
             openapi_extra=EXPLAIN_BODY)
@router.post("/models/{name}/versions/{version}/explain", summary="Explanation (one version)",
             dependencies=[Depends(require_api_key)], response_model=InferResponse, responses=INFER_ERRORS,
             openapi_extra=EXPLAIN_BODY)
async def explain(name: str, request: Request, service: ServiceDep, version: str | None = None) -> InferResponse:
    """What ``POST /explain`` answers, as protocol tensors: one image in (``INPUT``, BYTES, shape
    [1]); request parameters ``top_k`` (default 1) and ``class_id``; outputs ``class_ids`` (INT64
    [k]), ``confidences`` (FP32 [k]), ``heatmaps`` (BYTES [k], base64 PNGs of the image's size)
    and ``grids`` (FP32 [k, h, w])."""
    start = time.monotonic()
    slot = served(service, name, version)
    target, explainer = service.explain_target(slot.name), service.explainer
    max_bytes = 4 * service.settings.max_upload_bytes
    if not explainer.has_room():
        raise await refused_upload(request, explainer.overloaded(), max_bytes=max_bytes)
    body = await read_body(request, max_bytes=max_bytes)
    parsed, binary = parse_body(body, request.headers.get(BINARY_HEADER))
    top_k = _int_parameter(parsed, "top_k", 1) or 1
    classes = target.classes(_int_parameter(parsed, "class_id", None), top_k)
    encoded, items = request_inputs(parsed, binary, service.ready_pipeline(slot.name))
    if not encoded or len(items) != 1:
        raise MalformedRequest(f"explain takes one encoded image: input {BYTES_INPUT!r}, BYTES, shape [1]")
    done = await explainer.explain(target, items[0], start + service.settings.request_timeout_s,
                                   classes=classes, top_k=top_k)
    k, grids = len(done.maps), np.stack([m.grid for m in done.maps])
    return InferResponse(model_name=name, model_version=str(slot.version), id=parsed.id, outputs=[
        ResponseOutput(name="class_ids", datatype="INT64", shape=[k], data=[m.class_id for m in done.maps]),
        ResponseOutput(name="confidences", datatype="FP32", shape=[k],
                       data=[float(done.probs[m.class_id]) for m in done.maps]),
        ResponseOutput(name="heatmaps", datatype="BYTES", shape=[k], data=[m.heatmap_png for m in done.maps]),
        ResponseOutput(name="grids", datatype="FP32", shape=list(grids.shape), data=grids.ravel().tolist()),
    ])


def fallback_for(*routers: APIRouter) -> APIRouter:
    """A router, to include after ``routers``, that answers whatever under ``/v2`` they do not:
    405 where a path exists for other methods, else 404, both in the protocol's shape."""
    known = [route for r in routers for route in r.routes if isinstance(route, APIRoute)]
    fallback = APIRouter(prefix="/v2", route_class=OipRoute)

    @fallback.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"],
                        include_in_schema=False)
    async def unknown(path: str, request: Request) -> None:
        allowed = set().union(*(r.methods for r in known if r.matches(request.scope)[0] is Match.PARTIAL))
        if allowed:
            raise MethodNotAllowed(f"{request.method} is not allowed on /v2/{path}",
                                   headers={"Allow": allowed_methods(allowed)})
        raise NotFound(f"no such endpoint: /v2/{path}")

    return fallback
