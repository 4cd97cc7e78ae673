"""The Open Inference Protocol's tensors: the request (JSON, or JSON followed by Triton's binary
tensor data), the model's two inputs, and the outputs (probabilities, or the classification
extension's "score:index:label" strings). No routes here: ``http.oip`` serves them.

Inputs (one per request):
- ``INPUT`` ``BYTES [N]`` (or ``[N, 1]``): encoded images. In JSON each element is base64; with
  the binary extension (what ``tritonclient`` sends) they are raw, each prefixed by its 4-byte
  little-endian length.
- ``PIXELS`` ``FP32 [N, 3, H, W]``: images already pre-processed (resized, cropped, normalised
  with the model's mean/std). They are turned back into 8-bit pixels for the shared graph, which
  changes each value by at most half a grey level.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from resnet_serve.errors import MalformedRequest
from resnet_serve.pipeline import Pipeline
from resnet_serve.results import ImageResult, top_k

BINARY_HEADER = "inference-header-content-length"
BYTES_INPUT = "INPUT"  # encoded images
PIXELS_INPUT = "PIXELS"  # pre-processed images; "INPUT" is accepted too, as before
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


def inlined_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema, standing on its own inside the OpenAPI document."""
    return _inlined(model.model_json_schema())  # type: ignore[no-any-return]


def parse_body(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
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


def take_binary(tensor: RequestInput, binary: bytes, offset: int) -> tuple[bytes, int]:
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        return b"", offset
    if not isinstance(size, int) or size < 0 or offset + size > len(binary):
        raise MalformedRequest(f"input {tensor.name!r}: binary_data_size does not match the body")
    return binary[offset : offset + size], offset + size


def decode_bytes(tensor: RequestInput, raw: bytes) -> list[bytes]:
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


def decode_fp32(tensor: RequestInput, raw: bytes, pipeline: Pipeline) -> list[np.ndarray]:
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


def requested_outputs(request: InferRequest, num_classes: int) -> list[RequestOutput]:
    """The outputs asked for, checked before any inference is spent on the request."""
    wanted = request.outputs or [RequestOutput(name=OUTPUT_NAME)]
    for output in wanted:
        if output.name != OUTPUT_NAME:
            raise MalformedRequest(f"unknown output {output.name!r}; this model has {OUTPUT_NAME!r}")
        k = output.parameters.get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_classes):
            raise MalformedRequest(f"classification must be an integer from 1 to {num_classes}")
    return wanted


def outputs(wanted: list[RequestOutput], results: list[ImageResult], pipeline: Pipeline) -> list[ResponseOutput]:
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


def request_inputs(request: InferRequest, binary: bytes, pipeline: Pipeline) -> tuple[bool, list[Any]]:
    """The request's one input: (True, encoded images) or (False, pre-processed pixels)."""
    if len(request.inputs) != 1:
        raise MalformedRequest(f"send exactly one input tensor ({BYTES_INPUT!r} or {PIXELS_INPUT!r}), "
                               f"not {len(request.inputs)}")
    tensor = request.inputs[0]
    raw, _ = take_binary(tensor, binary, 0)
    if tensor.datatype not in ("BYTES", "FP32"):
        raise MalformedRequest(f"datatype {tensor.datatype} is not supported; use BYTES or FP32")
    accepted = (BYTES_INPUT,) if tensor.datatype == "BYTES" else (PIXELS_INPUT, BYTES_INPUT)
    if tensor.name not in accepted:
        raise MalformedRequest(f"unknown input {tensor.name!r}; this model takes {BYTES_INPUT!r} (BYTES) "
                               f"or {PIXELS_INPUT!r} (FP32)")
    if tensor.datatype == "BYTES":
        return True, decode_bytes(tensor, raw)
    return False, decode_fp32(tensor, raw, pipeline)


def model_metadata(pipeline: Pipeline, versions: list[str]) -> dict[str, Any]:
    """The protocol's model metadata: unique input names, the output, the runtime's platform."""
    spec, info = pipeline.spec, pipeline.engine.info
    return {
        "name": spec.name,
        "versions": versions,
        "platform": info.platform,
        "inputs": [
            {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS_INPUT, "datatype": "FP32", "shape": [-1, 3, spec.crop_size, spec.crop_size]},
        ],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, spec.num_classes]}],
    }
