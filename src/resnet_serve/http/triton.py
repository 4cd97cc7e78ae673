"""Triton's extensions to the protocol, which Triton's own tools and clients read: the model
configuration (``/v2/models/{name}/config``), statistics (``/v2/models[/{name}]/stats``), the
repository index (``POST /v2/repository/index``) and, with ``RESNET_SERVE_MODEL_CONTROL=explicit``,
loading and unloading (``POST /v2/repository/models/{name}/load|unload``), answered in Triton's
JSON shapes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fastapi import APIRouter, Depends, Request

from resnet_serve.errors import MalformedRequest
from resnet_serve.http.auth import require_api_key
from resnet_serve.http.dependencies import ServiceDep
from resnet_serve.http.errors import OipRoute
from resnet_serve.http.oip import MODEL_ERRORS, served
from resnet_serve.http.oip_codec import BYTES_INPUT, OUTPUT_NAME, PIXELS_INPUT, V2Error
from resnet_serve.http.uploads import read_body
from resnet_serve.pipeline import Duration
from resnet_serve.repository import LABELS_FILE
from resnet_serve.service import ServedModel, Service

router = APIRouter(prefix="/v2", tags=["Triton extensions"], route_class=OipRoute)
BACKENDS = {"torchscript": "pytorch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def model_config(service: Service, slot: ServedModel) -> dict[str, Any]:
    """Triton's model configuration (``config.pbtxt`` as JSON) for what this server runs."""
    pipeline = service.ready_pipeline(slot.name)
    spec, info, settings = pipeline.spec, pipeline.engine.info, pipeline.settings
    delay_us = int(settings.max_wait_ms * 1000) if settings.dispatch == "wait" else 0
    return {
        "name": spec.name,
        "platform": info.platform,
        "backend": BACKENDS[info.runtime],
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": settings.max_batch_size,
        "input": [
            {"name": BYTES_INPUT, "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [1]},
            {"name": PIXELS_INPUT, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
             "dims": [3, spec.crop_size, spec.crop_size]},
        ],
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [spec.num_classes],
                    "label_filename": LABELS_FILE}],
        "dynamic_batching": {"preferred_batch_size": [settings.max_batch_size],
                             "max_queue_delay_microseconds": delay_us},
        "instance_group": [{"name": spec.name, "kind": "KIND_GPU" if info.device.startswith("cuda") else "KIND_CPU",
                            "count": 1}],
        "parameters": {"labels": {"string_value": f"/labels?model={spec.name}"},
                       "precision": {"string_value": info.precision}},
    }


def _duration(d: Duration) -> dict[str, int]:
    return dataclasses.asdict(d)


def model_stats(slot: ServedModel) -> dict[str, Any]:
    """Triton's statistics for one model (zeros until it has served)."""
    pipeline = slot.pipeline
    if pipeline is None:
        return {"name": slot.name, "version": str(slot.version), "last_inference": 0, "inference_count": 0,
                "execution_count": 0, "inference_stats": {}, "batch_stats": []}
    stats, batches, none = pipeline.stats, pipeline.batcher.stats, {"count": 0, "ns": 0}
    return {
        "name": slot.name,
        "version": str(slot.version),
        "last_inference": stats.last_inference_ms,
        "inference_count": batches.items,
        "execution_count": batches.batches,
        "inference_stats": {
            "success": _duration(stats.success), "fail": _duration(stats.fail), "queue": _duration(stats.queue),
            "compute_input": _duration(stats.decode), "compute_infer": _duration(stats.infer),
            "compute_output": none, "cache_hit": _duration(stats.cache_hit), "cache_miss": _duration(stats.cache_miss),
        },
        "batch_stats": [{"batch_size": size, "compute_input": {"count": d.count, "ns": 0},
                         "compute_infer": _duration(d), "compute_output": {"count": d.count, "ns": 0}}
                        for size, d in sorted(stats.infer_by_batch_size.items())],
    }


@router.get("/models/{name}/config", summary="Model configuration (Triton)", responses=MODEL_ERRORS)
@router.get("/models/{name}/versions/{version}/config", summary="Model configuration (Triton, one version)",
            responses=MODEL_ERRORS)
