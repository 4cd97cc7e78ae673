"""Dynamic request batching on the event loop.

Concurrency contract:
- Everything here runs on the event loop thread: ``submit()`` and one background task share a
  ``deque`` and an ``asyncio.Event``, so no lock is needed.
- ``submit()`` returns a ``Pending`` whose ``future`` the caller awaits. With a ``max_queue``,
  it admits a request only while the queue has room, otherwise it raises ``Overloaded`` at once
  (503 + ``Retry-After``): memory never grows without bound. ``max_queue`` counts the requests
  that wait behind a batch: while the model is idle, the next ``max_batch_size`` requests are
  that batch, even before the task has had its turn to take them, so a burst that lands between
  two turns of the loop is not refused for room it would have had a moment later. The pipeline
  passes no ``max_queue``: it bounds its requests once, at admission, before they are decoded.
- The task takes the oldest request and forms a batch by the dispatch policy:
    * ``eager`` (default): add whatever else is already queued, up to ``max_batch_size``, and
      dispatch now. The task collects only while the model has a free slot (see below), so a
      lone request never pays the batching window, and under load requests pile up while the
      batches run, so the next batch is full.
    * ``wait``: wait until the batch is full or its oldest request has waited ``max_wait_ms``.
- ``max_concurrent_batches`` (Ray Serve's name) is how many batches may run at once: the model's
  instances (``inference``). The task waits for a free slot before it collects a batch, runs each
  batch as a task of its own, and the slot frees when that task ends, however it ends: a done
  callback then fails whatever future of its batch is still pending (``NotReady``). With 1 (the
  default) one batch runs at a time.
- Before dispatch, a request whose future is already done (the caller timed out or the client
  went away) is dropped, and one past its deadline is failed with ``DeadlineExceeded``.
- The handler's results resolve the batch's futures one to one; if it raises, every future of
  that batch gets the exception (a ``ServeError`` as is, anything else as ``InferenceFailed``)
  and the next batch runs.
- ``close(grace_s)`` stops admitting (``NotReady``), lets the queue drain for up to
  ``grace_s``, then fails what is left with ``NotReady`` and stops the task and the batches
  still running (their requests get ``NotReady``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from resnet_serve.errors import (
    DeadlineExceeded,
    InferenceFailed,
    NotReady,
    Overloaded,
    ServeError,
)

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")
Handler = Callable[[list[In]], Awaitable[Sequence[Out]]]


@dataclass(eq=False)
class Pending(Generic[In, Out]):
    """One queued request: its input, its future, and when it entered and left the queue."""

    item: In
    future: asyncio.Future[Out]
    enqueued_at: float
    deadline: float
    dispatched_at: float | None = None

    @property
    def queue_ms(self) -> float:
        end = self.dispatched_at if self.dispatched_at is not None else time.monotonic()
        return (end - self.enqueued_at) * 1000.0


@dataclass
class BatcherStats:
    """What the batcher saw: batches run, requests in them, and requests it refused or dropped."""

    batches: int = 0
    items: int = 0
    rejected: int = 0
    expired: int = 0
    abandoned: int = 0
    failed_batches: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)


class Batcher(Generic[In, Out]):
    """Collects single requests into batches for ``handler`` (see the module docstring)."""

    def __init__(
        self,
        handler: Handler[In, Out],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int | None,
        dispatch: Literal["eager", "wait"] = "eager",
        max_concurrent_batches: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_concurrent_batches < 1 or (max_queue is not None and max_queue < 1):
            raise ValueError("max_batch_size, max_concurrent_batches and max_queue must be at least 1")
        self._handler = handler
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.dispatch = dispatch
        self.max_concurrent_batches = max_concurrent_batches
        self.stats = BatcherStats()
        self._queue: collections.deque[Pending[In, Out]] = collections.deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._running: set[asyncio.Task[None]] = set()  # the batches dispatched and not finished
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="resnet-serve-batcher")

    @property
    def depth(self) -> int:
        return len(self._queue)

    def _full(self) -> bool:
        """Whether the queue holds ``max_queue`` requests, plus the next batch of each free slot."""
        if self.max_queue is None:
            return False
        free = self.max_concurrent_batches - len(self._running)
        return len(self._queue) >= self.max_queue + free * self.max_batch_size

    def submit(self, item: In, *, timeout_s: float) -> Pending[In, Out]:
        """Queue ``item``; raise ``Overloaded`` or ``NotReady`` instead of waiting for room."""
        if self._closing:
            raise NotReady("the service is shutting down")
        if self._task.done():
            raise NotReady("the batcher has stopped")
        if self._full():
            self.stats.rejected += 1
            raise Overloaded(
                f"the queue is full ({self.max_queue} requests waiting)", headers={"Retry-After": "1"}
            )
        now = time.monotonic()
        pending: Pending[In, Out] = Pending(
            item=item,
            future=asyncio.get_running_loop().create_future(),
            enqueued_at=now,
            deadline=now + timeout_s,
        )
        self._queue.append(pending)
        self._arrived.set()
        return pending

    async def _next_batch(self) -> list[Pending[In, Out]]:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        batch = [self._queue.popleft()]
        if self.dispatch == "wait":
            window_ends = batch[0].enqueued_at + self.max_wait_s
            while len(batch) < self.max_batch_size:
                if not self._queue:
                    remaining = window_ends - time.monotonic()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except TimeoutError:
                        break
                    continue
                batch.append(self._queue.popleft())
        else:
            while self._queue and len(batch) < self.max_batch_size:
                batch.append(self._queue.popleft())
        return batch

    def _still_wanted(self, pending: Pending[In, Out], now: float) -> bool:
        if pending.future.done():
            self.stats.abandoned += 1
            return False
        if now >= pending.deadline:
            self.stats.expired += 1
            pending.future.set_exception(DeadlineExceeded("the request expired while queued"))
            return False
        return True

    async def _dispatch(self, batch: list[Pending[In, Out]]) -> None:
        try:
            results = await self._handler([p.item for p in batch])
            if len(results) != len(batch):
                raise InferenceFailed(f"handler returned {len(results)} results for {len(batch)}")
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
        except Exception as exc:
            self.stats.failed_batches += 1
            error = exc if isinstance(exc, ServeError) else InferenceFailed(f"batch failed: {exc!r}")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()  # released by _finished, or here if nothing is left to run
            batch = await self._next_batch()
            now = time.monotonic()
            live = [p for p in batch if self._still_wanted(p, now)]
            if not live:
                self._slots.release()
                continue
            for pending in live:
                pending.dispatched_at = now
            self.stats.batches += 1
            self.stats.items += len(live)
            self.stats.batch_sizes[len(live)] += 1
            task = asyncio.get_running_loop().create_task(self._dispatch(live), name="resnet-serve-batch")
            self._running.add(task)
            task.add_done_callback(functools.partial(self._finished, live))

    def _finished(self, batch: list[Pending[In, Out]], task: asyncio.Task[None]) -> None:
        """A batch's task ended, however (even cancelled before it started): its slot is free and
        no future of its batch is left pending."""
        self._running.discard(task)
        self._slots.release()
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(NotReady("the batch was interrupted"))

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop admitting; drain for up to ``grace_s``; fail whatever is left with ``NotReady``."""
        self._closing = True
        end = time.monotonic() + grace_s
        while (self._queue or self._running) and time.monotonic() < end and not self._task.done():
            await asyncio.sleep(0.01)
        self._task.cancel()
        for task in self._running:
            task.cancel()
        await asyncio.gather(self._task, *self._running, return_exceptions=True)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(NotReady("the service shut down before this request ran"))
