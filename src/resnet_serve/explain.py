"""Explanations ("why this class?"): Grad-CAM heatmaps, off the batching hot path.

Concurrency contract:
- One worker thread (``resnet-serve-explain``, a one-thread executor) runs explanations, one at
  a time: it decodes the upload, loads the model's eager FP32 copy on first use (then keeps it;
  one version per model: a version loaded in place of another drops the other's copy),
  runs Grad-CAM and draws the PNGs. Nothing else touches the eager networks, so they need no lock.
- It runs at the lowest CPU priority (``RESNET_SERVE_EXPLAIN_PRIORITY``, by default Linux's
  ``SCHED_IDLE``; nice 19 elsewhere), and the intra-op threads it starts inherit that: when ``/predict``'s threads need the cores they get
  them, and explanations use what is left (``benchmarks/explain_bench.py`` measures both).
- Admission: at most ``explain_queue`` explanations are waiting or running; one more is refused
  at once with 503 and Retry-After. The count drops when the worker finishes a job, not when its
  caller gives up, so it always says how much work the thread really has.
- A caller waits until its request deadline, then answers 504; its job is skipped if it has not
  started, or runs to the end with the result dropped if it has.
- ``close()``: jobs not yet started fail with 503 (``NotReady``), the running one finishes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from resnet_serve.backends import Explained
from resnet_serve.decode import decode
from resnet_serve.errors import DeadlineExceeded, InvalidParameter, NotReady, Overloaded
from resnet_serve.heatmaps import heatmap_image, image_box, overlay_image, place, png_base64, png_bytes
from resnet_serve.loading import open_explainer
from resnet_serve.repository import read_version
from resnet_serve.spec import ModelSpec
from resnet_serve.transform import to_pixels

LOWEST_PRIORITY = 19
MAX_EXPLAINED = 5  # classes per request: each costs one backward pass


class Explains(Protocol):
    """What explains a model: ``backends.torch.gradcam.GradCam`` (Grad-CAM on the eager network), or
    without torch ``backends.onnxruntime.OnnxCam`` (CAM from the ONNX graph); see ``loading``."""

    layer: str

    def __call__(self, pixels: np.ndarray, classes: list[int] | None = None, top_k: int = 1) -> Explained: ...


@dataclass(frozen=True)
class Target:
    """The model to explain: its spec, and the version folder that holds what explains it."""

    spec: ModelSpec
    version: int
    directory: Path | None
    weights: str = "custom"  # the source of the weights, as /predict reports it

    def classes(self, class_id: int | None, top_k: int) -> list[int] | None:
        """The classes asked for (None: the ``top_k`` most likely), checked against the model."""
        if not 1 <= top_k <= MAX_EXPLAINED:
            raise InvalidParameter(f"top_k must be 1-{MAX_EXPLAINED} for explanations, not {top_k}")
        if class_id is None:
            return None
        if not 0 <= class_id < self.spec.num_classes:
            raise InvalidParameter(f"class_id {class_id} is out of range: {self.spec.name} has "
                                   f"{self.spec.num_classes} classes (0-{self.spec.num_classes - 1})")
        return [class_id]


@dataclass(frozen=True)
class ClassMap:
    """One explained class: the map over the crop (``grid``, the network's resolution) and, for a
    JSON answer, the heatmap as a PNG of the image's own size (base64)."""

    class_id: int
    grid: np.ndarray
    heatmap_png: str | None


@dataclass(frozen=True)
class Explanation:
    """What one explanation answers."""

    probs: np.ndarray
    maps: list[ClassMap]
    layer: str
    method: str
    format: str
    width: int
    height: int
    box: tuple[float, float, float, float]
    explain_ms: float
    overlay_png: bytes | None = None


def lower_priority(priority: str) -> None:
    """Lower the calling thread's CPU priority (Linux: per thread, inherited by the threads it
    starts). ``idle``: ``SCHED_IDLE``, it runs when nothing else wants the CPU (elsewhere nice 19);
    ``low``: nice 19; ``normal``: unchanged. Measured in ``benchmarks/explain_bench.py``: with
    nice 19 /predict's p50 at c=8 on a 2-core machine grew 29% beside explanations, with
    ``SCHED_IDLE`` 8%. The price: on a machine kept busy by other processes too, explanations wait
    for them, up to their deadline."""
    if priority == "normal":
        return
    tid = threading.get_native_id()
    if priority == "idle":
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
            return
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, tid, LOWEST_PRIORITY)