async def config(name: str, service: ServiceDep, version: str | None = None) -> dict[str, Any]:
    return model_config(service, served(service, name, version))


@router.get("/models/stats", summary="Statistics of every model (Triton)")
async def all_stats(service: ServiceDep) -> dict[str, Any]:
    return {"model_stats": [model_stats(slot) for slot in service.models.values()]}


@router.get("/models/{name}/stats", summary="Model statistics (Triton)", responses=MODEL_ERRORS)
@router.get("/models/{name}/versions/{version}/stats", summary="Model statistics (Triton, one version)",
            responses=MODEL_ERRORS)
async def stats(name: str, service: ServiceDep, version: str | None = None) -> dict[str, Any]:
    return {"model_stats": [model_stats(served(service, name, version))]}


# A repository request is a small JSON object; a larger body is refused as it arrives (413).
MAX_REPOSITORY_BODY = 64 * 1024


async def _json_object(request: Request, shape: str) -> dict[str, Any]:
    """A repository request's JSON object (an empty body is an empty one), or 400 naming ``shape``."""
    body = await read_body(request, max_bytes=MAX_REPOSITORY_BODY)
    try:
        data = json.loads(body) if body.strip() else {}
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise MalformedRequest(f"the request is JSON: {shape}")
    return data


@router.post("/repository/index", summary="Every model version in the repository and its state (Triton)",
             responses={413: {"model": V2Error, "description": "a request body over 64 kB"}})
async def index(request: Request, service: ServiceDep) -> list[dict[str, str]]:
    ready_only = bool((await _json_object(request, '{} or {"ready": true}')).get("ready", False))
    rows = []
    for version in service.versions:
        slot = service.models.get(version.name)
        if slot is not None and slot.version == version.version:
            continue
        reason = version.problem or f"not the version served ({slot.version if slot else 'none'})"
        rows.append({"name": version.name, "version": str(version.version), "state": "UNAVAILABLE", "reason": reason})
    rows += [{"name": m.name, "version": str(m.version), "state": m.state, "reason": m.reason or ""}
             for m in service.models.values()]
    rows.sort(key=lambda row: (row["name"], int(row["version"])))
    return [row for row in rows if not ready_only or row["state"] == "READY"]


async def _parameters(request: Request) -> dict[str, Any]:
    """A load or unload request's ``parameters`` (an empty body has none)."""
    parameters = (await _json_object(request, '{} or {"parameters": {...}}')).get("parameters", {})
    if not isinstance(parameters, dict):
        raise MalformedRequest('"parameters" is an object')
    return parameters


CONTROL: dict[str, Any] = {"dependencies": [Depends(require_api_key)], "responses": {
    code: {"model": V2Error, "description": text}
    for code, text in {400: "the load failed (the version served stays), or a malformed request",
                       401: "API key missing or wrong", 403: "model control is off (RESNET_SERVE_MODEL_CONTROL)",
                       404: "no such model in the repository", 413: "a request body over 64 kB",
                       503: "the service is loading or shutting down"}.items()
}}


@router.post("/repository/models/{name}/load", summary="Load a model's latest version (Triton, explicit model control)",
             **CONTROL)
async def load(name: str, request: Request, service: ServiceDep) -> dict[str, Any]:
    """Serve the latest version in the repository: exported since the start, newer, or unloaded."""
    overrides = [key for key in await _parameters(request) if key == "config" or key.startswith("file:")]
    if overrides:
        raise MalformedRequest(f"a load takes the model as exported; {', '.join(overrides)} cannot override it "
                               "(export a new version instead)")
    await service.load_model(name)
    return {}


@router.post("/repository/models/{name}/unload", summary="Stop serving a model (Triton, explicit model control)",
             **CONTROL)
async def unload(name: str, request: Request, service: ServiceDep) -> dict[str, Any]:
    """Requests admitted before finish; later ones get 503 until the model is loaded again."""
    await _parameters(request)  # unload_dependents: a classifier has none
    await service.unload_model(name)
    return {}
