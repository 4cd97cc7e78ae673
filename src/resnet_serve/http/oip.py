"""The Open Inference Protocol v2 (KServe, Triton) beside our own API, through the same pipeline.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``,
``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``.

Inputs (one per request):
- ``BYTES`` ``[N]``: encoded images. In JSON each element is base64 (the protocol's way to carry
  binary in JSON); with Triton's binary-tensor extension (what ``tritonclient`` sends) they are
  raw, each prefixed by its 4-byte little-endian length.
- ``FP32`` ``[N, 3, H, W]``: images already pre-processed (resized, cropped, normalised with the
  model's mean/std). They are turned back into 8-bit pixels for the shared graph, which changes
  each value by at most half a grey level.
Output ``probabilities`` ``FP32 [N, classes]``; or, with Triton's classification extension
(``"parameters": {"classification": K}`` on the requested output), ``BYTES [N, K]`` strings
``"score:index:label"``. Every error under ``/v2``, unknown paths included, is the protocol's
``{"error": "..."}`` with the usual status codes: the routes run under ``OipRoute``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from starlette.routing import Match

from resnet_serve import __version__
from resnet_serve.errors import (
    MalformedRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    ServeError,
    UnsupportedMediaType,
)
from resnet_serve.http.auth import require_api_key
from resnet_serve.http.dependencies import ServiceDep
from resnet_serve.http.errors import log_server_side, validation_message
from resnet_serve.http.uploads import client_gone, read_body
from resnet_serve.pipeline import Pipeline
from resnet_serve.results import ImageResult, top_k
from resnet_serve.service import Service

BINARY_HEADER = "inference-header-content-length"
INPUT_NAME = "INPUT"
OUTPUT_NAME = "probabilities"


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput]
    outputs: list[RequestOutput] = Field(default_factory=list)


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


class InferResponse(BaseModel):
    model_config = {"protected_namespaces": ()}

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class V2Error(BaseModel):
    error: str


class Readiness(BaseModel):
    ready: bool
    name: str | None = None


NOT_READY: dict[int | str, dict[str, Any]] = {
    400: {"model": Readiness, "description": "not ready (the protocol uses a 4xx here)"}}
MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": V2Error, "description": "no such model"},
    503: {"model": V2Error, "description": "not ready"}}
INFER_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error, "description": text}
    for code, text in {400: "malformed request, bad tensor, or an image that cannot be decoded",
                       401: "API key missing or wrong", 404: "no such model", 413: "body or image too large",
                       415: "not JSON, or not an image format we decode", 422: "no image in a BYTES element",
                       500: "the model failed on this batch", 503: "overloaded or not ready",
                       504: "no result within the deadline"}.items()
}
def _inlined(schema: Any, definitions: dict[str, Any] | None = None) -> Any:
    """A JSON schema with pydantic's local ``$defs`` references written out in place, so it
    stands on its own inside the OpenAPI document."""
    if definitions is None:
        definitions = schema.pop("$defs", {})
    if isinstance(schema, dict):
        ref = schema.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inlined(dict(definitions[ref.removeprefix("#/$defs/")]), definitions)
        return {k: _inlined(v, definitions) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_inlined(v, definitions) for v in schema]
    return schema


INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _inlined(InferRequest.model_json_schema())}},
    }
}


def _parse_body(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """The JSON part and, with the binary extension, the bytes that follow it."""
    try:
        split = int(header_length) if header_length is not None else len(body)
    except ValueError:
        raise MalformedRequest(f"{BINARY_HEADER} is not a number") from None
    if not 0 <= split <= len(body):
        raise MalformedRequest(f"{BINARY_HEADER} is outside the body")
    try:
        return InferRequest.model_validate(json.loads(body[:split])), body[split:]
    except (ValueError, ValidationError) as exc:
        raise MalformedRequest(f"the inference request is not valid JSON for the v2 protocol: {exc}") from None


def _take_binary(tensor: RequestInput, binary: bytes, offset: int) -> tuple[bytes, int]:
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        return b"", offset
    if not isinstance(size, int) or size < 0 or offset + size > len(binary):
        raise MalformedRequest(f"input {tensor.name!r}: binary_data_size does not match the body")
    return binary[offset : offset + size], offset + size


def _decode_bytes(tensor: RequestInput, raw: bytes) -> list[bytes]:
    count = int(np.prod(tensor.shape)) if tensor.shape else 0
    if tensor.data is None:  # binary extension: <uint32 length><bytes> repeated
        items, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise MalformedRequest("truncated BYTES element")
            (length,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4 : offset + 4 + length])
            offset += 4 + length
    else:
        try:
            items = [base64.b64decode(item, validate=True) for item in tensor.data]
        except (binascii.Error, TypeError, ValueError):
            raise MalformedRequest("BYTES elements in JSON must be base64-encoded images") from None
    if len(items) != count or count == 0:
        raise MalformedRequest(f"input {tensor.name!r} has {len(items)} elements; its shape says {count}")
    return items


def _decode_fp32(tensor: RequestInput, raw: bytes, pipeline: Pipeline) -> list[np.ndarray]:
    spec = pipeline.spec
    size = spec.crop_size
    if len(tensor.shape) != 4 or tensor.shape[1:] != [3, size, size] or tensor.shape[0] < 1:
        raise MalformedRequest(f"FP32 input must have shape [N, 3, {size}, {size}], not {tensor.shape}")
    try:
        values = np.frombuffer(raw, dtype="<f4") if tensor.data is None else np.asarray(tensor.data, dtype=np.float32)
        normalised = values.reshape(tensor.shape)
    except ValueError:
        raise MalformedRequest("the FP32 data does not fill the shape it declares") from None
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    pixels = np.clip(np.round((normalised * std + mean) * 255.0), 0, 255).astype(np.uint8)
    return list(pixels)


def _requested_outputs(request: InferRequest, num_classes: int) -> list[RequestOutput]:
    """The outputs asked for, checked before any inference is spent on the request."""
    wanted = request.outputs or [RequestOutput(name=OUTPUT_NAME)]
    for output in wanted:
        if output.name != OUTPUT_NAME:
            raise MalformedRequest(f"unknown output {output.name!r}; this model has {OUTPUT_NAME!r}")
        k = output.parameters.get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_classes):
            raise MalformedRequest(f"classification must be an integer from 1 to {num_classes}")
    return wanted


def _outputs(wanted: list[RequestOutput], results: list[ImageResult], pipeline: Pipeline) -> list[ResponseOutput]:
    probs = np.stack([r.probs for r in results])
    outputs = []
    for output in wanted:
        k = output.parameters.get("classification")
        if k is None:
            outputs.append(ResponseOutput(name=OUTPUT_NAME, datatype="FP32", shape=list(probs.shape),
                                          data=probs.ravel().tolist()))
            continue
        names = pipeline.spec.labels.en
        data = [f"{v:f}:{i}:{names[i]}" for row in probs for v, i in zip(*top_k(row, k))]
        outputs.append(ResponseOutput(name=OUTPUT_NAME, datatype="BYTES", shape=[len(results), k], data=data))
    return outputs


class OipRoute(APIRoute):
    """A route whose errors answer in the protocol's shape, ``{"error": "<message>"}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def protocol_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except ServeError as exc:
                log_server_side(request, exc)
                return JSONResponse({"error": exc.message}, exc.status_code, headers=exc.headers)
            except RequestValidationError as exc:
                return JSONResponse({"error": validation_message(exc)}, 400)

        return protocol_errors


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"], route_class=OipRoute)


