"""The service's runtime state, and the one path every image takes to its probabilities.

``Service`` owns the model (behind its batcher), the decode pool, the result cache, admission
control and readiness. ``classify()`` is the request path shared by every endpoint (our API
and the Open Inference Protocol):
    result cache → decode/resize/crop in a worker thread (``preprocess``) → queue (``batcher``)
    → one forward pass per batch on the inference thread (``engine``).
Everything here runs on the event loop thread except the decode pool and the inference thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from starlette.requests import Request

from resnet_serve import metrics
from resnet_serve.batcher import Batcher, Pending
from resnet_serve.cache import CachedResult, ResultCache
from resnet_serve.engine import Engine, Prediction
from resnet_serve.errors import DeadlineExceeded, MalformedRequest, NotReady, Overloaded
from resnet_serve.labels import Labels, Language
from resnet_serve.preprocess import preprocess
from resnet_serve.schemas import ImageInfo, PredictResponse, class_scores
from resnet_serve.settings import Settings
from resnet_serve.weights import LoadedWeights, ModelSpec, WeightsInfo

logger = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed", "shutting_down"]
HEAP_TRIM_INTERVAL_S = 5.0


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def release_free_heap() -> bool:
    """Give free heap pages back to the OS.

    After a large transient buffer is freed (a 10 MB upload that was refused, say), glibc raises
    its mmap threshold and later large buffers come from the heap, whose high-water mark then
    stays resident: RSS creeps up by the peak of concurrent large uploads. Trimming returns it.
    (Pinning the mmap threshold instead cost about a fifth of the throughput: torch's multi-MB
    activations would then be mapped and unmapped on every forward pass.)
    """
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


async def _trim_heap_forever(interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(release_free_heap)


@dataclass(frozen=True)
class Classified:
    """One image's probabilities with where the time went."""

    result: CachedResult
    preprocess_ms: float = 0.0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_size: int = 0
    cached: bool = False

    def response(self, labels: Labels, model: str, weights: str, filename: str | None, start: float,
                 top_k: int, lang: Language) -> PredictResponse:
        """The ``/predict`` answer (also Ray Serve's), timed from ``start`` (monotonic)."""
        result = self.result
        return PredictResponse(
            predictions=class_scores(labels, result.probs, top_k, lang),
            image=ImageInfo(format=result.format, width=result.width, height=result.height, filename=filename),
            preprocess_time_ms=round(self.preprocess_ms, 3),
            queue_time_ms=round(self.queue_ms, 3),
            inference_time_ms=round(self.inference_ms, 3),
            total_time_ms=round((time.monotonic() - start) * 1000.0, 3),
            batch_size=self.batch_size,
            cached=self.cached,
            model=model,
            weights=weights,
        )


