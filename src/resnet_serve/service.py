"""The service's lifecycle: load the model, serve it through its pipeline, drain on shutdown.

States: ``loading`` (weights resolved; compiling and warming in the background, readiness 503)
→ ``ready`` → ``shutting_down`` (SIGTERM: readiness 503 at once, new requests refused, admitted
ones finish within the grace period); or ``failed`` if the model cannot be built.

Start-up resolves the weights before the server accepts requests, so
``RESNET_SERVE_WEIGHTS_MODE=official`` without the official file stops the process.
Everything here runs on the event loop thread; loading runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Literal

from resnet_serve import memory, metrics
from resnet_serve.errors import NotReady
from resnet_serve.loading import LoadedWeights, load_engine, resolve
from resnet_serve.pipeline import Pipeline, Predictor
from resnet_serve.settings import Settings
from resnet_serve.spec import ModelSpec
from resnet_serve.weights import WeightsInfo

logger = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed", "shutting_down"]


class Service:
    """One server's runtime state: the model's pipeline, the shared decode pool, readiness."""

    def __init__(self, settings: Settings, spec: ModelSpec) -> None:
        self.settings = settings
        self.spec = spec
        self.status: Status = "loading"
        self.failure: str | None = None
        self.weights: WeightsInfo | None = None
        self.pipeline: Pipeline | None = None
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="resnet-serve-decode"
        )
        self._owned_engine: Predictor | None = None
        self._loader: asyncio.Task[None] | None = None
        self._heap_trimmer: asyncio.Task[None] | None = None

    async def start(self, engine: Predictor | None = None) -> None:
        """Serve ``engine`` at once (tests share one), or resolve the weights now and build the
        model in the background."""
        if engine is not None:
            self._serve(engine)
            return
        weights = await asyncio.to_thread(resolve, self.spec, self.settings)
        self.weights = weights.info
        self._loader = asyncio.create_task(self._load(weights), name="resnet-serve-load")

    async def _load(self, weights: LoadedWeights) -> None:
        try:
            engine = await asyncio.to_thread(load_engine, self.spec, weights, self.settings)
        except Exception as exc:
            logger.exception("the model failed to load")
            self.status, self.failure = "failed", f"{type(exc).__name__}: {exc}"
            return
        self._owned_engine = engine
        if self.status == "loading":
            self._serve(engine)
            logger.info("ready: %s on %s (%s weights)", self.spec.name, engine.info.device, weights.info.source)

    async def loaded(self) -> None:
        """Wait until the background load has finished (ready or failed)."""
        if self._loader is not None:
            await asyncio.shield(self._loader)

    def _serve(self, engine: Predictor) -> None:
        info = engine.info
        self.weights = info.weights
        self.pipeline = Pipeline(self.spec, engine, self.settings, self.decode_pool)
        metrics.MODEL_INFO.labels(info.name, info.device, info.precision, info.weights.source, info.runtime).set(1)
        self._heap_trimmer = memory.start_heap_trimmer()
        self.status = "ready"

    @property
    def weights_source(self) -> str:
        return self.weights.source if self.weights else "unknown"

    def ready_pipeline(self) -> Pipeline:
        """The gate for new requests: 503 unless ready (loading, failed or shutting down)."""
        if self.status != "ready" or self.pipeline is None:
            detail = self.failure if self.status == "failed" else f"the service is {self.status}"
            raise NotReady(detail, headers={"Retry-After": "1"})
        return self.pipeline

    def readiness(self) -> str:
        """The status a readiness probe reports; a dead inference thread is restarted here and
        reported as ``restarting`` this once (the thread's jobs were already failed with 503)."""
        if self.status == "ready" and self.pipeline is not None and not self.pipeline.engine.ensure_running():
            return "restarting"
        return self.status

    def begin_shutdown(self) -> None:
        """Readiness false and new predictions refused; admitted requests carry on."""
        if self.status != "shutting_down":
            in_flight = self.pipeline.in_flight if self.pipeline else 0
            logger.info("shutting down: refusing new requests, finishing %d in flight", in_flight)
        self.status = "shutting_down"

    async def stop(self) -> None:
        self.begin_shutdown()
        if self._loader is not None and not self._loader.done():
            await self._loader
        if self._heap_trimmer is not None:
            self._heap_trimmer.cancel()
        grace = self.settings.shutdown_grace_s
        if self.pipeline is not None:
            await self.pipeline.close(grace)
        if self._owned_engine is not None:
            await asyncio.to_thread(self._owned_engine.close, grace)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
