"""The service's lifecycle: find the models, load each behind its own pipeline, drain on shutdown.

Server states: ``loading`` (the repository is read, the default model possibly exported, the
models compiled and warmed in the background; readiness 503) → ``ready`` (every model has loaded
or failed, and at least one serves) → ``shutting_down`` (SIGTERM: readiness 503 at once, new
requests refused, admitted ones finish within the grace period); or ``failed`` if no model
can serve. Each model has its own state (Triton's names): ``LOADING``, ``READY``, or
``UNAVAILABLE`` with the reason (a missing or damaged artefact, say), which affects no other.

Start-up reads the repository, and for the default one resolves the weights, before the server
accepts requests, so a missing repository or ``RESNET_SERVE_WEIGHTS_MODE=official`` without the
official file stops the process. Everything here runs on the event loop thread; exporting and
loading run in a worker thread, one model after another.

Explicit model control (``RESNET_SERVE_MODEL_CONTROL=explicit``, Triton's name): a load reads the
repository again and loads the model's latest version beside the one served, which keeps serving
until the new one is warm; loads and unloads take turns (one lock). The swap is one assignment
on the event loop, and a request takes its pipeline and is admitted to it with no await in
between, so every request admitted to the old pipeline is counted there; the old one stops once
those have finished (within ``shutdown_grace_s``). No request is refused or lost by a swap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from resnet_serve import memory, metrics
from resnet_serve.errors import LoadFailed, ModelControlDisabled, ModelNotFound, ModelUnavailable, NotReady
from resnet_serve.explain import Explainer, Target
from resnet_serve.loading import (
    RepositoryPlan,
    default_spec,
    load_engine,
    model_settings,
    plan_repository,
    served_versions,
)
from resnet_serve.pipeline import Pipeline, Predictor
from resnet_serve.repository import ModelVersion, Repository, valid_name
from resnet_serve.settings import Settings

logger = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed", "shutting_down"]
ModelState = Literal["LOADING", "READY", "UNAVAILABLE"]


@dataclass
class ServedModel:
    """One model of the repository: the version served, its state and, once ready, its pipeline."""

    name: str
    version: int
    state: ModelState = "LOADING"
    reason: str | None = None
    pipeline: Pipeline | None = None


def _forget_info(pipeline: Pipeline) -> None:
    """Drop the model-info series of a pipeline that stops serving (before the next one sets its own)."""
    info = pipeline.engine.info
    metrics.MODEL_INFO.remove(info.name, info.device, info.precision, info.weights.source, info.runtime)


class Service:
    """One server's runtime state: its models, the shared decode pool, readiness."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.status: Status = "loading"
        self._shutdown_said = False
        self.failure: str | None = None
        self.models: dict[str, ServedModel] = {}
        self.versions: list[ModelVersion] = []
        self.default: str | None = None
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="resnet-serve-decode"
        )
        self.explainer = Explainer(queue_limit=settings.explain_queue, priority=settings.explain_priority,
                                   max_pixels=min(settings.max_pixels, settings.explain_max_pixels))
        self._engines: list[Predictor] = []
        self._root: Path | None = None  # the repository served, once read
        self._control = asyncio.Lock()  # loads and unloads take turns
        self._loader: asyncio.Task[None] | None = None
        self._heap_trimmer: asyncio.Task[None] | None = None

    async def start(self, engine: Predictor | None = None) -> None:
        """Serve ``engine`` at once as the only model (tests share one), or read the repository
        now and load its models in the background."""
        self._heap_trimmer = memory.start_heap_trimmer()
        if engine is not None:
            spec = engine.info.spec
            self.default = spec.name
            self.models[spec.name] = ServedModel(spec.name, engine.info.version)
            self._serve(self.models[spec.name], engine, self.settings)
            self.status = "ready"
            return
        plan = await asyncio.to_thread(plan_repository, self.settings)
        self._root = plan.root
        if plan.export is None:
            self._read(plan)
        else:
            self.default = default_spec(self.settings).name
        self._loader = asyncio.create_task(self._load_all(plan), name="resnet-serve-load")

    async def loaded(self) -> None:
        """Wait until the background load has finished (every model ready or unavailable)."""
        if self._loader is not None:
            await asyncio.shield(self._loader)

    def _read(self, plan: RepositoryPlan) -> None:
        """The versions in the repository; the latest of each is served."""
        self.versions, latest, self.default = served_versions(plan.root, self.settings.default_model)
        self.models = {name: ServedModel(name, v.version) for name, v in latest.items()}

    async def _load_all(self, plan: RepositoryPlan) -> None:
        exported, started = False, time.perf_counter()
        try:
            if plan.export is not None:
                exported = await asyncio.to_thread(plan.export)
                self._read(plan)
            for version in [v for v in self.versions if v.name in self.models
                            and v.version == self.models[v.name].version]:
                if self.status == "shutting_down":
                    return
                await self._load(version, exported, started if exported else None)
                exported = False  # only the first (the default model) was exported
        except Exception as exc:
            logger.exception("the models failed to load")
            self.status, self.failure = "failed", f"{type(exc).__name__}: {exc}"
            return
        await asyncio.to_thread(memory.release_free_heap)  # what exporting and warming up left behind
        if self.status == "loading":
            ready = [m for m in self.models.values() if m.state == "READY"]
            self.status = "ready" if ready else "failed"
            self.failure = None if ready else "; ".join(f"{m.name}: {m.reason}" for m in self.models.values())
            logger.info("ready: %s", ", ".join(f"{m.name}/{m.version} {m.state}" for m in self.models.values()))

    async def _load(self, version: ModelVersion, exported: bool, started: float | None) -> None:
        slot = self.models[version.name]
        settings = model_settings(version, self.settings)
        try:
            engine = await asyncio.to_thread(load_engine, version, self.settings, exported=exported, started=started)
        except Exception as exc:
            logger.error("model %s/%d is unavailable: %s", version.name, version.version, exc)
            slot.state, slot.reason = "UNAVAILABLE", str(exc)
            return
        self._engines.append(engine)
        self._serve(slot, engine, settings)

    def _serve(self, slot: ServedModel, engine: Predictor, settings: Settings) -> None:
        info = engine.info
        slot.pipeline = Pipeline(engine, settings, self.decode_pool)
        metrics.MODEL_INFO.labels(info.name, info.device, info.precision, info.weights.source, info.runtime).set(1)
        slot.state, slot.reason = "READY", None

    async def load_model(self, name: str) -> ServedModel:
        """Serve the latest version of ``name`` in the repository now: a model exported since the
        start, a new version, or one unloaded (one already served at its latest: nothing to do).
        A load that fails leaves what was served as it was."""
        root = self._controllable()
        async with self._control:
            versions = await asyncio.to_thread(Repository(root).versions)
            latest = {v.name: v for v in versions}
            if name not in latest or not valid_name(name):
                raise ModelNotFound(f"no model {name!r} in the repository {root} (it has {', '.join(latest)})")
            version, old = latest[name], self.models.get(name)
            if old is not None and old.version == version.version and old.pipeline is not None:
                return old
            try:
                engine = await asyncio.to_thread(load_engine, version, self.settings)
            except Exception as exc:
                raise LoadFailed(f"{name}/{version.version} failed to load: {exc}") from exc
            if self.status == "shutting_down":
                await asyncio.to_thread(engine.close, 0)
                raise NotReady("the service is shutting down")
            slot = ServedModel(name, version.version)
            if old is not None and old.pipeline is not None:
                _forget_info(old.pipeline)
            self._engines.append(engine)
            self._serve(slot, engine, model_settings(version, self.settings))
            self.models[name], self.versions = slot, versions
            if self.status == "failed":  # nothing served before this load
                self.status, self.failure = "ready", None
            logger.info("loaded %s/%d on request%s", name, version.version,
                        f", in place of version {old.version}" if old and old.version != version.version else "")
            if old is not None and old.pipeline is not None:
                await self._retire(old.pipeline)
            return slot

    async def unload_model(self, name: str) -> None:
        """Stop serving ``name``: its admitted requests finish, new ones get 503 until a load."""
        self._controllable()
        async with self._control:
            slot = self.model(name)
            self.models[slot.name] = ServedModel(slot.name, slot.version, "UNAVAILABLE", "unloaded")
            logger.info("unloaded %s/%d on request", slot.name, slot.version)
            if slot.pipeline is not None:
                _forget_info(slot.pipeline)
                await self._retire(slot.pipeline)

    def _controllable(self) -> Path:
        """The repository, if models may be loaded and unloaded now."""
        if self.settings.model_control != "explicit":
            raise ModelControlDisabled("loading and unloading models is off (RESNET_SERVE_MODEL_CONTROL=explicit "
                                       "turns it on)")
        if self._root is None or self.status in ("loading", "shutting_down"):
            raise NotReady(f"the service is {self.status}", headers={"Retry-After": "1"})
        return self._root

    async def _retire(self, pipeline: Pipeline) -> None:
        """A pipeline no new request can reach: wait for the ones admitted to it (within the
        shutdown grace), then stop its batcher and inference thread."""
        end = time.monotonic() + self.settings.shutdown_grace_s
        while pipeline.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.01)
        await pipeline.close(0)
        self._engines.remove(pipeline.engine)
        await asyncio.to_thread(pipeline.engine.close, self.settings.shutdown_grace_s)

    def model(self, name: str | None) -> ServedModel:
        """The model ``name`` (the default one for None), or 404 naming the models served
        (503 while the repository itself is still being prepared)."""
        name = name or self.default
        found = self.models.get(name) if name is not None and valid_name(name) else None
        if found is None:
            if self.status == "loading" and not self.models:
                raise NotReady("the service is loading", headers={"Retry-After": "1"})
            raise ModelNotFound(f"no model {name!r}; this server serves: {', '.join(self.models)}")
        return found

    def ready_pipeline(self, name: str | None = None) -> Pipeline:
        """The gate for new requests: 503 unless the model is loaded and the server not stopping.
        A model that is ready serves while the others still load."""
        if self.status in ("shutting_down", "failed"):
            detail = self.failure if self.status == "failed" else f"the service is {self.status}"
            raise NotReady(detail, headers={"Retry-After": "1"})
        slot = self.model(name)
        if slot.pipeline is not None:
            return slot.pipeline
        if slot.state == "LOADING":
            raise NotReady(f"model {slot.name} is loading", headers={"Retry-After": "1"})
        raise ModelUnavailable(f"model {slot.name} is unavailable: {slot.reason}")

    def model_ready(self, slot: ServedModel) -> bool:
        """Ready to serve now; a dead inference thread is restarted here (ready again next time)."""
        return (self.status in ("loading", "ready") and slot.pipeline is not None
                and slot.pipeline.engine.ensure_running())

    def readiness(self) -> str:
        """The status a readiness probe reports: ``restarting`` while an inference thread that
        died is being replaced (its requests were already failed with 503)."""
        if self.status != "ready":
            return self.status
        alive = [self.model_ready(m) for m in self.models.values() if m.pipeline is not None]
        return "ready" if all(alive) else "restarting"

    def explain_target(self, name: str | None = None) -> Target:
        """The model to explain, behind the same gate as predictions (ready, not stopping)."""
        info = self.ready_pipeline(name).engine.info
        return Target(info.spec, info.version, info.directory, info.weights.source)

    @property
    def default_pipeline(self) -> Pipeline | None:
        slot = self.models.get(self.default) if self.default else None
        return slot.pipeline if slot else None

    def begin_shutdown(self) -> None:
        """Readiness false and new predictions refused; admitted requests carry on. Nothing but
        an assignment: SIGTERM's handler calls this, and a signal handler can run in the middle
        of a write to the log, where a second write fails ("reentrant call") and, raised out of
        the handler, loses the signal. ``say_shutdown`` logs it, from the event loop."""
        self.status = "shutting_down"

    def say_shutdown(self) -> None:
        """The shutdown's log line: once, and only when something had started (not after a start
        that failed)."""
        if not self._shutdown_said and (self._loader is not None or self.models):
            self._shutdown_said = True
            in_flight = sum(m.pipeline.in_flight for m in self.models.values() if m.pipeline)
            logger.info("shutting down: refusing new requests, finishing %d in flight", in_flight)

    async def stop(self) -> None:
        self.begin_shutdown()
        self.say_shutdown()
        if self._loader is not None and not self._loader.done():
            await self._loader
        async with self._control:  # a load or unload under way finishes first (a load then gives up)
            pass
        if self._heap_trimmer is not None:
            self._heap_trimmer.cancel()
        grace = self.settings.shutdown_grace_s
        await asyncio.gather(self.explainer.close(grace),
                             *(m.pipeline.close(grace) for m in self.models.values() if m.pipeline))
        for engine in list(self._engines):
            await asyncio.to_thread(engine.close, grace)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
