"""``GET /model`` and ``GET /labels``: what is served, with which settings, and its classes."""

from __future__ import annotations

import functools
from importlib import metadata

from fastapi import APIRouter

from resnet_serve.http.dependencies import ServiceDep
from resnet_serve.http.schemas import ErrorResponse, LabelEntry, LabelsResponse, ModelResponse
from resnet_serve.labels import Labels

router = APIRouter()


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def _labels_response(labels: Labels) -> LabelsResponse:
    entries = [LabelEntry(class_id=i, en=en, zh=zh) for i, (en, zh) in enumerate(zip(labels.en, labels.zh))]
    return LabelsResponse(count=len(labels), labels=entries)


@router.get("/model", response_model=ModelResponse, responses={503: {"model": ErrorResponse}},
            summary="The model being served, its runtime and its settings")
async def model_info(service: ServiceDep) -> ModelResponse:
    pipeline = service.ready_pipeline()
    info, settings, spec = pipeline.engine.info, service.settings, pipeline.spec
    return ModelResponse(
        name=info.name,
        weights=info.weights.source,
        weights_sha256=info.weights.sha256,
        weights_path=str(info.weights.path) if info.weights.path else None,
        runtime=info.runtime,
        platform=info.platform,
        device=info.device,
        precision=info.precision,
        channels_last=info.channels_last,
        compiled_from=info.compiled_from,
        start_s=info.start_s,
        cache_size=settings.cache_size,
        threads=info.threads,
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
    )


@router.get("/labels", response_model=LabelsResponse, summary="All class names, English and Chinese")
async def labels(service: ServiceDep) -> LabelsResponse:
    return _labels_response(service.spec.labels)
