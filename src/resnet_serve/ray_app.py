"""resnet-serve on Ray Serve, for more than one machine (the ``ray`` extra).

The same weights resolution, TorchScript engine, pre-processing, labels and response schema as
the single-process service; Ray provides the replicas, the HTTP proxy, autoscaling, and the
request batching (``@serve.batch``, Ray Serve's own dynamic batcher, in place of ours).

    serve run resnet_serve.ray_app:app                     # one replica, local Ray
    serve deploy deploy/ray/serve_config.yaml              # replicas and autoscaling from YAML

Replicas read their settings from ``RESNET_SERVE_*`` in their environment (``runtime_env`` in
the Serve config), or from overrides given to ``build_app``.
"""

# No ``from __future__ import annotations`` here: Ray's ingress wrapper hands FastAPI the methods
# in a way that loses postponed annotations, and ``request: Request`` would become a query field.
import asyncio
import time
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from resnet_serve.api import handle_error
from resnet_serve.cache import CachedResult
from resnet_serve.engine import Engine, Prediction
from resnet_serve.errors import ServeError
from resnet_serve.labels import Language, load_labels
from resnet_serve.preprocess import preprocess
from resnet_serve.schemas import HealthResponse, PredictResponse
from resnet_serve.service import Classified
from resnet_serve.settings import DEFAULT_TOP_K, MAX_TOP_K, Settings
from resnet_serve.uploads import read_upload
from resnet_serve.weights import RESNET18, resolve

api = FastAPI(title="resnet-serve on Ray Serve")
for _exc_type in (ServeError, RequestValidationError, StarletteHTTPException, Exception):
    api.add_exception_handler(_exc_type, handle_error)


@serve.deployment(
    name="ResnetServe",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=32,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
)
@serve.ingress(api)
class ResnetServe:
    """One replica: a warmed engine; Ray routes requests to it and batches them."""

    def __init__(self, overrides: "dict[str, Any] | None" = None) -> None:
        self.settings = Settings(**(overrides or {}))
        self.spec = RESNET18
        self.labels = load_labels(self.spec)
        weights = resolve(self.spec, self.settings)
        self.weights = weights.info
        self.engine = Engine.load(self.spec, weights, self.settings)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _infer(self, images: list[torch.Tensor]) -> list[Prediction]:
        return await self.engine.predict(images)

    @api.post("/predict", response_model=PredictResponse)
    async def predict(
        self,
        request: Request,
        top_k: int = Query(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K),
        lang: Language = Query("en"),
    ) -> PredictResponse:
        start = time.monotonic()
        upload = await read_upload(request, max_bytes=self.settings.max_upload_bytes)
        decoded = await asyncio.to_thread(preprocess, upload.data, self.spec, max_pixels=self.settings.max_pixels)
        preprocess_ms = (time.monotonic() - start) * 1000.0
        prediction = await self._infer(decoded.tensor)
        result = CachedResult(prediction.probs, decoded.format, decoded.width, decoded.height)
        classified = Classified(result, preprocess_ms, 0.0, prediction.inference_ms, prediction.batch_size)
        return classified.response(self.labels, self.spec.name, self.weights.source, upload.filename,
                                   start, top_k, lang)

    @api.get("/health/ready", response_model=HealthResponse)
    async def ready(self) -> HealthResponse:
        return HealthResponse(status="ready" if self.engine.alive else "restarting", weights=self.weights.source)

    def check_health(self) -> None:
        """Ray's own health check: a replica whose engine died is replaced."""
        if not self.engine.alive:
            raise RuntimeError("the inference thread is not running")


def build_app(overrides: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application, with settings overrides for every replica."""
    return ResnetServe.bind(overrides)


app = build_app()
