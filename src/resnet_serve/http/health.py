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
    default = service.default_pipeline
    info = default.engine.info if default else None
    unavailable = [f"{m.name}: {m.reason}" for m in service.models.values() if m.state == "UNAVAILABLE"]
    detail = service.failure or ("; ".join(unavailable) if unavailable else None)
    body = HealthResponse(status=status, weights=info.weights.source if info else None,
                          runtime=info.runtime if info else None, detail=detail)
    return JSONResponse(body.model_dump(), 200 if status == "ready" else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
