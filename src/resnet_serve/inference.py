"""The threads that run the model (one per instance), and the engine around it (any ``Backend``).

Concurrency contract:
- One dedicated OS thread (``resnet-serve-inference``) per instance of the backend
  (``Backend.instances``, ``RESNET_SERVE_INSTANCES``, 1 by default) runs it. Nothing else ever
  calls it; with several instances each thread runs its own batch at the same time, on the one
  loaded model, which each runtime allows (``backends``), each with its share of the threads.
- Work reaches them through one ``queue.Queue`` of ``_Job``s, taken by whichever thread is free
  (the batcher keeps at most one batch in flight per instance): a batch's ``uint8`` images plus a
  ``concurrent.futures.Future``. The thread stacks the images itself (a lone image is a view,
  not a copy), so the event loop never waits on the copy. It resolves that future with the
  probabilities or the exception; ``asyncio.wrap_future`` hands the outcome to the event loop
  with ``call_soon_threadsafe``. An exception fails only that job; the thread goes on.
- ``close()`` puts a sentinel per thread behind the jobs already queued, so they finish first; a job
  submitted after ``close()`` fails at once with ``NotReady``.
- If a thread dies anyway (a ``BaseException``), it fails the job it held and every queued job
  with ``NotReady`` (503), and stops the other instances after the job each runs. ``Engine``
  starts a new set of threads on the next batch or health check (``ensure_running``); ``alive``
  is false in between, so readiness says 503. The new threads take no job before the old ones
  have finished theirs, so no more than ``instances`` calls run at once on the cores; a survivor
  stuck past ``SURVIVOR_WAIT_S`` is waited for no longer (and logged), so it cannot stop serving.
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
    instances: int = 1  # batches run at once, each on an inference thread of its own
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
SURVIVOR_WAIT_S = 10.0  # how long restarted threads wait for an instance of the old set to finish its batch


class InferenceThread:
    """Runs a backend on batches on its own threads: one, or one per instance (see the module's
    notes), taking jobs from one queue."""

    def __init__(self, backend: Backend, after: InferenceThread | None = None) -> None:
        """``after``: the set these threads replace; they wait for its threads to finish."""
        self._backend = backend
        self._predecessors = list(after._threads) if after is not None else []
        self._jobs: queue.Queue[_Job | object] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # orders submit() against close and death
        count = backend.instances
        self._threads = [threading.Thread(target=self._run, name="resnet-serve-inference" + (f"-{i}" if i else ""),
                                          daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        job: _Job | None = None
        try:
            deadline = time.monotonic() + SURVIVOR_WAIT_S
            for old in self._predecessors:  # a survivor of the set replaced ends its job first
                old.join(max(0.0, deadline - time.monotonic()))
                if old.is_alive():
                    logger.warning("%s still runs its batch after %.0f s; serving beside it", old.name,
                                   SURVIVOR_WAIT_S)
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
            logger.critical("an inference thread died", exc_info=True)
            self._fail_leftovers(job)

    def _fail_leftovers(self, current: _Job | None) -> None:
        """If a thread dies, no job it holds or that waits in the queue may hang, and the others
        stop after the job they run (a new set of threads replaces them all, ``Engine``)."""
        with self._lock:
            self._closed = True
        died = NotReady("the inference thread stopped; the request was not run")
        if current is not None and not current.future.done():
            current.future.set_exception(died)
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(died)
        for _ in self._threads:
            self._jobs.put(_STOP)

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
        """Whether every thread runs and none has died."""
        return not self._closed and all(thread.is_alive() for thread in self._threads)

    def close(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then stop the threads."""
        with self._lock:
            if not self._closed:
                self._closed = True
                for _ in self._threads:
                    self._jobs.put(_STOP)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


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
        self._thread = InferenceThread(self._backend, after=self._thread)
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