class Explainer:
    """The explanation worker of one server: its thread, its bound, its eager networks."""

    def __init__(self, *, queue_limit: int, max_pixels: int, priority: str = "idle",
                 opener: Callable[[Target], Explains] | None = None) -> None:
        self.queue_limit = queue_limit
        self.max_pixels = max_pixels
        self.pending = 0  # waiting or running; changed on the event loop thread only
        self._opener = opener or _open_target
        self._networks: dict[tuple[str, int, Path | None], Explains] = {}
        self._closing = False
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="resnet-serve-explain", initializer=lower_priority, initargs=(priority,))

    async def explain(self, target: Target, data: bytes, deadline: float, *, classes: list[int] | None = None,
                      top_k: int = 1, overlay: bool = False) -> Explanation:
        """Explain one upload within the deadline, or refuse it at once if the queue is full."""
        if self._closing:
            raise NotReady("the service is shutting down", headers={"Retry-After": "1"})
        if not self.has_room():
            raise self.overloaded()
        loop = asyncio.get_running_loop()
        self.pending += 1
        job = self._pool.submit(self._run, target, data, classes, top_k, overlay)
        job.add_done_callback(lambda _: self._finished_on(loop))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded("no explanation within the request deadline") from None

    def has_room(self) -> bool:
        return self.pending < self.queue_limit

    def overloaded(self) -> Overloaded:
        return Overloaded(f"{self.pending} explanations waiting or running; try again shortly",
                          headers={"Retry-After": "2"})

    def _finished_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """From the worker thread: count the job done on the loop's thread (unless it has closed)."""
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._finished)

    def _finished(self) -> None:
        self.pending -= 1

    def _network(self, target: Target) -> Explains:
        key = (target.spec.name, target.version, target.directory)
        if key not in self._networks:
            for replaced in [k for k in self._networks if k[0] == target.spec.name]:
                del self._networks[replaced]
            self._networks[key] = self._opener(target)
        return self._networks[key]

    def _run(self, target: Target, data: bytes, classes: list[int] | None, top_k: int,
             overlay: bool) -> Explanation:
        """On the worker thread: decode, explain, draw."""
        if self._closing:
            raise NotReady("the service is shutting down; the explanation was not run")
        spec = target.spec
        decoded = decode(data, resize_size=spec.resize_size, max_pixels=self.max_pixels)
        network = self._network(target)
        started = time.perf_counter()
        explained = network(to_pixels(decoded.image, spec), classes, top_k)
        width, height = decoded.width, decoded.height
        box = image_box(width, height, spec)
        maps, overlay_png = [], None
        for class_id, grid in explained.grids.items():
            heatmap = None
            if not overlay:
                values, mask = place(grid, width, height, box)
                heatmap = png_base64(heatmap_image(values, mask))
            maps.append(ClassMap(class_id, grid, heatmap))
        if overlay:
            photo = decoded.image
            values, mask = place(maps[0].grid, photo.width, photo.height, image_box(photo.width, photo.height, spec))
            overlay_png = png_bytes(overlay_image(photo, values, mask))
        return Explanation(explained.probs, maps, explained.layer, explained.method, decoded.format, width, height, box,
                           (time.perf_counter() - started) * 1000.0, overlay_png)

    async def close(self, grace_s: float) -> None:
        """Refuse new work, fail what has not started, let the running one finish."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(self._pool.shutdown, wait=True), grace_s)


def _open_target(target: Target) -> Explains:
    version = read_version(target.spec.name, target.version, target.directory) if target.directory else None
    return open_explainer(version, target.spec)  # type: ignore[return-value]
