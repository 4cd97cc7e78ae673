"""``GET /models``, ``GET /model`` and ``GET /labels``: what is served, how, and its classes."""

from __future__ import annotations

import functools
from importlib import metadata

from fastapi import APIRouter

from resnet_serve.http.dependencies import ModelQueryDep, ServiceDep
from resnet_serve.http.schemas import (
    ErrorResponse,
    LabelEntry,
    LabelsResponse,
    ModelResponse,
    ModelsResponse,
    ModelSummary,
)
from resnet_serve.labels import Labels
from resnet_serve.service import ServedModel, Service

router = APIRouter()
MODEL_ERRORS = {404: {"model": ErrorResponse, "description": "no such model"},
                503: {"model": ErrorResponse, "description": "loading, unavailable or shutting down"}}


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def _labels_response(labels: Labels) -> LabelsResponse:
    entries = [LabelEntry(class_id=i, en=en, zh=zh) for i, (en, zh) in enumerate(zip(labels.en, labels.zh))]
    return LabelsResponse(count=len(labels), labels=entries)


def _summary(service: Service, slot: ServedModel) -> ModelSummary:
    summary = ModelSummary(name=slot.name, version=slot.version, state=slot.state, reason=slot.reason,
                           default=slot.name == service.default)
    if slot.pipeline is not None:
        info = slot.pipeline.engine.info
        summary.architecture, summary.num_classes = info.spec.architecture, info.spec.num_classes
        summary.runtime, summary.precision, summary.weights = info.runtime, info.precision, info.weights.source
    return summary


@router.get("/models", response_model=ModelsResponse, summary="Every model served, with its state")
async def models(service: ServiceDep) -> ModelsResponse:
    return ModelsResponse(default=service.default, models=[_summary(service, m) for m in service.models.values()])


@router.get("/model", response_model=ModelResponse, responses=MODEL_ERRORS,
            summary="A model (default: the default one), its runtime and its settings")
async def model_info(service: ServiceDep, query: ModelQueryDep) -> ModelResponse:
    pipeline = service.ready_pipeline(query.model)
    info, settings, spec = pipeline.engine.info, pipeline.settings, pipeline.spec
    return ModelResponse(
        name=info.name,
        version=info.version,
        architecture=spec.architecture,
        default=info.name == service.default,
        weights=info.weights.source,
        weights_sha256=info.weights.sha256,
        weights_path=str(info.weights.path) if info.weights.path else None,
        runtime=info.runtime,
        runtime_reason=info.runtime_reason,
        platform=info.platform,
        device=info.device,
        precision=info.precision,
        channels_last=info.channels_last,
        compiled_from=info.compiled_from,
        start_s=info.start_s,
        cache_size=settings.cache_size,
        threads=info.threads,
        instances=info.instances,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        dispatch=settings.dispatch,
        max_queue=pipeline.queue_limit,
        request_timeout_s=settings.request_timeout_s,
        max_upload_mb=settings.max_upload_mb,
        num_classes=spec.num_classes,
        input_size=spec.crop_size,
        warmup_batch_ms=info.warmup_batch_ms,
        torch_version=installed_version("torch"),
        onnxruntime_version=installed_version("onnxruntime"),
        openvino_version=installed_version("openvino"),
    )


@router.get("/labels", response_model=LabelsResponse, responses=MODEL_ERRORS,
            summary="A model's class names, English and Chinese")
async def labels(service: ServiceDep, query: ModelQueryDep) -> LabelsResponse:
    return _labels_response(service.ready_pipeline(query.model).spec.labels)