def _served(service: Service, name: str) -> Pipeline:
    """The ready pipeline of model ``name`` (404 for a model this server does not serve)."""
    if name != service.spec.name:
        raise ModelNotFound(f"unknown model {name!r}; this server serves {service.spec.name!r}")
    return service.ready_pipeline()


def _ready(service: Service) -> bool:
    return service.readiness() == "ready"


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "resnet-serve", "version": __version__, "extensions": ["classification", "binary_tensor_data"]}


@router.get("/health/live", summary="Server liveness")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness (400 when not ready, as the protocol says)",
            response_model=Readiness, responses=NOT_READY)
async def server_ready(service: ServiceDep) -> JSONResponse:
    ready = _ready(service)
    return JSONResponse({"ready": ready}, 200 if ready else 400)


@router.get("/models/{name}", summary="Model metadata", responses=MODEL_ERRORS)
async def model_metadata(name: str, service: ServiceDep) -> dict[str, Any]:
    pipeline = _served(service, name)
    size, info = pipeline.spec.crop_size, pipeline.engine.info
    return {
        "name": name,
        "versions": ["1"],
        "platform": info.platform,
        "inputs": [
            {"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]},
            {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, size, size]},
        ],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, pipeline.spec.num_classes]}],
    }


@router.get("/models/{name}/ready", summary="Model readiness", response_model=Readiness,
            responses={**NOT_READY, **MODEL_ERRORS})
