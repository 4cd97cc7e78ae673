"""The one thread that runs the model, and the engine around it (any ``Backend``).

Concurrency contract:
- One dedicated OS thread (``resnet-serve-inference``) owns the backend. Nothing else ever calls
  it, so it needs no lock and the runtime's intra-op pool is never shared.
- Work reaches it through a ``queue.Queue`` of ``_Job``s: a batch's ``uint8`` images plus a
  ``concurrent.futures.Future``. The thread stacks the images itself (a lone image is a view,
  not a copy), so the event loop never waits on the copy. It resolves that future with the
  probabilities or the exception; ``asyncio.wrap_future`` hands the outcome to the event loop
  with ``call_soon_threadsafe``. An exception fails only that job; the thread goes on.
- ``close()`` puts a sentinel behind the jobs already queued, so they finish first; a job
  submitted after ``close()`` fails at once with ``NotReady``.
- If the thread dies anyway (a ``BaseException``), a ``finally`` fails the job it held and every
  queued job with ``NotReady`` (503). ``Engine`` starts a new thread on the next batch or health
  check (``ensure_running``); ``alive`` is false in between, so readiness says 503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resnet_serve.backends import PLATFORMS, TORCHSCRIPT, Backend
from resnet_serve.errors import InferenceFailed, NotReady
from resnet_serve.spec import ModelSpec
from resnet_serve.weights import WeightsInfo

logger = logging.getLogger(__name__)

Outcome = tuple[np.ndarray, float]  # probabilities of the batch, forward time in ms


@dataclass(frozen=True)
class Prediction:
    """One image's output and the batch it ran in."""

    probs: np.ndarray
    inference_ms: float
    batch_size: int


@dataclass
class ModelInfo:
    """The loaded model: its spec (so its labels and geometry travel with it), and what ``/model``
    and the protocol's metadata report about how it runs."""

    spec: ModelSpec
    version: int
    device: str
    precision: str
    weights: WeightsInfo
    threads: int
    runtime: str = TORCHSCRIPT
    runtime_reason: str = "configured"
    channels_last: bool = False
    compiled_from: str = "repository"
    max_batch_size: int = 1
    start_s: float = 0.0
    warmup_batch_ms: dict[int, float] = field(default_factory=dict)
    directory: Path | None = None  # the version folder it was loaded from (explanations read it)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def platform(self) -> str:
        return PLATFORMS[self.runtime]

    def batch_ms(self, n: int) -> float | None:
        """A batch of ``n``'s time: measured at warm-up, else the largest size measured scaled
        up linearly (an overestimate on a CPU, where a batch costs less per image); None if
        nothing was measured."""
        if n in self.warmup_batch_ms:
            return self.warmup_batch_ms[n]
        if not self.warmup_batch_ms:
            return None
        measured = max(self.warmup_batch_ms)
        return self.warmup_batch_ms[measured] * n / measured


@dataclass
class _Job:
    images: list[np.ndarray]
    future: concurrent.futures.Future[Outcome]


_STOP = object()


class InferenceThread:
    """Runs a backend on batches, one at a time, on its own thread."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._jobs: queue.Queue[_Job | object] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # orders submit() against close and death
        self._thread = threading.Thread(target=self._run, name="resnet-serve-inference", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        job: _Job | None = None
        try:
            self._backend.prepare_thread()
            while True:
                item = self._jobs.get()
                if item is _STOP:
                    return
                assert isinstance(item, _Job)
                job = item
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(self._forward(job.images))
                    except Exception as exc:  # the job fails; the thread lives on
                        job.future.set_exception(exc)
                job = None
        except BaseException:
            logger.critical("the inference thread died", exc_info=True)
        finally:
            self._fail_leftovers(job)

    def _fail_leftovers(self, current: _Job | None) -> None:
        """If the thread dies, no job it holds or that waits for it may hang."""
        with self._lock:
            self._closed = True
        died = NotReady("the inference thread stopped; the request was not run")
        if current is not None and not current.future.done():
            current.future.set_exception(died)
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Job) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(died)

    def _forward(self, images: list[np.ndarray]) -> Outcome:
        """Probabilities for the stacked batch, and the forward pass's own time in ms."""
        batch = images[0][np.newaxis] if len(images) == 1 else np.stack(images)
        start = time.perf_counter()
        probs = self._backend.run(batch)
        return probs, (time.perf_counter() - start) * 1000.0

    def submit(self, images: list[np.ndarray]) -> concurrent.futures.Future[Outcome]:
        future: concurrent.futures.Future[Outcome] = concurrent.futures.Future()
        with self._lock:
            if not self._closed:
                self._jobs.put(_Job(images, future))
                return future
        future.set_exception(NotReady("the inference thread is shut down"))
        return future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then stop the thread."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._jobs.put(_STOP)
        self._thread.join(timeout)


class Engine:
    """A loaded backend behind its inference thread, with an async ``predict``."""

    def __init__(self, backend: Backend, info: ModelInfo) -> None:
        self.info = info
        self.restarts = 0
        self._backend = backend
        self._closed = False
        self._thread = InferenceThread(backend)

    def ensure_running(self) -> bool:
        """Whether the inference thread runs; if it died (its jobs were already failed with 503),
        start a new one and say False this once, so a readiness probe reports the restart."""
        if self._closed or self._thread.alive:
            return True
        self.restarts += 1
        logger.error("the inference thread died; restarting it (restart %d)", self.restarts)
        self._thread = InferenceThread(self._backend)
        return False

    def warmup(self, max_batch_size: int, crop_size: int) -> None:
        """Run the batch sizes as often as the runtime needs to settle, and time each: every size
        for TorchScript, whose profiling executor specialises per shape and whose first calls
        optimise the graph, and once each for OpenVINO, which prepares each shape on its first
        call; batch 1 once for ONNX Runtime, which needs no warming per shape (a first batch of 4
        costs about what a later one does, ``benchmarks/start_bench.py``), so its run only proves
        the session serves before readiness says so."""
        every = self._backend.warmup_every_size
        for n in range(1, max_batch_size + 1) if every else [1]:
            images = [np.zeros((3, crop_size, crop_size), dtype=np.uint8)] * n
            for _ in range(self._backend.warmup_rounds):
                _, elapsed = self._thread.submit(images).result()
            self.info.warmup_batch_ms[n] = round(elapsed, 3)

    @property
    def alive(self) -> bool:
        return self._thread.alive

    async def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """Run ``images`` as one batch on the inference thread, split the result."""
        self.ensure_running()
        try:
            probs, elapsed = await asyncio.wrap_future(self._thread.submit(images))
        except NotReady:
            raise
        except Exception as exc:
            logger.exception("inference failed for a batch of %d", len(images))
            raise InferenceFailed(f"inference failed: {type(exc).__name__}") from exc
        n = len(images)
        return [Prediction(probs=probs[i], inference_ms=elapsed, batch_size=n) for i in range(n)]

    def close(self, timeout: float | None = None) -> None:
        self._closed = True
        self._thread.close(timeout)
