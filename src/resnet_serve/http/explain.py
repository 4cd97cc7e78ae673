"""``POST /explain``: the predictions and, per explained class, a Grad-CAM heatmap of the upload's
own size; with ``Accept: image/png``, the overlay of the first explained class as the answer.

Gated like ``/predict`` (service ready, a free place in the explainer's queue) before the upload
is read; the work itself runs on the explainer's thread (``resnet_serve.explain``), never on the
batching path, so predictions keep their latency.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from resnet_serve.explain import Explanation, Target
from resnet_serve.http.auth import require_api_key
from resnet_serve.http.dependencies import ExplainQuery, ExplainQueryDep, ServiceDep
from resnet_serve.http.predict import BINARY, ERROR_RESPONSES, multipart_body
from resnet_serve.http.schemas import ExplainedClass, ExplainResponse, ImageInfo, class_scores
from resnet_serve.http.uploads import FILE_FIELD, read_within, refused_upload
from resnet_serve.results import ImageResult

router = APIRouter(dependencies=[Depends(require_api_key)])

PNG = "image/png"
RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {"content": {PNG: {"schema": BINARY}},
          "description": "JSON; or with `Accept: image/png`, the photo with the first explained class's heatmap"},
    501: {"description": "this install cannot explain (no torch), or the model has no eager weights"},
}


def wants_png(accept: str | None) -> bool:
    """Whether the client prefers ``image/png`` to JSON (the first of the two it names)."""
    for part in (accept or "").split(","):
        media = part.split(";")[0].strip().lower()
        if media in (PNG, "application/json"):
            return media == PNG
    return False


def _answer(explanation: Explanation, target: Target, query: ExplainQuery, filename: str | None,
            start: float) -> ExplainResponse:
    labels = target.spec.labels
    result = ImageResult(explanation.probs, explanation.format, explanation.width, explanation.height)
    explained = [ExplainedClass(class_id=m.class_id, label=labels.name(m.class_id, query.lang),
                                label_en=labels.en[m.class_id], label_zh=labels.zh[m.class_id],
                                confidence=float(explanation.probs[m.class_id]), heatmap_png=m.heatmap_png or "",
                                grid=[[round(float(v), 4) for v in row] for row in m.grid])
                 for m in explanation.maps]
    return ExplainResponse(
        predictions=class_scores(labels, result, query.top_k, query.lang), explanations=explained,
        image=ImageInfo(format=explanation.format, width=explanation.width, height=explanation.height,
                        filename=filename),
        layer=explanation.layer, method=explanation.method, crop_box=tuple(round(v, 2) for v in explanation.box),  # type: ignore[arg-type]
        explain_time_ms=round(explanation.explain_ms, 3),
        total_time_ms=round((time.monotonic() - start) * 1000.0, 3),
        model=target.spec.name, model_version=target.version, weights=target.weights)


@router.post("/explain", response_model=ExplainResponse, responses=RESPONSES, summary="Why this class? Grad-CAM",
             description=f"Send the image as multipart field `{FILE_FIELD}` (or the raw body). Explains the "
                         "`top_k` most likely classes, or `class_id`. Runs one at a time beside the predictions, "
                         "at low CPU priority; 503 with Retry-After when its queue is full.",
             openapi_extra=multipart_body(FILE_FIELD, BINARY, raw=True))
async def explain(request: Request, query: ExplainQueryDep, service: ServiceDep) -> Response | ExplainResponse:
    start = time.monotonic()
    settings, explainer = service.settings, service.explainer
    target = service.explain_target(query.model)
    classes = target.classes(query.class_id, query.top_k)
    if not explainer.has_room():
        raise await refused_upload(request, explainer.overloaded(), max_bytes=settings.max_upload_bytes)
    (upload,) = await read_within(request, settings.request_timeout_s, max_bytes=settings.max_upload_bytes)
    overlay = wants_png(request.headers.get("accept"))
    explanation = await explainer.explain(target, upload.data, start + settings.request_timeout_s,
                                          classes=classes, top_k=query.top_k, overlay=overlay)
    if overlay:
        assert explanation.overlay_png is not None
        first = explanation.maps[0].class_id
        return Response(explanation.overlay_png, media_type=PNG, headers={
            "X-Class-Id": str(first), "X-Confidence": f"{float(explanation.probs[first]):.6f}",
            "X-Explain-Time-Ms": f"{explanation.explain_ms:.3f}"})
    return _answer(explanation, target, query, upload.filename, start)