async def model_ready(name: str, service: ServiceDep) -> JSONResponse:
    if name != service.spec.name:
        raise ModelNotFound(f"unknown model {name!r}; this server serves {service.spec.name!r}")
    ready = _ready(service)
    return JSONResponse({"name": name, "ready": ready}, 200 if ready else 400)


@router.post("/models/{name}/infer", summary="Inference", dependencies=[Depends(require_api_key)],
             response_model=InferResponse, responses=INFER_ERRORS, openapi_extra=INFER_BODY)
async def infer(name: str, request: Request, service: ServiceDep) -> InferResponse:
    start = time.monotonic()
    pipeline = _served(service, name)
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", "application/octet-stream", ""):
        raise UnsupportedMediaType("the v2 protocol takes application/json (or the binary extension)")
    body = await read_body(request, max_bytes=4 * service.settings.max_upload_bytes)
    parsed, binary = _parse_body(body, request.headers.get(BINARY_HEADER))
    if len(parsed.inputs) != 1:
        raise MalformedRequest(f"send exactly one input tensor ({INPUT_NAME!r}), not {len(parsed.inputs)}")
    tensor = parsed.inputs[0]
    wanted = _requested_outputs(parsed, pipeline.spec.num_classes)
    raw, _ = _take_binary(tensor, binary, 0)
    deadline = start + service.settings.request_timeout_s
    gone = functools.partial(client_gone, request)
    if tensor.datatype == "BYTES":
        items: list[Any] = _decode_bytes(tensor, raw)
        run: Callable[..., Coroutine[Any, Any, ImageResult]] = pipeline.predict_bytes
    elif tensor.datatype == "FP32":
        items, run = _decode_fp32(tensor, raw, pipeline), pipeline.predict_pixels
    else:
        raise MalformedRequest(f"datatype {tensor.datatype} is not supported; use BYTES or FP32")
    with pipeline.admitted(len(items)):
        results = await asyncio.gather(*(run(item, deadline, gone) for item in items), return_exceptions=True)
    for outcome in results:
        if isinstance(outcome, BaseException):
            raise outcome
    outputs = _outputs(wanted, results, pipeline)  # type: ignore[arg-type]
    return InferResponse(model_name=name, model_version="1", id=parsed.id, outputs=outputs)


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"],
                  include_in_schema=False)
async def unknown(path: str, request: Request) -> None:
    """Whatever no protocol route answers: 405 where the path exists for other methods, else 404."""
    allowed = set()
    for route in router.routes:
        if isinstance(route, APIRoute) and route.endpoint is not unknown:
            match, _ = route.matches(request.scope)
            if match is Match.PARTIAL:
                allowed |= route.methods
    if allowed:
        raise MethodNotAllowed(f"{request.method} is not allowed on /v2/{path}",
                               headers={"Allow": ", ".join(sorted(allowed))})
    raise NotFound(f"no such endpoint: /v2/{path}")
