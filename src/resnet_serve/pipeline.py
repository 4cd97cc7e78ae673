"""One model's request path, as plain code with no HTTP in it:

    result cache → decode/resize/crop in the decode pool (``transform``) → admission-bounded
    queue (``batcher``) → one forward pass per batch on the inference thread (``inference``)

Concurrency contract: everything here runs on the event loop thread, except ``preprocess`` (in
the shared decode pool) and the forward pass (on the engine's inference thread). Admission
counts images and is decided before an upload is read or decoded: ``admitted()`` holds one of
``admission_limit`` slots (a full queue plus a batch for each instance running) or raises ``Overloaded`` at
once, and a request that finds more images in its body takes a slot for each as it finds them
(``Slots.take``), so the batcher's queue never holds more than the limit. A request waits for
its result until its deadline or until the caller's ``abandoned`` awaitable completes (the
client went away); either way its future is cancelled, and the batcher drops a cancelled
request before inference.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from resnet_serve import metrics
from resnet_serve.batcher import Batcher, Pending
from resnet_serve.cache import ResultCache
from resnet_serve.errors import DeadlineExceeded, MalformedRequest, Overloaded, PayloadTooLarge
from resnet_serve.inference import ModelInfo, Prediction
from resnet_serve.results import ImageResult
from resnet_serve.settings import Settings
from resnet_serve.transform import preprocess

Abandoned = Callable[[], Awaitable[object]]
T = TypeVar("T")


class Predictor(Protocol):
    """What the pipeline and the service need of an engine (tests put fakes here)."""

    info: ModelInfo

    async def predict(self, images: list[np.ndarray]) -> list[Prediction]: ...

    def ensure_running(self) -> bool: ...

    def close(self, timeout: float | None = None) -> None: ...


@dataclass
class Duration:
    """A count and the total time it took, as Triton's statistics report them."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class PipelineStats:
    """What the model answered, for the protocol's statistics extension."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    decode: Duration = field(default_factory=Duration)
    infer: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    infer_by_batch_size: collections.defaultdict[int, Duration] = field(
        default_factory=lambda: collections.defaultdict(Duration))
    last_inference_ms: int = 0


class Slots:
    """The in-flight slots one request holds: one per image, released together when it is answered."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self.held = 0

    def take(self, count: int = 1) -> None:
        """``count`` more slots, or 503 at once if there are not enough now; 413 if this request
        alone would need more than the model ever admits, since waiting would never help."""
        pipeline = self._pipeline
        if self.held + count > pipeline.admission_limit:
            raise PayloadTooLarge(f"{self.held + count} images in one request; this model admits at most "
                                  f"{pipeline.admission_limit} at a time: send them in smaller requests")
        if not pipeline.has_room(count):
            raise pipeline.overloaded()
        pipeline.hold(count)
        self.held += count