class Service:
    """One app's runtime state: the model, its batcher, its decode pool and its readiness."""

    def __init__(self, settings: Settings, spec: ModelSpec, labels: Labels) -> None:
        self.settings = settings
        self.spec = spec
        self.labels = labels
        self.status: Status = "loading"
        self.failure: str | None = None
        self.weights: WeightsInfo | None = None
        self.engine: Engine | None = None
        self.batcher: Batcher[torch.Tensor, Prediction] | None = None
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="resnet-serve-decode"
        )
        self.queue_limit = settings.queue_limit()
        self.in_flight = 0
        self.cache = ResultCache(settings.cache_size)
        self._owns_engine = False
        self._heap_trimmer: asyncio.Task[None] | None = None

    def start(self, engine: Engine) -> None:
        """Put a warmed engine behind a batcher and declare the service ready."""
        s = self.settings
        self.engine, self.weights = engine, engine.info.weights
        self.queue_limit = s.queue_limit(engine.info.warmup_batch_ms.get(s.max_batch_size))
        info = engine.info
        metrics.MODEL_INFO.labels(info.name, info.device, info.precision, info.weights.source, s.runtime).set(1)
        self.batcher = Batcher(
            self._run_batch,
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            max_queue=self.queue_limit,
            dispatch=s.dispatch,
        )
        if _malloc_trim is not None:
            self._heap_trimmer = asyncio.get_running_loop().create_task(
                _trim_heap_forever(HEAP_TRIM_INTERVAL_S), name="resnet-serve-heap-trim")
        self.status = "ready"

    def begin_loading(self, weights: LoadedWeights) -> asyncio.Task[None]:
        """Compile and warm the model in the background; /health/ready says 503 meanwhile."""
        self.weights = weights.info
        return asyncio.create_task(self._load(weights), name="resnet-serve-load")

    async def _load(self, weights: LoadedWeights) -> None:
        try:
            engine = await asyncio.to_thread(Engine.load, self.spec, weights, self.settings)
        except Exception as exc:
            logger.exception("the model failed to load")
            self.status, self.failure = "failed", f"{type(exc).__name__}: {exc}"
            return
        self._owns_engine = True
        if self.status == "loading":
            self.start(engine)
            logger.info("ready: %s on %s (%s weights)", self.spec.name, engine.info.device, weights.info.source)

    async def _run_batch(self, images: list[torch.Tensor]) -> list[Prediction]:
        """The batcher's handler: the engine's forward pass, observed."""
        assert self.engine is not None and self.batcher is not None
        metrics.QUEUE_DEPTH.set(self.batcher.depth)
        metrics.BATCH_SIZE.observe(len(images))
        predictions = await self.engine.predict(images)
        metrics.INFERENCE_SECONDS.observe(predictions[0].inference_ms / 1000.0)
        return predictions

    def begin_shutdown(self) -> None:
        """Readiness false and new predictions refused; admitted requests carry on."""
        if self.status != "shutting_down":
            logger.info("shutting down: refusing new requests, finishing %d in flight", self.in_flight)
        self.status = "shutting_down"

    async def stop(self) -> None:
        self.begin_shutdown()
        if self._heap_trimmer is not None:
            self._heap_trimmer.cancel()
        grace = self.settings.shutdown_grace_s
        if self.batcher is not None:
            await self.batcher.close(grace_s=grace)
        if self.engine is not None and self._owns_engine:
            await asyncio.to_thread(self.engine.close, grace)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def admission_limit(self) -> int:
        """Requests allowed in flight at once: a full queue plus the batch being run."""
        return self.queue_limit + self.settings.max_batch_size

    def check_alive(self) -> bool:
        """True when the model can serve; restarts a dead inference thread (next probe: ready)."""
        if self.engine is None or self.engine.alive:
            return True
        self.engine.ensure_running()
        return False

    def has_room(self, count: int = 1) -> bool:
        return self.in_flight + count <= self.admission_limit

    def overloaded(self) -> Overloaded:
        return Overloaded(f"{self.in_flight} requests in flight; try again shortly", headers={"Retry-After": "1"})

    @contextlib.contextmanager
    def admitted(self, count: int = 1) -> Iterator[None]:
        """Hold ``count`` in-flight slots, or raise 503 at once if there are not enough."""
        if not self.has_room(count):
            raise self.overloaded()
        self.in_flight += count
        metrics.IN_FLIGHT.inc(count)
        try:
            yield
        finally:
            self.in_flight -= count
            metrics.IN_FLIGHT.dec(count)

    async def classify(self, data: bytes, deadline: float, request: Request | None = None) -> Classified:
        """Probabilities for one encoded image, from the cache or through the batcher.

        Readiness is checked when a request is admitted, not here: a request admitted before
        SIGTERM still runs while the service drains."""
        key = self.cache.key(data) if self.settings.cache_size else None  # no hashing when off
        if key is not None:
            hit = self.cache.get(key)
            metrics.CACHE_LOOKUPS.labels("hit" if hit is not None else "miss").inc()
            if hit is not None:
                return Classified(hit, cached=True)
        decode_start = time.monotonic()
        decoded = await asyncio.get_running_loop().run_in_executor(
            self.decode_pool, functools.partial(preprocess, data, self.spec, max_pixels=self.settings.max_pixels)
        )
        preprocess_ms = (time.monotonic() - decode_start) * 1000.0
        return await self._infer(decoded.tensor, deadline, request, key, decoded.format, decoded.width,
                                 decoded.height, preprocess_ms)

    async def classify_pixels(self, pixels: torch.Tensor, deadline: float, request: Request | None = None) -> Classified:
        """Probabilities for an already pre-processed ``uint8 [3, H, W]`` image."""
        height, width = pixels.shape[1:]
        return await self._infer(pixels, deadline, request, None, "tensor", int(width), int(height), 0.0)

    async def _infer(self, pixels: torch.Tensor, deadline: float, request: Request | None, key: bytes | None,
                     fmt: str, width: int, height: int, preprocess_ms: float) -> Classified:
        batcher = self._running_batcher()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the request deadline passed during pre-processing")
        pending = batcher.submit(pixels, timeout_s=remaining)
        metrics.QUEUE_DEPTH.set(batcher.depth)
        prediction = await _await_result(pending, request, remaining)
        metrics.QUEUE_WAIT_SECONDS.observe(pending.queue_ms / 1000.0)
        result = CachedResult(prediction.probs, fmt, width, height)
        if key is not None:  # a copy, so the cache does not keep the whole batch's tensor alive
            self.cache.put(key, CachedResult(prediction.probs.clone(), fmt, width, height))
        return Classified(result, preprocess_ms, pending.queue_ms, prediction.inference_ms, prediction.batch_size)

    def _running_batcher(self) -> Batcher[torch.Tensor, Prediction]:
        if self.batcher is None:
            raise NotReady("the model is not loaded", headers={"Retry-After": "1"})
        return self.batcher

    def ready_batcher(self) -> Batcher[torch.Tensor, Prediction]:
        """The gate for new requests: 503 unless ready (loading, failed or shutting down)."""
        if self.status != "ready" or self.batcher is None:
            detail = self.failure if self.status == "failed" else f"the service is {self.status}"
            raise NotReady(detail, headers={"Retry-After": "1"})
        return self.batcher


async def _client_gone(request: Request) -> None:
    """Return once the client disconnects (the body has been read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _await_result(pending: Pending[torch.Tensor, Prediction], request: Request | None,
                        timeout_s: float) -> Prediction:
    """Wait for the batch result; give up (and free the slot) on deadline or disconnect."""
    if request is None:
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout_s)
        except TimeoutError:
            pending.future.cancel()
            raise DeadlineExceeded("no result within the request deadline") from None
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait(
            (pending.future, watcher), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watcher.cancel()
    if pending.future.done():
        return pending.future.result()
    pending.future.cancel()
    if watcher in done:
        raise MalformedRequest("the client disconnected before the result was ready")
    raise DeadlineExceeded("no result within the request deadline")
