"""Probes and metrics for the platform: ``/health/live``, ``/health/ready`` and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from resnet_serve import metrics
from resnet_serve.http.dependencies import ServiceDep
from resnet_serve.http.schemas import HealthResponse

router = APIRouter()


@router.get("/health/live", response_model=HealthResponse, summary="The process is up")
async def live() -> HealthResponse:
    return HealthResponse(status="alive")


@router.get(
    "/health/ready",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "loading, failed, restarting or shutting down"}},
    summary="The model is loaded and warmed",
)
async def ready(service: ServiceDep) -> JSONResponse:
    status = service.readiness()
    weights = service.weights.source if service.weights else None
    runtime = service.pipeline.engine.info.runtime if service.pipeline else None
    body = HealthResponse(status=status, weights=weights, runtime=runtime, detail=service.failure)
    return JSONResponse(body.model_dump(), 200 if status == "ready" else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