class Pipeline:
    """The request path of one model: its cache, its batcher and its engine."""

    def __init__(self, engine: Predictor, settings: Settings, decode_pool: Executor) -> None:
        self.engine = engine
        self.spec = engine.info.spec
        self.settings = settings
        self.stats = PipelineStats()
        self._decode_pool = decode_pool
        self.cache = ResultCache(settings.cache_size)
        instances = engine.info.instances
        self.queue_limit = settings.queue_limit(engine.info.batch_ms(settings.max_batch_size), instances)
        self.admission_limit = self.queue_limit + instances * settings.max_batch_size  # and the batches running
        self.in_flight = 0
        self.batcher: Batcher[np.ndarray, Prediction] = Batcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=None,  # bounded by admission, above
            dispatch=settings.dispatch,
            max_concurrent_batches=instances,
        )
        name = self.spec.name
        self._in_flight = metrics.IN_FLIGHT.labels(name)
        self._queue_depth = metrics.QUEUE_DEPTH.labels(name)
        self._queue_wait = metrics.QUEUE_WAIT_SECONDS.labels(name)
        self._batch_size = metrics.BATCH_SIZE.labels(name)
        self._inference_seconds = metrics.INFERENCE_SECONDS.labels(name)
        self._cache_lookups = {hit: metrics.CACHE_LOOKUPS.labels(name, "hit" if hit else "miss") for hit in (True, False)}

    def has_room(self, count: int = 1) -> bool:
        return self.in_flight + count <= self.admission_limit

    def overloaded(self) -> Overloaded:
        return Overloaded(f"{self.in_flight} images in flight; try again shortly", headers={"Retry-After": "1"})

    @contextlib.contextmanager
    def admitted(self) -> Iterator[Slots]:
        """Hold a slot for the request's first image, and any it takes later, until it is answered."""
        slots = Slots(self)
        try:
            slots.take()
            yield slots
        finally:
            self.hold(-slots.held)

    def hold(self, count: int) -> None:
        """Count ``count`` more images in flight (fewer, if negative), here and in the metrics."""
        self.in_flight += count
        self._in_flight.inc(count)

    async def predict_bytes(self, data: bytes, deadline: float, abandoned: Abandoned | None = None) -> ImageResult:
        """Probabilities for one encoded image, from the cache or through the batcher."""
        started = time.monotonic()
        key = self.cache.key(data) if self.cache.enabled else None  # no hashing when off
        if key is not None:
            hit = self.cache.get(key)
            self._cache_lookups[hit is not None].inc()
            (self.stats.cache_hit if hit is not None else self.stats.cache_miss).add(time.monotonic() - started)
            if hit is not None:
                self.stats.success.add(time.monotonic() - started)
                return hit
        image = await self._counted(started, asyncio.get_running_loop().run_in_executor(
            self._decode_pool, functools.partial(preprocess, data, self.spec, max_pixels=self.settings.max_pixels)
        ))
        preprocess_ms = (time.monotonic() - started) * 1000.0
        self.stats.decode.add(preprocess_ms / 1000.0)
        result = await self._counted(started, self._infer(
            image.pixels, deadline, abandoned, image.format, image.width, image.height, preprocess_ms))
        if key is not None:
            self.cache.put(key, result)
        self.stats.success.add(time.monotonic() - started)
        return result

    async def predict_pixels(self, pixels: np.ndarray, deadline: float,
                             abandoned: Abandoned | None = None) -> ImageResult:
        """Probabilities for an already pre-processed ``uint8 [3, H, W]`` image."""
        started = time.monotonic()
        height, width = pixels.shape[1:]
        result = await self._counted(started, self._infer(pixels, deadline, abandoned, "tensor", int(width),
                                                          int(height), 0.0))
        self.stats.success.add(time.monotonic() - started)
        return result

    async def _counted(self, started: float, work: Awaitable[T]) -> T:
        """``work``'s result; a failure is counted for the statistics before it propagates."""
        try:
            return await work
        except BaseException:
            self.stats.fail.add(time.monotonic() - started)
            raise

    async def _infer(self, pixels: np.ndarray, deadline: float, abandoned: Abandoned | None, fmt: str,
                     width: int, height: int, preprocess_ms: float) -> ImageResult:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the request deadline passed during pre-processing")
        pending = self.batcher.submit(pixels, timeout_s=remaining)
        self._queue_depth.set(self.batcher.depth)
        prediction = await await_result(pending, remaining, abandoned)
        self._queue_wait.observe(pending.queue_ms / 1000.0)
        self.stats.queue.add(pending.queue_ms / 1000.0)
        return ImageResult(prediction.probs, fmt, width, height, preprocess_ms, pending.queue_ms,
                           prediction.inference_ms, prediction.batch_size)

    async def _run_batch(self, images: list[np.ndarray]) -> list[Prediction]:
        """The batcher's handler: the engine's forward pass, observed."""
        self._queue_depth.set(self.batcher.depth)
        self._batch_size.observe(len(images))
        predictions = await self.engine.predict(images)
        seconds = predictions[0].inference_ms / 1000.0
        self._inference_seconds.observe(seconds)
        self.stats.infer.add(seconds, len(images))
        self.stats.infer_by_batch_size[len(images)].add(seconds)
        self.stats.last_inference_ms = int(time.time() * 1000)
        return predictions

    async def close(self, grace_s: float) -> None:
        await self.batcher.close(grace_s=grace_s)


async def await_result(pending: Pending[np.ndarray, Prediction], timeout_s: float,
                       abandoned: Abandoned | None = None) -> Prediction:
    """Wait for the batch result; give up (and free the slot) on deadline or when abandoned."""
    watcher = asyncio.ensure_future(abandoned()) if abandoned is not None else None
    waiting: set[asyncio.Future[object]] = {pending.future}  # type: ignore[arg-type]
    if watcher is not None:
        waiting.add(watcher)
    try:
        done, _ = await asyncio.wait(waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if watcher is not None:
            watcher.cancel()
        gave_up = not pending.future.done()
        if gave_up:  # the deadline, the client gone, or this task cancelled: the batcher drops it
            pending.future.cancel()
    if not gave_up:
        return pending.future.result()
    if watcher is not None and watcher in done:
        raise MalformedRequest("the client disconnected before the result was ready")
    raise DeadlineExceeded("no result within the request deadline")
