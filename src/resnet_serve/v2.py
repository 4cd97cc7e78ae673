"""KServe / Open Inference Protocol v2 (REST), beside our own API, through the same batcher.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/resnet18``,
``/v2/models/resnet18/ready``, ``POST /v2/models/resnet18/infer``.

Inputs (one per request):
- ``BYTES`` ``[N]``: encoded images. In JSON each element is base64 (the protocol's way to carry
  binary in JSON); with Triton's binary-tensor extension (what ``tritonclient`` sends) they are
  raw, each prefixed by its 4-byte little-endian length.
- ``FP32`` ``[N, 3, 224, 224]``: images already pre-processed (resized, cropped, normalised with
  the ImageNet mean/std). They are turned back into 8-bit pixels for the shared graph, which
  changes each value by at most half a grey level.
Output ``probabilities`` ``FP32 [N, 1000]``; or, with Triton's classification extension
(``"parameters": {"classification": K}`` on the requested output), ``BYTES [N, K]`` strings
``"score:index:label"``. Errors are ``{"error": "..."}`` with the usual status codes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import struct
import time
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from resnet_serve.errors import MalformedRequest, ServeError, UnsupportedMediaType
from resnet_serve.service import Classified, Service
from resnet_serve.uploads import read_body

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


NOT_READY = {400: {"model": Readiness, "description": "not ready (the protocol uses a 4xx here)"}}
INFER_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error, "description": text}
    for code, text in {400: "malformed request, bad tensor, or an image that cannot be decoded",
                       401: "API key missing or wrong", 413: "body or image too large",
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


def _decode_fp32(tensor: RequestInput, raw: bytes, service: Service) -> torch.Tensor:
    size = service.spec.crop_size
    if len(tensor.shape) != 4 or tensor.shape[1:] != [3, size, size] or tensor.shape[0] < 1:
        raise MalformedRequest(f"FP32 input must have shape [N, 3, {size}, {size}], not {tensor.shape}")
    try:
        values = np.frombuffer(raw, dtype="<f4") if tensor.data is None else np.asarray(tensor.data, dtype=np.float32)
        array = values.reshape(tensor.shape)
    except ValueError:
        raise MalformedRequest("the FP32 data does not fill the shape it declares") from None
    normalised = torch.from_numpy(array.copy())
    mean = torch.tensor(service.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(service.spec.std).view(1, 3, 1, 1)
    return ((normalised * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)


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


def _outputs(wanted: list[RequestOutput], classified: list[Classified], service: Service) -> list[dict[str, Any]]:
    probs = torch.stack([c.result.probs for c in classified])
    outputs = []
    for output in wanted:
        k = output.parameters.get("classification")
        if k is None:
            outputs.append({"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(probs.shape),
                            "data": probs.flatten().tolist()})
            continue
        values, indices = probs.topk(k, dim=1)
        data = [f"{v:f}:{i}:{service.labels.en[i]}" for row_v, row_i in zip(values.tolist(), indices.tolist())
                for v, i in zip(row_v, row_i)]
        outputs.append({"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [len(classified), k], "data": data})
    return outputs


def v2_router(service: Service, check_api_key: Any) -> APIRouter:
    """The v2 routes for ``service``'s model."""
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
    name = service.spec.name
    settings = service.settings

    def ready() -> bool:
        return service.status == "ready" and service.check_alive()

    @router.get("", summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        from resnet_serve import __version__

        return {"name": "resnet-serve", "version": __version__, "extensions": ["classification", "binary_tensor_data"]}

    @router.get("/health/live", summary="Server liveness")
    async def server_live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready", summary="Server readiness (400 when not ready, as the protocol says)",
                response_model=Readiness, responses=NOT_READY)
    async def server_ready() -> JSONResponse:
        return JSONResponse({"ready": ready()}, 200 if ready() else 400)

    @router.get(f"/models/{name}", summary="Model metadata")
    async def model_metadata() -> dict[str, Any]:
        size = service.spec.crop_size
        return {
            "name": name,
            "versions": ["1"],
            "platform": "pytorch_torchscript",
            "inputs": [
                {"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]},
                {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, size, size]},
            ],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, service.spec.num_classes]}],
        }

    @router.get(f"/models/{name}/ready", summary="Model readiness", response_model=Readiness, responses=NOT_READY)
    async def model_ready() -> JSONResponse:
        return JSONResponse({"name": name, "ready": ready()}, 200 if ready() else 400)

    @router.post(f"/models/{name}/infer", summary="Inference", dependencies=[Depends(check_api_key)],
                 response_model=InferResponse, responses=INFER_ERRORS, openapi_extra=INFER_BODY)
    async def infer(request: Request) -> InferResponse:
        start = time.monotonic()
        service.ready_batcher()
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", "application/octet-stream", ""):
            raise UnsupportedMediaType("the v2 protocol takes application/json (or the binary extension)")
        body = await read_body(request, max_bytes=4 * settings.max_upload_bytes)
        parsed, binary = _parse_body(body, request.headers.get(BINARY_HEADER))
        if len(parsed.inputs) != 1:
            raise MalformedRequest(f"send exactly one input tensor ({INPUT_NAME!r}), not {len(parsed.inputs)}")
        tensor = parsed.inputs[0]
        wanted = _requested_outputs(parsed, service.spec.num_classes)
        raw, _ = _take_binary(tensor, binary, 0)
        deadline = start + settings.request_timeout_s
        if tensor.datatype == "BYTES":
            images = _decode_bytes(tensor, raw)
            classify = service.classify
        elif tensor.datatype == "FP32":
            images = list(_decode_fp32(tensor, raw, service))  # type: ignore[arg-type]
            classify = service.classify_pixels  # type: ignore[assignment]
        else:
            raise MalformedRequest(f"datatype {tensor.datatype} is not supported; use BYTES or FP32")
        with service.admitted(len(images)):
            results = await asyncio.gather(*(classify(i, deadline, request) for i in images), return_exceptions=True)
        for outcome in results:
            if isinstance(outcome, BaseException):
                raise outcome if isinstance(outcome, ServeError) else outcome
        outputs = _outputs(wanted, list(results), service)  # type: ignore[arg-type]
        return InferResponse(model_name=name, model_version="1", id=parsed.id,
                             outputs=[ResponseOutput(**o) for o in outputs])

    return router
